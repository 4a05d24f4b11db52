"""The model trainer process: the train/serve split of the shared models, live (issue 11).

``recsys run --processes N --share-signals --model-trainer`` starts this beside the N shards
(:func:`dataflows.shards.run_shards`); ``recsys trainer`` (or ``python -m dataflows.trainer``) runs
it by hand, or in a container of its own (docker-compose.yml), with the shards' ``RECSYS_*``
settings. It reads the exchange log (one partition) once, from its own
position, and the whole ``catalog`` topic (the head reads the item vectors of every example), and
trains the shared head and re-ranker with :class:`recsys.signals.trainer.ModelTrainer`: the same
code and order as a sharing shard, state in a RocksDB of its own (``<state_dir>/trainer``),
snapshots published to ``RECSYS_EXCHANGE_SNAPSHOT_DIR`` every ``RECSYS_TRAINER_PUBLISH_MESSAGES``
messages or ``RECSYS_TRAINER_PUBLISH_S`` seconds. A plain consumer loop, not a Bytewax flow: the
trainer has one input in one order, and its position lives in its RocksDB with the models (the
same atomic write), so it needs no recovery store of its own.

On SIGTERM/SIGINT it reads the exchange log to the end it sees then, learns it, publishes once
more and exits 0 (``stopped: trainer_learned=..., ...``).

Every ``RECSYS_EXCHANGE_SNAPSHOT_INTERVAL_S`` and at its stop it also writes a snapshot of its own
state (:func:`recsys.signals.trainer.state_snapshot_topic`) beside the shards' snapshots; a trainer
whose state is blank, or below the log's start once retention ran, starts from the newest one and
the log after it (with the models of a trainer that read the whole log), and refuses to start,
naming the gap, only when none reaches the log's start. Its Prometheus metrics
(:class:`dataflows.metrics.TrainerMetrics`: learned position, log end, lag, the version published
and its age) are served on ``RECSYS_METRICS_PORT + RECSYS_SHARDS`` when the port is set.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

from kafka.structs import TopicPartition

from dataflows.catalog_table import Bootstrapped, bootstrap_catalog
from dataflows.kafka_io import KafkaClients, _envelope, _partitions, ensure_topics
from dataflows.metrics import TrainerMetrics
from dataflows.trainer_lock import publisher_lock
from recsys.items.catalog import read_catalog_file
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.signals.exchange import SharedModels
from recsys.signals.snapshot import (
    SnapshotError,
    SnapshotInfo,
    SnapshotWriter,
    newest_snapshot,
)
from recsys.signals.trainer import ModelTrainer, bootstrap_state, state_snapshot_topic
from recsys.store.kv import MemoryKV, RocksKV

#: After a stop, how long the trainer reads the exchange log towards its end before it gives up.
DRAIN_TIMEOUT_S = 20.0  # within the supervisor's STOP_GRACE_S (dataflows/shards.py)


def trainer_settings(settings: Settings) -> Settings:
    """The settings the trainer runs with: sharing on with the models trained here, its state
    under ``<state_dir>/trainer`` (never a shard's)."""
    return settings.replace(share_signals=True, model_trainer=False, shards=1, shard=0,
                            state_dir=str(Path(settings.state_dir) / "trainer"), recovery_dir=None)


class Opened(NamedTuple):
    """What :func:`open_trainer` opened: the trainer's engine (catalog, item vectors, head,
    re-ranker), the :class:`ModelTrainer` over its RocksDB state, the catalog read, and the state
    snapshot it was loaded from (None: none loaded)."""

    engine: Shard
    trainer: ModelTrainer
    catalog: Bootstrapped
    loaded: SnapshotInfo | None


def open_trainer(settings: Settings, clients: Any, *, log_start: int | None = None, embedder: Any = None) -> Opened:
    """The trainer's engine (in memory) with the catalog topic read to its end, then its RocksDB
    state: loaded from the newest trainer state snapshot when it is blank or below ``log_start - 1``
    (:func:`recsys.signals.trainer.bootstrap_state`), and the :class:`ModelTrainer` over it.

    The catalog comes first: the models resume from their checkpoint by learning again the
    messages after it, and the head reads the vectors of their items; before the catalog was
    read those were zero (or, with ``unknown_items=admit``, a placeholder's), and a restarted
    trainer's models parted from an uninterrupted one's."""
    ts = trainer_settings(settings)
    if not ts.exchange_snapshot_dir:
        raise SystemExit("recsys trainer: the model trainer publishes to RECSYS_EXCHANGE_SNAPSHOT_DIR: set it (the shards read it)")
    own_embedder = embedder is None
    if own_embedder:
        from recsys.items.embeddings import Embedder

        embedder = Embedder(ts.model_name, ts.embed_cache_dir, batch_size=ts.embed_batch_size)
    kv = None
    try:
        engine = Shard(ts, MemoryKV(), embedder)
        if ts.catalog_file:
            engine.upsert_catalog(read_catalog_file(ts.catalog_file))
        # the shards dead-letter the catalog's bad records; the trainer's running loop drops them too
        catalog = bootstrap_catalog(engine, clients, settings.catalog_topic, dead_letters_topic=None,
                                    recommendations_topic=settings.recommendations_topic)
        Path(ts.state_dir).mkdir(parents=True, exist_ok=True)
        kv = RocksKV(str(Path(ts.state_dir) / "rocks"))
        try:
            loaded = bootstrap_state(kv, ts.exchange_snapshot_dir, ts.exchange_topic, log_start=log_start)
        except SnapshotError as exc:
            raise SystemExit(f"recsys trainer: state snapshot of {ts.state_dir}: {exc}") from exc
    except BaseException:
        if kv is not None:
            kv.close()
        if own_embedder:
            embedder.close()
        raise
    models = SharedModels(kv, engine.head, engine.reranker if ts.rerank_enabled else None,
                          history_len=engine.head.config.history_len if engine.head is not None else 0,
                          vectors_for=engine._admit_remote_items if ts.unknown_items == "admit" else None,
                          persistent=True, checkpoint_interval_s=ts.head_snapshot_interval_s)
    models.is_known = engine.items.catalog.__contains__
    trainer = ModelTrainer(kv, models, topic=ts.exchange_topic, snapshot_dir=ts.exchange_snapshot_dir,
                           publish_every_messages=ts.trainer_publish_messages, publish_every_s=ts.trainer_publish_s)
    return Opened(engine, trainer, catalog, loaded)


def gap_message(settings: Settings, position: int, log_start: int) -> str:
    """Why a trainer refuses to start: its state needs the exchange log from ``position + 1``, which
    retention deleted, and no trainer state snapshot reaches ``log_start - 1``."""
    ts = trainer_settings(settings)
    topic = settings.exchange_topic
    newest = newest_snapshot(ts.exchange_snapshot_dir, state_snapshot_topic(topic))
    snaps = (f"no trainer state snapshot ({state_snapshot_topic(topic)}.*.snapshot) is in {ts.exchange_snapshot_dir}"
             if newest is None else f"the newest trainer state snapshot there is at position {newest.position}")
    where = "its state is blank" if position < 0 else f"its state ({ts.state_dir}) has learned the log up to position {position}"
    return (f"recsys trainer: exchange topic {topic!r} starts at offset {log_start}, but the trainer needs it from "
            f"{position + 1} ({where}): records {position + 1}..{log_start - 1} were deleted (retention), and {snaps}. "
            f"A running trainer writes one every RECSYS_EXCHANGE_SNAPSHOT_INTERVAL_S={settings.exchange_snapshot_interval_s:g} s "
            f"and at its stop; keep the log longer than that, or put one at position >= {log_start - 1} there and start again")


class _Hold:
    """Holds the log at a message naming items the catalog does not hold yet, up to
    ``unknown_item_wait_s`` of ``clock`` (as a shard does: the catalog records are on their way)."""

    def __init__(self, wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.wait_s, self.clock = wait_s, clock
        self.at: tuple[int, float] | None = None
        self.gave_up = 0

    def __call__(self, position: int, items: list[str]) -> bool:
        now = self.clock()
        if self.at is None or self.at[0] != position:
            self.at = (position, now)
        if now - self.at[1] < self.wait_s:
            return True
        print(f"trainer: exchange position {position}: {len(items)} item(s) not in the catalog after "
              f"{self.wait_s:g} s ({', '.join(items[:5])}); learned with zero vectors", file=sys.stderr, flush=True)
        self.gave_up += len(items)
        return False


def run_trainer(settings: Settings, clients: Any = None, stop: threading.Event | None = None,
                emit: Callable[[str], None] = print, *, embedder: Any = None, metrics: TrainerMetrics | None = None) -> int:
    """Train until ``stop`` is set, then drain the log to its end as seen then, publish, return 0.

    ``embedder``: one already loaded (tests; default: the settings' model, closed at the end);
    ``metrics``: where its gauges go (default: a :class:`TrainerMetrics`, served when
    ``RECSYS_METRICS_PORT`` is set). Refused (SystemExit) while another trainer publishes to the
    same ``RECSYS_EXCHANGE_SNAPSHOT_DIR`` (:func:`publisher_lock`), before anything is read."""
    lock = publisher_lock(settings.exchange_snapshot_dir) if settings.exchange_snapshot_dir else None
    try:
        return _run_trainer(settings, clients, stop, emit, embedder=embedder, metrics=metrics)
    finally:
        if lock is not None:
            lock.close()


def _run_trainer(settings: Settings, clients: Any, stop: threading.Event | None, emit: Callable[[str], None], *,
                 embedder: Any, metrics: TrainerMetrics | None) -> int:
    clients = clients if clients is not None else KafkaClients(settings)
    stop = stop if stop is not None else threading.Event()
    own_metrics = metrics is None
    metrics = metrics if metrics is not None else TrainerMetrics(settings)
    topic = settings.exchange_topic
    ensure_topics(clients, {topic: 1})
    log_tp = TopicPartition(topic, 0)
    consumer = clients.consumer(auto_offset_reset="none")
    opened = None
    try:
        log_start = consumer.beginning_offsets([log_tp])[log_tp]
        opened = open_trainer(settings, clients, log_start=log_start, embedder=embedder)
        engine, trainer, boot = opened.engine, opened.trainer, opened.catalog
        if opened.loaded is not None:
            emit(f"trainer: state loaded from snapshot {opened.loaded.path} at exchange position {opened.loaded.position} "
                 f"(the log starts at offset {log_start}); reading {topic!r} from offset {opened.loaded.position + 1}")
        if log_start > trainer.position + 1:  # retention took what the trainer still needs, and no snapshot reaches it
            raise SystemExit(gap_message(settings, trainer.position, log_start))
        writer = (SnapshotWriter(settings.exchange_snapshot_dir, state_snapshot_topic(topic),
                                 settings.exchange_snapshot_interval_s, origin=None)
                  if settings.exchange_snapshot_interval_s > 0 else None)
        catalog_tps = [TopicPartition(settings.catalog_topic, p) for p in _partitions(clients, consumer, settings.catalog_topic)]
        consumer.assign([log_tp, *catalog_tps])
        consumer.seek(log_tp, trainer.position + 1)
        for tp in catalog_tps:
            consumer.seek(tp, boot.ends.get(tp.partition, 0))
        # time the engine spends applying catalog records does not count (as in a shard's waits)
        hold = _Hold(settings.unknown_item_wait_s, clock=lambda: time.monotonic() - engine.waiting.credit)
        held: dict[int, bytes] = {}
        trainer.maybe_publish(force=True)  # restarted: its models are served again at once
        if (url := metrics.serve()) is not None:
            emit(f"metrics: {url}")
        counted = [trainer.learned_messages, trainer.publications]

        def observe() -> None:
            end = consumer.highwater(log_tp)
            metrics.learned.inc(trainer.learned_messages - counted[0])
            metrics.publications.inc(trainer.publications - counted[1])
            counted[:] = [trainer.learned_messages, trainer.publications]
            metrics.observe(position=trainer.position, log_end=end, published=trainer.published,
                            published_at=trainer.published_at)

        observe()
        emit(f"ready: model trainer at exchange position {trainer.position} (models {trainer.version}); "
             f"publishing to {settings.exchange_snapshot_dir} every {settings.trainer_publish_messages} messages or "
             f"{settings.trainer_publish_s:g} s")

        def step(timeout_ms: int) -> int:
            nonlocal held
            polled = consumer.poll(timeout_ms=timeout_ms, max_records=settings.poll_max_records)
            items = [_envelope(r) for tp, rs in polled.items() if tp != log_tp for r in rs]
            if items:
                engine.process(items)  # catalog upserts (a catalog record waited for releases the log)
            new = [(r.offset, r.value if r.value is not None else b"") for r in polled.get(log_tp, [])]
            if new or held:
                records = sorted({**held, **dict(new)}.items())
                trainer.apply(records, hold=hold)
                held = {p: raw for p, raw in records if p > trainer.position}
            else:
                trainer.maybe_publish()
            if writer is not None and writer.maybe_write(trainer.kv):  # between two writes: one log position
                metrics.state_snapshots.inc()
            observe()
            return len(new)

        while not stop.is_set():
            step(100)
        step(100)
        # highwater(), not end_offsets(): the local Tansu broker reports the last batch's base offset + 1 there
        end = consumer.highwater(log_tp)
        end = end if end is not None else consumer.end_offsets([log_tp])[log_tp]
        began = time.monotonic()
        while trainer.position + 1 < end and time.monotonic() - began < DRAIN_TIMEOUT_S:
            step(100)
        trainer.checkpoint()  # a restart learns nothing again (a catalog update may change a vector meanwhile)
        trainer.maybe_publish(force=True)
        if writer is not None and writer.maybe_write(trainer.kv, force=True, wait=True):  # where the next start begins
            metrics.state_snapshots.inc()
        observe()
        state_snapshots = len(writer.written) if writer is not None else 0
        emit(f"stopped: trainer_learned={trainer.learned_messages}, trainer_publications={trainer.publications}, "
             f"trainer_position={trainer.position}, trainer_unknown_items={hold.gave_up}, "
             f"trainer_state_snapshots={state_snapshots}")
        return 0
    finally:
        consumer.close()
        if own_metrics:
            metrics.close()
        if opened is not None:
            opened.trainer.kv.close()
            if embedder is None:
                opened.engine.embedder.close()


def run_until_signalled(settings: Settings) -> int:
    """:func:`run_trainer` until SIGTERM or SIGINT (``recsys trainer``, ``python -m dataflows.trainer``)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return run_trainer(settings, stop=stop, emit=lambda line: print(line, flush=True))


def main() -> int:  # pragma: no cover - a process entry point (tests run it as one)
    return run_until_signalled(Settings.from_env(os.environ))


if __name__ == "__main__":
    sys.exit(main())
