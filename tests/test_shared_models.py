"""Shards share the learned models (the head and the re-ranker) through the exchange log (issue 11)."""

from __future__ import annotations

import orjson
import pytest
import torch

from dataflows.kafka_io import partition_for_key
from recsys.backtest.protocols import PrequentialScorer
from recsys.backtest.shards import model_checksum, replay_shared_shards
from recsys.events import CatalogItem, Envelope, encode
from recsys.settings import Settings
from recsys.shard.batching import user_disjoint_chunks
from recsys.shard.step import Shard
from recsys.signals.exchange import (
    MODEL_CHECKPOINT_KEY,
    MODEL_REPLAY_PREFIX,
    SHARED_MODEL_PREFIXES,
    decode_message,
    encode_message,
    encode_message_v2,
)
from recsys.store.kv import MemoryKV, RocksKV
from recsys.synthetic import generate_catalog, generate_events


@pytest.fixture(scope="module")
def catalog():
    return generate_catalog(80, seed=41)


@pytest.fixture(scope="module")
def events(catalog):
    return generate_events(2400, catalog, n_users=80, seed=42)


class _Clock:
    """A clock that moves one second per reading (checkpoints come every few messages)."""

    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def _settings(**kw) -> Settings:
    return Settings(unknown_items="admit", state_ttl_days=36_500.0, **kw)


def _shard(embedder, catalog, shard: int, shards: int = 2, *, kv=None, share: bool = True, clock=None, **kw) -> Shard:
    """A shard on ``kv`` (default: in memory, evaluating as a replay does)."""
    settings = _settings(shards=shards, shard=shard, share_signals=share, **kw)
    engine = Shard(settings, kv if kv is not None else MemoryKV(), embedder, evaluate=kv is None,
                   **({"clock": clock} if clock is not None else {}))
    engine.upsert_catalog(catalog)
    return engine


def _owner(shards: int):
    return lambda u: partition_for_key(u.encode(), shards)


def _head_state(shard: Shard) -> dict:
    state = shard.head.state_dict()
    return {"model": state["model"], "optimizer": state["optimizer"]["state"], "rng": state["rng"],
            "pop": (state["pop_ids"], state["pop_counts"]), "n": state["n_updates"]}


def _same_models(a: Shard, b: Shard) -> bool:
    """Bit for bit: every head parameter and Adam moment, its sampler and popularity, the re-ranker's weights."""
    x, y = _head_state(a), _head_state(b)
    same_head = (all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])
                 and all(torch.equal(x["optimizer"][i][m], y["optimizer"][i][m]) for i in x["optimizer"] for m in ("exp_avg", "exp_avg_sq"))
                 and x["rng"] == y["rng"] and x["pop"][0] == y["pop"][0] and torch.equal(x["pop"][1], y["pop"][1]) and x["n"] == y["n"])
    return same_head and a.reranker.w.tobytes() == b.reranker.w.tobytes() and a.reranker.examples == b.reranker.examples


def _replay(embedder, catalog, events, shards: int, *, share: bool = True) -> list[Shard]:
    engines = [_shard(embedder, catalog, s, shards, share=share) for s in range(shards)]
    scorer = PrequentialScorer(["full-system"], (10,))
    replay_shared_shards(engines, events, _owner(shards), scorer, batch_size=150)
    return engines


def test_sharing_shards_hold_the_same_models_after_the_log_drains(embedder, catalog, events):
    engines = _replay(embedder, catalog, events, 3)
    assert engines[0].head.n_updates > 0 and engines[0].reranker.examples > 0  # they did learn
    assert all(_same_models(engines[0], other) for other in engines[1:])
    assert len({e.model_version for e in engines}) == 1 and "@x" in engines[0].model_version


def test_each_shard_learns_from_every_shards_users(embedder, catalog, events):
    shared = _replay(embedder, catalog, events, 2)[0]
    alone = [_shard(embedder, catalog, s, 2, share=False) for s in range(2)]
    for s, engine in enumerate(alone):
        mine = [e for e in events if _owner(2)(e.user_id) == s]
        offset = 0
        for chunk in user_disjoint_chunks(mine, 150):
            engine.process([Envelope("events", s, offset + i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(chunk)])
            offset += len(chunk)
    # the shared head counted every shard's positives (its negative sampler's popularity): about
    # both unshared heads' together (each leaves its last part-batch unlearned), far above either
    positives = float(shared.head.state_dict()["pop_counts"].sum())
    alone_positives = [float(e.head.state_dict()["pop_counts"].sum()) for e in alone]
    assert min(alone_positives) > 0 and positives > max(alone_positives)
    assert positives == pytest.approx(sum(alone_positives), rel=0.1)
    assert shared.reranker.examples > max(e.reranker.examples for e in alone)


def _log(embedder, catalog, events, shards: int = 2) -> list[tuple[int, bytes]]:
    """One exchange log of ``shards`` sharing shards (each its own users, its messages in turn)."""
    engines = [_shard(embedder, catalog, s, shards) for s in range(shards)]
    log: list[tuple[int, bytes]] = []
    chunks = [[e for e in events if _owner(shards)(e.user_id) == s] for s in range(shards)]
    for s, engine in enumerate(engines):
        offset = 0
        for chunk in user_disjoint_chunks(chunks[s], 150):
            envs = [Envelope("events", s, offset + i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(chunk)]
            offset += len(chunk)
            for message in engine.process(envs).exchange:
                log.append((len(log), message))
            engine.apply_exchange(log[-1:])  # its own messages come back: the re-ranker sees what it showed
    return log


def test_redelivered_or_republished_messages_teach_the_models_nothing(embedder, catalog, events):
    log = _log(embedder, catalog, events)
    assert {(decode_message(raw).version, decode_message(raw).models) for _, raw in log} == {(3, True)}
    assert any(decode_message(raw).pairs for _, raw in log)
    a, b = (_shard(embedder, catalog, 0), _shard(embedder, catalog, 1))
    a.apply_exchange(log)
    b.apply_exchange(log)
    version = a.model_version
    assert a.apply_exchange(log) == 0  # the same positions again
    assert a.apply_exchange([(len(log) + i, raw) for i, (_, raw) in enumerate(log)]) == 0  # re-published
    assert _same_models(a, b) and a.model_version == version


def test_a_version_1_message_is_still_read_and_teaches_the_models_nothing(embedder, catalog):
    shard = _shard(embedder, catalog, 0)
    item = catalog[0].item_id
    ops = [["u1", None, item, "click", 1_000 + i, [[catalog[1].item_id, "click", 500]]] for i in range(300)]
    assert shard.apply_exchange([(0, encode_message(1, 1, ops))]) == 1
    assert len(shard.popularity) > 0 and shard.head.n_updates == 0 and shard.shared_models.pending == []


def test_a_restarted_shard_ends_with_the_models_of_one_that_never_stopped(tmp_path, embedder, catalog, events):
    log = _log(embedder, catalog, events)
    whole = _shard(embedder, catalog, 1)
    whole.apply_exchange(log)

    def reopen() -> Shard:
        return _shard(embedder, catalog, 1, kv=RocksKV(str(tmp_path / "rocks")), state_dir=str(tmp_path),
                      head_snapshot_interval_s=5.0, clock=_Clock())

    third = len(log) // 3
    first = reopen()
    for position in range(2 * third):  # message by message, each its own atomic write
        first.apply_exchange(log[position:position + 1])
    stored = dict(first.kv.iter_prefix(b"xm:"))
    assert MODEL_CHECKPOINT_KEY in stored and any(k.startswith(MODEL_REPLAY_PREFIX) for k in stored)
    first.kv.close()  # a crash: nothing else is saved
    again = reopen()
    assert again.apply_exchange(log) == len(log) - 2 * third  # the consumer restarts at the beginning
    assert _same_models(again, whole) and again.model_version == whole.model_version
    assert all(p.startswith(b"xm:") for p in SHARED_MODEL_PREFIXES)
    again.kv.close()


def test_a_shard_whose_items_text_changed_then_stopped_in_order_ends_with_the_models_of_one_that_never_stopped(
        tmp_path, embedder, catalog, events):
    """`recsys run` stopping in order checkpoints the shared models (``Shard.checkpoint_shared_models``),
    so the restart learns no message again. Before, it learned every message since the last
    checkpoint again with the catalog in its state, and a catalog update that had changed an item's
    text after those messages made their head steps read the item's new vector: the shard's models
    parted from the other shards'."""
    from collections import Counter
    from dataclasses import replace

    log = _log(embedder, catalog, events)
    cut = 2 * len(log) // 3
    named = Counter(i for _, raw in log[:cut] for op in decode_message(raw).ops if op[5]
                    for i in (op[2], *(h[0] for h in op[5])))
    item = next(c for c in catalog if c.item_id == named.most_common(1)[0][0])
    renamed = replace(item, title="a cast-iron garden bench, weathered green", description="heavy, for outdoors")
    whole = _shard(embedder, catalog, 1)
    whole.apply_exchange(log[:cut])
    whole.upsert_catalog([renamed])
    whole.apply_exchange(log[cut:])

    def reopen() -> Shard:  # no checkpoint of its own within the run (an hour apart)
        return _shard(embedder, catalog, 1, kv=RocksKV(str(tmp_path / "rocks")), state_dir=str(tmp_path),
                      head_snapshot_interval_s=3600.0)

    first = reopen()
    first.apply_exchange(log[:cut])
    first.upsert_catalog([renamed])  # committed to its state
    first.checkpoint_shared_models()  # a stop in order
    first.kv.close()
    again = reopen()
    again.upsert_catalog([renamed])  # the catalog topic read on from the state's position
    assert again.apply_exchange(log) == len(log) - cut
    assert _same_models(again, whole) and again.model_version == whole.model_version
    again.kv.close()


def test_a_recommendation_names_the_shared_model_version_that_made_it(embedder, catalog, events):
    log = _log(embedder, catalog, events)
    half = len(log) // 2
    a, b = (_shard(embedder, catalog, s, kv=MemoryKV()) for s in range(2))
    for shard in (a, b):
        shard.apply_exchange(log[:half])
    user = next(e for e in events if _owner(2)(e.user_id) == 0)
    first = orjson.loads(a.process([Envelope("events", 0, 0, user.user_id.encode(), encode(user), user.ts)]).recommendations[0][1])
    assert first["model_version"] == a.model_version == b.model_version  # same log position: same models
    assert first["model_version"].endswith(f"@x{a.shared_models.position}") and a.shared_models.position >= 0
    a.apply_exchange(log[half:])
    assert a.model_version != first["model_version"]  # the models moved on; the sent one still names its own


class _Still:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.t = 5_000.0

    def __call__(self) -> float:
        return self.t


def _waiting_shard(embedder, items, shard: int, clock) -> Shard:
    """A live-like sharing shard: unknown items are not admitted (they wait for the catalog)."""
    settings = Settings(state_ttl_days=36_500.0, shards=2, shard=shard, share_signals=True, unknown_item_wait_s=2.0)
    engine = Shard(settings, MemoryKV(), embedder, clock=clock)
    engine.upsert_catalog(items)
    return engine


def _message_naming(catalog, new_item: str) -> bytes:
    """One exchange message of 300 head examples (a full training batch), one of them ending
    on ``new_item``: the head learns from it as soon as it is applied."""
    ts, ops = 1_700_000_000_000, []
    for i in range(300):
        prev, item = catalog[i % 40].item_id, catalog[(i * 7 + 1) % 40].item_id
        ops.append([f"u{i}", None, new_item if i == 150 else item, "click", ts + i, [[prev, "click", ts + i - 1]]])
    return encode_message_v2(0, 1, ops, [])


def test_a_message_naming_an_item_not_in_the_catalog_yet_waits_for_its_record(embedder, catalog):
    """Live, shard 1 reads shard 0's message before the new item's catalog record: its head must
    not learn a zero vector for the item where shard 0's learns the item's own."""
    fresh = CatalogItem("fresh-1", title="insulated two person trail tent", category="tents", brand="acme", price=99.0)
    clock = _Still()
    origin, late = _waiting_shard(embedder, [*catalog, fresh], 0, clock), _waiting_shard(embedder, catalog, 1, clock)
    log = [(0, _message_naming(catalog, fresh.item_id))]
    origin.apply_exchange(log)
    assert origin.shared_models.head_calls == 1
    late.apply_exchange(log)
    assert late.exchange.position == -1 and late.shared_models.head_calls == 0  # held: nothing applied
    assert len(late.popularity) == 0  # signals wait with the models: one log, one position
    clock.t += 1.0
    late.process([Envelope("catalog", 0, 0, b"fresh-1", encode(fresh), 0)])  # the record arrives
    assert late.exchange.position == 0 and late.shared_models.head_calls == 1
    assert model_checksum(late) == model_checksum(origin)
    assert late.signal_checksum() == origin.signal_checksum()


def test_a_held_message_is_applied_after_the_wait_without_the_record_and_counted(embedder, catalog):
    """Bounded: past ``unknown_item_wait_s`` the log goes on (signals must not stall for good);
    the head then learns a zero vector for the item, which is why it waits first."""
    fresh = CatalogItem("fresh-2", title="ultralight down sleeping bag", category="bags", brand="acme", price=150.0)
    clock = _Still()
    origin, late = _waiting_shard(embedder, [*catalog, fresh], 0, clock), _waiting_shard(embedder, catalog, 1, clock)
    log = [(0, _message_naming(catalog, fresh.item_id))]
    origin.apply_exchange(log)
    late.apply_exchange(log)
    clock.t += 1.0
    late.process([])
    assert late.exchange.position == -1  # still within the wait
    clock.t += 1.5
    late.process([])
    assert late.exchange.position == 0 and late.totals["exchange_unknown_items"] == 1
    assert late.signal_checksum() == origin.signal_checksum()
    assert model_checksum(late) != model_checksum(origin)  # the zero vector: what the wait avoids


def test_sharing_shards_draw_the_rerankers_negatives_from_streams_of_their_own(embedder, catalog):
    """The shards pool their re-ranker steps through the log: drawn from one seed everywhere,
    every shard would pick the same negative positions at the same time (each draw N times in
    the pooled steps). Shard 0 keeps one process's stream, so one shard still equals it."""
    one = _shard(embedder, catalog, 0, 1, share=False)
    draws = []
    for s in range(3):
        shard = _shard(embedder, catalog, s, 3)
        draws.append(shard.reranker.rng.choice(20, size=3, replace=False).tolist())
    assert draws[0] == one.reranker.rng.choice(20, size=3, replace=False).tolist()
    assert draws[0] != draws[1] and draws[1] != draws[2] and draws[0] != draws[2]
    alone = [_shard(embedder, catalog, s, 3, share=False).reranker.rng.random() for s in range(2)]
    assert alone[0] == alone[1]  # --no-share is unchanged: each shard alone, as before
