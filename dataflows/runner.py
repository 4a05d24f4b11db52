"""Run a dataflow in this process with Bytewax recovery switched on.

Bytewax keeps source offsets (and its own state) in SQLite recovery partitions; after a crash
the same command resumes from the last snapshot. One worker per process: the engine and
kafka-python hold the GIL, so scale out with processes, not threads (ARCHITECTURE.md). The
processes are independent shards (``recsys run --processes N``, or ``--shards N --shard i``
each; :mod:`dataflows.shards`), each one such single-worker flow, not one Bytewax cluster
(``-i/-a``): a cluster's workers would share one state directory and only one of them would
read the catalog.
"""

from __future__ import annotations

import signal
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main


def recovery_config(recovery_dir: str | None) -> RecoveryConfig | None:
    """Initialise the recovery directory on first use; None switches recovery off."""
    if not recovery_dir:
        return None
    path = Path(recovery_dir)
    if not path.exists() or not any(path.iterdir()):
        path.mkdir(parents=True, exist_ok=True)
        init_db_dir(path, 1)
    return RecoveryConfig(path)


def run(flow: Dataflow, *, recovery_dir: str | None, snapshot_interval_s: float) -> None:
    """Block until the flow ends (sources exhausted) or the process is stopped."""
    run_main(
        flow,
        epoch_interval=timedelta(seconds=snapshot_interval_s),
        recovery_config=recovery_config(recovery_dir),
    )


# ------------------------------------------------------------------------------ orderly stop
#
# Why the flow ends its input instead of letting a KeyboardInterrupt through: Bytewax 0.21
# turns any Python exception raised inside the run (a KeyboardInterrupt from Ctrl-C included,
# whether raised in our source calls or by its own signal check) into a Rust panic of the
# worker, caught again in ``run_main``. The panic is real, so Rust's panic hook prints
# "thread '<unnamed>' panicked at src/run.rs:..." on every stop (bytewax issue #318, "Abort
# on exception without panicking"; #268 asks for the graceful stop done here). The only
# stop Bytewax treats as normal is the end of every input: then it closes the last epoch
# (the sinks flush, the offsets and state are snapshotted) and ``run_main`` returns.


class StopSignals:
    """SIGINT and SIGTERM as one orderly stop of a flow run in this process.

    - ``loading()``: while the model and catalog load, a signal raises ``KeyboardInterrupt``
      at once (nothing has been read from Kafka yet, nothing to commit).
    - ``running()``: the first signal sets :attr:`requested`; every source wrapped by
      :func:`stoppable` ends its input at its next poll (a few ms), Bytewax closes the epoch
      and :func:`run` returns normally. A second signal raises ``KeyboardInterrupt``: an
      abrupt stop, which recovery resumes from the last snapshot.

    Handlers are installed for both signals explicitly: a process started in the background
    by a shell inherits an *ignored* SIGINT, and would otherwise never stop on it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.received: str | None = None

    def loading(self) -> "StopSignals":
        for sig in self.SIGNALS:
            signal.signal(sig, self._interrupt)
        return self

    def running(self) -> "StopSignals":
        for sig in self.SIGNALS:
            signal.signal(sig, self._request)
        return self

    def _interrupt(self, signum: int, _frame: object) -> None:
        self.received = signal.Signals(signum).name
        raise KeyboardInterrupt()

    def _request(self, signum: int, _frame: object) -> None:
        if self.requested.is_set():
            self._interrupt(signum, _frame)
        self.received = signal.Signals(signum).name
        self.requested.set()


class _StoppablePartition(StatefulSourcePartition[Any, Any]):
    def __init__(self, inner: StatefulSourcePartition[Any, Any], stop: threading.Event) -> None:
        self._inner = inner
        self._stop = stop

    def next_batch(self) -> list[Any]:
        if self._stop.is_set():
            self._inner.close()
            raise StopIteration()
        return self._inner.next_batch()

    def next_awake(self) -> datetime | None:
        return None if self._stop.is_set() else self._inner.next_awake()

    def snapshot(self) -> Any:
        return self._inner.snapshot()

    def close(self) -> None:
        self._inner.close()


class StoppableSource(FixedPartitionedSource[Any, Any]):
    """``source`` whose every partition ends its input once ``stop`` is set (resume states
    unchanged: a restart continues from the offsets snapshotted at the stop)."""

    def __init__(self, source: FixedPartitionedSource[Any, Any], stop: threading.Event) -> None:
        self.source = source
        self.stop = stop

    def list_parts(self) -> list[str]:
        return self.source.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _StoppablePartition:
        return _StoppablePartition(self.source.build_part(step_id, for_part, resume_state), self.stop)


def stoppable(source: FixedPartitionedSource[Any, Any], stop: threading.Event | None) -> FixedPartitionedSource[Any, Any]:
    """``source`` itself when ``stop`` is None, else a :class:`StoppableSource` of it."""
    return source if stop is None else StoppableSource(source, stop)
