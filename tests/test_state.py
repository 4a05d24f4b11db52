"""User state: the KVStore contract (both backends), UserState.apply, the codec, UserStore."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys import feedback
from recsys.events import Event
from recsys.signals.popularity import Popularity
from recsys.store import users as user_codec
from recsys.store.kv import KVStore, MemoryKV, RocksKV, StoreClosedError, StoreOpenError
from recsys.store.users import (
    MAX_PURCHASED,
    StateDecodeError,
    UserState,
    UserStore,
    decode_user,
    encode_user,
    user_key,
)

H = 3_600_000  # one hour in ms


# --------------------------------------------------------------------------- KV contract


def test_kv_backend_implements_every_protocol_method_with_its_signature(kv):
    """A runtime_checkable isinstance only checks that names exist; the parameters must match too."""
    import inspect

    for name in ("get", "multi_get", "write", "iter_prefix", "close"):
        expected = list(inspect.signature(getattr(KVStore, name)).parameters)[1:]
        assert list(inspect.signature(getattr(kv, name)).parameters) == expected, name


def test_kv_get_missing_is_none(kv):
    assert kv.get(b"nope") is None


def test_kv_write_then_get_returns_exact_bytes(kv):
    kv.write({b"k\x00\xff": b"\x00v\xff\x00", b"empty": b""})
    assert kv.get(b"k\x00\xff") == b"\x00v\xff\x00"
    assert kv.get(b"empty") == b""


def test_memory_kv_keeps_what_it_stores_at_its_size():
    """orjson's bytes are over-allocated to at least 4 KiB and never shrunk; a store that kept
    them as given held ~4 KiB per small record (a replay's in-memory state: the 64-shard replay
    ran out of memory). The store keeps right-sized copies with the same bytes."""
    import tracemalloc

    kv = MemoryKV()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        records = {b"item:%d" % i: orjson.dumps({"item_id": str(i), "title": f"item {i}"}) for i in range(2000)}
        kv.write(records)
        del records  # what is left is what the store holds
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kv.get(b"item:7") == orjson.dumps({"item_id": "7", "title": "item 7"})
    assert held < 2000 * 400, f"{held / 2000:.0f} bytes per stored record of ~40 bytes"


def test_kv_multi_get_keeps_order_and_reports_missing(kv):
    kv.write({b"a": b"1", b"c": b"3"})
    assert kv.multi_get([b"c", b"b", b"a", b"c"]) == [b"3", None, b"1", b"3"]
    assert kv.multi_get([]) == []


def test_kv_write_overwrites_and_deletes(kv):
    kv.write({b"a": b"1", b"b": b"2"})
    kv.write({b"a": b"10"}, deletes=[b"b", b"never-there"])
    assert kv.multi_get([b"a", b"b"]) == [b"10", None]


def test_kv_write_applies_deletes_after_puts(kv):
    kv.write({b"a": b"1"}, deletes=[b"a"])
    assert kv.get(b"a") is None


def test_kv_write_rejects_non_bytes_without_writing_anything(kv):
    with pytest.raises(TypeError):
        kv.write({b"good": b"1", "bad": b"2"})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        kv.write({b"good": b"1"}, deletes=["bad"])  # type: ignore[list-item]
    assert kv.get(b"good") is None


def test_kv_iter_prefix_yields_only_prefix_in_bytewise_order(kv):
    kv.write({b"u:b": b"2", b"u:a": b"1", b"u:\xff": b"3", b"u": b"x", b"u;": b"y", b"t:z": b"z", b"v:": b"w"})
    assert list(kv.iter_prefix(b"u:")) == [(b"u:a", b"1"), (b"u:b", b"2"), (b"u:\xff", b"3")]
    assert list(kv.iter_prefix(b"none:")) == []


def test_kv_iter_prefix_is_unaffected_by_writes_during_iteration(kv):
    kv.write({b"p:%03d" % i: b"old" for i in range(50)})
    seen = []
    for key, value in kv.iter_prefix(b"p:"):
        seen.append((key, value))
        kv.write({b"p:%03d" % (int(key[2:]) + 1): b"new"}, deletes=[b"p:049"])
    assert seen == [(b"p:%03d" % i, b"old") for i in range(50)]


def test_kv_closed_store_raises(kv):
    kv.close()
    with pytest.raises(StoreClosedError):
        kv.get(b"a")
    with pytest.raises(StoreClosedError):
        kv.write({b"a": b"1"})
    kv.close()  # idempotent


# --------------------------------------------------------------------------- RocksKV specifics


def test_rocks_data_survives_close_and_reopen(tmp_path):
    kv = RocksKV(tmp_path / "db")
    kv.write({b"a": b"1"})
    kv.close()
    again = RocksKV(tmp_path / "db")
    assert again.get(b"a") == b"1"
    again.close()


def test_rocks_second_open_of_a_live_store_is_refused(tmp_path):
    kv = RocksKV(tmp_path / "db")
    with pytest.raises(StoreOpenError, match="cannot open RocksDB"):
        RocksKV(tmp_path / "db")
    kv.close()


_WRITER = textwrap.dedent(
    """
    import sys
    from recsys.store.kv import RocksKV
    kv = RocksKV(sys.argv[1])
    i = 0
    while True:
        kv.write({b"b%06d:%d" % (i, j): b"%d" % i * 50 for j in range(10)}, deletes=[b"b%06d:x" % i])
        print(i, flush=True)
        i += 1
    """
)


def test_rocks_write_survives_sigkill_and_is_atomic(tmp_path):
    path = str(tmp_path / "db")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, path], stdout=subprocess.PIPE, text=True)
    try:
        last = -1
        for line in proc.stdout:  # type: ignore[union-attr]
            last = int(line)
            if last >= 300:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert last >= 300
    kv = RocksKV(path)
    try:
        batches: dict[int, int] = {}
        for key, value in kv.iter_prefix(b"b"):
            i = int(key[1:7])
            assert value == b"%d" % i * 50
            batches[i] = batches.get(i, 0) + 1
        assert all(batches.get(i) == 10 for i in range(last + 1))  # every acknowledged write is there
        assert set(batches.values()) == {10}  # and no batch is half-applied
        assert sorted(batches) == list(range(len(batches)))
    finally:
        kv.close()


# --------------------------------------------------------------------------- UserState.apply


def ev(etype, item, ts, user="u", session=None, eid="e"):
    return Event(eid, etype, user, item, ts, session_id=session, query="q" if etype == "search" else None)


def apply(s, event, vec=None, partition=0, offset=0, history_len=50, half_life_h=1.0):
    return s.apply(event, vec, partition, offset, history_len=history_len, half_life_h=half_life_h)


def test_apply_redelivered_event_changes_nothing_byte_for_byte():
    s = UserState("u")
    assert apply(s, ev("click", "a", 1000), np.ones(4), offset=5)
    assert apply(s, ev("purchase", "b", 2000, session="s1"), np.arange(4.0), offset=6)
    before = encode_user(s)
    assert not apply(s, ev("purchase", "b", 2000, session="s1"), np.arange(4.0), offset=6)
    assert not apply(s, ev("browse", "c", 9999), np.ones(4), offset=3)  # older offset, same partition
    assert encode_user(s) == before


def test_apply_tracks_offsets_per_partition():
    s = UserState("u")
    assert apply(s, ev("click", "a", 1), partition=0, offset=10)
    assert apply(s, ev("click", "b", 2), partition=1, offset=3)
    assert not apply(s, ev("click", "b", 2), partition=1, offset=3)
    assert s.last_applied == {0: 10, 1: 3}
    assert s.is_applied(0, 10) and not s.is_applied(0, 11) and not s.is_applied(2, 0)


def test_apply_decays_counts_and_interest_by_hand():
    s = UserState("u")
    v1, v2 = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    apply(s, ev("click", "a", 0), v1, offset=0, half_life_h=1.0)  # 2 * v1
    apply(s, ev("add_to_cart", "b", 2 * H), v2, offset=1, half_life_h=1.0)  # 2*v1/4 + 4*v2
    apply(s, ev("click", "a", 3 * H), v1, offset=2, half_life_h=1.0)
    # at 3h: click(0h) -> 0.125, cart(2h) -> 0.5, click(3h) -> 1
    assert s.counts == pytest.approx({"click": 1.125, "add_to_cart": 0.5})
    np.testing.assert_allclose(s.interest, [2 * 0.125 + 2.0, 4 * 0.5], rtol=1e-6)
    assert s.interest.dtype == np.float32
    assert s.updated_ts == 3 * H


def test_apply_late_event_is_added_decayed_without_rewinding_the_clock():
    s = UserState("u")
    apply(s, ev("browse", "a", 2 * H, session="new"), np.array([1.0], np.float32), offset=0)
    apply(s, ev("browse", "b", 1 * H, session="old"), np.array([1.0], np.float32), offset=1)
    assert s.updated_ts == 2 * H
    assert s.session_id == "new"
    assert s.counts == pytest.approx({"browse": 1.5})  # the late one counts half, never more than 1
    np.testing.assert_allclose(s.interest, [1.5])
    assert [h[0] for h in s.history] == ["b", "a"]  # kept in event-time order


def test_apply_search_updates_counts_and_offsets_only():
    s = UserState("u")
    apply(s, ev("click", "a", 0), np.ones(2, np.float32), offset=0)
    apply(s, ev("search", None, 0), None, offset=1)
    assert s.counts == {"click": 1.0, "search": 1.0}
    assert s.history == [("a", "click", 0)]
    np.testing.assert_array_equal(s.interest, [2.0, 2.0])
    assert s.last_applied == {0: 1}


def test_apply_without_vector_keeps_history_but_not_interest():
    s = UserState("u")
    apply(s, ev("click", "a", 0), None)
    assert s.interest is None
    assert s.history == [("a", "click", 0)]


def test_history_is_bounded_and_keeps_the_most_recent():
    s = UserState("u")
    for i in range(30):
        apply(s, ev("browse", f"i{i}", i), offset=i, history_len=10)
    assert [h[0] for h in s.history] == [f"i{i}" for i in range(20, 30)]


def test_purchased_is_bounded_distinct_and_most_recent_last():
    s = UserState("u")
    for i in range(MAX_PURCHASED + 5):
        apply(s, ev("purchase", f"p{i}", i), offset=i, history_len=5)
    apply(s, ev("purchase", "p10", 10_000), offset=10_000, history_len=5)
    assert len(s.purchased) == MAX_PURCHASED
    assert s.purchased[-1] == "p10" and s.purchased.count("p10") == 1
    assert s.purchased[:2] == ["p5", "p6"]  # p0..p4 fell off; p10 moved to the end, not duplicated
    assert set(s.bought) == set(s.purchased) and s.bought["p10"] == 2 and s.bought["p6"] == 1


def test_bought_counts_purchases_per_item_only():
    s = UserState("u")
    for i, (etype, item) in enumerate([("purchase", "a"), ("click", "a"), ("purchase", "b"), ("purchase", "a")]):
        apply(s, ev(etype, item, i), offset=i)
    assert s.bought == {"a": 2, "b": 1}


def test_records_written_before_bought_existed_decode_with_no_counts():
    s = UserState("u", purchased=["a"], bought={"a": 3})
    raw = encode_user(s)
    version, flags, updated_ts, meta_len = user_codec._HEADER.unpack_from(raw)
    meta = orjson.loads(raw[user_codec._HEADER.size : user_codec._HEADER.size + meta_len])
    del meta["b"]
    old_meta = orjson.dumps(meta)
    old = user_codec._HEADER.pack(version, flags, updated_ts, len(old_meta)) + old_meta
    assert decode_user(old).bought == {} and decode_user(old).purchased == ["a"]


def test_apply_rejects_another_users_event():
    with pytest.raises(ValueError, match="other"):
        apply(UserState("u"), ev("click", "a", 0, user="other"))


def test_apply_rejects_vector_of_another_dimension():
    s = UserState("u")
    apply(s, ev("click", "a", 0), np.ones(3), offset=0)
    with pytest.raises(ValueError, match="shape"):
        apply(s, ev("click", "b", 1), np.ones(4), offset=1)


def test_user_state_weighs_events_with_the_one_shared_table():
    assert user_codec.EVENT_WEIGHTS is feedback.EVENT_WEIGHTS


# --------------------------------------------------------------------------- codec

_ids = st.text(min_size=1, max_size=12)
_types = st.sampled_from(["browse", "click", "add_to_cart", "purchase", "search"])
_ts = st.integers(min_value=0, max_value=2**53)
_states = st.builds(
    UserState,
    user_id=_ids,
    history=st.lists(st.tuples(_ids, _types, _ts), max_size=60),
    counts=st.dictionaries(_types, st.floats(min_value=0, max_value=1e9, allow_nan=False)),
    interest=st.one_of(
        st.none(),
        st.lists(st.floats(width=32, allow_nan=False), min_size=0, max_size=48).map(lambda xs: np.array(xs, np.float32)),
    ),
    purchased=st.lists(_ids, max_size=20),
    session_id=st.one_of(st.none(), _ids),
    updated_ts=_ts,
    last_applied=st.dictionaries(st.integers(0, 1000), st.integers(-1, 2**62)),
    bought=st.dictionaries(_ids, st.integers(1, 10**6), max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(_states)
def test_codec_round_trips(s):
    raw = encode_user(s)
    back = decode_user(raw)
    assert back == s
    assert encode_user(back) == raw
    if back.interest is not None:
        assert back.interest.dtype == np.float32 and back.interest.flags.writeable


def test_decoded_interest_does_not_alias_the_record():
    s = UserState("u", interest=np.ones(3, np.float32))
    back = decode_user(encode_user(s))
    back.interest += 1
    assert decode_user(encode_user(s)).interest.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("raw", [b"", b"\x01\x00", b"\x09" + bytes(13), encode_user(UserState("u"))[:-2]])
def test_codec_rejects_bad_bytes(raw):
    with pytest.raises(StateDecodeError):
        decode_user(raw)


# --------------------------------------------------------------------------- UserStore

DAY = 86_400_000


def test_store_returns_fresh_state_for_unknown_users(kv):
    users = UserStore(kv, ttl_days=1)
    got = users.get_many(["a", "b", "a"], now_ts=0)
    assert set(got) == {"a", "b"}
    assert got["a"] == UserState("a")


def test_store_round_trips_states_through_kv(kv):
    users = UserStore(kv, ttl_days=1)
    s = users.get_many(["a"], now_ts=0)["a"]
    apply(s, ev("click", "x", 1000, user="a"), np.ones(3, np.float32), offset=4)
    puts = users.puts([s])
    assert list(puts) == [user_key("a")] == [b"u:a"]
    kv.write(puts)
    assert users.get_many(["a"], now_ts=2000)["a"] == s


def test_store_treats_states_older_than_ttl_as_fresh(kv):
    users = UserStore(kv, ttl_days=1)
    s = UserState("a")
    apply(s, ev("click", "x", 1000, user="a"))
    kv.write(users.puts([s]))
    assert users.get_many(["a"], now_ts=1000 + DAY)["a"] == s  # exactly at the bound: kept
    assert users.get_many(["a"], now_ts=1001 + DAY)["a"] == UserState("a")


def test_store_sweep_deletes_only_expired_users(kv):
    users = UserStore(kv, ttl_days=1)
    states = []
    for i, ts in enumerate([0, 10, DAY, 2 * DAY]):
        s = UserState(f"u{i}")
        apply(s, ev("click", "x", ts, user=f"u{i}"))
        states.append(s)
    kv.write(users.puts(states) | {b"pop:x": b"keep"})
    assert users.count() == 4
    assert users.sweep_expired(now_ts=DAY + 5) == 1
    assert users.count() == 3
    assert sorted(users.get_many(["u1", "u2", "u3"], now_ts=DAY + 5)) == ["u1", "u2", "u3"]
    assert kv.get(user_key("u0")) is None and kv.get(b"pop:x") == b"keep"


def test_store_delete_user_forgets_them(kv):
    users = UserStore(kv, ttl_days=1)
    s = UserState("a")
    apply(s, ev("click", "x", 0, user="a"))
    kv.write(users.puts([s]))
    users.delete_user("a")
    assert users.count() == 0
    assert users.get_many(["a"], now_ts=0)["a"] == UserState("a")


def test_store_puts_commit_atomically_with_signal_records(kv):
    users = UserStore(kv, ttl_days=1)
    pop = Popularity(half_life_h=1)
    s = UserState("a")
    apply(s, ev("click", "x", 0, user="a"))
    pop.update("x", 2.0, 0)
    kv.write(users.puts([s]) | pop.export_dirty() | {b"wm:events:0": b"0"})
    assert users.count() == 1 and kv.get(b"pop:x") is not None and kv.get(b"wm:events:0") == b"0"
