"""Recommendations the sink has not had acknowledged survive a crash, however many a user got.

The Kafka sink sends without waiting and has the producer flush (every send acknowledged by
the broker) only at Bytewax's epoch snapshot (``RECSYS_SNAPSHOT_INTERVAL_S``, 2 s): until then
every recommendation sent in the epoch is in doubt. After a crash the broker re-delivers the
epoch's events; the engine has committed them already and re-emits, from each user's outbox,
the bytes a re-delivered trigger produced the first time. Before 2026-12-04 the outbox kept a
user's last four recommendations whatever had been acknowledged (its comment still said the
sink flushed every batch, as it once did), so a user with more than four in one epoch lost the
older ones when the producer had not delivered them: a broker that is slow or gone, then a
crash. Now an entry leaves the outbox only once the sink has flushed the batch that emitted it.
The same holds for search answers, and for lists whose trigger waited for its catalog item
(no re-delivery asks for those: a restart sends them again by itself).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import orjson
import pytest

from dataflows.kafka_io import consume_all, ensure_topics, produce_records
from dataflows.live import live_flow
from dataflows.runner import run
from recsys.events import Event, encode
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.synthetic import generate_catalog


class _Crash(RuntimeError):
    pass


class _HeldFuture:
    """A send waiting in the producer's buffer. Once the process has "died" nothing it does is
    observed any more, so its teardown (Bytewax closes the sinks) finds nothing to raise."""

    def __init__(self, producer: "_UnreachableProducer") -> None:
        self._producer = producer
        self._inner = None

    def get(self, timeout: float | None = None):  # noqa: ANN201 - kafka-python's RecordMetadata
        if self._inner is None:
            raise AssertionError("a send's result was asked for before the producer flushed it")
        return self._inner.get(timeout)

    def succeeded(self) -> bool:
        return self._producer._dead or (self._inner is not None and self._inner.succeeded())

    def failed(self) -> bool:
        return not self._producer._dead and self._inner is not None and self._inner.failed()


class _UnreachableProducer:
    """A producer whose broker does not answer (as kafka-python's, sends wait in its buffer until
    ``flush`` delivers them); the process dies at the ``crash_at``-th send to ``topic``."""

    def __init__(self, inner, topic: str, crash_at: int, sent: list[dict]) -> None:
        self._inner, self._topic, self._crash_at, self._sent = inner, topic, crash_at, sent
        self._held: list[tuple[tuple, dict, _HeldFuture]] = []
        self._dead = False  # after the crash nothing more leaves this process

    def send(self, topic, value=None, key=None, **kw):  # noqa: ANN001, ANN201
        if topic == self._topic:
            self._sent.append(orjson.loads(value))
            if len(self._sent) == self._crash_at:
                self._dead = True
                raise _Crash(f"killed at output {self._crash_at}, {len(self._held)} sends unacknowledged")
        future = _HeldFuture(self)
        self._held.append(((topic,), {"value": value, "key": key, **kw}, future))
        return future

    def flush(self, timeout: float | None = None) -> None:
        if self._dead:
            return
        held, self._held = self._held, []
        for args, kw, future in held:
            future._inner = self._inner.send(*args, **kw)
        self._inner.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        self.flush()  # nothing, once dead
        self._inner.close(timeout)


class _Outage:
    """The in-memory broker's client factory, its producers those of an unreachable broker."""

    def __init__(self, broker, topic: str, crash_at: int) -> None:
        self.broker, self.topic, self.crash_at = broker, topic, crash_at
        self.sent: list[dict] = []
        self.producers: list[_UnreachableProducer] = []

    def consumer(self, **kw):  # noqa: ANN201
        return self.broker.consumer(**kw)

    def producer(self, **kw):  # noqa: ANN201
        producer = _UnreachableProducer(self.broker.producer(**kw), self.topic, self.crash_at, self.sent)
        self.producers.append(producer)
        return producer

    def dead(self) -> bool:
        return any(p._dead for p in self.producers)

    def guard(self, engine: Shard) -> None:
        """Once the process has "died", the sinks' teardown acknowledges nothing to ``engine``
        (Bytewax closes them, and a dead producer's flush returns at once as if it delivered)."""
        acknowledge = engine.acknowledge
        engine.acknowledge = lambda stamp, output="recommendations": None if self.dead() else acknowledge(stamp, output)

    def admin(self, **kw):  # noqa: ANN201
        return self.broker.admin(**kw)

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap


def _crash_then_restart(broker, tmp_path, catalog: list, events: list[Event | tuple[bytes, bytes]], topic: str, crash_at: int, *, snapshot_interval_s: float = 60.0,
                        during: Callable[[Shard], None] | None = None, **settings_kw) -> tuple[list[dict], list[dict]]:
    """Two lives of the live flow over ``events``: in the first the broker takes nothing and the
    process dies at its ``crash_at``-th send to ``topic`` (by default well inside its first
    epoch, 60 s, so nothing was ever flushed; ``during(engine)`` runs in a thread meanwhile);
    the second, the broker back, runs to the end. ``catalog`` and ``events`` may hold raw
    ``(key, value)`` messages. Returns what the first life sent to ``topic`` and what the topic holds after the
    second."""
    settings = Settings(
        events_topic="events", catalog_topic="catalog", recommendations_topic="recs", dead_letters_topic="dead",
        search_results_topic="found", state_dir=str(tmp_path / "state"), recovery_dir=str(tmp_path / "recovery"),
        embed_cache_dir=str(tmp_path / "emb"), **settings_kw,
    )
    ensure_topics(broker, {"events": 1, "catalog": 1, "recs": 1, "dead": 1, "found": 1})
    produce_records(broker, "catalog", (c if isinstance(c, tuple) else (c.item_id.encode(), encode(c)) for c in catalog))
    produce_records(broker, "events", (e if isinstance(e, tuple) else (e.user_id.encode(), encode(e)) for e in events))
    outage = _Outage(broker, topic, crash_at=crash_at)
    for life, clients in ((settings, outage), (settings.replace(stop_at_end=True), broker)):
        engine = Shard.open(life)
        if clients is outage:
            outage.guard(engine)
        helper = threading.Thread(target=during, args=(engine,), daemon=True) if during and clients is outage else None
        try:
            if helper is not None:
                helper.start()
            if clients is outage:
                with pytest.raises(Exception, match=f"killed at output {crash_at}"):
                    run(live_flow(life, clients, engine=engine), recovery_dir=life.recovery_dir, snapshot_interval_s=snapshot_interval_s)
                assert consume_all(broker, topic) == []  # nothing of the first life delivered
            else:
                run(live_flow(life, clients, engine=engine), recovery_dir=life.recovery_dir, snapshot_interval_s=snapshot_interval_s)
        finally:
            if helper is not None:
                helper.join()
            engine.close()
    return outage.sent, [orjson.loads(r.value) for r in consume_all(broker, topic)]


def test_a_crash_before_the_sink_flushed_loses_no_recommendation_of_a_busy_user(memory_broker, tmp_path):
    catalog = generate_catalog(60, seed=11)
    events = [Event(event_id=f"e{i}", type="click", user_id="busy", item_id=catalog[i].item_id, ts=1_700_000_000_000 + i * 1000)
              for i in range(10)]
    sent, delivered = _crash_then_restart(memory_broker, tmp_path, catalog, events, "recs", crash_at=6, poll_max_records=1)
    in_doubt = [r["trigger_event_id"] for r in sent]
    assert len(in_doubt) == 6
    # every list of the first life is re-emitted (before the fix: only the user's last four, e0
    # and e1 lost), as first sent, byte for byte
    triggers = {r["trigger_event_id"] for r in delivered}
    assert set(in_doubt) <= triggers, f"lost: {sorted(set(in_doubt) - triggers)}"
    first = {r["trigger_event_id"]: r for r in sent}
    assert all(first[r["trigger_event_id"]] == r for r in delivered if r["trigger_event_id"] in first)
    assert triggers == {e.event_id for e in events}


def test_a_crash_before_the_sink_flushed_answers_no_search_twice_differently(memory_broker, tmp_path):
    """The same for search results: a shopper's ten searches, one a batch, the process dying at
    the tenth answer with none acknowledged. After the restart each search has been answered
    with the bytes first sent (before the fix the search outbox kept the newest 8: the first
    two were answered again, from the state then current, with another ``emitted_at``)."""
    catalog = generate_catalog(60, seed=13)
    events = [Event(event_id=f"s{i}", type="search", user_id="seeker", item_id=None, query=catalog[i].title.split()[0],
                    ts=1_700_000_000_000 + i * 1000) for i in range(10)]
    sent, answers = _crash_then_restart(memory_broker, tmp_path, catalog, events, "found", crash_at=10, poll_max_records=1)
    assert [r["trigger_event_id"] for r in sent] == [e.event_id for e in events]
    first = {r["trigger_event_id"]: r for r in sent}
    assert {a["trigger_event_id"] for a in answers} == set(first)
    changed = sorted(a["trigger_event_id"] for a in answers if a != first[a["trigger_event_id"]])
    assert not changed, f"answered again differently: {changed}"


def test_an_outbox_keeps_what_is_not_acknowledged_and_lets_it_go_once_it_is(tmp_path):
    """The engine's side, without a flow: with acknowledgements expected, every list stays until
    its batch is acknowledged and goes with the user's next write after that; without them (a
    caller that took the lists when ``process`` returned), only the batch's own list is kept
    (until 2026-12-04: the newest four, whatever had been delivered)."""
    from recsys.events import Envelope
    from recsys.shard.outbox import decode_outbox

    catalog = generate_catalog(30, seed=12)
    events = [Event(event_id=f"e{i}", type="click", user_id="u", item_id=catalog[i].item_id, ts=1_700_000_000_000 + i)
              for i in range(12)]
    envelopes = [Envelope("events", 0, i, b"u", encode(e), e.ts) for i, e in enumerate(events)]

    def outbox(engine: Shard) -> dict:
        return decode_outbox(engine.kv.get(b"o:u"))

    settings = Settings(state_dir=str(tmp_path / "state"), embed_cache_dir=str(tmp_path / "emb"), head_snapshot_interval_s=3600)
    engine = Shard.open(settings, in_memory=True)
    engine.upsert_catalog(catalog)
    engine.expect_acknowledgements()
    stamps = [engine.process([env]).stamp for env in envelopes[:8]]
    assert sorted(o for _, o in outbox(engine)) == list(range(8))  # nothing acknowledged: all eight
    engine.acknowledge(stamps[5])  # the batches up to the sixth delivered
    engine.process([envelopes[8]])
    assert sorted(o for _, o in outbox(engine)) == [6, 7, 8]
    engine.process([envelopes[9]])
    assert sorted(o for _, o in outbox(engine)) == [6, 7, 8, 9]
    engine.acknowledge(stamps[-1] + 2)  # everything so far delivered
    engine.process([envelopes[10]])
    assert sorted(o for _, o in outbox(engine)) == [10]
    engine.close()

    engine = Shard.open(settings.replace(state_dir=str(tmp_path / "state2")), in_memory=True)
    engine.upsert_catalog(catalog)
    for env in envelopes:
        engine.process([env])
    assert sorted(o for _, o in outbox(engine)) == [11]
    engine.close()


def test_a_search_outbox_keeps_what_is_not_acknowledged_and_lets_it_go_once_it_is(tmp_path):
    """The same for search answers: all ten kept until acknowledged, then the newest eight."""
    from recsys.events import Envelope
    from recsys.search.outbox import SEARCH_OUTBOX_LEN, outbox_key

    catalog = generate_catalog(30, seed=14)
    events = [Event(event_id=f"s{i}", type="search", user_id="u", item_id=None, query=catalog[i].title.split()[0],
                    ts=1_700_000_000_000 + i) for i in range(12)]
    envelopes = [Envelope("events", 0, i, b"u", encode(e), e.ts) for i, e in enumerate(events)]

    def kept(engine: Shard) -> list[int]:
        return sorted(o for _, o, *_ in orjson.loads(engine.kv.get(outbox_key("u"))))

    settings = Settings(state_dir=str(tmp_path / "state"), embed_cache_dir=str(tmp_path / "emb"), head_snapshot_interval_s=3600)
    engine = Shard.open(settings, in_memory=True)
    engine.upsert_catalog(catalog)
    engine.expect_acknowledgements("search_results")
    stamps = [engine.process([env]).stamp for env in envelopes[:10]]
    assert kept(engine) == list(range(10))
    engine.acknowledge(stamps[-1], "search_results")
    engine.process([envelopes[10]])
    assert kept(engine) == list(range(11 - SEARCH_OUTBOX_LEN, 11))
    with pytest.raises(ValueError, match="unknown output 'searches'"):
        engine.acknowledge(stamps[-1], "searches")
    engine.close()


def test_a_crash_before_the_sink_flushed_loses_no_list_of_an_event_that_waited_for_its_item(memory_broker, tmp_path):
    """An event that arrived before its catalog item waits in state (recsys/shard/waiting.py);
    its list is emitted when the item arrives, long after Bytewax committed the event's offset.
    A crash before the sink flushed that list re-delivers the catalog record at most, never the
    event, so no re-delivery can ask the outbox for it: the restart must send it by itself."""
    catalog = generate_catalog(40, seed=15)
    late = catalog.pop()  # announced only once the event for it waits
    early = Event(event_id="early", type="click", user_id="u", item_id=late.item_id, ts=1_700_000_000_000)

    def announce(engine: Shard) -> None:  # the item, once the event has waited through a few committed epochs
        deadline = time.monotonic() + 60
        while engine.totals.get("waited", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        produce_records(memory_broker, "catalog", [(late.item_id.encode(), encode(late))])

    # dies sending the released event's list; epochs of 0.2 s commit the event's offset meanwhile
    sent, delivered = _crash_then_restart(memory_broker, tmp_path, catalog, [early], "recs", crash_at=1,
                                          snapshot_interval_s=0.2, during=announce, unknown_item_wait_s=60.0)
    assert [r["trigger_event_id"] for r in sent] == ["early"]
    assert delivered == sent, "the waited event's list was lost"


def test_a_crash_before_the_sink_flushed_loses_no_answer_of_a_search_that_waited_behind_its_users_item(memory_broker, tmp_path):
    """The same for a search: a shopper's search waits behind their event for an item not yet in
    the catalog (a user's events keep their order), and is answered when the item arrives.
    Before 2026-12-06 that answer was not kept unsent (the search, below the watermark by then,
    was taken for a re-delivered one), so a crash before the sink flushed it lost it."""
    catalog = generate_catalog(40, seed=17)
    late = catalog.pop()
    early = Event(event_id="early", type="click", user_id="u", item_id=late.item_id, ts=1_700_000_000_000)
    query = f"{late.title.split()[0]} {late.category or ''}".strip()
    asked = Event(event_id="asked", type="search", user_id="u", item_id=None, ts=1_700_000_001_000, query=query)

    def announce(engine: Shard) -> None:
        deadline = time.monotonic() + 60
        while engine.totals.get("waited", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        produce_records(memory_broker, "catalog", [(late.item_id.encode(), encode(late))])

    sent, delivered = _crash_then_restart(memory_broker, tmp_path, catalog, [early, asked], "found", crash_at=1,
                                          snapshot_interval_s=0.2, during=announce, unknown_item_wait_s=60.0)
    assert [r["trigger_event_id"] for r in sent] == ["asked"]
    assert delivered == sent, "the waited search's answer was lost"


def test_a_crash_before_the_sink_flushed_loses_no_dead_letter_of_an_event_whose_wait_ran_out(memory_broker, tmp_path):
    """The same for the dead letter of an event whose item never came: it is emitted when the
    wait runs out, long after Bytewax committed the event's offset; a crash before the dead
    letters' sink flushed it lost it (no re-delivery brings it back)."""
    orphan = Event(event_id="orphan", type="click", user_id="u", item_id="never-announced", ts=1_700_000_000_000)
    sent, delivered = _crash_then_restart(memory_broker, tmp_path, generate_catalog(40, seed=16), [orphan], "dead", crash_at=1,
                                          snapshot_interval_s=0.2, unknown_item_wait_s=1.0)
    assert "never-announced" in sent[0]["reason"]
    assert delivered == sent, "the expired event's dead letter was lost"


def test_a_crash_before_the_sink_flushed_sends_each_refused_message_once_as_first_sent(memory_broker, tmp_path):
    """Refused messages (undecodable, an unknown event type, an unknown item), one a batch, the
    process dying at the third dead letter with none acknowledged; nothing of the first life
    reached the broker. After the restart each refused message has one dead letter, the bytes
    first sent. Before the fix the restart refused the re-delivered messages again, with a new
    ``failed_at``: a consumer could not tell a repeat from a new refusal."""
    catalog = generate_catalog(30, seed=17)
    good = [Event(event_id=f"e{i}", type="click", user_id="u", item_id=catalog[i].item_id, ts=1_700_000_000_000 + i * 1000)
            for i in range(6)]
    bad = [(b"u", b'{"event_id": "x1", "type": "click", "user_id": "u"'),
           (b"u", orjson.dumps({"event_id": "x2", "type": "hover", "user_id": "u", "item_id": catalog[0].item_id,
                                "ts": 1_700_000_000_000})),
           (b"u", orjson.dumps({"event_id": "x3", "type": "click", "user_id": "u", "item_id": "no-such-item",
                                "ts": 1_700_000_000_000}))]
    messages = [good[0], bad[0], good[1], good[2], bad[1], good[3], bad[2], good[4], good[5]]
    sent, delivered = _crash_then_restart(memory_broker, tmp_path, catalog, messages, "dead", crash_at=3,
                                          poll_max_records=1, unknown_item_wait_s=0.0)
    assert [d["source"]["offset"] for d in sent] == [1, 4, 6]
    assert delivered == sent, "refused again after the restart, with other bytes"


def test_a_crash_in_the_catalog_bootstrap_loses_no_dead_letter_and_sends_none_twice(memory_broker, tmp_path):
    """A bad catalog record read by the bootstrap before the flow starts (dataflows/catalog_table.py):
    the process dies sending its dead letter, before the bootstrap's flush. The restart reads the
    catalog again from the bootstrap's stored offset; the record was refused already, and its
    dead letter goes out once, as first sent (it was sent again with a new ``failed_at`` before
    2026-12-04; a restart that merely skipped the refused record would have lost it)."""
    catalog = [*generate_catalog(20, seed=18), (b"broken", b'{"item_id": "broken", "title": ')]
    events = [Event(event_id="e0", type="click", user_id="u", item_id=catalog[0].item_id, ts=1_700_000_000_000)]
    sent, delivered = _crash_then_restart(memory_broker, tmp_path, catalog, events, "dead", crash_at=1)
    assert [d["source"]["offset"] for d in sent] == [20]
    assert delivered == sent, "the bootstrap's dead letter was lost or sent again differently"


def test_a_rebuilt_state_sends_nothing_below_its_marks_but_what_waited_and_ranks_as_before(tmp_path):
    """The engine's side of ``recsys run --rebuild-state`` (the whole command, killed part-way
    too, is in tests/test_faults_kafka.py): below the marks the rebuild recorded, each message is
    applied and ranked but its list, search answer or dead letter is kept back, the answer to an
    event the wiped state had let go after a wait too (until 2026-12-07 every event let go was
    answered again: an operator's probe), while the events it still held waiting are answered;
    from the mark on the lists are the ones a rebuild that sent everything would send (the
    re-ranker learned from the kept-back lists alike). The marks stay in the state once passed
    (a rebuild killed then rebuilt again reads them); a topic re-created under a rebuilt state
    (its offsets going backwards) takes its mark with it."""
    from dataflows.runner import RebuildMarks, mark_sent_before
    from recsys.events import OFFSETS_RESET_FROM, OFFSETS_RESET_TO, CatalogItem, Envelope
    from recsys.shard.outbox import SENT_BEFORE_PREFIX

    catalog = generate_catalog(40, seed=13)
    events = [Event(event_id=f"e{i}", type="click", user_id=f"u{i % 7}", item_id=catalog[(3 * i) % 40].item_id,
                    ts=1_700_000_000_000 + 1000 * i) for i in range(120)]
    events[5] = Event("e5", "click", "u-late", "late-item", events[5].ts)  # waits for its item, let go at offset 10-19
    records = [encode(e) for e in events]
    records[10] = b"{not json"  # a bad record below the mark, one above it
    records[100] = b"{not json either"
    records[20] = encode(Event("s20", "search", "u3", None, events[20].ts, query="backpack"))
    records[90] = encode(Event("s90", "search", "u3", None, events[90].ts, query="backpack"))
    envelopes = [Envelope("events", 0, i, e.user_id.encode(), r, e.ts) for i, (e, r) in enumerate(zip(events, records))]
    late = CatalogItem("late-item", "Late backpack", category="bags")
    batches = [envelopes[i : i + 10] for i in range(0, 120, 10)]
    batches[1].append(Envelope("catalog", 0, 0, b"late-item", encode(late), events[19].ts))

    def life(state: str, carried: RebuildMarks | None) -> tuple[list, Shard]:
        settings = Settings(state_dir=str(tmp_path / state), embed_cache_dir=str(tmp_path / "emb"),
                            head_snapshot_interval_s=3600, unknown_item_wait_s=3600)
        if carried is not None:
            mark_sent_before(settings.state_dir, carried, events_topic="events")
        engine = Shard.open(settings)
        engine.upsert_catalog(catalog)
        return [engine.process(batch) for batch in batches], engine

    def triggers(result) -> list[str]:
        return [orjson.loads(p)["trigger_event_id"] for _, p in result.recommendations]

    def items(result) -> list:
        return [(orjson.loads(p)["user_id"], [i["item_id"] for i in orjson.loads(p)["items"]])
                for _, p in [*result.recommendations, *result.search_results]]

    plain, reference = life("plain", None)
    assert "e5" in triggers(plain[1])  # answered once its item came
    rebuilt, engine = life("rebuilt", RebuildMarks(marks={("events", 0): 60}, waiting=set()))
    for before, after in zip(plain[:6], rebuilt[:6]):  # below the mark: nothing out, all counted
        assert not after.recommendations and not after.search_results and not after.dead_letters
        assert after.counts["sent_before_rebuild"] == (len(before.recommendations) + len(before.search_results)
                                                       + len(before.dead_letters)) > 0
    for before, after in zip(plain[6:], rebuilt[6:]):  # from the mark on: the same lists, answers, refusals
        assert items(after) == items(before) and len(after.dead_letters) == len(before.dead_letters)
    assert sum(len(r.dead_letters) for r in rebuilt) == 1 and sum(len(r.search_results) for r in rebuilt) == 1
    assert list(engine.kv.iter_prefix(SENT_BEFORE_PREFIX)) == [(b"sent:events:0", b"60")]  # kept once passed
    engine.close()
    reference.close()

    # the events the wiped state still held waiting were never answered: they are, below the mark
    waited, engine = life("waited", RebuildMarks(marks={("events", 0): 60}, waiting={("events", 0, 5), ("events", 0, 15)}))
    assert sorted(triggers(waited[1])) == ["e15", "e5"] and not any(r.recommendations for r in waited[2:6])
    engine.close()

    # a topic re-created before the mark was passed: the new log's messages are answered
    settings = Settings(state_dir=str(tmp_path / "recreated"), embed_cache_dir=str(tmp_path / "emb"),
                        head_snapshot_interval_s=3600)
    mark_sent_before(settings.state_dir, RebuildMarks(marks={("events", 0): 500}), events_topic="events")
    engine = Shard.open(settings)
    engine.upsert_catalog(catalog)
    assert not engine.process(envelopes[30:60]).recommendations
    reset = Envelope("events", 0, -1, None, b"", extra={OFFSETS_RESET_FROM: 60, OFFSETS_RESET_TO: 0})
    renamed = [Envelope("events", 0, i, e.key, encode(dataclasses.replace(events[30 + i], event_id=f"new{i}")), e.timestamp_ms)
               for i, e in enumerate(envelopes[30:40])]
    assert engine.process([reset, *renamed]).recommendations
    assert list(engine.kv.iter_prefix(SENT_BEFORE_PREFIX)) == []
    engine.close()


def test_what_a_rebuild_carries_from_a_damaged_recovery_store_and_a_readable_state(tmp_path):
    """``sent_before_rebuild`` reads the recovery store's resume offsets and, from the old state,
    the marks an earlier rebuild left (the higher wins), the events it held waiting (and those its
    own rebuild was told of and had not answered) and the outputs its sinks never acknowledged (less the dead letters of messages the replay refuses
    again); a damaged store is named, not fatal (a rebuild is how one recovers from it)."""
    from dataflows.runner import RebuildMarks, mark_sent_before, sent_before_rebuild
    from recsys.shard.outbox import load_offsets, load_waiting_at_rebuild, SENT_BEFORE_PREFIX
    from recsys.store.kv import RocksKV

    state, recovery = tmp_path / "state", tmp_path / "recovery"
    mark_sent_before(str(state), RebuildMarks(marks={("events", 0): 500, ("events", 1): 7, ("catalog", 0): 40}),
                     events_topic="events")
    letters = [[None, orjson.dumps({"source": {"topic": "events", "partition": 0, "offset": o}}).decode()] for o in (3, 900)]
    kv = RocksKV(state / "rocks")
    kv.write({b"wait:events:1:00000000000000000004": b"{}", b"unsent:dead_letters:00000000000000000001": orjson.dumps(letters),
              b"meta:rebuild-waiting": b'[["events", 0, 600]]'})  # told by its own rebuild, not yet answered
    kv.close()
    (recovery / "shard-1").mkdir(parents=True)
    (recovery / "part-0.sqlite3").write_bytes(b"not a database, truncated")
    carried = sent_before_rebuild(str(state), str(recovery))
    assert carried.marks == {("events", 0): 500, ("events", 1): 7, ("catalog", 0): 40}
    assert carried.waiting == {("events", 1, 4), ("events", 0, 600)} and carried.unread == [str(recovery)]
    # a shard's fresh state: its own events partitions' marks (p % shards == shard), every catalog one
    mark_sent_before(str(tmp_path / "shard-1"), carried, events_topic="events", shards=2, shard=1)
    kv = RocksKV(tmp_path / "shard-1" / "rocks")
    assert load_offsets(kv, SENT_BEFORE_PREFIX) == {("events", 1): 7, ("catalog", 0): 40}
    assert load_waiting_at_rebuild(kv) == {("events", 1, 4), ("events", 0, 600)}
    kept = orjson.loads(kv.get(b"unsent:dead_letters:00000000000000000001"))
    assert [orjson.loads(p)["source"]["offset"] for _, p in kept] == [3]  # offset 900: refused again by the replay
    kv.close()
    # no state at all: what waited is not known
    assert sent_before_rebuild(str(tmp_path / "none"), None) == RebuildMarks()
