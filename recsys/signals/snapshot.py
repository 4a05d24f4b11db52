"""Snapshots of the shared records, so a new or wiped shard need not replay the exchange log
from the beginning of time (issue 11: retention deletes it).

A snapshot is one file in a directory every shard can reach (``RECSYS_EXCHANGE_SNAPSHOT_DIR``:
a shared volume): every record under the shared prefixes (:func:`shared_prefixes`: the global
signals, and shared model state where the exchange defines it), read at one exchange-log
position between two atomic writes of the shard that wrote it, with that position and the last
sequence number applied from each origin. Those three are exactly what the shards agree on at a
log position, so any shard's snapshot at position ``P`` is every shard's state at ``P``: a shard
that loads it and applies the log from ``P + 1`` ends with the same bytes as the others, and
the per-origin sequence numbers keep exactly-once across the boundary (a message re-published
after ``P`` whose sequence number the snapshot already holds is skipped).

Why a file and not a compacted topic: the records are one consistent cut at one position, and
a compacted topic keeps the newest value *per key*, not a cut. Keys deleted between two cuts
(evicted sessions, an erasure's sessions) would have to be tombstoned and every cut fenced by
markers a reader must find; and the cut is large (hundreds of MB at scale) while the loader
wants all of it at once. A file written to a temporary name, fsynced and renamed is atomic,
self-checking (sha256 of its records in its header) and simple to copy, inspect or delete.

File: ``<topic>.<position, 20 digits>.snapshot`` = ``b"RXS1\\n"`` + one JSON header line
(:class:`SnapshotInfo` fields) + zlib of the records, each ``len(key)`` (4 bytes, little
endian), key, ``len(value)``, value, in prefix then key order.

Loading (:func:`bootstrap`) happens into a blank state (no exchange position, no shared
record), or into one whose position the log's start has passed (its shared records replaced,
its users kept): it writes a marker first, the records in chunks, and last the position, the
applied sequence numbers and the shard's next sequence number, removing the marker; a crash
part-way leaves the marker, and the next start clears the shared records and loads again.

>>> from recsys.store.kv import MemoryKV
>>> import tempfile
>>> kv = MemoryKV(); kv.write({b"pop:a": b"1", b"x:pos": b"41", b"x:a:0": b"7"})
>>> d = tempfile.mkdtemp(); info = write_snapshot(kv, d, "signal-exchange")
>>> (info.position, info.applied, info.records)
(41, {0: 7}, 1)
>>> fresh = MemoryKV(); bootstrap(fresh, d, "signal-exchange", origin=0).position
41
>>> fresh.get(b"pop:a"), fresh.get(b"x:seq")
(b'1', b'8')
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from recsys.signals.exchange import (
    APPLIED_PREFIX,
    OUTBOX_PREFIX,
    POSITION_KEY,
    SEQ_KEY,
    SHARED_PREFIXES,
    SIGNAL_PREFIXES,
)

if TYPE_CHECKING:
    from recsys.store.kv import KVStore

MAGIC = b"RXS1\n"
SUFFIX = ".snapshot"
#: Present while a snapshot is being loaded: a start that finds it loads again from scratch.
LOADING_KEY = b"x:boot"
#: Snapshots kept per topic by a writer (the newest ones; older are deleted after a write).
KEEP = 3
_CHUNK = 20_000  # records per atomic write while loading
_ZLIB_LEVEL = 1
_log = logging.getLogger(__name__)


class SnapshotError(RuntimeError):
    """A snapshot file that cannot be used (unreadable, wrong topic, damaged: checksum)."""


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot's header: the exchange topic, the log ``position`` it was cut at, ``applied``
    (origin -> last sequence number applied), the prefixes copied, how many ``records``, the
    sha256 of the records as stored, the global-signal checksum at that position
    (:func:`recsys.signals.exchange.signal_checksum`), when and by which shard it was written."""

    topic: str
    position: int
    applied: dict[int, int]
    prefixes: list[str]
    records: int
    sha256: str
    signal_sha256: str
    written_at_ms: int
    origin: int | None = None
    path: str | None = field(default=None, compare=False)
    file_bytes: int = field(default=0, compare=False)


def shared_prefixes() -> tuple[bytes, ...]:
    """The key prefixes every shard holds identically at a log position: the global signals
    and the shared models' checkpoint and replay log (the exchange's ``SHARED_PREFIXES``)."""
    return SHARED_PREFIXES


def snapshot_name(topic: str, position: int) -> str:
    """The file name of ``topic``'s snapshot at ``position`` (sorts by position).

    >>> snapshot_name("signal-exchange", 12)
    'signal-exchange.00000000000000000012.snapshot'
    """
    return f"{topic}.{position:020d}{SUFFIX}"


def _position_of(name: str, topic: str) -> int | None:
    head = topic + "."
    if not (name.startswith(head) and name.endswith(SUFFIX)):
        return None
    digits = name[len(head):-len(SUFFIX)]
    return int(digits) if len(digits) == 20 and digits.isdigit() else None


def list_snapshots(directory: str | os.PathLike[str], topic: str) -> list[tuple[int, Path]]:
    """``(position, path)`` of ``topic``'s snapshots in ``directory``, oldest first."""
    path = Path(directory)
    if not path.is_dir():
        return []
    found = [(pos, p) for p in path.iterdir() if (pos := _position_of(p.name, topic)) is not None]
    return sorted(found)


def _signal_digest(records: list[tuple[bytes, bytes]]) -> str:
    """:func:`recsys.signals.exchange.signal_checksum` over collected records (those under
    ``SIGNAL_PREFIXES``, prefix by prefix, in key order)."""
    digest = hashlib.sha256()
    for prefix in SIGNAL_PREFIXES:
        for key, value in records:
            if key.startswith(prefix):
                digest.update(len(key).to_bytes(4, "little") + key + len(value).to_bytes(4, "little") + value)
    return digest.hexdigest()


def read_shared(kv: KVStore) -> tuple[int, dict[int, int], list[tuple[bytes, bytes]]]:
    """The log position, the per-origin applied sequence numbers and every shared record, read
    between two writes (call it from the thread that writes ``kv``: then the three belong to
    one log position)."""
    raw = kv.get(POSITION_KEY)
    position = -1 if raw is None else int(raw)
    applied = {int(k[len(APPLIED_PREFIX):]): int(v) for k, v in kv.iter_prefix(APPLIED_PREFIX)}
    seen: dict[bytes, bytes] = {}
    for prefix in shared_prefixes():
        for key, value in kv.iter_prefix(prefix):
            seen[key] = value
    return position, applied, sorted(seen.items())


def _encode_records(records: list[tuple[bytes, bytes]]) -> bytes:
    parts = []
    for key, value in records:
        parts.append(len(key).to_bytes(4, "little") + key + len(value).to_bytes(4, "little") + value)
    return b"".join(parts)


def write_file(directory: str | os.PathLike[str], topic: str, position: int, applied: dict[int, int],
               records: list[tuple[bytes, bytes]], *, origin: int | None = None) -> SnapshotInfo:
    """Write one snapshot file atomically (temporary name, fsync, rename) and return its header."""
    body = _encode_records(records)
    info = SnapshotInfo(topic=topic, position=position, applied=dict(applied),
                        prefixes=[p.decode("latin-1") for p in shared_prefixes()], records=len(records),
                        sha256=hashlib.sha256(body).hexdigest(), signal_sha256=_signal_digest(records),
                        written_at_ms=int(time.time() * 1000), origin=origin)
    header = orjson.dumps({k: v for k, v in asdict(info).items() if k not in ("path", "file_bytes")},
                          option=orjson.OPT_NON_STR_KEYS)
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    final = target / snapshot_name(topic, position)
    tmp = target / f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(MAGIC + header + b"\n")
        fh.write(zlib.compress(body, _ZLIB_LEVEL))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    try:  # the rename itself survives a power loss once the directory is synced
        dir_fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return SnapshotInfo(**{**asdict(info), "path": str(final), "file_bytes": final.stat().st_size})


def write_snapshot(kv: KVStore, directory: str | os.PathLike[str], topic: str, *, origin: int | None = None) -> SnapshotInfo:
    """Read the shared records of ``kv`` at its exchange position and write them as a snapshot."""
    position, applied, records = read_shared(kv)
    return write_file(directory, topic, position, applied, records, origin=origin)


def read_header(path: str | os.PathLike[str]) -> SnapshotInfo:
    """A snapshot's header (the records are not read)."""
    with open(path, "rb") as fh:
        if fh.read(len(MAGIC)) != MAGIC:
            raise SnapshotError(f"{path}: not an exchange snapshot of version 1")
        line = fh.readline()
    try:
        head = orjson.loads(line)
        head["applied"] = {int(k): int(v) for k, v in head["applied"].items()}
        return SnapshotInfo(**head, path=str(path), file_bytes=Path(path).stat().st_size)
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
        raise SnapshotError(f"{path}: unreadable snapshot header: {exc}") from None


def read_records(path: str | os.PathLike[str]) -> tuple[SnapshotInfo, list[tuple[bytes, bytes]]]:
    """A snapshot's header and records, checked against the header's sha256."""
    info = read_header(path)
    with open(path, "rb") as fh:
        fh.read(len(MAGIC))
        fh.readline()
        packed = fh.read()
    try:
        body = zlib.decompress(packed)
    except zlib.error as exc:
        raise SnapshotError(f"{path}: damaged records ({exc})") from None
    if hashlib.sha256(body).hexdigest() != info.sha256:
        raise SnapshotError(f"{path}: damaged records (sha256 does not match its header)")
    records, at = [], 0
    while at < len(body):
        n = int.from_bytes(body[at:at + 4], "little")
        key = body[at + 4:at + 4 + n]
        at += 4 + n
        n = int.from_bytes(body[at:at + 4], "little")
        records.append((key, body[at + 4:at + 4 + n]))
        at += 4 + n
    if len(records) != info.records:
        raise SnapshotError(f"{path}: {len(records)} records, its header says {info.records}")
    return info, records


def newest_snapshot(directory: str | os.PathLike[str] | None, topic: str) -> SnapshotInfo | None:
    """The header of ``topic``'s newest readable snapshot in ``directory`` (None if there is none)."""
    if not directory:
        return None
    for _, path in reversed(list_snapshots(directory, topic)):
        try:
            info = read_header(path)
        except (SnapshotError, OSError):
            continue
        if info.topic == topic:
            return info
    return None


def is_blank(kv: KVStore) -> bool:
    """Whether ``kv`` holds no exchange position and no shared record (a new or wiped shard)."""
    if kv.get(POSITION_KEY) is not None or next(iter(kv.iter_prefix(APPLIED_PREFIX)), None) is not None:
        return False
    return all(next(iter(kv.iter_prefix(prefix)), None) is None for prefix in shared_prefixes())


def bootstrap(kv: KVStore, directory: str | os.PathLike[str] | None, topic: str, *, origin: int | None,
              log_start: int | None = None) -> SnapshotInfo | None:
    """Load ``topic``'s newest snapshot from ``directory`` into ``kv`` before the shard is built
    on it, when ``kv`` is blank, or holds a load a crash interrupted, or (``log_start`` given:
    the exchange log's first offset) has applied the log only to below ``log_start - 1`` while
    the snapshot is at or after it: then its shared records are replaced and its user state is
    kept. None when nothing was loaded (the state needs no snapshot, there is none, or none
    covers the gap: the caller refuses). Sets the shard's next sequence number after its
    origin's last one in the snapshot and drops its outbox messages the snapshot holds
    (``origin=None``: a reader that publishes nothing, the model trainer: neither).
    Raises :class:`SnapshotError` when every snapshot there is damaged."""
    interrupted = kv.get(LOADING_KEY) is not None
    raw = kv.get(POSITION_KEY)
    position = -1 if raw is None else int(raw)
    behind = log_start is not None and position + 1 < log_start
    if not interrupted and not behind and not is_blank(kv):
        return None
    info, records, damaged = None, [], []
    for _, path in reversed(list_snapshots(directory, topic) if directory else []):
        try:  # the newest readable one; a damaged file is passed over, by name
            info, records = read_records(path)
        except (SnapshotError, OSError) as exc:
            damaged.append(str(exc))
            _log.warning("exchange snapshot skipped: %s", exc)
            continue
        if info.topic == topic:
            break
        info = None
    if info is None:
        if interrupted or damaged:
            raise SnapshotError(f"no usable snapshot of {topic!r} in {directory}"
                                + (f" (damaged: {'; '.join(damaged)})" if damaged else "")
                                + (": a load into this state was interrupted; delete the state directory and start again"
                                   if interrupted else ""))
        return None
    if not interrupted and info.position <= position:
        return None  # the state is as far as the snapshot: the log (or the refusal) decides
    if behind and log_start is not None and info.position < log_start - 1:
        return None  # does not reach the log's start either: the caller refuses, naming both
    # a crash part-way, or a behind state: clear the shared records, then load whole
    stale = [key for prefix in shared_prefixes() for key, _ in kv.iter_prefix(prefix)]
    kv.write({LOADING_KEY: info.path.encode()})
    for at in range(0, len(stale), _CHUNK):
        kv.write({}, stale[at:at + _CHUNK])
    for at in range(0, len(records), _CHUNK):
        kv.write(dict(records[at:at + _CHUNK]))
    last = {POSITION_KEY: str(info.position).encode(),
            **{APPLIED_PREFIX + str(o).encode(): str(s).encode() for o, s in info.applied.items()}}
    gone = [key for key, _ in kv.iter_prefix(APPLIED_PREFIX) if key not in last]
    if origin is not None:
        raw_seq = kv.get(SEQ_KEY)
        mine = info.applied.get(origin, 0)
        last[SEQ_KEY] = str(max(mine + 1, 1 if raw_seq is None else int(raw_seq))).encode()
        gone += [key for key, _ in kv.iter_prefix(OUTBOX_PREFIX) if int(key[len(OUTBOX_PREFIX):]) <= mine]
    kv.write(last, [*gone, LOADING_KEY])
    return info


class SnapshotWriter:
    """Writes a snapshot of a running shard's shared records every ``interval_s``, unless a
    snapshot of the topic in ``directory`` is already that recent (another shard wrote it), and
    keeps the newest :data:`KEEP`. The records are read in the caller's thread between two
    writes (one log position); compressing and writing the file happen in a background thread,
    at most one at a time."""

    def __init__(self, directory: str | os.PathLike[str], topic: str, interval_s: float, *, origin: int | None = None,
                 keep: int = KEEP, clock=time.time) -> None:
        self.directory, self.topic, self.interval_s = Path(directory), topic, interval_s
        self.origin, self.keep, self.clock = origin, keep, clock
        self._last = clock()  # the first one after a full interval: a start is no moment to pause
        self._thread: threading.Thread | None = None
        self.written: list[SnapshotInfo] = []
        self._erasure_done = -1  # the newest erasure position whose older snapshots are deleted
        self.failures = 0
        self.read_s = 0.0  # time spent in the caller's thread reading the records (the pause)

    def due(self) -> bool:
        if self.interval_s <= 0 or self.clock() - self._last < self.interval_s:
            return False
        if self._thread is not None and self._thread.is_alive():
            return False
        newest = list_snapshots(self.directory, self.topic)
        if newest and time.time() - newest[-1][1].stat().st_mtime < self.interval_s:
            self._last = self.clock()  # another shard wrote one: wait a full interval again
            return False
        return True

    def maybe_write(self, kv: KVStore, *, wait: bool = False, force: bool = False, erased_at: int = -1) -> bool:
        """Start a snapshot when one is due (see the class); ``wait``: finish it before returning;
        ``force``: due or not (after one being written; still none at a position one already has).

        ``erased_at``: the log position of the newest erasure the shard applied
        (``SignalExchange.erased_at``). The snapshots before it hold the erased user's sessions:
        one at or past it is written now, whatever the interval, and every older one deleted
        (until 2026-12-07 they stayed until three newer ones had been written, at least 15
        minutes at the default interval, and for ever once the flow stopped)."""
        if erased_at > self._erasure_done and self._erase_before(erased_at):
            force = force or not (self._thread is not None and self._thread.is_alive())
        if force:
            self.close()
        elif not self.due():
            return False
        started = time.perf_counter()
        position, applied, records = read_shared(kv)
        self.read_s = time.perf_counter() - started
        self._last = self.clock()
        if position < 0:
            return False  # nothing applied from the log yet: nothing a later shard could start from
        if newest := list_snapshots(self.directory, self.topic):
            if newest[-1][0] >= position:
                return False  # one at this position (or later) exists
        self._thread = threading.Thread(target=self._write, args=(position, applied, records, erased_at),
                                        name="exchange-snapshot", daemon=True)
        self._thread.start()
        if wait:
            self.close()
        return True

    def _erase_before(self, erased_at: int) -> bool:
        """Delete the snapshots before ``erased_at`` if one at or past it exists (another shard's,
        or this one's last); True when none does yet, and this writer must write one."""
        held = list_snapshots(self.directory, self.topic)
        if not held or held[-1][0] < erased_at:
            return True
        for position, old in held:
            if position < erased_at:
                old.unlink(missing_ok=True)
        self._erasure_done = erased_at
        return False

    def _write(self, position: int, applied: dict[int, int], records: list[tuple[bytes, bytes]],
               erased_at: int = -1) -> None:
        try:
            self.written.append(write_file(self.directory, self.topic, position, applied, records, origin=self.origin))
            for _, old in list_snapshots(self.directory, self.topic)[:-self.keep]:
                old.unlink(missing_ok=True)
            if erased_at > self._erasure_done:
                self._erase_before(erased_at)
            # a temporary file left by a writer killed part-way (an hour old: not one being written)
            for stale in self.directory.glob(f".{self.topic}.*{SUFFIX}.*.tmp"):
                if time.time() - stale.stat().st_mtime > 3600:
                    stale.unlink(missing_ok=True)
        except OSError as exc:  # a full or unreachable volume must not stop the stream: counted, logged
            self.failures += 1
            _log.warning("exchange snapshot at position %d not written to %s: %s", position, self.directory, exc)

    def close(self) -> None:
        """Wait for a snapshot being written."""
        if self._thread is not None:
            self._thread.join()
