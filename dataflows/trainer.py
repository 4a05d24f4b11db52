"""The model trainer process: the train/serve split of the shared models, live (issue 11).

``recsys run --processes N --share-signals --model-trainer`` starts this beside the N shards
(:func:`dataflows.shards.run_shards`); ``python -m dataflows.trainer`` runs it by hand with the
same ``RECSYS_*`` settings. It reads the exchange log (one partition) once, from its own
position, and the whole ``catalog`` topic (the head reads the item vectors of every example), and
trains the shared head and re-ranker with :class:`recsys.signals.trainer.ModelTrainer`: the same
code and order as a sharing shard, state in a RocksDB of its own (``<state_dir>/trainer``),
snapshots published to ``RECSYS_EXCHANGE_SNAPSHOT_DIR`` every ``RECSYS_TRAINER_PUBLISH_MESSAGES``
messages or ``RECSYS_TRAINER_PUBLISH_S`` seconds. A plain consumer loop, not a Bytewax flow: the
trainer has one input in one order, and its position lives in its RocksDB with the models (the
same atomic write), so it needs no recovery store of its own.

On SIGTERM/SIGINT it reads the exchange log to the end it sees then, learns it, publishes once
more and exits 0 (``stopped: trainer_learned=..., ...``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from kafka.structs import TopicPartition

from dataflows.catalog_table import bootstrap_catalog
from dataflows.kafka_io import KafkaClients, _envelope, _partitions, ensure_topics
from recsys.items.catalog import read_catalog_file
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.signals.exchange import SharedModels
from recsys.signals.trainer import ModelTrainer
from recsys.store.kv import MemoryKV, RocksKV

#: After a stop, how long the trainer reads the exchange log towards its end before it gives up.
DRAIN_TIMEOUT_S = 20.0  # within the supervisor's STOP_GRACE_S (dataflows/shards.py)


def trainer_settings(settings: Settings) -> Settings:
    """The settings the trainer runs with: sharing on with the models trained here, its state
    under ``<state_dir>/trainer`` (never a shard's)."""
    return settings.replace(share_signals=True, model_trainer=False, shards=1, shard=0,
                            state_dir=str(Path(settings.state_dir) / "trainer"), recovery_dir=None)


def open_trainer(settings: Settings, clients: Any) -> tuple[Shard, ModelTrainer]:
    """The trainer's engine (catalog, item vectors, head, re-ranker; in memory) with the catalog
    topic read to its end, and the :class:`ModelTrainer` over its RocksDB state."""
    ts = trainer_settings(settings)
    if not ts.exchange_snapshot_dir:
        raise SystemExit("the model trainer publishes to RECSYS_EXCHANGE_SNAPSHOT_DIR: set it (the shards read it)")
    from recsys.items.embeddings import Embedder

    engine = Shard(ts, MemoryKV(), Embedder(ts.model_name, ts.embed_cache_dir, batch_size=ts.embed_batch_size))
    if ts.catalog_file:
        engine.upsert_catalog(read_catalog_file(ts.catalog_file))
    Path(ts.state_dir).mkdir(parents=True, exist_ok=True)
    kv = RocksKV(str(Path(ts.state_dir) / "rocks"))
    models = SharedModels(kv, engine.head, engine.reranker if ts.rerank_enabled else None,
                          history_len=engine.head.config.history_len if engine.head is not None else 0,
                          vectors_for=engine._admit_remote_items if ts.unknown_items == "admit" else None,
                          persistent=True, checkpoint_interval_s=ts.head_snapshot_interval_s)
    models.is_known = engine.items.catalog.__contains__
    trainer = ModelTrainer(kv, models, topic=ts.exchange_topic, snapshot_dir=ts.exchange_snapshot_dir,
                           publish_every_messages=ts.trainer_publish_messages, publish_every_s=ts.trainer_publish_s)
    return engine, trainer


class _Hold:
    """Holds the log at a message naming items the catalog does not hold yet, up to
    ``unknown_item_wait_s`` (as a shard does: the catalog records are on their way)."""

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
                emit: Callable[[str], None] = print) -> int:
    """Train until ``stop`` is set, then drain the log to its end as seen then, publish, return 0."""
    clients = clients if clients is not None else KafkaClients(settings)
    stop = stop if stop is not None else threading.Event()
    engine, trainer = open_trainer(settings, clients)
    boot = bootstrap_catalog(engine, clients, settings.catalog_topic, dead_letters_topic=settings.dead_letters_topic,
                             recommendations_topic=settings.recommendations_topic)
    topic = settings.exchange_topic
    ensure_topics(clients, {topic: 1})
    log_tp = TopicPartition(topic, 0)
    consumer = clients.consumer(auto_offset_reset="none")
    hold = _Hold(settings.unknown_item_wait_s)
    held: dict[int, bytes] = {}
    try:
        catalog_tps = [TopicPartition(settings.catalog_topic, p) for p in _partitions(clients, consumer, settings.catalog_topic)]
        consumer.assign([log_tp, *catalog_tps])
        log_start = consumer.beginning_offsets([log_tp])[log_tp]
        if log_start > trainer.position + 1:  # retention took what the trainer still needs
            raise SystemExit(f"trainer: exchange topic {topic!r} starts at offset {log_start}, but the trainer's state "
                             f"({trainer_settings(settings).state_dir}) needs it from {trainer.position + 1}: start it on "
                             f"a blank state (it learns from the log's start) or keep the log longer")
        consumer.seek(log_tp, trainer.position + 1)
        for tp in catalog_tps:
            consumer.seek(tp, boot.ends.get(tp.partition, 0))
        trainer.maybe_publish(force=True)  # restarted: its models are served again at once
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
        trainer.maybe_publish(force=True)
        emit(f"stopped: trainer_learned={trainer.learned_messages}, trainer_publications={trainer.publications}, "
             f"trainer_position={trainer.position}, trainer_unknown_items={hold.gave_up}")
        return 0
    finally:
        consumer.close()
        trainer.kv.close()
        engine.embedder.close()


def main() -> int:  # pragma: no cover - a process entry point (tests run it as one)
    settings = Settings.from_env(os.environ)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return run_trainer(settings, stop=stop, emit=lambda line: print(line, flush=True))


if __name__ == "__main__":
    sys.exit(main())
