"""Shards share the global signals through one ordered log of signal operations (issue 11)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from dataflows.kafka_io import partition_for_key
from recsys.backtest.protocols import PrequentialScorer
from recsys.backtest.shards import model_checksum, replay_shared_shards
from recsys.events import Envelope, Event, encode
from recsys.settings import Settings
from recsys.shard.batching import user_disjoint_chunks
from recsys.shard.step import Shard
from recsys.signals.exchange import ExchangeFormatError, OpMessage, decode_message, encode_message
from recsys.store.kv import MemoryKV, RocksKV
from recsys.synthetic import generate_catalog, generate_events


@pytest.fixture(scope="module")
def catalog():
    return generate_catalog(80, seed=31)


@pytest.fixture(scope="module")
def events(catalog):
    return generate_events(1500, catalog, n_users=60, seed=32)


def _settings(**kw) -> Settings:
    return Settings(head_enabled=False, unknown_items="admit", state_ttl_days=36_500.0, **kw)


def _open(tmp_path, embedder, catalog, name: str, *, shard: int = 0, shards: int = 2, share: bool = True) -> Shard:
    """A shard on real RocksDB in ``tmp_path/name`` (reopened when it exists); close with :func:`_close`."""
    settings = _settings(state_dir=str(tmp_path / name), shards=shards, shard=shard, share_signals=share)
    engine = Shard(settings, RocksKV(str(tmp_path / name / "rocks")), embedder)
    engine.upsert_catalog(catalog)
    return engine


def _close(*shards: Shard) -> None:
    for shard in shards:
        shard.kv.close()  # the embedder is the module's


def _batches(events, shards: int, shard: int, size: int = 100):
    """The envelope batches of one shard's users (owned as Kafka's partitioner would own them)."""
    mine = [e for e in events if partition_for_key(e.user_id.encode(), shards) == shard]
    offset = 0
    for chunk in user_disjoint_chunks(mine, size):
        yield [Envelope("events", shard, offset + i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(chunk)]
        offset += len(chunk)


def _log_of_two_shards(tmp_path, embedder, catalog, events) -> tuple[list[tuple[int, bytes]], list[Shard]]:
    """Two sharing shards process their users' events; their messages form one log, shard 0's first."""
    shards = [_open(tmp_path, embedder, catalog, f"s{s}", shard=s) for s in range(2)]
    log: list[tuple[int, bytes]] = []
    for s, shard in enumerate(shards):
        for batch in _batches(events, 2, s):
            for message in shard.process(batch).exchange:
                log.append((len(log), message))
    return log, shards


def test_an_op_message_round_trips_and_names_its_version():
    ops = [["u1", "s9", "b", "click", 1_700_000_000_123, [["a", "browse", 1_700_000_000_000], ["c", "cart", 5]]],
           ["u2", None, "é", "purchase", 7, None]]
    raw = encode_message(4, 12, ops)
    assert decode_message(raw) == OpMessage(4, 12, ops)
    with pytest.raises(ExchangeFormatError, match="version 1, 2 or 3"):
        decode_message(b"X9" + raw[2:])


def test_a_sharing_shard_records_instead_of_applying_and_seals_one_message_per_batch(tmp_path, embedder, catalog, events):
    shard = _open(tmp_path, embedder, catalog, "s0")
    batch = next(_batches(events, 2, 0))
    result = shard.process(batch)
    message = decode_message(result.exchange[0])
    assert len(result.exchange) == 1 and (message.origin, message.seq) == (0, 1)
    items = [orjson.loads(env.value).get("item_id") for env in batch]
    assert [op[2] for op in message.ops] == [i for i in items if i is not None]  # each event's updates, in order
    assert len(shard.covisit) == 0 and len(shard.popularity) == 0  # nothing applied until the log says so
    assert shard.exchange.pending() == [result.exchange[0]]  # in the outbox until seen back
    shard.apply_exchange([(0, result.exchange[0])])
    assert len(shard.popularity) > 0 and shard.exchange.pending() == []
    _close(shard)


def test_two_shards_applying_the_same_log_in_order_hold_byte_identical_signals(tmp_path, embedder, catalog, events):
    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    for shard in shards:
        assert shard.apply_exchange(log) == len(log)
    sums = {shard.signal_checksum() for shard in shards}
    assert len(sums) == 1 and len(shards[0].covisit) > 0 and len(shards[0].sessions) > 0
    # and it is the committed state: reopened, each shard still says the same
    _close(*shards)
    again = _open(tmp_path, embedder, catalog, "s1", shard=1)
    assert again.signal_checksum() in sums and again.exchange.position == len(log) - 1
    _close(again)


def test_the_same_ops_in_another_order_may_end_in_other_bytes(tmp_path, embedder, catalog, events):
    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    first_of_each = [next(r for r in log if decode_message(r[1]).origin == s) for s in (0, 1)]
    shards[0].apply_exchange([(0, first_of_each[0][1]), (1, first_of_each[1][1])])
    shards[1].apply_exchange([(0, first_of_each[1][1]), (1, first_of_each[0][1])])
    # session slots (and with them the session records) go to whoever's session came first
    assert shards[0].signal_checksum() != shards[1].signal_checksum()
    _close(*shards)


def test_redelivered_or_republished_messages_change_nothing(tmp_path, embedder, catalog, events):
    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    shard = shards[0]
    shard.apply_exchange(log)
    digest = shard.signal_checksum()
    assert shard.apply_exchange(log) == 0  # the same positions again (a consumer rewound)
    republished = [(len(log) + i, raw) for i, (_, raw) in enumerate(log)]  # an outbox re-send after a crash
    assert shard.apply_exchange(republished) == 0
    assert shard.signal_checksum() == digest and shard.exchange.position == 2 * len(log) - 1
    _close(*shards)


def test_a_shard_restarted_part_way_applies_the_rest_once(tmp_path, embedder, catalog, events):
    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    shards[0].apply_exchange(log)
    half = len(log) // 2
    shards[1].apply_exchange(log[:half])
    _close(*shards)
    restarted = _open(tmp_path, embedder, catalog, "s1", shard=1)
    assert restarted.apply_exchange(log) == len(log) - half  # the consumer restarts from the beginning
    whole = _open(tmp_path, embedder, catalog, "s0", shard=0)
    assert restarted.signal_checksum() == whole.signal_checksum()
    _close(restarted)
    _close(whole)


def test_sealed_messages_wait_in_the_outbox_across_a_restart(tmp_path, embedder, catalog, events):
    shard = _open(tmp_path, embedder, catalog, "s0")
    batches = list(_batches(events, 2, 0))
    sealed = [m for batch in batches[:2] for m in shard.process(batch).exchange]
    _close(shard)
    restarted = _open(tmp_path, embedder, catalog, "s0")
    assert restarted.exchange.pending() == sealed  # published again after a crash before publishing
    assert decode_message(restarted.process(batches[2]).exchange[0]).seq == 3  # numbering goes on
    _close(restarted)


def _forget(user_id: str, offset: int) -> Envelope:
    return Envelope("control", 0, offset, None, orjson.dumps({"type": "forget_user", "user_id": user_id}), 1_900_000_000_000)


def test_an_erasure_drops_the_users_sessions_at_one_log_position_on_every_shard(tmp_path, embedder, catalog, events):
    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    owner = next(s for s in (0, 1) if any(partition_for_key(e.user_id.encode(), 2) == s for e in events))
    user = next(e.user_id for e in events if partition_for_key(e.user_id.encode(), 2) == owner and e.item_id)
    # shard 0 reads the erasure before it applies the log, shard 1 after: at different positions
    for message in shards[0].process([_forget(user, 0)]).exchange:
        log.append((len(log), message))
    shards[0].apply_exchange(log)
    shards[1].apply_exchange(log)
    for message in shards[1].process([_forget(user, 0)]).exchange:
        log.append((len(log), message))
    for shard in shards:
        shard.apply_exchange(log)
    assert shards[0].signal_checksum() == shards[1].signal_checksum()
    assert all(user not in {s[0] for s in shard.sessions._sessions.values()} for shard in shards)
    assert any(True for _ in shards[0].kv.iter_prefix(b"ses:"))  # everyone else's sessions are still there
    _close(*shards)


def test_an_offline_erasure_waits_in_the_outbox_for_the_log(tmp_path, embedder, catalog, events):
    shard = _open(tmp_path, embedder, catalog, "s0")
    user = next(e.user_id for e in events if partition_for_key(e.user_id.encode(), 2) == 0 and e.item_id)
    sealed = [m for batch in _batches(events, 2, 0) for m in shard.process(batch).exchange]
    shard.apply_exchange(list(enumerate(sealed)))
    assert user in {s[0] for s in shard.sessions._sessions.values()}
    assert shard.forget([user]) == 1 and len(shard.exchange.pending()) == 1  # `recsys forget --offline`
    assert user in {s[0] for s in shard.sessions._sessions.values()}  # not before the log says so
    shard.apply_exchange([(len(sealed), shard.exchange.pending()[0])])
    assert user not in {s[0] for s in shard.sessions._sessions.values()} and shard.exchange.pending() == []
    _close(shard)


def test_sharing_off_records_nothing_and_writes_no_exchange_keys(tmp_path, embedder, catalog, events):
    shard = _open(tmp_path, embedder, catalog, "s0", shards=1, share=False)
    result = shard.process(next(_batches(events, 1, 0)))
    assert result.exchange == [] and shard.exchange is None and len(shard.popularity) > 0
    assert list(shard.kv.iter_prefix(b"x:")) == []
    _close(shard)


def _user_of(shard: int, shards: int = 2, prefix: str = "q") -> str:
    return next(f"{prefix}{i}" for i in range(100) if partition_for_key(f"{prefix}{i}".encode(), shards) == shard)


def _event_env(event: Event, shard: int, offset: int) -> Envelope:
    return Envelope("events", shard, offset, event.user_id.encode(), encode(event), event.ts)


def test_search_associations_learned_on_one_shard_are_found_by_a_search_on_the_other(tmp_path, embedder, catalog):
    shards = [_open(tmp_path, embedder, catalog, f"s{s}", shard=s) for s in range(2)]
    query, item, ts = "zorblax quintessa", catalog[7].item_id, 1_700_000_000_000
    a_user, b_user = _user_of(0), _user_of(1)

    def search_on_b(offset: int) -> list[str]:
        result = shards[1].process([_event_env(Event(f"b{offset}", "search", b_user, None, ts + offset, query=query), 1, offset)])
        (_, payload), = result.search_results
        return [i["item_id"] for i in orjson.loads(payload)["items"]]

    assert item not in search_on_b(0)  # nothing ties the made-up words to the item yet
    # shard 0's user searches, then buys the item: the association goes into shard 0's message
    log = [(0, m) for m in shards[0].process([
        _event_env(Event("a0", "search", a_user, None, ts + 10, query=query), 0, 0),
        _event_env(Event("a1", "purchase", a_user, item, ts + 20), 0, 1)]).exchange]
    assert len(log) == 1 and shards[0].search.associations.weights("quintessa zorblax") == {}  # recorded, not learned
    for shard in shards:
        shard.apply_exchange(log)
    learned = [shard.search.associations.top("quintessa zorblax", 5) for shard in shards]
    assert learned[0] == learned[1] == [(item, 0.25)]
    assert item in search_on_b(1)  # shard 1 learned it from shard 0's engagement
    # the associations are global signals: identical records, in the checksum and the snapshots
    records = [dict(shard.kv.iter_prefix(b"sqa:")) for shard in shards]
    assert records[0] == records[1] != {} and shards[0].signal_checksum() == shards[1].signal_checksum()
    _close(*shards)


def test_a_search_op_sealed_before_ops_carried_its_time_is_learned_after_what_the_query_holds(tmp_path, embedder, catalog):
    """Ops now carry the engagement's event time and tie-break (the associations average in event
    time); an op sealed by the release before has ``None`` there and counts as the query's newest."""
    from recsys.signals.exchange import SEARCH_OP

    shard = _open(tmp_path, embedder, catalog, "s0")
    a, b = catalog[1].item_id, catalog[2].item_id
    shard.exchange.apply_ops([["tent", [2_000, 7], a, SEARCH_OP, 1.0, None], ["tent", None, b, SEARCH_OP, 1.0, None]])
    assert shard.search.associations.top("tent", 2) == [(b, 0.25), (a, 0.1875)]
    _close(shard)


def _search_traffic(shards: list[Shard], catalog, batches: int) -> None:
    """Many users on both shards search and engage, interleaved; every shard applies the log in
    its order, some while the other shard is still sealing; at the end both apply all of it."""
    rng = np.random.default_rng(5)
    queries = ["running shoe", "trail tent", "camp stove", "rain jacket"]
    log: list[tuple[int, bytes]] = []
    offsets, ts = [0, 0], 1_700_000_000_000
    for batch in range(batches):
        for s, shard in enumerate(shards):
            envs = []
            for u in range(3):
                user = _user_of(s, prefix=f"w{batch % 4}-{u}-")
                ts += 1000
                envs.append(_event_env(Event(f"{user}-{ts}", "search", user, None, ts, query=str(rng.choice(queries))), s, offsets[s]))
                offsets[s] += 1
                for _ in range(2):
                    ts += 1000
                    kind = str(rng.choice(["click", "add_to_cart", "purchase", "browse"]))
                    envs.append(_event_env(Event(f"{user}-{ts}", kind, user, catalog[int(rng.integers(20))].item_id, ts), s, offsets[s]))
                    offsets[s] += 1
            log.extend((len(log) + i, m) for i, m in enumerate(shard.process(envs).exchange))
        if shards[0].exchange is not None:
            shards[batch % 2].apply_exchange(log)  # one shard keeps up, the other lags a batch
    for shard in shards:
        if shard.exchange is not None:
            shard.apply_exchange(log)


def test_two_sharing_shards_end_with_identical_search_associations(tmp_path, embedder, catalog):
    shards = [_open(tmp_path, embedder, catalog, f"s{s}", shard=s) for s in range(2)]
    _search_traffic(shards, catalog, 12)
    assert len(shards[0].search.associations) >= 3
    assert dict(shards[0].kv.iter_prefix(b"sqa:")) == dict(shards[1].kv.iter_prefix(b"sqa:"))
    assert shards[0].signal_checksum() == shards[1].signal_checksum()
    _close(*shards)


def test_two_sharing_shards_learn_the_same_search_reranker_from_both_shards_engagements(tmp_path, embedder, catalog):
    """Search's re-ranker learned per shard until 2026-12-03: each from its own users'
    engagements, so two shards ranked the same query for the same shopper with other weights.
    Now the shard that showed the list samples the step and every shard takes it from the log:
    the same weights everywhere, learned from both shards' engagements (more than either's own)."""
    alone = [_open(tmp_path, embedder, catalog, f"alone{s}", shard=s, share=False) for s in range(2)]
    _search_traffic(alone, catalog, 30)
    own = [shard.search.reranker.examples for shard in alone]
    assert min(own) > 0
    shards = [_open(tmp_path, embedder, catalog, f"s{s}", shard=s) for s in range(2)]
    _search_traffic(shards, catalog, 30)
    rerankers = [shard.search.reranker for shard in shards]
    assert rerankers[0].examples == rerankers[1].examples > max(own)
    assert rerankers[0].w.tobytes() == rerankers[1].w.tobytes() and rerankers[0].w.any()
    assert shards[0].search.version == shards[1].search.version
    # the weights are state, committed with the log position (and in the snapshots)
    assert shards[0].kv.get(b"sqr:weights") == shards[1].kv.get(b"sqr:weights") is not None
    assert model_checksum(shards[0]) == model_checksum(shards[1])
    _close(*alone, *shards)


def _scores(result_models) -> tuple[float, float]:
    m = result_models["full-system"]
    return m["hr@10"], m["ndcg@10"]


def _replay(embedder, catalog, evs, n: int, share: bool) -> tuple[float, float, str]:
    """Prequential HR@10, NDCG@10 and shard 0's signal checksum of ``n`` in-memory shards."""
    scorer = PrequentialScorer(["full-system"], (10,))
    shards = []
    for s in range(n):
        shard = Shard(_settings(shards=n, shard=s, share_signals=share), MemoryKV(), embedder, evaluate=True, emit=False)
        shard.eval_k = 10
        shard.upsert_catalog(catalog)
        shards.append(shard)
    owner = (lambda u: partition_for_key(u.encode(), n))
    if share:
        replay_shared_shards(shards, evs, owner, scorer, batch_size=100)
    else:  # as `recsys replay --no-share`: each shard alone, one after the other
        for s, shard in enumerate(shards):
            for batch in _batches(evs, n, s):
                for sb in shard.process(batch).scored:
                    scorer.score_chunk(sb.events, {"full-system": sb.recommended})
    digest = shards[0].signal_checksum()
    result = scorer.result([type("Named", (), {"name": "full-system"})()], {"full-system": {}}, n_events=len(evs),
                           catalog_size=len(catalog), seconds=1.0, batch_size=100, dataset="synthetic")
    return (*_scores(result["models"]), digest)


def test_one_sharing_shard_scores_and_learns_exactly_as_one_unshared_process(embedder, catalog, events):
    shared = _replay(embedder, catalog, events, 1, True)
    alone = _replay(embedder, catalog, events, 1, False)
    assert shared == alone  # same HR, NDCG and the same signal bytes: lag 1 hides nothing from the scoring


def _chain_sessions(n_users: int, n_items: int, seed: int, session_len: int = 4) -> list[Event]:
    """Anonymous sessions that walk item chains (i -> its successor, 80%): only what *other*
    users did predicts the next click, so a shard learning from half of them knows less."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(n_items)
    events, ts = [], 1_700_000_000_000
    for u in range(n_users):
        item = int(rng.integers(n_items))
        for _ in range(session_len):
            ts += 1000
            events.append(Event(f"e{len(events)}", "click", f"u{u}", f"i{item}", ts))
            item = int(successor[item]) if rng.random() < 0.8 else int(rng.integers(n_items))
    return events


def test_two_sharing_shards_score_closer_to_one_process_than_two_alone(embedder):
    catalog = generate_catalog(150, seed=41)
    evs = _chain_sessions(400, 150, seed=42)
    one = _replay(embedder, catalog, evs, 1, False)
    shared = _replay(embedder, catalog, evs, 2, True)
    alone = _replay(embedder, catalog, evs, 2, False)
    # measured: HR@10 0.535 one process, 0.533 two sharing shards, 0.451 two alone
    assert abs(shared[0] - one[0]) < abs(alone[0] - one[0]) / 4, (one, shared, alone)


@pytest.mark.parametrize("lag", [1, 3])
def test_replayed_shards_end_with_identical_signals_whatever_the_exchange_lag(embedder, catalog, events, lag):
    shards = []
    for s in range(3):
        shard = Shard(_settings(shards=3, shard=s, share_signals=True), MemoryKV(), embedder, evaluate=True, emit=False)
        shard.upsert_catalog(catalog)
        shards.append(shard)
    stats = replay_shared_shards(shards, events, lambda u: partition_for_key(u.encode(), 3),
                                 PrequentialScorer(["full-system"], (10,)), batch_size=100, lag=lag)
    assert len({shard.signal_checksum() for shard in shards}) == 1
    assert stats["applied_ops"] == 3 * sum(1 for e in events if e.item_id is not None)  # every op, on every shard
    assert stats["exchange_bytes"] > 0 and all(shard.exchange.position == stats["exchange_messages"] - 1 for shard in shards)
