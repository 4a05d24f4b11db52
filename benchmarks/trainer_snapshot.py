"""What the model trainer's own state snapshot costs (issue 11, a trainer past the log's retention):
its size, the read in the trainer's thread, the background write, and a blank trainer's load.

    .venv/bin/python benchmarks/trainer_snapshot.py [--items 500] [--users 2000] [--events 20000]

Synthetic data (load only). Two sharing shards (head and re-ranker on, in memory) produce the
exchange log; a trainer on RocksDB learns it (the models' checkpoint at the default interval,
``RECSYS_HEAD_SNAPSHOT_INTERVAL_S``, or at every message with ``--checkpoint-every-message``), its state
is snapshotted as ``dataflows/trainer.py`` does (read in its thread, written by
:class:`recsys.signals.snapshot.SnapshotWriter`'s thread), and a blank trainer loads it and
restores its models; their checksum is checked against the source's. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zlib
from pathlib import Path

from recsys.backtest.shards import model_checksum
from recsys.events import Envelope, encode
from recsys.items.embeddings import Embedder
from recsys.settings import Settings
from recsys.shard.batching import user_disjoint_chunks
from recsys.shard.step import Shard
from recsys.signals.exchange import SharedModels
from recsys.signals.snapshot import read_shared, write_file
from recsys.signals.trainer import ModelTrainer, bootstrap_state, state_snapshot_topic
from recsys.store.kv import MemoryKV, RocksKV
from recsys.synthetic import generate_catalog, generate_events

TOPIC = "signal-exchange"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--checkpoint-every-message", action="store_true")
    p.add_argument("--embed-cache-dir", default="var/embeddings")
    args = p.parse_args()
    print(f"load average: {os.getloadavg()}")
    settings = Settings(shards=2, share_signals=True, unknown_items="admit", state_ttl_days=36_500.0,
                        **({"head_snapshot_interval_s": 0.0} if args.checkpoint_every_message else {}))
    embedder = Embedder(settings.model_name, args.embed_cache_dir)
    catalog = generate_catalog(args.items, seed=0)
    events = generate_events(args.events, catalog, n_users=args.users, seed=1)

    def engine(shard: int) -> Shard:
        e = Shard(settings.replace(shard=shard), MemoryKV(), embedder, evaluate=True)
        e.upsert_catalog(catalog)
        return e

    producers = [engine(0), engine(1)]
    log: list[tuple[int, bytes]] = []
    for chunk in user_disjoint_chunks(events, args.batch):
        for s, producer in enumerate(producers):
            mine = [e for e in chunk if zlib.crc32(e.user_id.encode()) % 2 == s]
            envs = [Envelope("events", s, len(log) * 10_000 + i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(mine)]
            for message in producer.process(envs).exchange if mine else ():
                log.append((len(log), message))
        for producer in producers:
            producer.apply_exchange(log[-2:])
    print(f"log: {len(log)} messages, {sum(len(m) for _, m in log) / 2**20:.1f} MiB")

    with tempfile.TemporaryDirectory() as tmp:
        source = engine(0)
        kv = RocksKV(str(Path(tmp) / "source"))
        models = SharedModels(kv, source.head, source.reranker, history_len=source.head.config.history_len,
                              vectors_for=source._admit_remote_items, persistent=True,
                              checkpoint_interval_s=settings.head_snapshot_interval_s)
        trainer = ModelTrainer(kv, models, snapshot_dir=Path(tmp) / "snaps", publish_every_messages=10**9,
                               publish_every_s=float("inf"))
        started = time.perf_counter()
        for at in range(0, len(log), 20):
            trainer.apply(log[at:at + 20])
        print(f"trained: {source.head.n_updates} head steps, {source.reranker.examples} re-ranker examples "
              f"in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        position, applied, records = read_shared(kv)
        read_s = time.perf_counter() - started
        replay = sum(1 for k, _ in records if k.startswith(b"xm:log:"))
        print(f"state: {len(records)} records ({replay} messages since the checkpoint), "
              f"{sum(len(k) + len(v) for k, v in records) / 2**20:.2f} MiB; read in the trainer's thread in {read_s * 1000:.0f} ms")
        started = time.perf_counter()
        info = write_file(Path(tmp) / "snaps", state_snapshot_topic(TOPIC), position, applied, records)
        print(f"write (the writer's thread): {time.perf_counter() - started:.2f} s, file {info.file_bytes / 2**20:.2f} MiB")
        expected = model_checksum(source)
        kv.close()

        blank = RocksKV(str(Path(tmp) / "blank"))
        started = time.perf_counter()
        loaded = bootstrap_state(blank, Path(tmp) / "snaps", TOPIC)
        load_s = time.perf_counter() - started
        target = engine(0)
        started = time.perf_counter()
        SharedModels(blank, target.head, target.reranker, history_len=target.head.config.history_len,
                     vectors_for=target._admit_remote_items, persistent=True)
        restore_s = time.perf_counter() - started
        blank.close()
        print(f"load into a blank trainer: {load_s:.2f} s, models restored in {restore_s:.2f} s at position "
              f"{loaded.position}; models equal the source's: {model_checksum(target) == expected}")


if __name__ == "__main__":
    main()
