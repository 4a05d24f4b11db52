"""End to end through the real graph: producer bytes -> KafkaSource -> Shard -> KafkaSink.

Runs the same flow over the in-memory broker and over the real local broker (Tansu): every
valid event yields (or is coalesced into) a schema-valid recommendation for its user, and every
invalid message lands in dead letters with a reason and its source coordinates.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pytest

from dataflows.kafka_io import (
    KafkaClients,
    consume_all,
    ensure_topics,
    partition_for_key,
    produce_records,
)
from dataflows.live import live_flow
from dataflows.runner import run
from recsys.events import encode
from recsys.schemas import validate
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.synthetic import generate_catalog, generate_events

BAD = [
    (b"u-bad", b'{"event_id": "b1", "type": "click", "user_id": "u-bad", "item_id": ', "malformed or truncated JSON"),
    (b"u-bad", b'{"event_id": "b2", "type": "hover", "user_id": "u-bad", "item_id": "i1", "ts": 1}', "unknown event type"),
    (b"u-bad", b'{"event_id": "b3", "type": "click", "user_id": "u-bad", "ts": 1}', "field 'item_id': missing"),
    (b"u-bad", b'{"event_id": "b4", "type": "click", "user_id": "u-bad", "item_id": "nope", "ts": 1}', "unknown item"),
    (b"u-bad", b'{"event_id": "b5", "type": "click", "user_id": 7, "item_id": "i1", "ts": 1}', "expected a string"),
    (b"u-bad", b'{"x": "' + b"y" * 70_000 + b'"}', "oversized"),
    (None, b"[1, 2, 3]", "expected a JSON object"),
]


@pytest.fixture(scope="module")
def catalog():
    return generate_catalog(120, seed=3)


@pytest.fixture(scope="module")
def embed_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("embeddings"))


def _run_pipeline(clients, settings: Settings, catalog, events) -> dict:
    ensure_topics(clients, {settings.events_topic: 2, settings.catalog_topic: 1, settings.recommendations_topic: 2, settings.dead_letters_topic: 1})
    produce_records(clients, settings.catalog_topic, ((c.item_id.encode(), encode(c)) for c in catalog))
    records = [(e.user_id.encode(), encode(e)) for e in events]
    records[50:50] = [(k, v) for k, v, _ in BAD]
    produce_records(clients, settings.events_topic, records)
    engine = Shard.open(settings)
    engine.upsert_catalog(catalog)  # the start-up catalog file path; the topic re-upserts the same
    run(live_flow(settings, clients, engine=engine), recovery_dir=settings.recovery_dir, snapshot_interval_s=1.0)
    totals = dict(engine.totals)
    engine.close()
    return {
        "recs": consume_all(clients, settings.recommendations_topic, timeout_s=30),
        "dead": consume_all(clients, settings.dead_letters_topic, timeout_s=30),
        "totals": totals,
    }


def _check(out: dict, events) -> None:
    recs = [orjson.loads(r.value) for r in out["recs"]]
    for rec in recs:
        assert validate("recommendation", rec) == []
        assert len(rec["items"]) > 0 and all(i["reason"] for i in rec["items"])
    # every valid event is covered: its user's LAST event triggered a recommendation
    last_event = {}
    for e in events:
        last_event[e.user_id] = e.event_id
    triggers = {(r["user_id"], r["trigger_event_id"]) for r in recs}
    assert all((u, eid) in triggers for u, eid in last_event.items())
    assert {r["user_id"] for r in recs} == set(last_event)
    # every bad message is dead-lettered once, with its reason and coordinates
    dead = [orjson.loads(d.value) for d in out["dead"]]
    assert len(dead) == len(BAD)
    for letter in dead:
        assert validate("dead_letter", letter) == []
        assert letter["source"]["topic"].endswith("events") and letter["source"]["offset"] >= 0
    reasons = " | ".join(d["reason"] for d in dead)
    for _, _, expected in BAD:
        assert expected in reasons
    # counts add up: consumed = processed + dead-lettered
    t = out["totals"]
    assert t["events_in"] == len(events) + len(BAD)
    assert t["valid_events"] + t["dead_letters"] == t["events_in"]
    assert t["applied"] == len(events)


def _settings(tmp_path, embed_cache, prefix="", **kw) -> Settings:
    return Settings(
        events_topic=prefix + "events",
        catalog_topic=prefix + "catalog",
        recommendations_topic=prefix + "recommendations",
        dead_letters_topic=prefix + "dead-letters",
        state_dir=str(tmp_path / "state"),
        recovery_dir=str(tmp_path / "recovery"),
        embed_cache_dir=embed_cache,
        stop_at_end=True,
        poll_max_records=200,
        **kw,
    )


def test_every_event_is_answered_or_dead_lettered_in_memory(memory_broker, tmp_path, catalog, embed_cache):
    events = generate_events(3000, catalog, n_users=300, seed=4)
    out = _run_pipeline(memory_broker, _settings(tmp_path, embed_cache), catalog, events)
    _check(out, events)


def test_every_event_is_answered_or_dead_lettered_through_real_broker(local_broker, tmp_path, catalog, embed_cache, topic_name):
    prefix = topic_name("p") + "-"
    events = generate_events(3000, catalog, n_users=300, seed=5)
    settings = _settings(tmp_path, embed_cache, prefix=prefix, bootstrap_servers=local_broker.bootstrap)
    out = _run_pipeline(KafkaClients(settings), settings, catalog, events)
    _check(out, events)


def test_rerun_on_same_state_and_recovery_emits_nothing_new(memory_broker, tmp_path, catalog, embed_cache):
    """A finished flow restarted with the same directories finds nothing left to do."""
    events = generate_events(500, catalog, n_users=50, seed=6)
    settings = _settings(tmp_path, embed_cache)
    first = _run_pipeline(memory_broker, settings, catalog, events)
    engine = Shard.open(settings)
    run(live_flow(settings, memory_broker, engine=engine), recovery_dir=settings.recovery_dir, snapshot_interval_s=1.0)
    engine.close()
    assert len(consume_all(memory_broker, settings.recommendations_topic)) == len(first["recs"])


def test_two_shards_split_the_users_and_each_sees_the_whole_catalog(memory_broker, tmp_path, catalog, embed_cache):
    """Shards of one stream (``--shards 2 --shard i``), run one after the other: each reads its
    own events partition and keeps its own users, both read every catalog record, and together
    they answer every event exactly as the one-process flow's contract asks."""
    events = generate_events(1200, catalog, n_users=120, seed=7)
    base = _settings(tmp_path, embed_cache, shards=2)
    ensure_topics(memory_broker, {base.events_topic: 2, base.catalog_topic: 1, base.recommendations_topic: 2,
                                  base.dead_letters_topic: 1})
    late = dataclasses.replace(catalog[0], item_id="late-item")  # announced by the catalog topic only
    produce_records(memory_broker, base.catalog_topic, [(late.item_id.encode(), encode(late))])
    produce_records(memory_broker, base.events_topic, [(e.user_id.encode(), encode(e)) for e in events])
    owner = {e.user_id: partition_for_key(e.user_id.encode(), 2) for e in events}
    totals = []
    for shard in (0, 1):
        settings = base.replace(shard=shard).for_shard()
        engine = Shard.open(settings)
        engine.upsert_catalog(catalog)
        run(live_flow(settings, memory_broker, engine=engine), recovery_dir=settings.recovery_dir, snapshot_interval_s=1.0)
        assert "late-item" in engine.items.catalog
        assert engine.users.count() == sum(1 for p in owner.values() if p == shard)
        totals.append(dict(engine.totals))
        engine.close()
    assert [t["applied"] for t in totals] == [sum(1 for e in events if owner[e.user_id] == s) for s in (0, 1)]
    recs = [orjson.loads(r.value) for r in consume_all(memory_broker, base.recommendations_topic)]
    assert {r["user_id"] for r in recs} == set(owner)
    last_event = {e.user_id: e.event_id for e in events}
    assert {(r["user_id"], r["trigger_event_id"]) for r in recs} >= set(last_event.items())
    assert all(validate("recommendation", r) == [] for r in recs)


def test_a_restart_whose_topic_settings_no_longer_match_the_recovery_directory_is_refused_by_name(memory_broker, tmp_path, catalog, embed_cache):
    """Bytewax resumes each input and output by its topic's name: a flow restarted with a renamed
    topic (``--search-results-topic`` in the operator run that found it, the recommendations
    topic here) on the same recovery directory stopped in Bytewax,
    at every start, with "Key StateKey("search-results-producer") is not in this worker's
    routing map" (seen in an operator run on 2026-12-06, forty-second session). ``recsys run``
    now checks first and refuses naming the topic and the two ways on; the second, moving the
    recovery directory aside, is run here: the restart reads the events again from their first
    offset and applies none of them twice."""
    from dataflows.live import flow_topics
    from dataflows.runner import RecoveryTopicsError, check_recovery_topics, recovered_topics

    events = generate_events(400, catalog, n_users=40, seed=8)
    settings = _settings(tmp_path, embed_cache)
    first = _run_pipeline(memory_broker, settings, catalog, events)
    read, written = recovered_topics(settings.recovery_dir)
    assert read == {settings.events_topic, settings.catalog_topic, settings.control_topic}
    assert settings.recommendations_topic in written and written <= {settings.recommendations_topic, settings.dead_letters_topic,
                                                                     settings.search_results_topic}
    reads, writes = flow_topics(settings)
    check_recovery_topics(settings.recovery_dir, reads=reads, writes=writes, state_dir=settings.state_dir)  # as written: fine
    renamed = settings.replace(recommendations_topic="shop-recs")
    reads, writes = flow_topics(renamed)
    with pytest.raises(RecoveryTopicsError) as refused:
        check_recovery_topics(renamed.recovery_dir, reads=reads, writes=writes, state_dir=renamed.state_dir)
    message = str(refused.value)
    assert f"wrote to {settings.recommendations_topic!r}" in message and "'shop-recs'" in message
    assert "start with its old name" in message and "move" in message

    # the second way on: the recovery directory moved aside
    moved = settings.replace(recommendations_topic="shop-recs", recovery_dir=str(tmp_path / "recovery-2"))
    ensure_topics(memory_broker, {"shop-recs": 2})
    engine = Shard.open(moved)
    try:
        run(live_flow(moved, memory_broker, engine=engine), recovery_dir=moved.recovery_dir, snapshot_interval_s=1.0)
        assert engine.totals["applied"] == 0 and engine.totals["dead_letters"] == 0  # nothing applied or refused twice
        assert engine.totals["redelivered_skipped"] == first["totals"]["events_in"]  # the bad messages' copies too
    finally:
        engine.close()


def _kafka_topics(source_or_sink) -> set[str]:
    """The topics a (wrapped) source or sink of the live flow reads or writes: through
    ``Inputs.sources``, ``Watched``/``ResumeAtLeast``'s ``inner``, ``StoppableSource``/``Ticking``'s
    ``source``, down to each ``KafkaSource``/``KafkaSink``."""
    from dataflows.kafka_io import KafkaSink, KafkaSource

    if isinstance(source_or_sink, (KafkaSource, KafkaSink)):
        return {source_or_sink.topic}
    found: set[str] = set()
    for inner in getattr(source_or_sink, "sources", ()):
        found |= _kafka_topics(inner)
    for name in ("inner", "source"):
        if (inner := getattr(source_or_sink, name, None)) is not None:
            found |= _kafka_topics(inner)
    return found


@pytest.mark.parametrize("share", [False, True], ids=["one", "sharing"])
def test_the_topics_checked_against_recovery_are_those_the_live_flow_reads_and_writes(memory_broker, tmp_path, embed_cache, share):
    """``flow_topics`` restates what ``live_flow`` builds, for the recovery check before the
    engine opens: walked out of the built graph, the two must agree."""
    from dataflows.live import flow_topics

    settings = _settings(tmp_path, embed_cache, share_signals=share, exchange_snapshot_dir=None)
    ensure_topics(memory_broker, {settings.events_topic: 2, settings.catalog_topic: 1, settings.recommendations_topic: 2,
                                  settings.dead_letters_topic: 1})
    engine = Shard.open(settings)
    try:
        flow = live_flow(settings, memory_broker, engine=engine)
        reads, writes = set(), set()
        steps = list(flow.substeps)
        while steps:
            step = steps.pop()
            steps += getattr(step, "substeps", [])
            if (source := getattr(step, "source", None)) is not None:
                reads |= _kafka_topics(source)
            if (sink := getattr(step, "sink", None)) is not None:
                writes |= _kafka_topics(sink)
    finally:
        engine.close()
    assert (reads, writes) == flow_topics(settings)
    assert (settings.exchange_topic in reads) is share


@pytest.mark.parametrize("where", ["memory", "real broker"])
def test_a_catalog_tombstone_withdraws_the_item_from_the_next_run_on(where, request, tmp_path, catalog, embed_cache):
    """A shop deletes an item from its compacted catalog topic the Kafka way, with a record
    whose value is null: the flow withdraws it (never recommended again) instead of
    dead-lettering the tombstone as an empty message and recommending the item on."""
    if where == "memory":
        clients, settings = request.getfixturevalue("memory_broker"), _settings(tmp_path, embed_cache)
    else:
        prefix = request.getfixturevalue("topic_name")("tomb") + "-"
        settings = _settings(tmp_path, embed_cache, prefix=prefix, bootstrap_servers=request.getfixturevalue("local_broker").bootstrap)
        clients = KafkaClients(settings)
    ensure_topics(clients, {settings.events_topic: 2, settings.catalog_topic: 1, settings.recommendations_topic: 2, settings.dead_letters_topic: 1})
    produce_records(clients, settings.catalog_topic, ((c.item_id.encode(), encode(c)) for c in catalog))
    events = generate_events(1200, catalog, n_users=60, seed=8)
    produce_records(clients, settings.events_topic, [(e.user_id.encode(), encode(e)) for e in events[:600]])
    engine = Shard.open(settings)
    run(live_flow(settings, clients, engine=engine), recovery_dir=settings.recovery_dir, snapshot_interval_s=1.0)
    popular = engine.popularity.top(1, events[599].ts)[0][0]
    engine.close()
    first = consume_all(clients, settings.recommendations_topic, timeout_s=30)
    assert any(popular in [i["item_id"] for i in orjson.loads(r.value)["items"]] for r in first)  # else this proves nothing
    produce_records(clients, settings.catalog_topic, [(popular.encode(), None)])
    produce_records(clients, settings.events_topic, [(e.user_id.encode(), encode(e)) for e in events[600:]])
    engine = Shard.open(settings)
    run(live_flow(settings, clients, engine=engine), recovery_dir=settings.recovery_dir, snapshot_interval_s=1.0)
    assert not engine.items.recommendable(popular) and engine.items.catalog.get(popular).title
    engine.close()
    second = {e.event_id for e in events[600:]}
    later = [r for r in consume_all(clients, settings.recommendations_topic, timeout_s=30)
             if orjson.loads(r.value)["trigger_event_id"] in second]
    assert later and not [r for r in later if popular in [i["item_id"] for i in orjson.loads(r.value)["items"]]]
    assert consume_all(clients, settings.dead_letters_topic, timeout_s=5) == []


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_events_and_catalog_from_a_producer_that_compresses_are_read(codec, local_broker, tmp_path, catalog, embed_cache, topic_name):
    """A shop's producers often compress (`compression.type`: lz4 and zstd are common defaults).
    Until 2026-12-06 (forty-fifth session) kafka-python had no library to read lz4, zstd or
    snappy batches: the flow stopped at its first poll (`UnsupportedCodecError`) and every
    restart stopped the same way."""
    from kafka import KafkaProducer

    prefix = topic_name("codec") + "-"
    settings = _settings(tmp_path, embed_cache, prefix=prefix, bootstrap_servers=local_broker.bootstrap)
    clients = KafkaClients(settings)
    ensure_topics(clients, {settings.events_topic: 2, settings.catalog_topic: 1, settings.recommendations_topic: 2, settings.dead_letters_topic: 1})
    events = generate_events(300, catalog, n_users=30, seed=9)
    producer = KafkaProducer(bootstrap_servers=local_broker.bootstrap, compression_type=codec, linger_ms=5)
    for c in catalog:
        producer.send(settings.catalog_topic, key=c.item_id.encode(), value=encode(c))
    for e in events:
        producer.send(settings.events_topic, key=e.user_id.encode(), value=encode(e))
    producer.flush()
    producer.close()
    engine = Shard.open(settings)
    run(live_flow(settings, clients, engine=engine), recovery_dir=settings.recovery_dir, snapshot_interval_s=1.0)
    totals = dict(engine.totals)
    engine.close()
    assert (totals["catalog_in"], totals["events_in"], totals["applied"]) == (len(catalog), len(events), len(events))
    last = {e.user_id: e.event_id for e in events}
    triggers = {orjson.loads(r.value)["trigger_event_id"] for r in consume_all(clients, settings.recommendations_topic, timeout_s=30)}
    assert set(last.values()) <= triggers


@pytest.mark.parametrize("damage", ["empty", "junk", "truncated"])
def test_a_damaged_recovery_store_is_refused_in_one_line_naming_the_file(memory_broker, tmp_path, embed_cache, catalog,
                                                                         damage):
    """An empty, overwritten or half-truncated ``part-0.sqlite3`` (a day-2 operator's probe,
    2026-12-07) ended ``recsys run`` in a traceback through the recovery check ("no such table:
    exs", "file is not a database", "database disk image is malformed"); now one refusal that
    names the file and the two ways on, as for a recovery directory of other topics."""
    from dataflows.live import flow_topics
    from dataflows.runner import RecoveryTopicsError, check_recovery_topics

    settings = _settings(tmp_path, embed_cache)
    _run_pipeline(memory_broker, settings, catalog, generate_events(200, catalog, n_users=20, seed=9))
    (store,) = sorted(Path(settings.recovery_dir).glob("*.sqlite3"))
    whole = store.read_bytes()
    store.write_bytes({"empty": b"", "junk": b"not a database" * 100, "truncated": whole[:len(whole) // 2]}[damage])
    reads, writes = flow_topics(settings)
    with pytest.raises(RecoveryTopicsError) as refused:
        check_recovery_topics(settings.recovery_dir, reads=reads, writes=writes, state_dir=settings.state_dir)
    message = str(refused.value)
    assert f"the recovery directory {settings.recovery_dir} holds {store.name}, which is not a Bytewax recovery" in message
    assert "--rebuild-state" in message and "\n" not in message


def test_a_recovery_directory_of_a_sharing_flow_refused_without_sharing_names_share_signals(monkeypatch):
    """`--share-signals` switched off on a sharing flow's directories was refused as if a topic had
    been renamed, and `--share-signals` was named nowhere (a day-2 operator's probe, 2026-12-07).
    What the recovery directory resumes is given here (reading it is tested above)."""
    from dataflows import runner
    from dataflows.live import flow_topics

    settings = Settings()
    reads, writes = flow_topics(settings)
    monkeypatch.setattr(runner, "recovered_topics", lambda _: ({*reads, settings.exchange_topic}, set(writes)))
    with pytest.raises(runner.RecoveryTopicsError) as refused:
        runner.check_recovery_topics("var/recovery", reads=reads, writes=writes, state_dir="var/state",
                                     exchange_topic=settings.exchange_topic)
    assert (f"written by a flow that read {settings.exchange_topic!r} (the signal exchange: that flow ran with "
            f"--share-signals, which this one does not)") in str(refused.value)
