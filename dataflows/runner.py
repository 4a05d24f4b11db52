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

import argparse
import errno
import fcntl
import io
import pickle
import shutil
import signal
import sqlite3
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main

from dataflows.kafka_io import topic_of_part


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
        self._unraisable_hook: Any = None  # Python's, while loading() has its own in place

    def loading(self) -> "StopSignals":
        for sig in self.SIGNALS:
            signal.signal(sig, self._interrupt)
        if self._unraisable_hook is None:
            self._unraisable_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def running(self) -> "StopSignals":
        """Switch to the orderly stop. A signal received while loading whose
        ``KeyboardInterrupt`` was dropped raises it again here, before the flow starts: Python
        runs a handler wherever the main thread is, and an exception raised inside a finalizer
        (``__del__``, a weakref callback: a library's object collected during the load) is
        printed as "Exception ignored" and lost (seen in CI: the flow went on to run)."""
        if self._unraisable_hook is not None:
            sys.unraisablehook, self._unraisable_hook = self._unraisable_hook, None
        if self.received is not None:
            raise KeyboardInterrupt()
        for sig in self.SIGNALS:
            signal.signal(sig, self._request)
        return self

    def _unraisable(self, unraisable: Any) -> None:
        """While loading: the ``KeyboardInterrupt`` of a signal that landed inside a finalizer is
        not printed ("Exception ignored in ...", a traceback an operator's Ctrl-C should not
        show: seen in CI); :meth:`running` stops the run for it. Anything else goes to Python's
        hook as before."""
        if issubclass(unraisable.exc_type, KeyboardInterrupt) and self.received is not None:
            return
        self._unraisable_hook(unraisable)

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
# ------------------------------------------------------------------ integrity at start


class StateBehindRecoveryError(RuntimeError):
    """The state directory has not processed everything below the recovery offsets: started,
    the flow would skip those messages for good."""


def bytewax_run_args() -> argparse.Namespace | None:
    """The command line of ``python -m bytewax.run`` that started this process (with its
    ``BYTEWAX_*`` variables); None when Bytewax's runner did not start it. Read with the
    runner's own parser, from the same ``sys.argv`` it parsed a moment before, so the two cannot
    disagree."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) != "bytewax.run":
        return None
    from bytewax.run import _parse_args  # private, but the one definition of that command line

    return _parse_args()


def bytewax_run_recovery_dir(args: argparse.Namespace | None) -> str | None:
    """The recovery directory of Bytewax's runner command line ``args`` (its ``-r``); None
    without one, or without ``args``."""
    found = None if args is None else args.recovery_directory
    return None if found is None else str(found)


def bytewax_run_layout_error(args: argparse.Namespace | None) -> str | None:
    """Why Bytewax's runner command line ``args`` cannot run the live flow, or None: the flow
    is one worker in one process. More workers a process (``-w``) would call the one engine from
    a thread each, and it is not made to be shared between threads; more processes in a Bytewax
    cluster (``-a``) would each read a share of the catalog topic, and on one machine open one
    state directory. Scale-out is ``recsys run --processes N``: independent shards, each such a
    flow (module docstring)."""
    if args is None:
        return None
    how = ("the flow runs one worker in one process; leave that out, and scale out with `recsys run --processes N` "
           "(or one `recsys run --shards N --shard i` a process)")
    workers = args.workers_per_process or 1
    if workers > 1:
        return (f"-w {workers} would run {workers} workers in this process, each calling the one engine from a thread "
                f"of its own, and the engine is not made to be shared between threads: {how}")
    processes = [a for a in (args.addresses or "").split(";") if a.strip()]
    if len(processes) > 1:
        return (f"-a names {len(processes)} processes of one Bytewax cluster, which would each read a share of the "
                f"catalog topic (and on one machine open one state directory): {how}")
    return None


def _resumed_snapshots(recovery_dir: str | None) -> dict[tuple[str, str], list[tuple[int, bytes | None]]]:
    """``(step_id, state_key) -> [(epoch, serialised state), ...]`` of the snapshots Bytewax 0.21
    resumes from, read from its SQLite recovery partitions (``{}`` when there is nothing to
    resume). Mirrors its own resume query: the resume epoch is the smallest frontier of the last
    execution's workers, and only snapshots before it count."""
    if not recovery_dir or not Path(recovery_dir).is_dir():
        return {}
    executions, frontiers, snaps = [], {}, {}
    for db in sorted(Path(recovery_dir).glob("*.sqlite3")):
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                executions += con.execute("SELECT ex_num, worker_count, resume_epoch FROM exs").fetchall()
                for ex, worker, front in con.execute("SELECT ex_num, worker_index, worker_frontier FROM fronts"):
                    frontiers[(ex, worker)] = max(front, frontiers.get((ex, worker), front))
                for step, key, epoch, ser in con.execute("SELECT step_id, state_key, snap_epoch, ser_change FROM snaps"):
                    snaps.setdefault((step, key), []).append((epoch, ser))
            finally:
                con.close()
        except sqlite3.DatabaseError as exc:  # a traceback until 2026-12-07 (a day-2 operator's probe)
            raise RecoveryStoreError(
                f"the recovery directory {recovery_dir} holds {db.name}, which is not a Bytewax recovery store Bytewax "
                f"could resume from ({exc}): it was damaged, truncated or replaced. Move {recovery_dir} aside (the state "
                f"records what was applied: the flow then reads its inputs again from their first offset and applies "
                f"nothing twice), or start again with --rebuild-state") from None
    if not executions:
        return {}
    ex, workers, resume = max(executions)
    resume_epoch = min(max(resume, frontiers.get((ex, w), resume)) for w in range(workers))
    resumed = {at: [v for v in versions if v[0] < resume_epoch] for at, versions in snaps.items()}
    return {at: versions for at, versions in resumed.items() if versions}


def recovered_offsets(recovery_dir: str | None) -> dict[tuple[str, int], int]:
    """``(topic, partition) -> next offset`` that Bytewax will resume each Kafka source
    partition from (:func:`_resumed_snapshots`: each state's newest snapshot before the resume
    epoch); ``{}`` when there is nothing to resume. Only integer source states named
    ``<topic>#<partition>`` (:class:`KafkaSource`) are kept."""
    out: dict[tuple[str, int], int] = {}
    for (_step, key), versions in _resumed_snapshots(recovery_dir).items():
        ser = max(versions)[1]
        part = topic_of_part(key)
        if ser is None or part is None or part[1] is None:
            continue
        state = _plain_unpickle(ser)
        if isinstance(state, int) and not isinstance(state, bool):
            out[(part[0], part[1])] = state
    return out


class RecoveryTopicsError(RuntimeError):
    """The recovery directory resumes a topic this flow does not read or write (renamed by a
    topic setting, or sharing switched off): Bytewax would stop at its first step with "Key
    StateKey(...) is not in this worker's routing map"."""


class RecoveryStoreError(RecoveryTopicsError):
    """A file of the recovery directory is not a recovery store SQLite can read (damaged,
    truncated, empty): refused like a recovery directory for other topics, in one line."""


def recovered_topics(recovery_dir: str | None) -> tuple[set[str], set[str]]:
    """The Kafka topics a recovery directory holds states of, as ``(read, written)``: the source
    partitions (``<topic>#<partition>``, :class:`dataflows.kafka_io.KafkaSource`) and the sinks'
    producers (``<topic>-producer``, :class:`dataflows.kafka_io.KafkaSink`) that Bytewax resumes
    (:func:`_resumed_snapshots`; a sink's state is None, but its key is routed all the same)."""
    read, written = set(), set()
    for _step, key in _resumed_snapshots(recovery_dir):
        if (part := topic_of_part(key)) is not None:
            (written if part[1] is None else read).add(part[0])
    return read, written


def check_recovery_topics(recovery_dir: str | None, *, reads: set[str], writes: set[str], state_dir: str,
                          exchange_topic: str | None = None) -> None:
    """Refuse to start, naming the topic and what to do, when the recovery directory resumes a
    topic this flow does not read (``reads``) or write (``writes``): a topic setting changed
    since it was written (e.g. ``--search-results-topic``). Bytewax resumes each input and
    output by its topic's name and would stop with a bare "not in this worker's routing map",
    at every start (seen 2026-12-06, forty-second session, restarting on a renamed output)."""
    read, written = recovered_topics(recovery_dir)
    gone = [f"read {t!r}" for t in sorted(read - reads)] + [f"wrote to {t!r}" for t in sorted(written - writes)]
    if not gone:
        return
    if exchange_topic is not None and exchange_topic in read - reads:  # not named until 2026-12-07
        gone[0] += " (the signal exchange: that flow ran with --share-signals, which this one does not)"
    raise RecoveryTopicsError(
        f"the recovery directory {recovery_dir} was written by a flow that {' and '.join(gone)}, which this one "
        f"does not (it reads {', '.join(map(repr, sorted(reads)))}; writes {', '.join(map(repr, sorted(writes)))}). "
        f"Bytewax resumes each input and output by its topic's name, so it cannot resume that directory. If a topic "
        f"was renamed, start with its old name (the topic flags, or RECSYS_*_TOPIC), or move {recovery_dir} aside: "
        f"the state in {state_dir} records what was processed, so the flow then reads its input topics again from "
        f"their first offset, skips what it had applied (nothing is applied twice) and sends again what no sink had "
        f"acknowledged."
    )


def _plain_unpickle(data: bytes) -> object:
    """Bytewax pickles snapshots; ours are plain ints. Refuse anything that names a class, so
    reading a recovery file never runs code."""

    class Plain(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            raise pickle.UnpicklingError(f"not a plain value: {module}.{name}")

    try:
        return Plain(io.BytesIO(data)).load()
    except pickle.UnpicklingError:
        return None


def check_state_against_recovery(
    processed: Mapping[tuple[str, int], int],
    recovery_dir: str | None,
    *,
    state_dir: str,
    legacy_watermarks: Mapping[tuple[str, int], int] | None = None,
) -> None:
    """Refuse to start when the state has not processed every message below the offsets the
    flow will resume from (state deleted, its write-ahead log truncated, an older backup
    restored): those messages would be skipped for good. ``processed``: the engine's last
    processed offset per partition (:attr:`recsys.shard.step.Shard.positions`).
    ``legacy_watermarks``: the applied-event watermarks, for state written before positions
    were kept (then only the partitions they name are checked)."""
    resume = recovered_offsets(recovery_dir)
    if not processed and legacy_watermarks:
        processed, resume = legacy_watermarks, {k: v for k, v in resume.items() if k in legacy_watermarks}
    behind = sorted((t, p, r, processed.get((t, p))) for (t, p), r in resume.items() if r > 0 and processed.get((t, p), -1) < r - 1)
    if not behind:
        return
    lines = "; ".join(
        f"{t}[{p}] resumes at offset {r}, the state has {'processed nothing' if done is None else f'processed up to {done}'}"
        for t, p, r, done in behind
    )
    raise StateBehindRecoveryError(
        f"the state in {state_dir} is behind the recovery offsets in {recovery_dir}: {lines}. Starting now would skip "
        f"the messages in between for good (the state directory was deleted, rolled back or lost its write-ahead log). "
        f"Rebuild it with `recsys run --rebuild-state` (deletes {state_dir} and {recovery_dir}, then replays every "
        f"topic from its earliest offset into fresh state), or put back the state directory that belongs with "
        f"this recovery directory."
    )


def start_notes(processed: Mapping[tuple[str, int], int], recovery_dir: str | None, *, reads: set[str], events: str,
                ignore: set[str] = frozenset()) -> list[str]:
    """Lines ``recsys run`` prints at start when the state and the recovery directory go together
    in a way that is allowed but costs something, said nowhere until 2026-12-07 (a day-2
    operator's probe): nothing to resume while the state has applied events (the recovery
    directory lost or moved aside: the inputs are read again from their first offset), and
    positions for topics this flow does not read while its ``events`` topic has none (a renamed
    or mirrored events topic: what it holds is new to the state). ``processed``: the engine's
    positions; ``ignore``: topics not to name (the signal exchange).

    >>> notes = start_notes({("evA", 0): 99, ("catalog", 0): 9}, None, reads={"evB", "catalog"}, events="evB")
    >>> notes[0][:70]
    'recovery: no recovery directory is set while the state has applied eve'
    >>> notes[1]
    "the state holds positions in 'evA', which this flow does not read, and none in 'evB', which it reads from its first offset: if 'evB' holds the events of 'evA' (a renamed or mirrored topic), they are applied again (only a short window of recent event ids per shopper is recognised as a repeat)"
    >>> start_notes({("evB", 0): 99}, None, reads={"evB"}, events="evB")[1:]  # the recovery note alone
    []
    """
    notes = []
    held = {t for t, _ in processed} - set(ignore)
    if held and not recovered_offsets(recovery_dir):
        where = f"{recovery_dir} holds nothing to resume" if recovery_dir else "no recovery directory is set"
        notes.append(f"recovery: {where} while the state has applied events: the inputs are read again from their "
                     f"first offset, what the state applied is skipped, and answers it kept for a re-delivery may be "
                     f"sent again, byte for byte")
    gone = sorted(held - reads)
    if gone and events not in held:
        was = ", ".join(map(repr, gone))
        notes.append(f"the state holds positions in {was}, which this flow does not read, and none in {events!r}, which "
                     f"it reads from its first offset: if {events!r} holds the events of {was} (a renamed or mirrored "
                     f"topic), they are applied again (only a short window of recent event ids per shopper is "
                     f"recognised as a repeat)")
    return notes


def open_elsewhere(path: Path) -> list[Path]:
    """The RocksDB databases under ``path`` that another process has open: RocksDB holds an
    ``fcntl`` lock on a database's ``LOCK`` file for as long as it is open, which a test lock
    taken here, and released at once, runs into."""
    held = []
    for lock in sorted(path.rglob("LOCK")) if path.is_dir() else ():
        try:
            with open(lock, "r+b") as fh:
                fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when fh closes
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                held.append(lock.parent)
    return held


def wipe_for_rebuild(state_dir: str, recovery_dir: str | None) -> list[str]:
    """Delete the state and recovery directories so the next start replays every topic from its
    earliest offset into fresh state (``recsys run --rebuild-state``); returns what was removed.
    Refuses a directory that holds the working directory or the home directory, and a state
    directory a running flow has open (until 2026-12-06 it deleted that flow's directories and
    ran beside it from the earliest offsets, sending every recommendation again)."""
    for d in (state_dir, recovery_dir):
        if d and (held := open_elsewhere(Path(d).resolve())):
            raise ValueError(f"--rebuild-state: {held[0]} is open in another process (its RocksDB lock is held): stop "
                             f"the `recsys run` on {state_dir} first; nothing was deleted")
    removed = []
    for d in (state_dir, recovery_dir):
        if not d:
            continue
        path = Path(d).resolve()
        if path in (Path("/"), Path.home().resolve()) or Path.cwd().resolve().is_relative_to(path):
            raise ValueError(f"--rebuild-state: refusing to delete {path} (it holds the working or home directory)")
        if path.exists():
            shutil.rmtree(path)
            removed.append(str(path))
    return removed


@dataclass
class RebuildMarks:
    """What ``recsys run --rebuild-state`` carries from the state and recovery directories it
    wipes into the fresh state (:func:`sent_before_rebuild`, :func:`mark_sent_before`)."""

    #: ``(topic, partition) -> offset`` below which every output a message triggered was delivered
    marks: dict[tuple[str, int], int] = field(default_factory=dict)
    #: the events the wiped state held waiting for their item (never answered); None: not known
    waiting: set[tuple[str, int, int]] | None = None
    #: the wiped state's outputs its sinks never acknowledged (``unsent:`` records), to send at start
    unsent: dict[bytes, bytes] = field(default_factory=dict)
    #: the stores and states that could not be read
    unread: list[str] = field(default_factory=list)

    def drop_past(self, log_ends: Mapping[tuple[str, int], int]) -> list[str]:
        """Drop the marks of partitions that no longer exist or whose log now ends below them
        (the topic was re-created, or a broker lost its records): what such a log holds now is
        new, and is sent. Until 2026-12-07 (an operator's probe) the rebuild that the "log ends at
        offset ..." refusal advises kept every answer for the new records back. Returns a note per
        mark dropped.

        >>> m = RebuildMarks(marks={("ev", 0): 277, ("ev", 1): 40, ("gone", 0): 5})
        >>> m.drop_past({("ev", 0): 83, ("ev", 1): 40}), m.marks
        (['ev[0] (its log ends at 83)', 'gone[0] (no such partition now)'], {('ev', 1): 40})
        """
        notes = []
        for at, mark in sorted(self.marks.items()):
            end = log_ends.get(at)
            if end is None or end < mark:
                notes.append(f"{at[0]}[{at[1]}] ({'no such partition now' if end is None else f'its log ends at {end}'})")
                del self.marks[at]
        return notes


def sent_before_rebuild(state_dir: str, recovery_dir: str | None) -> RebuildMarks:
    """What a rebuild must not send again, and what it must, read before :func:`wipe_for_rebuild`
    deletes it.

    The marks are the recovery stores' resume offsets (:func:`recovered_offsets`; Bytewax
    commits an epoch's source offsets only after its sinks flushed what the epoch sent): the
    directory's own, and each shard's (``shard-<i>``), the lowest where two read one partition
    (the catalog). Marks that an earlier rebuild left in the state count too (a rebuild killed
    part-way, then rebuilt again), the higher of the two. From the state (the directory's own
    and each shard's, when they can be read): the events it held waiting for their catalog item,
    whose answers were never sent however far below a mark they lie, and the outputs its sinks
    never acknowledged, which a plain restart would have sent and the rebuilt flow sends at its
    start instead. Until 2026-12-07 (an operator's probe) a mark the replay had passed was
    deleted before Bytewax committed an epoch past it, and a dead letter sent for an event whose
    wait ran out was sent again."""
    from recsys.shard.step import unsent_key, unsent_key_parts

    out = RebuildMarks()
    if recovery_dir:
        root = Path(recovery_dir)
        for store in [root, *sorted(root.glob("shard-*"))] if root.is_dir() else ():
            try:
                offsets = recovered_offsets(str(store))
            except Exception:  # noqa: BLE001 - a damaged store (RecoveryStoreError, a bad pickle): said, not fatal
                out.unread.append(str(store))
                continue
            for at, offset in offsets.items():
                out.marks[at] = min(offset, out.marks.get(at, offset))
    recovered = dict(out.marks)
    root = Path(state_dir)
    states = [d for d in [root / "rocks", *sorted(root.glob("shard-*/rocks"))] if (d / "CURRENT").is_file()]
    waiting: set[tuple[str, int, int]] | None = set() if states else None  # no state at all: not known
    for rocks in states:
        try:
            earlier, held, unsent = _read_wiped_state(rocks, recovered)
        except Exception:  # noqa: BLE001 - a damaged state (often why it is rebuilt): what it held is not known, said
            out.unread.append(str(rocks))
            waiting = None
            continue
        for at, offset in earlier.items():
            out.marks[at] = max(offset, out.marks.get(at, offset))
        if waiting is not None:
            waiting |= held
        for key, value in unsent.items():
            while key in out.unsent:  # two shards' stamps alike: the next free one
                output, stamp = unsent_key_parts(key)
                key = unsent_key(output, stamp + 1)
            out.unsent[key] = value
    out.waiting = waiting
    return out


def _replayed_left_out(unsent: dict[bytes, bytes], marks: Mapping[tuple[str, int], int]) -> dict[bytes, bytes]:
    """The unsent outputs less the dead letters of messages at or past their partition's mark:
    the replay reads and refuses those again (in the wiped state their batches' epoch was never
    committed), and sends that refusal.

    >>> import orjson
    >>> letters = [[None, orjson.dumps({"source": {"topic": "ev", "partition": 0, "offset": o}}).decode()] for o in (5, 9)]
    >>> kept = _replayed_left_out({b"unsent:dead_letters:1": orjson.dumps(letters)}, {("ev", 0): 8})
    >>> [orjson.loads(p)["source"]["offset"] for _, p in orjson.loads(kept[b"unsent:dead_letters:1"])]
    [5]
    """
    import orjson

    from recsys.shard.step import unsent_key_parts

    out = {}
    for key, raw in unsent.items():
        entries = orjson.loads(raw)
        if unsent_key_parts(key)[0] == "dead_letters":
            def below(payload: str) -> bool:
                src = orjson.loads(payload)["source"]
                return src["offset"] < marks.get((src["topic"], src["partition"]), 0)
            entries = [[k, payload] for k, payload in entries if below(payload)]
        if entries:
            out[key] = orjson.dumps(entries)
    return out


def _read_wiped_state(rocks: Path, recovered: Mapping[tuple[str, int], int]) -> tuple[
        dict[tuple[str, int], int], set[tuple[str, int, int]], dict[bytes, bytes]]:
    """An old state's rebuild marks, waiting positions and unsent outputs. The waiting positions
    are its waiting room's, and, when it was itself rebuilt, those its rebuild was told of that
    its replay had not answered in a committed epoch (:func:`_not_answered`)."""
    from recsys.shard.outbox import SENT_BEFORE_PREFIX, load_offsets, load_waiting_at_rebuild
    from recsys.shard.step import UNSENT_PREFIX
    from recsys.shard.waiting import parked_positions
    from recsys.store.kv import RocksKV

    kv = RocksKV(str(rocks), verify=False)
    try:
        waiting = _not_answered(load_waiting_at_rebuild(kv) or set(), recovered) | parked_positions(kv)
        return load_offsets(kv, SENT_BEFORE_PREFIX), waiting, dict(kv.iter_prefix(UNSENT_PREFIX))
    finally:
        kv.close()


def _not_answered(told: set[tuple[str, int, int]], recovered: Mapping[tuple[str, int], int]) -> set[tuple[str, int, int]]:
    """Of the waiting events an earlier rebuild was told of, those its replay had not answered
    in an epoch Bytewax committed (at or past the recovery offset of their partition): a rebuild
    killed before it reached them, then rebuilt again, answers them.

    >>> sorted(_not_answered({("ev", 0, 5), ("ev", 0, 50), ("ev", 1, 5)}, {("ev", 0): 40}))
    [('ev', 0, 50), ('ev', 1, 5)]
    """
    return {(t, p, o) for t, p, o in told if o >= recovered.get((t, p), 0)}


def mark_sent_before(state_dir: str, carried: RebuildMarks, *, events_topic: str, shards: int = 1, shard: int = 0,
                     unsent: bool = True) -> None:
    """Record what :func:`sent_before_rebuild` read in the fresh state at ``state_dir`` (one
    shard's, :meth:`recsys.settings.Settings.for_shard`), which the rebuilt flow then opens: of
    ``events_topic``'s marks, only the partitions the shard reads (``p % shards == shard``); the
    unsent outputs when ``unsent`` (one shard takes them all: any shard's sinks can send them)."""
    from recsys.shard.outbox import write_sent_before
    from recsys.store.kv import RocksKV

    own = {(t, p): o for (t, p), o in carried.marks.items() if t != events_topic or p % shards == shard}
    left = _replayed_left_out(carried.unsent, carried.marks) if unsent else {}
    if not own and not left:
        return
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    kv = RocksKV(str(Path(state_dir) / "rocks"), verify=False)
    try:
        write_sent_before(kv, own, carried.waiting)
        if left:
            kv.write(left)
    finally:
        kv.close()
