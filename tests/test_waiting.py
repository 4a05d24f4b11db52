"""recsys/shard/waiting.py: events for items the catalog has not delivered yet wait in state, bounded."""

from __future__ import annotations

from recsys.events import Envelope, Event, encode
from recsys.shard.waiting import WaitingRoom
from recsys.store.kv import RocksKV


def _env(ev: Event, offset: int) -> tuple[Envelope, Event]:
    return Envelope("events", 0, offset, ev.user_id.encode(), encode(ev), 5), ev


def test_a_parked_event_survives_a_restart_and_is_released_when_its_item_arrives(tmp_path):
    now = [100.0]
    kv = RocksKV(tmp_path / "db")
    room = WaitingRoom(kv, wait_s=5.0, clock=lambda: now[0])
    waiting = room.sort([_env(Event("e1", "click", "u", "new", ts=1), 3)], known=set(), committed={})
    kv.write(waiting.puts, waiting.deletes)  # the engine commits this with the batch
    kv.close()

    kv = RocksKV(tmp_path / "db")  # a crash and restart: Bytewax has moved past offset 3
    room = WaitingRoom(kv, wait_s=5.0, clock=lambda: now[0])
    assert len(room) == 1
    redelivered = room.sort([_env(Event("e1", "click", "u", "new", ts=1), 3)], known=set(), committed={})
    assert redelivered.ready == [] and redelivered.puts == {}  # the copy is dropped: it is parked
    released = room.sort([], known={"new"}, committed={("events", 0): 9})
    assert [e.event_id for _, e in released.ready] == ["e1"] and released.released == {("events", 0, 3)}
    kv.write(released.puts, released.deletes)
    kv.close()
    kv = RocksKV(tmp_path / "db")
    assert len(WaitingRoom(kv, 5.0, lambda: 0.0)) == 0  # released: gone from state too
    kv.close()


def test_a_copy_redelivered_in_the_batch_that_releases_its_parked_event_is_dropped(tmp_path):
    """After a crash, Bytewax re-delivers a parked event in the restart's first batch, the batch
    that releases it (its item has arrived, its time is up, or its search's query is no longer
    being encoded). Before 2026-12-06 the release took its position out of the parked set first,
    so the copy went to ``ready`` too: a search answered twice (found by the crash test with the
    embedding worker, tests/test_crash_search.py), an event handed to apply twice."""
    now = [100.0]
    kv = RocksKV(tmp_path / "db")
    room = WaitingRoom(kv, wait_s=5.0, clock=lambda: now[0])
    click, search = Event("e1", "click", "u", "new", ts=1), Event("q1", "search", "v", None, ts=1, query="steel kettle")
    waiting = room.sort([_env(click, 3), _env(search, 4)], known=set(), committed={}, encoding=lambda e: e.type == "search",
                        query_wait_s=0.2)
    assert waiting.parked == 2
    kv.write(waiting.puts, waiting.deletes)
    kv.close()

    kv = RocksKV(tmp_path / "db")  # the restart: no query is being encoded now, and the item has come
    room = WaitingRoom(kv, wait_s=5.0, clock=lambda: now[0])
    first = room.sort([_env(click, 3), _env(search, 4)], known={"new"}, committed={("events", 0): 4},
                      encoding=lambda e: False, query_wait_s=0.2)
    assert [e.event_id for _, e in first.ready] == ["e1", "q1"]
    assert first.released == {("events", 0, 3), ("events", 0, 4)} and len(room) == 0
    kv.close()


def test_a_users_later_events_wait_behind_and_the_unknown_one_expires_after_the_bound(tmp_path):
    now = [0.0]
    room = WaitingRoom(RocksKV(tmp_path / "db"), wait_s=2.0, clock=lambda: now[0])
    batch = [_env(Event("e1", "click", "u", "nope", ts=1), 0), _env(Event("e2", "click", "u", "known", ts=2), 1),
             _env(Event("e3", "click", "v", "known", ts=3), 2)]
    first = room.sort(batch, known={"known"}, committed={})
    assert [e.event_id for _, e in first.ready] == ["e3"] and first.parked == 2
    now[0] = 1.9
    assert room.sort([], known={"known"}, committed={}).expired == []
    now[0] = 2.0
    done = room.sort([], known={"known"}, committed={})
    assert [e.event_id for _, e in done.expired] == ["e1"] and [e.event_id for _, e in done.ready] == ["e2"]
    assert len(room) == 0 and len(done.deletes) == 2


def test_a_copy_of_an_unknown_item_event_processed_before_is_not_refused_again(tmp_path):
    """At or below the last offset its partition processed, and not parked: it was dead-lettered
    before, and that dead letter was kept until acknowledged. Before 2026-12-06 it was
    dead-lettered again at once, with a new ``failed_at``; a copy above the engine's watermark
    (the partition's last event was the one that expired) was even parked and refused again."""
    room = WaitingRoom(RocksKV(tmp_path / "db"), wait_s=2.0, clock=lambda: 0.0)
    out = room.sort([_env(Event("e1", "click", "u", "nope", ts=1), 4)], known=set(), committed={("events", 0): 7})
    assert out.expired == [] and out.refused_before == 1 and len(room) == 0
    last = room.sort([_env(Event("e2", "click", "u", "nope", ts=1), 7)], known=set(), committed={("events", 0): 7})
    assert last.expired == [] and last.parked == 0 and last.refused_before == 1


def test_a_copy_of_an_applied_event_goes_on_even_while_its_user_has_an_event_waiting(tmp_path):
    """A restart re-delivers a shopper's search that was answered and an event of theirs parked
    after it. The copy goes on to the engine (which re-emits the stored answer) instead of
    waiting behind the parked event: released with it, it was taken for a new search and
    answered a second time (before 2026-12-06)."""
    now = [0.0]
    room = WaitingRoom(RocksKV(tmp_path / "db"), wait_s=2.0, clock=lambda: now[0])
    search, click = Event("s1", "search", "u", None, ts=1, query="tent"), Event("c1", "click", "u", "new", ts=2)
    first = room.sort([_env(search, 3), _env(click, 4)], known=set(), committed={})
    assert [e.event_id for _, e in first.ready] == ["s1"] and first.parked == 1
    again = room.sort([_env(search, 3), _env(click, 4)], known=set(), committed={("events", 0): 4})
    assert [e.event_id for _, e in again.ready] == ["s1"] and again.parked == 0 and again.released == set()
    released = room.sort([], known={"new"}, committed={("events", 0): 4})
    assert [e.event_id for _, e in released.ready] == ["c1"] and released.released == {("events", 0, 4)}


def test_no_wait_passes_events_through_unchanged(tmp_path):
    room = WaitingRoom(RocksKV(tmp_path / "db"), wait_s=0.0, clock=lambda: 0.0)
    batch = [_env(Event("e1", "click", "u", "nope", ts=1), 0)]
    assert room.sort(batch, known=set(), committed={}).ready == batch


def test_the_wait_is_a_validated_setting():
    import pytest

    from recsys.settings import Settings, SettingsError

    assert Settings.from_env({"RECSYS_UNKNOWN_ITEM_WAIT_S": "0.5"}).unknown_item_wait_s == 0.5
    with pytest.raises(SettingsError, match="RECSYS_UNKNOWN_ITEM_WAIT_S"):
        Settings(unknown_item_wait_s=-1)


_TS = 1_700_000_000_000


class _SlowEmbedder:
    """The shared embedder, whose every item costs ``per_item`` seconds of the test's clock (a
    real model takes ~3.4 ms per item on this machine: a bulk import of thousands takes seconds)."""

    def __init__(self, embedder, clock: list[float], per_item: float) -> None:
        self._inner, self._clock, self._per_item = embedder, clock, per_item

    def embed(self, texts, **kw):
        self._clock[0] += self._per_item * len(texts)
        return self._inner.embed(texts, **kw)

    def close(self) -> None:  # the module's embedder outlives each engine
        pass

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _import_shard(tmp_path, embedder, now: list[float]):
    from recsys.settings import Settings
    from recsys.shard.step import Shard

    settings = Settings(state_dir=str(tmp_path / "state"), state_ttl_days=36_500.0, unknown_item_wait_s=2.0)
    return Shard(settings, RocksKV(tmp_path / "db"), _SlowEmbedder(embedder, now, 0.01), clock=lambda: now[0])


def _catalog(ids, offset: int) -> list[Envelope]:
    from recsys.events import CatalogItem
    from recsys.events import encode as encode_item

    return [Envelope("catalog", 0, offset + i, item_id.encode(),
                     encode_item(CatalogItem(item_id, title=f"trail tent model {item_id}", category="tents")), 5)
            for i, item_id in enumerate(ids)]


def test_a_bulk_catalog_import_does_not_dead_letter_the_events_waiting_for_its_items(tmp_path, embedder):
    """Found in the operator's run: 5,000 new items and 800 events for them, 478 dead-lettered as
    unknown. The events came first (their topic is light) and waited 2 s of wall time while the
    flow spent that time embedding the import ahead of their items. Time spent applying catalog
    records does not count against a wait: the catalog was catching up. Here 300 items in three
    batches of 100, one second of embedding each, and one event per item parked before them."""
    now = [1_000.0]
    engine = _import_shard(tmp_path, embedder, now)
    ids = [f"new-{i}" for i in range(300)]
    events = [Envelope("events", 0, i, f"u{i}".encode(), encode(Event(f"e{i}", "click", f"u{i}", item, ts=_TS + i)), _TS + i)
              for i, item in enumerate(ids)]
    assert engine.process(events).counts["waited"] == 300
    dead = 0
    for b in range(3):
        result = engine.process(_catalog(ids[b * 100:(b + 1) * 100], b * 100))
        dead += len(result.dead_letters)
    assert dead == 0, f"{dead} events dead-lettered while their items were being imported"
    assert engine.totals["valid_events"] == 300 and len(engine.waiting) == 0
    engine.close()


def test_the_catalog_time_credited_to_waits_survives_a_restart_and_the_bound_still_holds(tmp_path, embedder):
    """The credit is state: after a restart a parked event's deadline means what it meant. And an
    event whose item never comes is still dead-lettered once 2 s have passed outside catalog work."""
    now = [1_000.0]
    engine = _import_shard(tmp_path, embedder, now)
    engine.process(_catalog([f"old-{i}" for i in range(150)], 0))  # 1.5 s of catalog work, before any wait
    engine.process([Envelope("events", 0, 0, b"u", encode(Event("e0", "click", "u", "never", ts=_TS)), _TS)])
    engine.process(_catalog([f"more-{i}" for i in range(150)], 150))  # 1.5 s more, credited
    engine.close()
    stopped_at = now[0]
    engine = _import_shard(tmp_path, embedder, now)  # restarted: the parked event and the credit are read back
    now[0] = stopped_at  # (the catalog it loads is embedded again, through the slow embedder)
    assert len(engine.waiting) == 1
    now[0] += 1.9
    assert engine.process([]).dead_letters == [] and len(engine.waiting) == 1
    now[0] += 0.2
    result = engine.process([])
    assert len(result.dead_letters) == 1 and b"unknown item 'never'" in result.dead_letters[0][1]
    engine.close()


def test_the_time_between_a_bulk_imports_slices_does_not_run_out_a_wait_but_a_trickle_does(tmp_path, embedder):
    """A catalog probe: 20,000 new items into a running flow, clicks on them 5 s later, 179 of 200
    dead-lettered after 27-40 s of wall time, their items still on the topic. Only the upserts'
    own time was credited; each slice's ranking, commit and fetch (here 0.4 s between slices of 64)
    ran the clock. Full slices mean more is on the topic: the time up to the next slice is import
    time too. Fewer records than a slice (a trickle of price changes) stop the clock only for their
    upserts, so an event for an item that never comes still runs out."""
    now = [1_000.0]
    engine = _import_shard(tmp_path, embedder, now)
    slice_ = engine.settings.catalog_poll_max_records
    ids = [f"bulk-{i}" for i in range(12 * slice_)]
    engine.process([Envelope("events", 0, 0, b"u", encode(Event("e0", "click", "u", ids[-1], ts=_TS)), _TS)])
    dead = 0
    for b in range(12):  # 12 slices, 0.64 s of embedding each, 0.4 s between them: ~4.8 s outside upserts
        now[0] += 0.4
        dead += len(engine.process(_catalog(ids[b * slice_:(b + 1) * slice_], b * slice_)).dead_letters)
    assert dead == 0 and engine.totals["valid_events"] == 1 and len(engine.waiting) == 0

    engine.process([Envelope("events", 0, 1, b"v", encode(Event("e1", "click", "v", "never", ts=_TS + 1)), _TS + 1)])
    for b in range(8):  # a trickle: two records a batch, 0.4 s apart: 3.2 s outside upserts (the first 0.4 s
        # follows the import's last full slice, and is credited)
        now[0] += 0.4
        result = engine.process(_catalog([f"price-{b}-a", f"price-{b}-b"], len(ids) + 2 * b))
        dead += len(result.dead_letters)
    assert dead == 1
    engine.close()


def test_a_parked_event_a_newer_rule_refuses_at_restart_is_dead_lettered_not_dropped(tmp_path, embedder):
    """A code review of 2026-12-07: a parked event that no longer decoded at a restart (a rule
    added since, a smaller RECSYS_MAX_MESSAGE_BYTES) was skipped without a word, neither applied
    nor dead-lettered, and its key stayed in the state for good. It is dead-lettered at the first
    batch, with the reason, and its key deleted."""
    import base64

    import orjson

    from recsys.shard.waiting import WAIT_PREFIX, _key

    now = [1_000.0]
    engine = _import_shard(tmp_path, embedder, now)
    raw = b'{"event_id": "e9", "type": "click", "user_id": "u\\u200bx", "item_id": "later", "ts": 1700000000000}'
    parked = ["events", 0, 7, base64.b64encode(b"ux").decode(), base64.b64encode(raw).decode(), _TS, now[0] + 2.0]
    engine.kv.write({_key(("events", 0, 7)): orjson.dumps(parked)})  # as an older release parked it
    engine.close()
    engine = _import_shard(tmp_path, embedder, now)
    result = engine.process([])
    ((_, letter),) = result.dead_letters
    reason = orjson.loads(letter)["reason"]
    assert reason.startswith("field 'user_id': contains the control, bidirectional or invisible character U+200B")
    assert "refused at a restart" in reason
    assert list(engine.kv.iter_prefix(WAIT_PREFIX)) == []
    engine.close()


def test_a_feed_of_full_slices_of_known_items_does_not_stop_the_wait_for_an_item_that_never_comes(tmp_path, embedder):
    """A code review of 2026-12-07: the gap credit stopped the clock for any stream of full catalog
    slices, a price feed of known items too, so an event for a mistyped item waited for as long
    as the feed ran (and its user's later events behind it). Only slices that bring new items
    are an import the event may be waiting for."""
    now = [1_000.0]
    engine = _import_shard(tmp_path, embedder, now)
    slice_ = engine.settings.catalog_poll_max_records
    ids = [f"known-{i}" for i in range(slice_)]
    engine.process(_catalog(ids, 0))
    engine.process([Envelope("events", 0, 0, b"u", encode(Event("e0", "click", "u", "never", ts=_TS)), _TS)])
    dead = 0
    for b in range(8):  # the same items again and again (new prices), full slices 0.4 s apart: 3.2 s
        now[0] += 0.4
        dead += len(engine.process(_catalog(ids, slice_ * (b + 1))).dead_letters)
    assert dead == 1
    engine.close()


class _AnsweringWorker:
    """An embedding worker that answers each job at the batch after the one that sent it."""

    def __init__(self, embedder) -> None:
        self._embedder, self._jobs, self._asked = embedder, {}, set()

    def started(self) -> bool:
        return True

    def submit(self, texts, *, cached=True) -> int:
        self._jobs[len(self._jobs)] = texts
        return len(self._jobs) - 1

    def close(self) -> None:
        pass

    def take(self, job):
        if job not in self._asked:
            self._asked.add(job)
            return None
        return self._embedder.embed(self._jobs[job])


def test_with_the_embedding_worker_the_waiting_clock_never_runs_backwards(tmp_path, embedder):
    """A code review of 2026-12-07: with the embedding worker, whose path credits all the time from
    its mark while records are deferred, the bulk import's gap credit (and each slice's upserts)
    were credited a second time: over 22.5 s of wall time the waiting clock moved -19 s. Each
    interval is credited once now: the clock stands still during the import, never goes back,
    and runs again after it."""
    now = [1_000.0]
    engine = _import_shard(tmp_path, embedder, now)
    engine._worker = _AnsweringWorker(embedder)
    slice_ = engine.settings.catalog_poll_max_records
    ids = [f"w-{i}" for i in range(10 * slice_)]
    engine.process([Envelope("events", 0, 0, b"u", encode(Event("e0", "click", "u", ids[-1], ts=_TS)), _TS)])
    clocks = [engine.waiting.now()]
    for b in range(10):
        now[0] += 0.4
        assert engine.process(_catalog(ids[b * slice_:(b + 1) * slice_], b * slice_)).dead_letters == []
        clocks.append(engine.waiting.now())
    for _ in range(3):  # the worker's last answers
        now[0] += 0.4
        engine.process([])
        clocks.append(engine.waiting.now())
    assert all(b >= a - 1e-9 for a, b in zip(clocks, clocks[1:])), clocks
    assert engine.totals["valid_events"] == 1  # released when its item came
    now[0] += 1.0
    engine.process([])
    assert engine.waiting.now() - clocks[-1] >= 0.99  # and the clock runs again
    engine.close()
