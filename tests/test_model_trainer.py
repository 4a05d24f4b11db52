"""The train/serve split (issue 11): one trainer trains the shared models from the exchange log and
publishes snapshots; shards serving from them train nothing (recsys/signals/trainer.py)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from dataflows.kafka_io import partition_for_key
from recsys.backtest.protocols import PrequentialScorer
from recsys.backtest.shards import (
    model_checksum,
    replay_shared_shards,
    serving_checksum,
)
from recsys.events import Envelope, encode
from recsys.settings import Settings
from recsys.shard.batching import user_disjoint_chunks
from recsys.shard.step import Shard
from recsys.signals.exchange import SharedModels
from recsys.signals.trainer import (
    ModelTrainer,
    newest_model_snapshot,
    read_model_snapshot,
    write_model_snapshot,
)
from recsys.store.kv import MemoryKV, RocksKV
from recsys.synthetic import generate_catalog, generate_events

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def catalog():
    return generate_catalog(80, seed=41)


@pytest.fixture(scope="module")
def events(catalog):
    return generate_events(2400, catalog, n_users=80, seed=42)


def _settings(**kw) -> Settings:
    return Settings(unknown_items="admit", state_ttl_days=36_500.0, **kw)


def _shard(embedder, catalog, shard: int, shards: int = 2, *, kv=None, trainer: bool = False, **kw) -> Shard:
    settings = _settings(shards=shards, shard=shard, share_signals=True, model_trainer=trainer, **kw)
    engine = Shard(settings, kv if kv is not None else MemoryKV(), embedder, evaluate=kv is None)
    engine.upsert_catalog(catalog)
    return engine


def _owner(shards: int):
    return lambda u: partition_for_key(u.encode(), shards)


def sharing_log(producers: list[Shard], events, size: int) -> list[tuple[int, bytes]]:
    """The exchange log of two sharing shards (``producers``) fed ``events`` in user-disjoint
    chunks of ``size``, one batch of each in turn, both applying each round's messages."""
    log: list[tuple[int, bytes]] = []
    for chunk in user_disjoint_chunks(events, size):
        for s, engine in enumerate(producers):
            part = [e for e in chunk if _owner(2)(e.user_id) == s]
            envs = [Envelope("events", s, len(log) * 1000 + i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(part)]
            for message in engine.process(envs).exchange if part else ():
                log.append((len(log), message))
        for engine in producers:
            engine.apply_exchange(log[-2:])
    return log


def _replay(embedder, catalog, events, shards: int, *, trainer: bool, **kw):
    engines = [_shard(embedder, catalog, s, shards, trainer=trainer) for s in range(shards)]
    trainer_engine = _shard(embedder, catalog, 0, shards) if trainer else None
    scorer = PrequentialScorer(["full-system"], (10,))
    stats = replay_shared_shards(engines, events, _owner(shards), scorer, batch_size=150, trainer=trainer_engine, **kw)
    return engines, trainer_engine, scorer, stats


def _hits(scorer: PrequentialScorer) -> dict:
    result = scorer.result([type("Named", (), {"name": "full-system"})()], {"full-system": {}}, n_events=1,
                           catalog_size=80, seconds=1.0, batch_size=150, dataset="synthetic")
    return {k: v for k, v in result["models"]["full-system"].items() if "hr" in k.lower() or "ndcg" in k.lower()}


def test_a_trainer_publishing_every_message_at_once_serves_the_models_shards_trained_themselves(embedder, catalog, events):
    today, _, today_scorer, _ = _replay(embedder, catalog, events, 3, trainer=False)
    served, trainer, scorer, stats = _replay(embedder, catalog, events, 3, trainer=True, publish_every=1, publish_lag=0)
    assert trainer.head.n_updates > 0 and stats["model_publications"] > 10
    # the trainer holds bit for bit the models each shard of today trained itself, and every shard serves them
    assert model_checksum(trainer) == model_checksum(today[0])
    assert {serving_checksum(e) for e in served} == {serving_checksum(trainer)} == {serving_checksum(today[0])}
    assert stats["served_as_trained"]
    assert served[0].model_version == today[0].model_version
    assert _hits(scorer) == _hits(today_scorer)  # the same recommendations, scored the same
    assert stats["model_learn_cpu_s"] == 0  # the shards trained nothing themselves


def test_shards_served_by_a_trainer_train_nothing_and_lag_by_the_publication(embedder, catalog, events):
    served, trainer, _, stats = _replay(embedder, catalog, events, 2, trainer=True, publish_every=8, publish_lag=2)
    assert {serving_checksum(e) for e in served} == {serving_checksum(trainer)}  # the last one reaches them at the end
    assert stats["model_publications"] < stats["exchange_messages"] / 4
    # a shard alone on the same log, served by nobody, learns nothing: training is the trainer's
    idle, producer = _shard(embedder, catalog, 1, trainer=True), _shard(embedder, catalog, 0, trainer=True)
    log = []
    mine = [e for e in events if _owner(2)(e.user_id) == 0]
    for chunk in user_disjoint_chunks(mine, 150):
        envs = [Envelope("events", 0, i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(chunk)]
        log.extend(producer.process(envs).exchange)
    assert log and idle.apply_exchange(list(enumerate(log))) == len(log)
    assert idle.head.n_updates == 0 and idle.reranker.examples == 0 and idle.model_version.endswith("@x-1")
    assert len(idle.popularity) > 0  # the signals are still applied from the log


def test_model_snapshots_are_atomic_versioned_files_and_a_damaged_one_is_skipped(tmp_path):
    for position in (3, 9, 14, 20):
        write_model_snapshot(tmp_path, "x", position, position, f"models at {position}".encode())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"x.{p:020d}.models" for p in (9, 14, 20)]  # the newest three kept, no temporary left
    assert newest_model_snapshot(tmp_path, "x").position == 20
    assert newest_model_snapshot(tmp_path, "x", newer_than=20) is None
    newest = tmp_path / names[-1]
    newest.write_bytes(newest.read_bytes()[:-3])  # cut short
    info = newest_model_snapshot(tmp_path, "x")
    assert info.position == 14 and read_model_snapshot(info.path)[1] == b"models at 14"


def test_a_live_shard_loads_the_newest_snapshot_between_batches_and_names_its_version(tmp_path, embedder, catalog, events):
    snapshots = tmp_path / "snapshots"
    trainer_engine = _shard(embedder, catalog, 0)
    trainer = ModelTrainer(MemoryKV(), trainer_engine.shared_models, snapshot_dir=snapshots,
                           publish_every_messages=1_000_000, publish_every_s=float("inf"))
    producer = _shard(embedder, catalog, 0, trainer=True)
    log = []
    mine = [e for e in events if _owner(2)(e.user_id) == 0]
    for chunk in user_disjoint_chunks(mine, 150):
        envs = [Envelope("events", 0, len(log) * 1000 + i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(chunk)]
        for message in producer.process(envs).exchange:
            log.append((len(log), message))
    trainer.apply(log)
    assert trainer.publications == 0 and trainer.maybe_publish(force=True)
    live = _shard(embedder, catalog, 1, kv=RocksKV(str(tmp_path / "rocks")), trainer=True, state_dir=str(tmp_path),
                  exchange_snapshot_dir=str(snapshots))
    assert serving_checksum(live) == serving_checksum(trainer_engine)  # loaded at start
    version = live.model_version
    assert version.endswith(f"@x{trainer.models.position}") and trainer.models.position >= 0
    user = next(e for e in events if _owner(2)(e.user_id) == 1)
    rec = orjson.loads(live.process([Envelope("events", 1, 0, user.user_id.encode(), encode(user), user.ts)]).recommendations[0][1])
    assert rec["model_version"] == version
    live.kv.close()


_TRAINER_CHILD = r"""
import sys
from pathlib import Path

import orjson

from recsys.events import decode_catalog_item
from recsys.items.embeddings import Embedder
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.signals.exchange import SharedModels
from recsys.signals.trainer import ModelTrainer
from recsys.store.kv import MemoryKV, RocksKV

log_file, state, snaps, progress, cache = sys.argv[1:6]
log = [(i, bytes.fromhex(h)) for i, h in enumerate(orjson.loads(Path(log_file).read_bytes()))]
catalog = [decode_catalog_item(bytes.fromhex(h), 1 << 20) for h in orjson.loads(Path(log_file + ".catalog").read_bytes())]
settings = Settings(unknown_items="admit", state_ttl_days=36500.0, shards=2, shard=0, share_signals=True)
engine = Shard(settings, MemoryKV(), Embedder(settings.model_name, cache))  # the head and the catalog's vectors
engine.upsert_catalog(catalog)
kv = RocksKV(state)  # the trainer's own state: position, sequence numbers, models
models = SharedModels(kv, engine.head, engine.reranker, history_len=engine.head.config.history_len,
                      vectors_for=engine._admit_remote_items, persistent=True, checkpoint_interval_s=0.05)
trainer = ModelTrainer(kv, models, snapshot_dir=snaps, publish_every_messages=3, publish_every_s=1e9)
with open(progress, "a") as out:
    for position in range(trainer.position + 1, len(log)):
        trainer.apply(log[position:position + 1])
        out.write(f"{position}\n")
        out.flush()
trainer.maybe_publish(force=True)
print("done", trainer.position, trainer.models.position, flush=True)
"""


@pytest.mark.slow
def test_a_killed_trainer_resumes_without_learning_a_message_twice_or_skipping_one(tmp_path, embedder, catalog, events):
    """SIGKILL the trainer (a process of its own, on RocksDB) at random moments, restart it each time:
    it ends with the models of a trainer that never stopped, bit for bit (every head step, Adam
    moment, sampler count and re-ranker example learned once), and publishes them."""
    log = sharing_log([_shard(embedder, catalog, s) for s in range(2)], events, 100)
    log.append((len(log), b"not an exchange message"))  # refused by every reader alike
    log.extend((len(log) + i, raw) for i, (_, raw) in enumerate(log[:5]))  # re-published: learned once
    whole = _shard(embedder, catalog, 0)
    reference = ModelTrainer(MemoryKV(), whole.shared_models, publish=lambda *a: None)
    reference.apply(log)
    assert reference.learned_messages == len(log) - 6 and whole.head.n_updates > 3

    log_file = tmp_path / "log.json"
    log_file.write_bytes(orjson.dumps([raw.hex() for _, raw in log]))
    (tmp_path / "log.json.catalog").write_bytes(orjson.dumps([encode(c).hex() for c in catalog]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    progress = tmp_path / "progress"
    args = [sys.executable, "-c", _TRAINER_CHILD, str(log_file), str(tmp_path / "state"), str(tmp_path / "snaps"), str(progress),
            str(Path(embedder.cache_path).parent)]  # the vectors the parent embedded (its cache, opened per call)
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        done_before = len(progress.read_text().splitlines()) if progress.exists() else 0
        target = done_before + rng.randint(2, max(3, len(log) // 5))
        child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and child.poll() is None:
            if progress.exists() and len(progress.read_text().splitlines()) >= target:
                break
            time.sleep(0.01)
        assert child.poll() is None, child.stderr.read()[-2000:]
        child.send_signal(signal.SIGKILL)
        child.wait()
        kills += 1
    final = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert kills == 3 and final.stdout.split()[1] == str(len(log) - 1)
    header, payload = read_model_snapshot(newest_model_snapshot(tmp_path / "snaps", "signal-exchange").path)
    assert header["position"] == reference.models.position
    check = _shard(embedder, catalog, 1, trainer=True)
    check.load_models(payload)
    assert serving_checksum(check) == serving_checksum(whole)
    assert check.model_version == whole.model_version
    # the trainer's own state (optimizer moments, sampler too) equals the uninterrupted one's
    again = _shard(embedder, catalog, 0)
    kv = RocksKV(str(tmp_path / "state"))
    SharedModels(kv, again.head, again.reranker, history_len=again.head.config.history_len, persistent=True)
    kv.close()
    assert model_checksum(again) == model_checksum(whole)
