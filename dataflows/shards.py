"""Scale-out over processes: ``recsys run --processes N`` runs N shard processes and supervises them.

One Python process is bound to one core (the GIL); the flow is CPU bound. So the stream is
split by Kafka partition: shard ``i`` of ``N`` reads the ``events`` partitions ``p`` with
``p % N == i`` (producers key events by user, so every user belongs to exactly one shard),
reads the whole ``catalog`` topic (every shard needs every item), keeps its own RocksDB state
and Bytewax recovery under ``<dir>/shard-<i>``, and writes to the shared output topics. Each
shard is an ordinary single-process flow (``recsys run --shards N --shard i`` runs one by
hand, on this machine or another), with the same crash guarantees: a killed shard resumes
from its own recovery snapshot and skips what its state has already applied.

Without ``--share-signals`` the shards do not share the global signals (co-visitation,
transitions, popularity, session neighbours) nor the learned head and re-ranker: each learns them
from its own users' events, a 1/N sample of the stream. With it they share them through the
exchange log (docs/scale-out.md); with ``--model-trainer`` too, one more process, the model
trainer (:mod:`dataflows.trainer`), trains the head and the re-ranker from that log once and the
shards load its snapshots; it is stopped after the shards (it learns the log to its end first).

This module only starts, watches and stops the shard processes: settings travel as
``RECSYS_*`` variables (:meth:`Settings.to_env`), each output line is relayed with a
``[shard i]`` prefix, "ready" is printed once every shard is ready, and the "stopped:" totals
are summed. If one shard fails, the others are stopped and the exit status is the failure's,
so that whatever supervises this process restarts the set.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable

from recsys.settings import Settings

_PR_SET_PDEATHSIG = 1
#: After a stop, how long a shard may take to commit its epoch and exit before it is killed
#: (an orderly stop takes well under a second once the model is loaded).
STOP_GRACE_S = 30.0
#: The exit status of a shard stopped before its flow started (`recsys run` while loading).
INTERRUPTED = 130
#: ... and the statuses such a stop ends with: 130, or death by SIGINT. CPython (3.11, 3.12)
#: ends a `python -m` process, as each shard is, by re-raising SIGINT at exit when a
#: KeyboardInterrupt ever left code run by `exec` of a string, even one caught later (a sticky
#: flag; a script run by path exits 130 all the same): a signal landing in such code while the
#: model loads, a library's generated code for instance. Seen once in ~30 stops timed across the
#: load; the supervisor then exited 254 (-2), a failure, until 2026-12-06. And death by SIGTERM:
#: the supervisor's stop reached a shard in its first second, before `recsys run` installed its
#: handlers (the supervisor exited 241, -15, and an empty `stopped: ` line, until 2026-12-07).
STOPPED_WHILE_LOADING = (INTERRUPTED, -signal.SIGINT, -signal.SIGTERM)


def exit_status(code: int) -> int:
    """A child's return code as a shell gives it: 128 + N for death by signal N (Popen's -N).

    >>> exit_status(-9), exit_status(2), exit_status(0)
    (137, 2, 0)
    """
    return 128 - code if code < 0 else code


def how_it_ended(code: int) -> str:
    """``exited with status 2`` / ``was killed by SIGKILL``.

    >>> how_it_ended(-9), how_it_ended(3)
    ('was killed by SIGKILL', 'exited with status 3')
    """
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the shard gets SIGTERM if this supervisor dies (even by SIGKILL): no orphans."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def parse_totals(line: str) -> dict[str, int]:
    """``"stopped: a=1, b=2"`` -> ``{"a": 1, "b": 2}``.

    >>> parse_totals("stopped: applied=3, events_in=4")
    {'applied': 3, 'events_in': 4}
    """
    body = line.split(":", 1)[1]
    return {k.strip(): int(v) for k, v in (part.split("=") for part in body.split(",") if "=" in part)}


def summed_totals(lines: Iterable[str]) -> dict[str, int]:
    """The totals of several ``stopped:`` lines added up (the shards', and each shard's starts).

    >>> summed_totals(["stopped: applied=3, events_in=4", "stopped: applied=2, dead_letters=1"])
    {'applied': 5, 'events_in': 4, 'dead_letters': 1}
    """
    totals: dict[str, int] = {}
    for line in lines:
        for key, value in parse_totals(line).items():
            totals[key] = totals.get(key, 0) + value
    return totals


class Shard:
    """One shard process: its output relayed line by line, its ready and stopped lines kept
    (several stopped lines when it started again in place to read partitions added to a topic:
    their totals add up). ``module``: what it runs (``dataflows.trainer`` for the model trainer,
    index -1)."""

    def __init__(self, index: int, settings: Settings, emit: Callable[[str], None], module: str = "recsys_cli",
                 emit_err: Callable[[str], None] | None = None) -> None:
        self.index = index
        self.name = "trainer" if index < 0 else f"shard {index}"
        env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1", "RUST_BACKTRACE": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *(["run"] if module == "recsys_cli" else [])],
            stdout=subprocess.PIPE,
            # its stderr (status lines, one-line errors) to the supervisor's stderr: until 2026-12-07 both
            # went to stdout, and whoever watched the supervisor's stderr for errors saw none
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only, which forwards it
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.ready_line = ""
        self.stopped_lines: list[str] = []
        self.ready = threading.Event()
        self._emit = emit
        self._emit_err = emit_err if emit_err is not None else _to_stderr
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            if line.startswith("ready") and not self.ready_line:
                self.ready_line = line
                self.ready.set()
            elif line.startswith("stopped:"):
                self.stopped_lines.append(line)
            self._emit(f"[{self.name}] {line}")
        self.ready.set()  # ended (maybe before ready): wake whoever waits

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._emit_err(f"[{self.name}] {raw.rstrip(chr(10))}")

    def interrupt(self) -> None:
        # SIGTERM, not SIGINT: a shard started from a background job inherits an ignored
        # SIGINT; either way `recsys run` ends its input, commits the epoch and exits
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float | None = None) -> int:
        code = self.proc.wait(timeout_s)
        self._reader.join(5.0)
        self._err_reader.join(5.0)
        return code


def run_shards(settings: Settings, processes: int, *, emit: Callable[[str], None] = print,
               emit_err: Callable[[str], None] | None = None) -> int:
    """Run ``processes`` shards of ``settings`` until they all stop; returns the exit status.
    Each shard's stdout lines go to ``emit``, its stderr lines to ``emit_err`` (default: this
    process's stderr), prefixed ``[shard i]``."""
    if processes < 2:
        raise ValueError(f"run_shards needs at least 2 processes, got {processes}")
    if settings.shards != 1:
        raise ValueError("--processes starts every shard itself: do not combine it with --shards/--shard")
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            emit(line)
            sys.stdout.flush()

    def say_err(line: str) -> None:
        with lock:
            (emit_err or _to_stderr)(line)

    shards = [Shard(i, settings.replace(shards=processes, shard=i), say, emit_err=say_err) for i in range(processes)]
    # issue 11 train/serve split: one trainer beside the shards trains the shared models (dataflows/trainer.py)
    trainer = (Shard(-1, settings.replace(shards=processes), say, module="dataflows.trainer", emit_err=say_err)
               if settings.share_signals and settings.model_trainer else None)
    stopping = threading.Event()
    stop_at: list[float] = []
    received: list[str] = []  # the signal that asked for the stop (none: a shard failed)

    def stop(signum: int | None = None, *_: object) -> None:
        if signum is not None and not received:
            received.append(signal.Signals(signum).name)
        if not stop_at:
            stop_at.append(time.monotonic())
        stopping.set()
        for shard in shards:
            shard.interrupt()
        if trainer is not None:
            trainer.interrupt()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for shard in shards:
            while not shard.ready.wait(0.2) and not stopping.is_set():
                pass
        if all(shard.ready_line for shard in shards):
            say(f"ready: {processes} shard processes (" + "; ".join(
                f"shard {s.index} pid {s.proc.pid}: {s.ready_line.removeprefix('ready: ').split(';')[0]}" for s in shards
            ) + ")")
        codes: dict[int, int] = {}
        watched = [*shards, *([trainer] if trainer is not None else [])]
        while len(codes) < len(watched):
            if trainer is not None and not stop_at and all(s.index in codes for s in shards):
                stop_at.append(time.monotonic())
                trainer.interrupt()  # every shard has stopped: the trainer learns the log to its end and stops
            for shard in watched:
                if shard.index in codes:
                    continue
                try:
                    codes[shard.index] = shard.wait(0.2)
                except subprocess.TimeoutExpired:
                    if stop_at and time.monotonic() - stop_at[0] > STOP_GRACE_S:
                        say(f"[{shard.name}] still running {STOP_GRACE_S:.0f} s after the stop: killed")
                        shard.proc.kill()
                    continue
                if stopping.is_set() and codes[shard.index] in STOPPED_WHILE_LOADING:
                    codes[shard.index] = 0  # stopped while loading, as asked
                if codes[shard.index] != 0 and not stopping.is_set():
                    # on stderr, where the shards' own errors go (stdout until 2026-12-07)
                    say_err(f"[{shard.name}] {how_it_ended(codes[shard.index])}: stopping the other shards")
                    stop()
        failed = [exit_status(code) for code in codes.values() if code != 0]
        if received and not failed and not any(shard.stopped_lines for shard in shards):
            # every shard stopped before its flow ran: as one `recsys run` says it (until 2026-12-07
            # an empty `stopped: ` line and status 0)
            say_err(f"recsys run: stopped by {received[0]} before the flow started; no event was read from Kafka")
            return INTERRUPTED
        totals = summed_totals(line for shard in shards for line in shard.stopped_lines)
        say("stopped: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
        return failed[0] if failed else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for shard in [*shards, *([trainer] if trainer is not None else [])]:
            if shard.proc.poll() is None:
                shard.proc.kill()
                shard.proc.wait()
