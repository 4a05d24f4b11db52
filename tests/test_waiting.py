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


def test_an_unknown_item_event_below_the_watermark_was_dead_lettered_before_and_is_again_at_once(tmp_path):
    room = WaitingRoom(RocksKV(tmp_path / "db"), wait_s=2.0, clock=lambda: 0.0)
    out = room.sort([_env(Event("e1", "click", "u", "nope", ts=1), 4)], known=set(), committed={("events", 0): 7})
    assert [e.event_id for _, e in out.expired] == ["e1"] and len(room) == 0


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
