"""Issue 9, the state faults: no event changes another user's state, re-sent events count once,
idle users and their outboxes leave the disk, hostile values are refused with a reason."""

from __future__ import annotations

import orjson
import pytest

from recsys.events import CatalogItem, Envelope, Event, encode
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.store.users import decode_user, user_key

T0 = 1_700_000_000_000
DAY_MS = 86_400_000
ITEMS = [CatalogItem(f"i{n}", f"product number {n}", category="things") for n in range(20)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("emb"))


def _settings(tmp_path, cache, **kw) -> Settings:
    kw.setdefault("head_enabled", False)
    kw.setdefault("head_snapshot_interval_s", 3600)
    return Settings(state_dir=str(tmp_path / "state"), embed_cache_dir=cache, **kw)


def _open(tmp_path, cache, **kw) -> Shard:
    engine = Shard.open(_settings(tmp_path, cache, **kw))
    engine.upsert_catalog(ITEMS)
    return engine


def _env(event: Event, offset: int, *, broker_ts: int | None = None, partition: int = 0) -> Envelope:
    ts = event.ts if broker_ts is None else broker_ts
    return Envelope("events", partition, offset, event.user_id.encode(), encode(event), ts)


def _dead_reasons(result) -> list[str]:
    return [orjson.loads(p)["reason"] for _, p in result.dead_letters]


# --------------------------------------------------------------------------- defect 2


def test_an_event_from_the_year_9998_leaves_100_other_users_intact(tmp_path, cache):
    engine = _open(tmp_path, cache)
    users = [f"u{n}" for n in range(100)]
    engine.process([_env(Event(f"a{n}", "click", u, f"i{n % 20}", T0 + n), n) for n, u in enumerate(users)])
    later = T0 + 60_000
    batch = [_env(Event(f"b{n}", "click", u, f"i{(n + 1) % 20}", later + n), 100 + n) for n, u in enumerate(users)]
    year_9998 = 253_370_764_800_000
    batch.insert(50, _env(Event("bad", "click", "clockbug", "i3", year_9998), 200, broker_ts=later))
    result = engine.process(batch)

    reasons = _dead_reasons(result)
    assert len(reasons) == 1 and "ahead of the message's broker timestamp" in reasons[0] and "RECSYS_MAX_EVENT_AHEAD_S" in reasons[0]
    states = engine.users.get_many(users, now_ts=later)
    assert all(len(states[u].history) == 2 for u in users), [u for u in users if len(states[u].history) != 2][:5]
    assert engine.kv.get(user_key("clockbug")) is None
    engine.close()


def test_an_event_within_the_allowed_clock_skew_is_applied(tmp_path, cache):
    engine = _open(tmp_path, cache, max_event_ahead_s=600)
    ok = engine.process([_env(Event("e1", "click", "u", "i1", T0 + 500_000), 0, broker_ts=T0)])
    assert ok.counts["applied"] == 1 and not ok.dead_letters
    late = engine.process([_env(Event("e2", "click", "u", "i2", T0 + 700_000), 1, broker_ts=T0)])
    assert late.counts["dead_letters"] == 1 and late.counts["applied"] == 0
    engine.close()


def test_idle_expiry_is_per_user_against_their_own_event_time(tmp_path, cache):
    # broker timestamps equal event times here, so only the TTL can act: a user back after
    # 2 days starts afresh; one back after an hour, in the same batch, keeps everything
    engine = _open(tmp_path, cache, state_ttl_days=1.0)
    engine.process([_env(Event("a1", "purchase", "gone", "i1", T0), 0), _env(Event("b1", "purchase", "stays", "i2", T0), 1)])
    engine.process([
        _env(Event("b2", "click", "stays", "i3", T0 + 3_600_000), 2),
        _env(Event("a2", "click", "gone", "i4", T0 + 2 * DAY_MS), 3),
    ])
    states = {u: decode_user(engine.kv.get(user_key(u))) for u in ("gone", "stays")}
    assert [h[0] for h in states["stays"].history] == ["i2", "i3"] and states["stays"].bought == {"i2": 1}
    assert [h[0] for h in states["gone"].history] == ["i4"] and states["gone"].bought == {}
    engine.close()


# --------------------------------------------------------------------------- defect 3


def test_a_resent_event_id_is_counted_once_even_across_a_restart(tmp_path, cache):
    buy = Event("order-17", "purchase", "u", "i5", T0)
    engine = _open(tmp_path, cache)
    first = engine.process([_env(buy, 0), _env(buy, 1)])  # a retry in the same poll
    assert first.counts["applied"] == 1 and first.counts["duplicates"] == 1
    engine.close()

    engine = _open(tmp_path, cache)  # a re-run of the upstream job, after a restart
    again = engine.process([_env(buy, 2), _env(Event("order-18", "click", "u", "i6", T0 + 1), 3)])
    assert again.counts["duplicates"] == 1 and again.counts["applied"] == 1
    state = engine.users.get_many(["u"], now_ts=T0)["u"]
    assert state.bought == {"i5": 1}
    assert [h[0] for h in state.history] == ["i5", "i6"]
    assert state.counts["purchase"] == pytest.approx(1.0, rel=1e-6)
    engine.close()


def test_the_dedup_window_is_bounded_and_other_users_may_reuse_an_id(tmp_path, cache):
    engine = _open(tmp_path, cache, dedup_window=3)
    events = [Event(f"e{n}", "click", "u", f"i{n}", T0 + n) for n in range(5)]
    engine.process([_env(e, n) for n, e in enumerate(events)])
    state = engine.users.get_many(["u"], now_ts=T0)["u"]
    assert state.recent_ids == ["e2", "e3", "e4"]
    # another user's event with the same id is theirs; an id older than the window is applied again
    result = engine.process([_env(Event("e4", "click", "v", "i1", T0 + 9), 5), _env(Event("e0", "click", "u", "i0", T0 + 10), 6)])
    assert result.counts["applied"] == 2 and result.counts["duplicates"] == 0
    engine.close()


# --------------------------------------------------------------------------- defect 8


def test_the_running_sweep_deletes_idle_users_and_their_outboxes_but_never_a_live_one(tmp_path, cache):
    engine = _open(tmp_path, cache, state_ttl_days=1.0, sweep_keys_per_batch=10)
    idle = [f"idle{n:02d}" for n in range(30)]
    engine.process([_env(Event(f"a{n}", "click", u, f"i{n % 20}", T0 + n), n) for n, u in enumerate(idle)])
    engine.process([_env(Event("l1", "click", "live", "i1", T0 + DAY_MS // 2), 30)])
    assert all(engine.kv.get(b"o:" + u.encode()) for u in idle)  # each has an outbox
    swept, offset = [], 31
    for n in range(6):  # the newest event is 1.2 days after the idle users' last one
        result = engine.process([_env(Event(f"f{n}", "click", "fresh", "i2", T0 + int(1.2 * DAY_MS) + n), offset)])
        offset += 1
        swept.append(result.counts["swept_users"])
    assert max(swept) <= 10 and sum(swept) == 30  # a bounded slice per batch, every idle user once
    users = {k[2:].decode() for k, _ in engine.kv.iter_prefix(b"u:")}
    outboxes = {k[2:].decode() for k, _ in engine.kv.iter_prefix(b"o:")}
    assert users == outboxes == {"live", "fresh"}
    assert len(engine.users.get_many(["live"], now_ts=T0)["live"].history) == 1
    engine.close()


def test_the_sweep_reads_no_records_while_no_stored_user_can_have_expired(tmp_path, cache):
    engine = _open(tmp_path, cache, state_ttl_days=1.0, sweep_keys_per_batch=10)
    scans = []
    iter_from = engine.kv.iter_from
    engine.kv.iter_from = lambda start, prefix: scans.append(start) or iter_from(start, prefix)
    idle = [f"idle{n:02d}" for n in range(30)]
    engine.process([_env(Event(f"a{n}", "click", u, f"i{n % 20}", T0 + n), n) for n, u in enumerate(idle)])
    read = len(scans)  # a full pass over the store as it was: every record is now known >= T0
    for n in range(3):  # less than the TTL after the oldest record: no slice can find anything
        engine.process([_env(Event(f"w{n}", "click", "w", "i1", T0 + DAY_MS // 2 + n), 30 + n)])
    assert len(scans) == read
    result = engine.process([_env(Event("f", "click", "fresh", "i2", T0 + int(1.2 * DAY_MS)), 40)])
    assert len(scans) == read + 1 and result.counts["swept_users"] == 10  # the bounded slice again
    engine.close()


def test_the_sweep_spares_a_user_of_the_same_batch_and_can_be_switched_off(tmp_path, cache):
    engine = _open(tmp_path, cache, state_ttl_days=1.0, sweep_keys_per_batch=0)
    engine.process([_env(Event("a", "click", "old", "i1", T0), 0)])
    engine.process([_env(Event("b", "click", "new", "i1", T0 + 2 * DAY_MS), 1)])
    assert engine.kv.get(user_key("old")) is not None  # no sweep: reset on its next event only
    engine.close()
    engine = _open(tmp_path, cache, state_ttl_days=1.0, sweep_keys_per_batch=100)
    # "old" is expired at the stream's clock, but it has an event in this very batch
    result = engine.process([_env(Event("c", "click", "new", "i2", T0 + 2 * DAY_MS + 1), 2), _env(Event("d", "click", "old", "i3", T0 + 2 * DAY_MS), 3)])
    assert result.counts["swept_users"] == 0
    assert [h[0] for h in decode_user(engine.kv.get(user_key("old"))).history] == ["i3"]
    engine.close()


# --------------------------------------------------------------------------- hostile values

_CLICK = b'{"event_id": "h1", "type": "purchase", "user_id": "u-h", "item_id": "i1", "ts": 1700000000000'
HOSTILE = {
    "price 1e308": (_CLICK + b', "price": 1e308}', "field 'price': 1e+308 is above the limit of 1e+12"),
    "quantity of 300 digits": (_CLICK + b', "quantity": ' + b"9" * 300 + b"}", "field 'quantity': 1e+300 is above the limit of 1000000"),
    "NUL in user_id": (_CLICK.replace(b'"u-h"', b'"u\\u0000h"') + b"}", "field 'user_id': contains the control, bidirectional or invisible character U+0000"),
    "right-to-left override in item_id": (_CLICK.replace(b'"i1"', '"i\u202e1"'.encode()) + b"}", "field 'item_id': contains the control, bidirectional or invisible character U+202E"),
    "context nested 500 deep": (_CLICK + b', "context": ' + b'{"a": ' * 500 + b"1" + b"}" * 500 + b"}", "field 'context': nested deeper than 16 levels"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_value_is_dead_lettered_with_its_reason(tmp_path, cache, case):
    raw, reason = HOSTILE[case]
    engine = _open(tmp_path, cache)
    result = engine.process([Envelope("events", 0, 0, b"u-h", raw, T0)])
    assert _dead_reasons(result) == [reason]
    assert result.counts["applied"] == 0 and not list(engine.kv.iter_prefix(b"u:"))
    engine.close()


def test_values_at_the_limits_are_accepted(tmp_path, cache):
    ok = _CLICK + b', "price": 1e12, "quantity": 1000000, "context": ' + b'{"a": ' * 15 + b"[1]" + b"}" * 15 + b"}"
    engine = _open(tmp_path, cache)
    result = engine.process([Envelope("events", 0, 0, b"u-h", ok, T0)])
    assert result.counts["applied"] == 1 and not result.dead_letters
    engine.close()


def test_a_catalog_item_with_attributes_nested_300_deep_is_dead_lettered_not_a_crash(tmp_path, cache):
    raw = b'{"item_id": "deep", "title": "t", "attributes": ' + b'{"a": ' * 300 + b"1" + b"}" * 300 + b"}"
    engine = _open(tmp_path, cache)
    result = engine.process([Envelope("catalog", 0, 0, b"deep", raw, T0)])  # storing it used to raise
    assert _dead_reasons(result) == ["field 'attributes': nested deeper than 16 levels"]
    engine.close()


def test_the_sweep_also_drops_what_memory_holds_of_an_expired_user(tmp_path, cache):
    """The sweep deleted an expired user's stored search window and search outbox but left their
    in-memory copies: the process kept the user's last query (shown in a later recommendation's
    reason, "you searched '...'") past the TTL that promises it is gone, and a restarted process
    did not, so the two disagreed. What the process remembers of a swept user must go with it."""
    engine = _open(tmp_path, cache, state_ttl_days=1.0, sweep_keys_per_batch=100)
    engine.process([_env(Event("s", "search", "searcher", None, T0, query="product number"), 0)])
    engine.process([_env(Event("c", "click", "searcher", "i3", T0 + 1), 1)])
    windows, outbox = engine.search.windows, engine.search.outbox
    assert windows.last_query("searcher") == "product number" and outbox.get("searcher", 0, 0, "s") is not None
    result = engine.process([_env(Event("f", "click", "fresh", "i2", T0 + 2 * DAY_MS), 2)])
    assert result.counts["swept_users"] == 1 and engine.kv.get(user_key("searcher")) is None
    assert windows.last_query("searcher") is None  # main: 'product number'
    assert outbox.get("searcher", 0, 0, "s") is None
    engine.close()
    reopened = _open(tmp_path, cache, state_ttl_days=1.0, sweep_keys_per_batch=100)  # and a restart agrees
    assert reopened.search.windows.last_query("searcher") is None
    reopened.close()


class _DiskFull:
    """The state store's writes fail from now on, as on a full disk (RocksDB raises for its log)."""

    def __init__(self, kv) -> None:
        self.kv, self.write = kv, kv.write
        kv.write = self

    def __call__(self, *args, **kwargs):
        raise OSError(28, "No space left on device: While appending to file: .../rocks/000004.log")


def _learning_batches(n_batches: int, per_batch: int = 300) -> list[list[Envelope]]:
    """Clicks by a few users, each batch enough for a head step (256 examples) and for the
    re-ranker to learn from the lists shown in the batch before."""
    batches, offset = [], 0
    for b in range(n_batches):
        batch = []
        for k in range(per_batch):
            n = b * per_batch + k
            event = Event(event_id=f"e{n}", type="click", user_id=f"u{n % 7}", item_id=f"i{(n * 7) % 20}", ts=T0 + n * 1000)
            batch.append(_env(event, offset))
            offset += 1
        batches.append(batch)
    return batches


def _models(engine: Shard) -> tuple[str, str]:
    from recsys.shard.snapshots import reranker_to_json

    # the steps learned (a snapshot holds them all), not the ones served yet: the last step runs on
    # the head's thread and is served a few batches later
    return engine.head.state_dict()["n_updates"], reranker_to_json(engine.reranker)


@pytest.mark.parametrize("stop", ["close", "death"])
def test_models_saved_after_a_failed_batch_hold_nothing_it_learned(tmp_path, cache, stop):
    """A batch whose atomic write failed (a full disk here) is not in the state, so a restart
    applies and learns its events again; the models it restores must not have learned them
    already. Before 2026-12-04 the periodic snapshot was written in the middle of the batch,
    after the head's step and before the write, and ``close`` after a failure (``recsys run``
    closes the engine however the flow ended) saved the models too: either way a restart
    learned the failed batch twice. ``close``: the flow failed and closed the engine; ``death``:
    the process died after the periodic snapshot (every batch here: interval 0)."""
    kw = {"head_enabled": True, "head_snapshot_interval_s": 0.0}
    batches = _learning_batches(3)
    engine = _open(tmp_path, cache, **kw)
    for batch in batches[:2]:
        engine.process(batch)
    committed = _models(engine)
    _DiskFull(engine.kv)
    with pytest.raises(OSError, match="No space left"):
        engine.process(batches[2])
    assert _models(engine) != committed  # the failed batch did learn, in memory
    if stop == "close":
        engine.close()
    else:  # nothing more runs in a dead process: only its files stay
        engine.kv.write = engine.kv.write.write
        engine.kv.close()
        engine.embedder.close()
    again = Shard.open(_settings(tmp_path, cache, **kw))
    try:
        assert _models(again) == committed, "the restored models learned from the batch the state does not hold"
        again.upsert_catalog(ITEMS)
        assert again.process(batches[2]).counts["applied"] == len(batches[2])  # applied, and learned, once
    finally:
        again.close()


@pytest.mark.parametrize("shard", [0, 1])
def test_a_bad_record_of_a_topic_every_shard_reads_is_dead_lettered_by_shard_0_alone(tmp_path, cache, shard):
    """Every shard reads the whole catalog and control topics, so each of N shards refused the
    same bad record and sent its own dead letter: N copies, each with its own ``failed_at``.
    Now shard 0 dead-letters it and the others count it (``refused_on_shard_0``); a bad event
    is its own shard's to dead-letter, whatever the shard."""
    engine = Shard.open(_settings(tmp_path, cache, shards=2, shard=shard), in_memory=True)
    try:
        engine.upsert_catalog(ITEMS)
        bad_event = Envelope("events", shard, 0, b"u", b'{"event_id": "x", "type": "click"', T0)
        result = engine.process([Envelope("catalog", 0, 0, b"i-bad", b'{"item_id": "i-bad", "title": ', T0),
                                 Envelope("control", 0, 0, None, b'{"op": "forget_user"}', T0), bad_event])
        sources = [orjson.loads(payload)["source"]["topic"] for _, payload in result.dead_letters]
        if shard == 0:
            assert sorted(sources) == ["catalog", "control", "events"]
            assert result.counts["refused_on_shard_0"] == 0
        else:
            assert sources == ["events"]
            assert result.counts["refused_on_shard_0"] == 2
    finally:
        engine.close()
