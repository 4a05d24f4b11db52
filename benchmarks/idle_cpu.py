"""CPU of an idle live flow: ``recsys run`` on an empty local broker, per thread.

    .venv/bin/python benchmarks/idle_cpu.py [--seconds 20] [--tree DIR] [--rounds 1]

Starts a local broker, then ``python -m recsys_cli run --create-topics`` (state and recovery
in a temporary directory) from ``--tree`` (default: this checkout; give another checkout to
compare trees side by side, alternating with ``--rounds``), waits for its ``ready`` line and a
few seconds more, and reads every thread's user + system time from ``/proc`` over ``--seconds``.
Prints the busy threads' share of one core, the total, the thread count and the number of TCP
connections the flow holds to the broker (one per Kafka client that is connected). Linux only;
asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recsys_cli.local_broker import LocalBroker

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def thread_ticks(pid: int) -> dict[str, int]:
    """``{tid: user + system clock ticks}`` of every thread of ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        out[task.name] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return out


def broker_connections(pid: int, port: int) -> int:
    """TCP connections of ``pid`` whose remote end is ``127.0.0.1:port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        remote_port = int(parts[2].split(":")[1], 16)
        if remote_port == port and parts[9] in inodes:
            count += 1
    return count


def measure(tree: Path, seconds: float, ready_timeout_s: float = 300.0) -> None:
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
        log = Path(work) / "flow.log"
        with log.open("wb") as fh:
            flow = subprocess.Popen(
                [sys.executable, "-m", "recsys_cli", "run", "--bootstrap-servers", broker.bootstrap, "--create-topics",
                 "--state-dir", f"{work}/state", "--recovery-dir", f"{work}/recovery", "--quiet"],
                cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + ready_timeout_s
            while not any(line.startswith("ready") for line in log.read_text(errors="replace").splitlines()):
                if flow.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the flow did not get ready:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
            time.sleep(5)  # past the start-up
            before = thread_ticks(flow.pid)
            time.sleep(seconds)
            after = thread_ticks(flow.pid)
            shares = {tid: (after[tid] - before.get(tid, 0)) / TICKS / seconds * 100 for tid in after}
            busy = sorted(((s, tid) for tid, s in shares.items() if s >= 0.5), reverse=True)
            print(f"tree {tree}: {len(after)} threads, {broker_connections(flow.pid, broker.port)} connections to the broker, "
                  f"load average {os.getloadavg()[0]:.1f}")
            for share, tid in busy:
                main = " (main)" if tid == str(flow.pid) else ""
                print(f"  thread {tid}{main}: {share:5.1f}% of a core")
            print(f"  total: {sum(shares.values()):.1f}% of a core over {seconds:g} s")
        finally:
            flow.terminate()  # SIGTERM: the orderly stop
            try:
                flow.wait(timeout=60)
            except subprocess.TimeoutExpired:
                flow.kill()
                flow.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--tree", action="append", type=Path,
                   help="a checkout to run recsys from (repeat to alternate between trees); default: this one")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    for _ in range(args.rounds):
        for tree in args.tree or [ROOT]:
            measure(tree.resolve(), args.seconds)


if __name__ == "__main__":
    main()
