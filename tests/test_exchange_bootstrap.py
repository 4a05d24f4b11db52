"""A new or wiped shard starts from a snapshot of the shared records, not from the beginning of
the exchange log (issue 11: retention deletes it); it ends with the same global signals as the
others, exactly once across the snapshot's boundary."""

from __future__ import annotations

import os
import time

import pytest
from test_exchange import (  # noqa: F401
    _batches,
    _close,
    _log_of_two_shards,
    _open,
    catalog,
    embedder,
    events,
)

from dataflows.live import ExchangeBootstrapError, exchange_gap_message
from recsys.signals.exchange import SIGNAL_PREFIXES, decode_message
from recsys.signals.snapshot import (
    LOADING_KEY,
    SnapshotError,
    SnapshotWriter,
    bootstrap,
    list_snapshots,
    newest_snapshot,
    read_records,
    shared_prefixes,
    write_snapshot,
)
from recsys.store.kv import MemoryKV, RocksKV

TOPIC = "signal-exchange"


def _late(tmp_path, embedder, catalog, name: str, snapshots, *, shard: int):  # noqa: F811
    """A shard on a blank state directory, loaded from the newest snapshot first (as `recsys run` does)."""
    kv = RocksKV(str(tmp_path / name / "rocks"))
    info = bootstrap(kv, snapshots, TOPIC, origin=shard)
    kv.close()
    return info, _open(tmp_path, embedder, catalog, name, shard=shard)


def test_a_shard_started_late_from_a_snapshot_ends_with_the_others_signals(tmp_path, embedder, catalog, events):  # noqa: F811
    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    half = len(log) // 2
    shards[0].apply_exchange(log[:half])
    info = write_snapshot(shards[0].kv, tmp_path / "snaps", TOPIC, origin=0)
    assert info.position == half - 1 and info.signal_sha256 == shards[0].signal_checksum()
    for shard in shards:
        shard.apply_exchange(log)
    # the late shard never sees the log below the snapshot (retention deleted it)
    loaded, late = _late(tmp_path, embedder, catalog, "late", tmp_path / "snaps", shard=1)
    assert loaded.position == half - 1 and late.signal_checksum() == info.signal_sha256
    assert late.apply_exchange(log[half:]) == len(log) - half
    assert late.signal_checksum() == shards[0].signal_checksum() == shards[1].signal_checksum()
    assert late.exchange.position == shards[0].exchange.position == len(log) - 1
    _close(*shards, late)


def test_exactly_once_holds_across_the_snapshot_boundary(tmp_path, embedder, catalog, events):  # noqa: F811
    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    half = len(log) // 2
    shards[0].apply_exchange(log[:half])
    write_snapshot(shards[0].kv, tmp_path / "snaps", TOPIC)
    # after the cut: every message before it published again (outbox re-sends after crashes)
    republished = [(len(log) + i, raw) for i, (_, raw) in enumerate(log[:half])]
    whole = log + republished
    shards[0].apply_exchange(whole)
    _, late = _late(tmp_path, embedder, catalog, "late", tmp_path / "snaps", shard=1)
    # given the log from its start too (a consumer that rewound): positions at or below the cut are skipped
    assert late.apply_exchange(whole) == len(log) - half
    assert late.signal_checksum() == shards[0].signal_checksum()
    assert late.apply_exchange(whole) == 0 and late.signal_checksum() == shards[0].signal_checksum()
    _close(*shards, late)


def test_a_wiped_shard_restored_from_a_snapshot_numbers_its_messages_after_its_old_ones(tmp_path, embedder, catalog, events):  # noqa: F811
    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    for shard in shards:
        shard.apply_exchange(log)
    write_snapshot(shards[0].kv, tmp_path / "snaps", TOPIC)
    last_of_1 = max(decode_message(raw).seq for _, raw in log if decode_message(raw).origin == 1)
    _close(shards[1])  # shard 1's state is lost; it comes back on a blank directory
    _, wiped = _late(tmp_path, embedder, catalog, "wiped", tmp_path / "snaps", shard=1)
    assert wiped.exchange.next_seq == last_of_1 + 1
    batch = next(_batches(events, 2, 1))
    message = wiped.process(batch).exchange[0]  # its users' events, read again into the blank state
    assert decode_message(message).seq == last_of_1 + 1  # not a number every shard would skip
    record = [(len(log), message)]
    assert shards[0].apply_exchange(record) == 1 and wiped.apply_exchange(record) == 1
    assert wiped.signal_checksum() == shards[0].signal_checksum()
    _close(shards[0], wiped)


def test_a_snapshot_is_loaded_only_into_a_blank_state(tmp_path):
    source = MemoryKV()
    source.write({b"pop:a": b"1", b"cov:a": b"[]", b"x:pos": b"9", b"x:a:0": b"3", b"u:someone": b"{}"})
    info = write_snapshot(source, tmp_path, TOPIC)
    assert info.records == 2  # shared records only: no user record, no exchange bookkeeping
    busy = MemoryKV()
    busy.write({b"pop:b": b"2"})
    assert bootstrap(busy, tmp_path, TOPIC, origin=1) is None and busy.get(b"pop:a") is None
    assert bootstrap(MemoryKV(), tmp_path / "none", TOPIC, origin=1) is None  # no snapshot: the log from 0
    assert bootstrap(MemoryKV(), tmp_path, "another-topic", origin=1) is None  # another exchange's snapshots


def test_an_interrupted_load_is_cleared_and_loaded_again(tmp_path):
    source = MemoryKV()
    source.write({b"pop:a": b"1", b"pop:b": b"2", b"x:pos": b"4"})
    write_snapshot(source, tmp_path, TOPIC)
    kv = MemoryKV()
    kv.write({LOADING_KEY: b"x", b"pop:a": b"1", b"pop:zz": b"half-written"})  # a crash part-way
    info = bootstrap(kv, tmp_path, TOPIC, origin=0)
    assert info.position == 4 and kv.get(LOADING_KEY) is None
    assert dict(kv.iter_prefix(b"pop:")) == {b"pop:a": b"1", b"pop:b": b"2"}


def test_a_damaged_snapshot_is_refused_by_name(tmp_path):
    source = MemoryKV()
    source.write({b"pop:a": b"1" * 1000, b"x:pos": b"4"})
    info = write_snapshot(source, tmp_path, TOPIC)
    raw = bytearray(open(info.path, "rb").read())
    raw[-20] ^= 0xFF
    open(info.path, "wb").write(bytes(raw))
    with pytest.raises(SnapshotError, match=os.path.basename(info.path)):
        read_records(info.path)


def test_the_writer_cuts_at_most_one_snapshot_per_interval_across_shards_and_keeps_the_newest(tmp_path):
    kv = MemoryKV()
    now = [1000.0]
    writers = [SnapshotWriter(tmp_path, TOPIC, 60, origin=o, keep=2, clock=lambda: now[0]) for o in (0, 1)]
    for position in range(1, 5):
        kv.write({b"x:pos": str(position).encode(), b"pop:i": str(position).encode()})
        now[0] += 61  # an interval later, for the writers and for the files already written
        for _, path in list_snapshots(tmp_path, TOPIC):
            os.utime(path, (time.time() - 61, time.time() - 61))
        assert writers[0].maybe_write(kv, wait=True)
        assert not writers[1].maybe_write(kv, wait=True)  # shard 0 just wrote one: shard 1 waits
    kept = list_snapshots(tmp_path, TOPIC)
    assert [p for p, _ in kept] == [3, 4]
    assert newest_snapshot(tmp_path, TOPIC).position == 4
    assert dict(read_records(kept[-1][1])[1]) == {b"pop:i": b"4"}


def test_shared_prefixes_cover_every_global_signal_once():
    assert set(SIGNAL_PREFIXES) <= set(shared_prefixes()) and len(set(shared_prefixes())) == len(shared_prefixes())


def test_the_refusal_names_the_topic_the_offsets_and_the_snapshots(tmp_path):
    message = exchange_gap_message(TOPIC, 0, 40, state_position=-1, snapshot_dir=str(tmp_path), loaded=None,
                                   newest=None, interval_s=300)
    assert "'signal-exchange' partition 0" in message and "from offset 0" in message
    assert "starts at offset 40" in message and "records 0..39" in message and f"no snapshot of 'signal-exchange' is in {tmp_path}" in message
    assert issubclass(ExchangeBootstrapError, RuntimeError)
