"""The train/serve split of the shared models (issue 11, docs/scale-out.md "Where it stops scaling").

With the models shared through the exchange log (:class:`recsys.signals.exchange.SharedModels`),
every shard trains the same head and re-ranker from the whole log: N shards do the same training
N times. With a trainer (``RECSYS_MODEL_TRAINER``) one :class:`ModelTrainer` reads the exchange
log once, trains the head and the re-ranker exactly as a sharing shard does (the very
:class:`SharedModels` code, in log order), and publishes versioned model snapshots; the shards
skip the models' training (they still seal the training inputs into their messages) and load the
newest snapshot between two batches, serving on with the models they hold meanwhile. A
recommendation names the log position of the snapshot's models (``...@x<position>``), as before.

Where the snapshots go: files in the snapshot directory the shards already share for
bootstrapping (``RECSYS_EXCHANGE_SNAPSHOT_DIR``), not a compacted topic. A snapshot is one blob
(the head's parameters and the re-ranker's weights, 1.2 MB at 384 dimensions), replaced whole
each time: a compacted topic would keep it under one key, but a broker refuses messages over its
``message.max.bytes`` (1 MB by default), so the blob would have to be cut in parts with a marker
saying which parts make one version, and a shard would read them all back at start. A file
written to a temporary name, fsynced and renamed is atomic, names its version in its file name
(a shard checks for a newer one with one directory listing), and the shards already need that
directory. The cost: the shards and the trainer must reach one directory (a shared volume), as
bootstrapping already requires.

Crash safety: the trainer's state is a RocksDB store of its own holding the exchange position,
the last sequence number applied per origin, and the models as :class:`SharedModels` persists
them (a checkpoint plus each message learned since, re-learned on start), all in one atomic
write per call of :meth:`ModelTrainer.apply`. So a killed trainer resumes where its last write
left it: no example is learned twice and none skipped (a message re-delivered at an old position,
or published twice by its origin, is skipped as shards skip it). A snapshot is published only
after the write that holds its models, so no snapshot is ever ahead of the trainer's own state;
the same version published again after a restart is the same file. (A trainer stopping in order
checkpoints its models, so its restart learns nothing again; after a kill it learns the messages
since its last checkpoint again, with the catalog as it is then: an item whose text changed
meanwhile reads its new vector there.)

A trainer's own state (position, per-origin sequence numbers, and the models with their
training state: Adam moments, sampler counts, pending examples) is also snapshotted now and then
(:func:`state_snapshot_topic`), so that a trainer whose state is blank, or fell below the log's
start (retention), starts from it and the log after it instead of refusing: see
:func:`bootstrap_state`. The published model snapshots cannot serve for that: they hold only what
a shard serves with, and a trainer that went on from one would train with a fresh optimizer.

File: ``<topic>.<position, 20 digits>.models`` = ``b"RXM1\\n"`` + one JSON header line (topic,
position, learned_at, sha256 of the payload, written_at_ms) + the payload
(:meth:`SharedModels.serving_state`: the parameters a shard serves with, not the optimizer's
training state, which stays in the trainer's RocksDB).

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> write_model_snapshot(d, "signal-exchange", 7, 9, b"abc").name
'signal-exchange.00000000000000000007.models'
>>> info = newest_model_snapshot(d, "signal-exchange"); (info.position, info.learned_at)
(7, 9)
>>> read_model_snapshot(info.path)[1]
b'abc'
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import orjson

from recsys.signals.exchange import (
    APPLIED_PREFIX,
    POSITION_KEY,
    SharedModels,
    unread,
)

if TYPE_CHECKING:
    from recsys.store.kv import KVStore

MAGIC = b"RXM1\n"
SUFFIX = ".models"
#: Model snapshots kept per topic (the newest; older ones are deleted after each publication). More
#: than one, so that a shard listing the directory while the trainer deletes finds one to load.
KEEP = 3
_log = logging.getLogger(__name__)


def state_snapshot_topic(topic: str) -> str:
    """The name the trainer's state snapshots go by in the snapshot directory: exchange snapshots
    (:mod:`recsys.signals.snapshot`: the records under the shared prefixes, which in the trainer's
    state are the models' checkpoint and replay log, with the position and sequence numbers) of
    ``<topic>.trainer``. A shard never lists them (its snapshots are named after the topic alone).

    >>> from recsys.signals.snapshot import snapshot_name
    >>> snapshot_name(state_snapshot_topic("signal-exchange"), 41)
    'signal-exchange.trainer.00000000000000000041.snapshot'
    """
    return f"{topic}.trainer"


def bootstrap_state(kv: KVStore, directory: str | Path | None, topic: str, *, log_start: int | None = None):
    """Load the trainer's newest state snapshot into ``kv`` (its RocksDB, before the
    :class:`SharedModels` are built on it) when ``kv`` is blank, or has learned the log only to below
    ``log_start - 1`` (retention deleted the rest) and the snapshot reaches ``log_start - 1``: the
    trainer then reads the log from the snapshot's position + 1 and ends with the models of one
    that read it all (:func:`recsys.signals.snapshot.bootstrap`, with no sequence numbers of its
    own). Returns the snapshot's :class:`~recsys.signals.snapshot.SnapshotInfo`, or None when
    nothing was loaded."""
    from recsys.signals.snapshot import bootstrap

    return bootstrap(kv, directory, state_snapshot_topic(topic), origin=None, log_start=log_start)


class ModelSnapshotError(RuntimeError):
    """A model snapshot file that cannot be used (unreadable, another topic, damaged)."""


@dataclass(frozen=True)
class ModelSnapshotInfo:
    """A published model snapshot: the log ``position`` its models were last changed at (their
    version), the position learned to (``learned_at``), and its file."""

    position: int
    learned_at: int
    path: Path


def model_snapshot_name(topic: str, position: int) -> str:
    """The file name of ``topic``'s model snapshot at ``position`` (sorts by position).

    >>> model_snapshot_name("signal-exchange", 12)
    'signal-exchange.00000000000000000012.models'
    """
    return f"{topic}.{position:020d}{SUFFIX}"


def _snapshots(directory: str | Path, topic: str) -> list[tuple[int, Path]]:
    """``(position, path)`` of every model snapshot of ``topic`` in ``directory``, oldest first."""
    head = topic + "."
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        name = entry.name
        if name.startswith(head) and name.endswith(SUFFIX):
            digits = name[len(head):-len(SUFFIX)]
            if digits.isdigit():
                found.append((int(digits), Path(entry.path)))
    return sorted(found)


def newest_model_snapshot(directory: str | Path, topic: str, *, newer_than: int = -1) -> ModelSnapshotInfo | None:
    """The newest readable model snapshot of ``topic`` with a position above ``newer_than``, or None."""
    for position, path in reversed(_snapshots(directory, topic)):
        if position <= newer_than:
            return None
        try:
            header, _ = read_model_snapshot(path)
        except (OSError, ModelSnapshotError) as exc:  # deleted meanwhile, or damaged: try an older one
            _log.warning("model snapshot %s skipped: %s", path, exc)
            continue
        return ModelSnapshotInfo(int(header["position"]), int(header["learned_at"]), path)
    return None


def read_model_snapshot(path: str | Path) -> tuple[dict, bytes]:
    """``(header, payload)`` of a model snapshot file; :class:`ModelSnapshotError` when damaged."""
    raw = Path(path).read_bytes()
    if not raw.startswith(MAGIC):
        raise ModelSnapshotError(f"{path}: not a model snapshot (starts {raw[:5]!r}, expected {MAGIC!r})")
    line_end = raw.find(b"\n", len(MAGIC))
    if line_end < 0:
        raise ModelSnapshotError(f"{path}: no header line")
    try:
        header = orjson.loads(raw[len(MAGIC):line_end])
    except orjson.JSONDecodeError as exc:
        raise ModelSnapshotError(f"{path}: header unreadable: {exc}") from None
    payload = raw[line_end + 1:]
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise ModelSnapshotError(f"{path}: payload sha256 does not match its header (damaged or cut short)")
    return header, payload


def write_model_snapshot(directory: str | Path, topic: str, position: int, learned_at: int, payload: bytes,
                         *, keep: int = KEEP) -> Path:
    """Publish ``payload`` as ``topic``'s model snapshot at ``position``: written to a temporary
    name, fsynced, renamed (atomic), the directory fsynced; then all but the newest ``keep`` deleted."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = {"topic": topic, "position": position, "learned_at": learned_at,
              "sha256": hashlib.sha256(payload).hexdigest(), "written_at_ms": int(time.time() * 1000)}
    final = directory / model_snapshot_name(topic, position)
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + orjson.dumps(header) + b"\n" + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for _, old in _snapshots(directory, topic)[:-keep]:
        try:
            old.unlink()
        except FileNotFoundError:
            pass
    return final


class ModelTrainer:
    """Reads the exchange log once, trains the shared models from it, publishes snapshots.

    ``models`` is a :class:`SharedModels` over the trainer's own head and re-ranker (persistent
    on ``kv`` when it is RocksDB). :meth:`apply` learns the log's ``(position, message)`` records
    as a sharing shard learns them (same skips: old positions, ``(origin, seq)`` already applied,
    records that are no exchange message), committed in one atomic write with the position, then
    publishes a snapshot when the models changed and ``publish_every_messages`` messages were
    learned, or ``publish_every_s`` seconds passed, since the last one. ``publish`` (default:
    :func:`write_model_snapshot` into ``snapshot_dir``) takes ``(position, learned_at, payload)``;
    replays pass their own to model the publication lag.
    """

    def __init__(self, kv: KVStore, models: SharedModels, *, topic: str = "signal-exchange",
                 snapshot_dir: str | Path | None = None, publish_every_messages: int = 100,
                 publish_every_s: float = 5.0, clock: Callable[[], float] = time.time,
                 publish: Callable[[int, int, bytes], None] | None = None) -> None:
        if publish is None and snapshot_dir is None:
            raise ValueError("a model trainer needs a snapshot directory (or a publish callback) to publish to")
        self.kv, self.models, self.topic = kv, models, topic
        self.snapshot_dir = snapshot_dir
        self.publish_every_messages = max(1, int(publish_every_messages))
        self.publish_every_s = publish_every_s
        self.clock = clock
        self._publish = publish or (lambda pos, learned, payload: write_model_snapshot(snapshot_dir, topic, pos, learned, payload))
        raw = kv.get(POSITION_KEY)
        self.position = -1 if raw is None else int(raw)
        self.applied = {int(k[len(APPLIED_PREFIX):]): int(v) for k, v in kv.iter_prefix(APPLIED_PREFIX)}
        self.published = -1  # the models' position in the last snapshot published by this process
        self.published_at: float | None = None  # when (``clock``) it was published
        self._since_publish = 0
        self._last_publish = clock()
        self.learned_messages = 0  # counts, for the cost figures and tests
        self.publications = 0

    @property
    def version(self) -> str:
        return self.models.version

    def apply(self, records: Iterable[tuple[int, bytes]],
              hold: Callable[[int, list[str]], bool] | None = None) -> int:
        """Learn the log's records in order, commit, maybe publish. Returns how many messages were
        learned. ``hold(position, items)`` as in :meth:`recsys.signals.exchange.SignalExchange.apply`:
        True stops before a message naming items the trainer's catalog does not hold yet."""
        puts: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        done = 0
        for position, raw, message, fresh in unread(records, self.position, self.applied, self.models.unknown_items, hold):
            self.position = position
            puts[POSITION_KEY] = str(position).encode()
            if not fresh:
                continue
            self.models.learn(position, raw, message, puts, deletes)
            self.applied[message.origin] = message.seq
            puts[APPLIED_PREFIX + str(message.origin).encode()] = str(message.seq).encode()
            done += 1
        if puts or deletes:
            self.kv.write(puts, deletes)  # position, per-origin sequence numbers and models: one write
        self.learned_messages += done
        self._since_publish += done
        self.maybe_publish()
        return done

    def checkpoint(self) -> None:
        """Write a checkpoint of the models (every call of :meth:`apply` has committed what it
        learned), so that a restart learns no message again: a trainer stopping in order."""
        self.models.write_checkpoint(self.kv)

    def maybe_publish(self, *, force: bool = False) -> bool:
        """Publish a snapshot of the models when they changed since the last one and ``force``,
        or enough messages or seconds passed. Call only after the state is committed."""
        if self.models.position <= self.published:
            return False
        due = (self._since_publish >= self.publish_every_messages
               or self.clock() - self._last_publish >= self.publish_every_s)
        if not (force or due):
            return False
        self._publish(self.models.position, self.models.learned_at, self.models.serving_state())
        self.published = self.models.position
        self._since_publish = 0
        self._last_publish = self.published_at = self.clock()
        self.publications += 1
        return True
