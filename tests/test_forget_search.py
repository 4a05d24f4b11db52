"""An erasure takes back what search learned from the shopper (recsys/search/learned.py,
``SearchTrail``): their engagements leave the query -> item associations (``sqa:``), as if never
learned, and the query texts they typed leave the query-vector ring (``qv:``). Until 2026-12-08
both stayed: a query only the erased shopper typed still named what they chose after it, under
a key holding their words (an operator's probe, 2026-12-07). The sweep of an idle user drops the
link and takes nothing back."""

from __future__ import annotations

import logging

import orjson
import pytest

from dataflows.kafka_io import partition_for_key
from recsys.control import ControlMessage, encode_control
from recsys.events import CatalogItem, Envelope, Event, encode
from recsys.search.learned import ASSOC_PREFIX, TRAIL_PREFIX, trail_prefix
from recsys.search.semantic import QV_PREFIX
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.store.kv import RocksKV

VICTIM = "shopper-7f3a9c"
#: What the victim typed: words no item holds, so the item bought after it is credited to it
#: (text cannot judge), and a key under ``sqa:`` holds their words.
PRIVATE = "Maria Lopez anniversary"
T0 = 1_700_000_000_000
CATALOG = [
    CatalogItem("tent-blue", "Blue dome tent", category="Camping/Tents", brand="Alpina", price=120.0),
    CatalogItem("tent-green", "Green tunnel tent for four", category="Camping/Tents", brand="Northway", price=240.0),
    CatalogItem("stove", "Gas camping stove", category="Camping/Cooking", brand="Northway", price=45.0),
    CatalogItem("mug", "Enamel coffee mug", category="Camping/Cooking", brand="Alpina", price=12.0),
]


def _events(with_victim: bool) -> list[Event]:
    """Four shoppers search 'tent' and buy a tent; the victim too, and then searches
    :data:`PRIVATE` and buys the mug. One minute apart, each search's engagement right after it."""
    steps = [(f"other{n}", "tent", f"tent-{'blue' if n % 2 else 'green'}") for n in range(4)]
    steps[2:2] = [(VICTIM, "tent", "tent-blue"), (VICTIM, PRIVATE, "mug")]
    events = []
    for n, (user, query, item) in enumerate(steps):
        if user != VICTIM or with_victim:
            ts = T0 + 60_000 * n
            events.append(Event(f"s{n}-{user}", "search", user, None, ts, query=query))
            events.append(Event(f"p{n}-{user}", "purchase", user, item, ts + 1_000))
    return events


def _envs(events: list[Event], partition: int = 0, start: int = 0) -> list[Envelope]:
    return [Envelope("events", partition, start + n, e.user_id.encode(), encode(e), e.ts) for n, e in enumerate(events)]


def _forget(user_id: str, offset: int = 0) -> Envelope:
    return Envelope("control", 0, offset, user_id.encode(), encode_control(ControlMessage("forget_user", user_id)), T0 + 10**7)


def _associations(shard: Shard) -> dict[bytes, dict]:
    return {key: orjson.loads(value) for key, value in shard.kv.iter_prefix(ASSOC_PREFIX)}


def _raw_hits(state_dir: str, needle: bytes) -> list[bytes]:
    """Every key of the RocksDB state whose key or value holds ``needle`` (a full scan)."""
    kv = RocksKV(state_dir + "/rocks", verify=False)
    try:
        return [key for key, value in kv.iter_prefix(b"") if needle in key or needle in value]
    finally:
        kv.close()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("emb"))


def _open(tmp_path, cache, name: str, **kw) -> Shard:
    kw.setdefault("head_enabled", False)
    engine = Shard.open(Settings(state_dir=str(tmp_path / name), embed_cache_dir=cache, head_snapshot_interval_s=3600, **kw))
    engine.upsert_catalog(CATALOG)
    return engine


def test_an_erasure_takes_the_shoppers_engagements_and_query_texts_out_of_search(tmp_path, cache, caplog):
    reference = _open(tmp_path, cache, "reference")
    reference.process(_envs(_events(with_victim=False)))
    want = _associations(reference)
    reference.close()

    engine = _open(tmp_path, cache, "state")
    engine.process(_envs(_events(with_victim=True)))
    private_key = b"sqa:anniversary lopez maria"
    assert private_key in _associations(engine)  # it was learned: the victim's words name the mug
    assert _associations(engine)[b"sqa:tent"]["n"] == want[b"sqa:tent"]["n"] + 1
    engine.close()
    state = str(tmp_path / "state")
    assert _raw_hits(state, b"lopez") and _raw_hits(state, b"Lopez")  # the key, the ring, the trail, the outbox

    engine = _open(tmp_path, cache, "state")
    # an id the victim's is the start of (through the library: the control topic refuses a NUL) takes nothing
    # of theirs (until 2026-12-08 their trail's keys started with the id and a NUL; a review)
    engine.forget([VICTIM + "\x00e"])
    assert private_key in _associations(engine) and _associations(engine)[b"sqa:tent"]["n"] == want[b"sqa:tent"]["n"] + 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recsys.audit"):
        assert engine.process([_forget(VICTIM)]).counts["forgotten_users"] == 1
    (audit,) = [r.getMessage() for r in caplog.records if r.name == "recsys.audit"]
    assert " search_engagements=2 " in audit, audit  # 'tent' -> tent-blue, the private query -> mug
    # as if the victim had never searched: 'tent' holds the others' engagements only, the private query is gone
    assert _associations(engine) == want
    assert not engine.search.associations.weights("anniversary lopez maria")
    engine.close()
    assert _raw_hits(state, b"lopez") == [] and _raw_hits(state, b"Lopez") == []
    assert _raw_hits(state, VICTIM.encode()) == []
    assert [key for key in _raw_hits(state, b"") if key.startswith(QV_PREFIX)] == []  # both texts the victim
    # typed went from the ring of query vectors, 'tent' too (the next 'tent' is encoded again)

    # after a restart: another shopper typing the same words finds nothing learned from the victim
    engine = _open(tmp_path, cache, "state")
    assert _associations(engine) == want
    (_, payload), = engine.process(_envs([Event("later", "search", "other9", None, T0 + 10**8, query=PRIVATE)],
                                         start=100)).search_results
    assert all("often chosen" not in item["reason"] for item in orjson.loads(payload)["items"])
    engine.close()


def test_the_sweep_of_an_idle_shopper_drops_the_link_and_takes_nothing_back(tmp_path, cache):
    engine = _open(tmp_path, cache, "state", state_ttl_days=1.0)
    engine.process(_envs(_events(with_victim=True)))
    learned = _associations(engine)
    assert [k for k, _ in engine.kv.iter_prefix(trail_prefix(VICTIM))]
    # two days later someone else's event: every shopper above has been idle past the TTL
    result = engine.process(_envs([Event("late", "click", "newcomer", "stove", T0 + 2 * 86_400_000)], start=100))
    assert result.counts["swept_users"] >= 5
    assert list(engine.kv.iter_prefix(TRAIL_PREFIX)) == []
    assert _associations(engine) == learned  # what they taught search stays, with no link to them
    engine.close()


def test_with_shared_signals_every_shard_takes_the_engagements_back_at_the_erasures_position(tmp_path, embedder):
    """The victim's shard holds their trail; the erasure's exchange op carries their engagements,
    and every shard takes them back when it applies it: the shards' associations stay identical
    and equal those of shards that never saw the victim."""

    def shards(name: str) -> list[Shard]:
        out = []
        for s in range(2):
            settings = Settings(head_enabled=False, state_dir=str(tmp_path / name / str(s)), shards=2, shard=s,
                                share_signals=True, state_ttl_days=36_500.0)
            out.append(Shard(settings, RocksKV(str(tmp_path / name / str(s) / "rocks")), embedder))
            out[-1].upsert_catalog(CATALOG)
        return out

    def run(engines: list[Shard], events: list[Event]) -> list[tuple[int, bytes]]:
        log: list[tuple[int, bytes]] = []
        for s, engine in enumerate(engines):
            mine = [e for e in events if partition_for_key(e.user_id.encode(), 2) == s]
            log += [(len(log) + n, m) for n, m in enumerate(engine.process(_envs(mine, partition=s)).exchange)]
        for engine in engines:
            engine.apply_exchange(log)
        return log

    reference = shards("reference")
    run(reference, _events(with_victim=False))
    want = _associations(reference[0])
    assert want == _associations(reference[1]) and want

    engines = shards("shared")
    log = run(engines, _events(with_victim=True))
    assert b"sqa:anniversary lopez maria" in _associations(engines[1])
    owner = partition_for_key(VICTIM.encode(), 2)
    # the other shard reads the request first: it has no trail, its op takes nothing back
    for s in (1 - owner, owner):
        log += [(len(log) + n, m) for n, m in enumerate(engines[s].process([_forget(VICTIM)]).exchange)]
    for engine in engines:
        engine.apply_exchange(log)
    assert _associations(engines[0]) == _associations(engines[1]) == want
    assert engines[0].signal_checksum() == engines[1].signal_checksum()
    for engine in (*reference, *engines):
        engine.kv.close()


def test_taking_engagements_back_leaves_the_weights_of_never_having_learned_them():
    """``QueryAssociations.unlearn``: learned in any order, some taken back, the query holds exactly
    what learning only the others gives; one the query dropped already (older than its last
    ``keep``) is not held: taking it back changes nothing."""
    import random

    from recsys.search.learned import QueryAssociations

    rng = random.Random(8)
    engagements = [("tent", f"t{rng.randrange(4)}", rng.choice([0.25, 0.5, 1.0]), T0 + rng.randrange(10**6), rng.randrange(2**32))
                   for _ in range(40)]
    gone = set(rng.sample(range(40), 15))
    full, kept = QueryAssociations(), QueryAssociations()
    for n in rng.sample(range(40), 40):
        full.learn_at(*engagements[n])
        if n not in gone:
            kept.learn_at(*engagements[n])
    assert all(full.unlearn(*engagements[n]) for n in gone)
    assert full.weights("tent") == kept.weights("tent") and full.engagements("tent") == 25
    assert not full.unlearn(*engagements[min(gone)])  # taken back already
    assert all(full.unlearn(*engagements[n]) for n in set(range(40)) - gone)
    assert len(full) == 0 and full.export_dirty() == {b"sqa:tent": b""}  # the query went (the engine deletes the key)

    small = QueryAssociations(keep=4)
    for n, (ts, tie) in enumerate([(1, 0), (2, 0), (3, 0), (4, 0), (5, 0)]):
        small.learn_at("mug", f"m{n}", 1.0, T0 + ts, tie)
    assert not small.unlearn("mug", "m0", 1.0, T0 + 1, 0) and small.unlearn("mug", "m1", 1.0, T0 + 2, 0)


def test_records_a_release_before_emptied_are_deleted_at_the_next_commit(tmp_path, cache):
    """Until 2026-12-08 a query no longer held and a closed search window were written empty, their
    keys (a query's words, a user id) kept; such records in an older state go at the next commit,
    so that its signals' checksum equals a state's built without them (a review)."""
    sums = []
    for name, empties in (("old", {b"sqa:anniversary lopez maria": b"", b"sqw:" + VICTIM.encode(): b""}), ("new", {})):
        engine = _open(tmp_path, cache, name)
        engine.process(_envs(_events(with_victim=False)))
        engine.kv.write(empties)  # as the release before left them
        engine.close()
        engine = _open(tmp_path, cache, name)
        engine.process(_envs([Event("x1", "click", "other0", "stove", T0 + 10**6)], start=100))
        assert all(engine.kv.get(key) is None for key in empties)
        sums.append(engine.signal_checksum())
        engine.close()
    assert sums[0] == sums[1]
