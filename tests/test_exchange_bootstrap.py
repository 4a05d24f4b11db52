"""A new or wiped shard starts from a snapshot of the shared records, not from the beginning of
the exchange log (issue 11: retention deletes it); it ends with the same global signals as the
others, exactly once across the snapshot's boundary."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import time

import orjson
import pytest
from test_exchange import (  # noqa: F401
    _batches,
    _close,
    _forget,
    _log_of_two_shards,
    _open,
    _settings,
    catalog,
    events,
)
from test_operating import READY_TIMEOUT_S, RECSYS, Child, _stream, _totals, children  # noqa: F401, E402

from dataflows.kafka_io import KafkaClients, consume_all, produce_records
from dataflows.live import (
    ExchangeBootstrapError,
    catch_up_exchange,
)
from dataflows.testing.memory_broker import InMemoryBroker
from recsys.events import (
    OFFSETS_RESET_FROM,
    OFFSETS_RESET_TO,
    CatalogItem,
    Envelope,
    Event,
    decode_event,
    encode,
)
from recsys.shard.step import Shard
from recsys.signals.exchange import SEARCH_RANK_OP, SIGNAL_PREFIXES, decode_message
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
from recsys.synthetic import with_searches

TOPIC = "signal-exchange"


class SnapshotInfo0:
    position = -1  # no snapshot yet


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
    # new events of its users (offsets past everything its old messages covered) into the blank state
    batch = [dataclasses.replace(env, offset=env.offset + 10_000) for env in next(_batches(events, 2, 1))]
    message = wiped.process(batch).exchange[0]
    assert decode_message(message).seq == last_of_1 + 1  # not a number every shard would skip
    record = [(len(log), message)]
    assert shards[0].apply_exchange(record) == 1 and wiped.apply_exchange(record) == 1
    assert wiped.signal_checksum() == shards[0].signal_checksum()
    _close(shards[0], wiped)


def _rounds(tmp_path, embedder, catalog, events, name: str, *, wipe_at: int | None = None,  # noqa: F811
            lost: bool = False) -> tuple[list[tuple[int, bytes]], list]:
    """Two sharing shards, round by round: shard 0 processes a batch of its users' events, shard 1
    one of its own, their messages go to the log, and both apply the log so far. With ``wipe_at``:
    shard 0 cuts a snapshot at round ``wipe_at // 2``; at round ``wipe_at`` shard 1 seals its batch
    (its message published to the log, or ``lost`` with the state's outbox) and loses its state
    directory before applying the log. It comes back on a blank one: the snapshot, the log after
    it, then its ``events`` and ``control`` partitions read again from offset 0 (as far as it had
    read), and the rounds go on. In round 1 both shards read an erasure of one of shard 1's users."""
    batches = [list(_batches(events, 2, s)) for s in range(2)]
    erased = next(e.user_id for env in batches[1][0] for e in [decode_event(env.value)] if e.item_id)
    for s in range(2):
        batches[s][1] = [_forget(erased, 0), *batches[s][1]]
    shards = [_open(tmp_path, embedder, catalog, f"{name}{s}", shard=s) for s in range(2)]
    snaps = tmp_path / f"{name}-snaps"
    log: list[tuple[int, bytes]] = []

    def publish(messages: list[bytes]) -> None:
        log.extend((len(log), message) for message in messages)

    for r in range(max(map(len, batches))):
        for s, shard in enumerate(shards):
            if r < len(batches[s]):
                sealed = shard.process(batches[s][r]).exchange
                if not (r == wipe_at and s == 1 and lost):
                    publish(sealed)
        if r == wipe_at:
            _close(shards[1])  # its state directory is lost
            _, shards[1] = _late(tmp_path, embedder, catalog, f"{name}1-wiped", snaps, shard=1)
            assert shards[1].apply_exchange(log) > 0  # the log after the snapshot: its own old messages too
            puts: dict[bytes, bytes] = {}
            shards[1].exchange.resume_numbering(puts)  # as catch_up_exchange does
            shards[1].kv.write(puts)
            for batch in batches[1][:r + 1]:  # its events partition from the start of retention
                publish(shards[1].process(batch).exchange)
        for shard in shards:
            shard.apply_exchange(log)
        if wipe_at is not None and r == wipe_at // 2:
            write_snapshot(shards[0].kv, snaps, TOPIC, origin=0)
    return log, shards


def test_a_wiped_shard_re_reading_its_events_publishes_each_op_once(tmp_path, embedder, catalog, events):  # noqa: F811
    """Issue 11: a wiped shard rebuilds its users from its ``events`` partition, but the ops of the
    events whose messages the log holds (before the snapshot, or after it) are not published
    again; those of a sealed message lost with its state are, once. The signals end as those of a
    run in which the shard was never wiped (not only equal across the shards). Re-ranker steps and
    search associations follow the same rule: a re-read batch seals no message at all. (Search
    re-ranker steps are compared apart: sampled from what the shard showed, they may differ once
    the wiped shard answered its re-read searches again from other state; the two shards still
    learn the same weights from the log.)"""
    events = with_searches(events, catalog, 0.2, seed=1)  # search associations go through the log too
    whole_log, whole = _rounds(tmp_path, embedder, catalog, events, "whole")
    expected = whole[0].signal_checksum()

    def signal_ops(log):
        return [[op for op in decode_message(raw).ops if op[3] != SEARCH_RANK_OP] for _, raw in log]

    ops = signal_ops(whole_log)
    assert any(op[3] == SEARCH_RANK_OP for _, raw in whole_log for op in decode_message(raw).ops)
    assert len(ops) > 8 and whole[1].signal_checksum() == expected
    assert sum(op[3] == "forget_user" for message in ops for op in message) == 2  # one erasure, read by both
    assert any(op[3] == "search_learn" for message in ops for op in message)
    assert any(decode_message(raw).pairs for _, raw in whole_log)  # re-ranker steps
    for lost in (False, True):
        name = "lost" if lost else "published"
        log, shards = _rounds(tmp_path, embedder, catalog, events, name, wipe_at=24, lost=lost)
        assert shards[0].signal_checksum() == shards[1].signal_checksum() == expected, name
        assert signal_ops(log) == ops, name  # each op once, in the same order
        assert shards[0].kv.get(b"sqr:weights") == shards[1].kv.get(b"sqr:weights") is not None, name
        assert shards[1].users.count() == whole[1].users.count()  # its users rebuilt
        _close(*shards)
    _close(*whole)


def test_a_message_covers_no_event_still_waiting_for_its_catalog_item(tmp_path, embedder, catalog, events):  # noqa: F811
    """An event parked for its item has no op sealed yet: the messages sealed meanwhile cover its
    partition only below it, and the one with its op (once the item arrives) covers it."""
    settings = _settings(state_dir=str(tmp_path / "s0"), shards=2, shard=0, share_signals=True).replace(
        unknown_items="dead_letter", unknown_item_wait_s=3600.0)
    shard = Shard(settings, RocksKV(str(tmp_path / "s0" / "rocks")), embedder)
    shard.upsert_catalog(catalog)
    batch = next(_batches(events, 2, 0))
    at = next(i for i, env in enumerate(batch) if i > 0 and decode_event(env.value).item_id)
    late = dataclasses.replace(decode_event(batch[at].value), item_id="late-item")
    batch[at] = dataclasses.replace(batch[at], value=encode(late))
    first = decode_message(shard.process(batch).exchange[0])
    assert first.covered == [("events", 0, at - 1)] and shard.waiting.positions  # below the parked event
    item = Envelope("catalog", 0, 0, b"late-item", encode(CatalogItem("late-item", title="a late item")))
    second = decode_message(shard.process([item]).exchange[0])  # the item arrives: the event is released
    assert "late-item" in [op[2] for op in second.ops] and second.covered == [("events", 0, len(batch) - 1)]
    _close(shard)


def test_a_re_created_events_topic_is_not_taken_for_a_re_read(tmp_path, embedder, catalog, events):  # noqa: F811
    """Offsets that went backwards (the topic re-created) are new events, not covered ones."""
    shard = _open(tmp_path, embedder, catalog, "s0")
    first, second = list(_batches(events, 2, 0))[:2]
    shard.apply_exchange([(0, shard.process(first).exchange[0])])
    assert shard.exchange.covers("events", 0, len(first) - 1)
    reset = Envelope("events", 0, -1, None, b"", extra={OFFSETS_RESET_FROM: len(first), OFFSETS_RESET_TO: 0})
    renumbered = [dataclasses.replace(env, offset=i) for i, env in enumerate(second)]  # the new log from 0
    message = decode_message(shard.process([reset, *renumbered]).exchange[0])
    assert len(message.ops) == sum(1 for env in second if decode_event(env.value).item_id)  # each recorded
    assert message.covered == [("events", 0, len(second) - 1)]
    shard.apply_exchange([(1, shard.exchange.pending()[0])])
    assert shard.kv.get(b"x:c:0:events:0") == str(len(second) - 1).encode()  # every shard's record goes down
    _close(shard)


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


def test_an_erasure_reaches_the_snapshot_files_at_once(tmp_path):
    """The exchange snapshots hold every shard's sessions, user ids included. Until 2026-12-07
    (forty-seventh session) one written before an erasure stayed until three newer ones had been
    written (15 minutes at least at the default interval; for ever once the flow stopped). Now a
    writer whose shard applied an erasure (``erased_at``, its log position) writes one at once,
    interval or not, and deletes every older one; another shard's writer finds it and only deletes."""
    kv = MemoryKV()
    now = [1000.0]
    writers = [SnapshotWriter(tmp_path, TOPIC, 60, origin=o, clock=lambda: now[0]) for o in (0, 1)]
    for position in range(1, 4):
        kv.write({b"x:pos": str(position).encode(), b"ses:s1": f'["victim", {position}]'.encode()})
        now[0] += 61
        for _, path in list_snapshots(tmp_path, TOPIC):
            os.utime(path, (time.time() - 61, time.time() - 61))
        writers[0].maybe_write(kv, wait=True)
    assert [p for p, _ in list_snapshots(tmp_path, TOPIC)] == [1, 2, 3]
    kv.write({b"x:pos": b"4"}, [b"ses:s1"])  # the erasure's message applied at position 4
    assert not writers[1].maybe_write(kv, wait=True)  # not due: the interval has not passed
    assert writers[1].maybe_write(kv, wait=True, erased_at=4)  # due at once: the erasure
    assert [p for p, _ in list_snapshots(tmp_path, TOPIC)] == [4]
    assert read_records(list_snapshots(tmp_path, TOPIC)[0][1])[1] == []  # nothing of the victim
    assert not writers[0].maybe_write(kv, wait=True, erased_at=4)  # shard 0: its files are gone already
    assert [p for p, _ in list_snapshots(tmp_path, TOPIC)] == [4]


def test_the_exchange_keeps_where_it_applied_an_erasure(tmp_path, embedder, catalog, events):  # noqa: F811
    """What the writer above is handed: the log position of the newest erasure a shard applied,
    written with the batch, so that a restart still deletes what a crash left behind."""
    from recsys.signals.exchange import ERASED_AT_KEY

    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    try:
        user = next(e.user_id for e in events if e.item_id)
        assert shards[1].exchange.erased_at == -1
        for message in shards[0].process([_forget(user, 0)]).exchange:
            log.append((len(log), message))
        shards[1].apply_exchange(log)
        assert shards[1].exchange.erased_at == len(log) - 1  # the erasure's message, the last published
        assert shards[1].kv.get(ERASED_AT_KEY) == str(len(log) - 1).encode()  # written with the batch
    finally:
        _close(*shards)


def test_shared_prefixes_cover_every_global_signal_once():
    assert set(SIGNAL_PREFIXES) <= set(shared_prefixes()) and len(set(shared_prefixes())) == len(shared_prefixes())


class RetainedBroker(InMemoryBroker):
    """The in-memory broker with retention: each partition's log starts at ``log_start`` (the
    records below it deleted), as a real broker's does after retention ran (the local Tansu
    broker implements neither retention nor DeleteRecords, so this cannot run there)."""

    def __init__(self, log_start: int) -> None:
        super().__init__()
        self.log_start = log_start

    def consumer(self, **overrides):
        consumer = super().consumer(**overrides)
        consumer.beginning_offsets = lambda tps: {tp: self.log_start for tp in tps}
        return consumer


def _published(broker, log) -> None:
    broker.create_topic(TOPIC, 1)
    produce_records(broker, TOPIC, [(None, raw) for _, raw in log])


def test_a_log_trimmed_above_what_the_state_needs_is_refused_by_name(tmp_path, embedder, catalog, events):  # noqa: F811
    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    _close(*shards)
    broker = RetainedBroker(log_start=len(log) // 2)
    _published(broker, log)
    blank = _open(tmp_path, embedder, catalog, "blank", shard=1)
    with pytest.raises(ExchangeBootstrapError) as refused:
        catch_up_exchange(blank, broker, blank.settings.replace(exchange_topic=TOPIC, exchange_snapshot_dir=str(tmp_path / "snaps")))
    message = str(refused.value)
    assert f"exchange topic {TOPIC!r} partition 0: this shard needs the log from offset 0 (its state is blank)" in message
    assert f"starts at offset {len(log) // 2}" in message and f"records 0..{len(log) // 2 - 1}" in message
    assert f"no snapshot of {TOPIC!r} is in {tmp_path / 'snaps'}" in message
    assert blank.exchange.position == -1  # nothing applied
    _close(blank)


def test_a_snapshot_at_or_after_the_log_start_lets_a_blank_shard_catch_up(tmp_path, embedder, catalog, events):  # noqa: F811
    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    cut = len(log) // 2
    shards[0].apply_exchange(log[:cut])
    write_snapshot(shards[0].kv, tmp_path / "snaps", TOPIC)
    shards[0].apply_exchange(log)
    broker = RetainedBroker(log_start=cut)  # what the snapshot holds is all retention deleted
    _published(broker, log)
    loaded, late = _late(tmp_path, embedder, catalog, "late", tmp_path / "snaps", shard=1)
    settings = late.settings.replace(exchange_topic=TOPIC, exchange_snapshot_dir=str(tmp_path / "snaps"))
    assert catch_up_exchange(late, broker, settings, loaded) == len(log) - cut  # read from the cut on, once
    assert late.signal_checksum() == shards[0].signal_checksum()
    assert late.positions[(TOPIC, 0)] == len(log) - 1  # recorded as the flow records it
    _close(shards[0], shards[1], late)


# ------------------------------------------------------------------------ live, on the real broker


def _checksum(output: str) -> tuple[str, int]:
    found = re.findall(r"global signals: sha256=([0-9a-f]{64}) at exchange position (\d+)", output)
    assert found, output
    return found[-1][0], int(found[-1][1])


def _drained(bootstrap: str, topic: str, quiet_s: float = 4, timeout_s: float = 150) -> int:
    """Until the exchange log has stopped growing for ``quiet_s``; its length."""
    clients = KafkaClients.for_bootstrap(bootstrap)
    deadline, last, still_since = time.monotonic() + timeout_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(consume_all(clients, topic, timeout_s=5))
        if count != last:
            last, still_since = count, time.monotonic()
        elif count and time.monotonic() - still_since > quiet_s:
            return count
        time.sleep(0.5)
    pytest.fail(f"{topic!r} still growing after {timeout_s} s")


@pytest.mark.slow
@pytest.mark.processes
def test_a_shard_started_late_from_a_snapshot_ends_with_the_others_checksum_live(local_broker, topic_name, tmp_path, children):  # noqa: F811
    prefix = topic_name("boot") + "-"
    _, flags = _stream(local_broker.bootstrap, prefix, tmp_path, n_users=40)
    snaps = tmp_path / "snaps"
    flags += ["--shards", "2", "--share-signals", "--exchange-topic", prefix + "exchange",
              "--exchange-snapshot-dir", str(snaps), "--exchange-snapshot-interval-s", "1"]
    # shard 0 runs alone first: its users' ops fill the exchange log, and it cuts snapshots
    first = Child([*RECSYS, "run", "--shard", "0", *flags])
    children.append(first)
    first.wait_for("ready:", READY_TIMEOUT_S)
    length = _drained(local_broker.bootstrap, prefix + "exchange")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (newest_snapshot(snaps, prefix + "exchange") or SnapshotInfo0).position < length - 1:
        time.sleep(0.5)
    assert first.stop_with(signal.SIGTERM, timeout_s=30)[0] == 0, first.output
    cut = newest_snapshot(snaps, prefix + "exchange")
    assert cut is not None and cut.position == length - 1, first.output
    # shard 1 starts late on a blank state: from the snapshot, not from offset 0; shard 0 resumes
    late = Child([*RECSYS, "run", "--shard", "1", *flags])
    again = Child([*RECSYS, "run", "--shard", "0", *flags])
    children.extend([late, again])
    loaded = late.wait_for("exchange: blank state loaded from snapshot", 2 * READY_TIMEOUT_S)
    assert f"at position {cut.position}" in loaded and f"from offset {cut.position + 1}" in loaded
    late.wait_for("ready:", 2 * READY_TIMEOUT_S)
    again.wait_for("ready:", 2 * READY_TIMEOUT_S)
    total = _drained(local_broker.bootstrap, prefix + "exchange")
    assert total > length  # shard 1's users' ops came after the cut
    for child in (late, again):
        assert child.stop_with(signal.SIGTERM, timeout_s=30)[0] == 0, child.output
    assert _checksum(late.output) == _checksum(again.output) == (_checksum(again.output)[0], total - 1)


@pytest.mark.slow
@pytest.mark.processes
def test_a_shard_wiped_mid_run_restarts_from_the_newest_snapshot_and_ends_with_the_others_checksum_live(
        local_broker, topic_name, tmp_path, children):  # noqa: F811
    """Two sharing shard processes on the real local broker; shard 1 is killed (SIGKILL) and its state
    and recovery directories deleted while shard 0 runs on. Restarted, it loads the newest snapshot,
    reads the log after it and its own events partition from the start (rebuilding its users, but
    publishing no op for the events the log covers: message version 3), then takes new events;
    both end with the same global-signal checksum at the log's last position."""
    import shutil

    from recsys.synthetic import generate_catalog, generate_events

    prefix = topic_name("wipe") + "-"
    _, flags = _stream(local_broker.bootstrap, prefix, tmp_path, n_users=40)
    snaps, exchange = tmp_path / "snaps", prefix + "exchange"
    flags += ["--shards", "2", "--share-signals", "--exchange-topic", exchange,
              "--exchange-snapshot-dir", str(snaps), "--exchange-snapshot-interval-s", "1"]
    shards = [Child([*RECSYS, "run", "--shard", str(i), *flags]) for i in range(2)]
    children.extend(shards)
    for shard in shards:
        shard.wait_for("ready:", 2 * READY_TIMEOUT_S)
    length = _drained(local_broker.bootstrap, exchange)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (newest_snapshot(snaps, exchange) or SnapshotInfo0).position < length - 1:
        time.sleep(0.5)
    cut = newest_snapshot(snaps, exchange)
    assert cut is not None and cut.position == length - 1, shards[0].output

    shards[1].kill()  # SIGKILL, then its state is lost
    for sub in ("state", "recovery"):
        shutil.rmtree(tmp_path / sub / "shard-1")
    wiped = Child([*RECSYS, "run", "--shard", "1", *flags])
    children.append(wiped)
    loaded = wiped.wait_for("exchange: blank state loaded from snapshot", 2 * READY_TIMEOUT_S)
    assert f"at position {cut.position}" in loaded and f"from offset {cut.position + 1}" in loaded, loaded
    wiped.wait_for("ready:", 2 * READY_TIMEOUT_S)
    # new traffic for both shards' users, stamped after every event of the first part
    clients = KafkaClients.for_bootstrap(local_broker.bootstrap)
    old = [decode_event(env.value) for env in consume_all(clients, prefix + "events", timeout_s=5)]
    later = [dataclasses.replace(e, event_id="late-" + e.event_id, ts=e.ts + 10**9)
             for e in generate_events(60, generate_catalog(30, seed=7), n_users=40, seed=9)]
    assert min(e.ts for e in later) > max(e.ts for e in old)
    produce_records(clients, prefix + "events", [(e.user_id.encode(), encode(e)) for e in later])
    total = _drained(local_broker.bootstrap, exchange)
    for shard in (shards[0], wiped):
        assert shard.stop_with(signal.SIGTERM, timeout_s=30)[0] == 0, shard.output
    assert _checksum(wiped.output) == _checksum(shards[0].output) == (_checksum(shards[0].output)[0], total - 1)
    # the re-read of shard 1's events published nothing again: every op after the cut is a new event's
    # its users rebuilt: every event of its partition (shard 1 of 2 owns partition 1) applied once
    owned = [env for env in consume_all(clients, prefix + "events", timeout_s=5) if env.partition == 1]
    stopped = next(line for line in reversed(wiped.lines) if line.startswith("stopped:"))
    assert _totals(stopped)["applied"] == len(owned), wiped.output
    log = [decode_message(env.value) for env in consume_all(clients, exchange, timeout_s=5)]
    first = min(e.ts for e in later)
    assert all(op[4] < first for message in log[:length] for op in message.ops)
    assert all(op[4] >= first for message in log[length:] for op in message.ops)
    assert {message.origin for message in log[length:] if message.ops} == {0, 1}  # both took new events


def test_a_damaged_newest_snapshot_is_passed_over_for_the_one_before(tmp_path):
    source = MemoryKV()
    source.write({b"pop:a": b"1", b"x:pos": b"4"})
    older = write_snapshot(source, tmp_path, TOPIC)
    source.write({b"pop:a": b"2", b"x:pos": b"9"})
    newer = write_snapshot(source, tmp_path, TOPIC)
    raw = bytearray(open(newer.path, "rb").read())
    raw[-5] ^= 0xFF
    open(newer.path, "wb").write(bytes(raw))
    kv = MemoryKV()
    assert bootstrap(kv, tmp_path, TOPIC, origin=0).position == older.position and kv.get(b"pop:a") == b"1"
    os.remove(older.path)
    with pytest.raises(SnapshotError, match="damaged"):
        bootstrap(MemoryKV(), tmp_path, TOPIC, origin=0)


def test_a_shard_behind_the_log_start_moves_onto_a_newer_snapshot_and_keeps_its_users(tmp_path, embedder, catalog, events):  # noqa: F811
    from dataflows.live import shard_factory

    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    behind, cut = len(log) // 4, len(log) // 2
    shards[1].apply_exchange(log[:behind])  # shard 1 was down while the log went on
    users = shards[1].users.count()
    shards[0].apply_exchange(log[:cut])
    write_snapshot(shards[0].kv, tmp_path / "snaps", TOPIC)
    shards[0].apply_exchange(log)
    broker = RetainedBroker(log_start=cut)  # retention deleted everything the snapshot holds
    _published(broker, log)
    settings = shards[1].settings.replace(exchange_topic=TOPIC, exchange_snapshot_dir=str(tmp_path / "snaps"),
                                          embed_cache_dir=str(tmp_path / "emb"))
    _close(shards[1])
    engine = shard_factory(settings, clients=broker)()  # as `recsys run` opens it
    assert engine.users.count() == users > 0  # its own users kept
    assert engine.exchange.position == len(log) - 1 and engine.signal_checksum() == shards[0].signal_checksum()
    assert engine.exchange.pending() == []  # its messages the snapshot holds are not published again
    engine.close()
    _close(shards[0])


def test_a_start_the_check_refuses_is_refused_before_the_catch_up_applies_anything(tmp_path, embedder, catalog, events):  # noqa: F811
    """`recsys run` checks the state against the recovery offsets: until 2026-12-07 it did so after
    the exchange catch-up had read the log, applied it to the state (and sent what that released),
    and said so, then refused the start. The check now runs once the state is open, before it."""
    from dataflows.live import shard_factory

    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    shards[1].apply_exchange(log[: len(log) // 4])
    position = shards[1].exchange.position
    broker = RetainedBroker(log_start=0)
    _published(broker, log)
    settings = shards[1].settings.replace(exchange_topic=TOPIC, exchange_snapshot_dir=str(tmp_path / "snaps"),
                                          embed_cache_dir=str(tmp_path / "emb"))
    _close(shards[1])
    seen = []

    def refuse(engine) -> None:
        seen.append(engine.exchange.position)
        raise RuntimeError("the state is behind the recovery offsets")

    with pytest.raises(RuntimeError, match="behind the recovery offsets"):
        shard_factory(settings, clients=broker, check=refuse)()
    assert seen == [position]  # checked before the catch-up moved it
    engine = shard_factory(settings, clients=broker)()  # closed in order: the state opens again, unchanged till now
    assert engine.exchange.position == len(log) - 1  # and catches up when the start goes on
    engine.close()
    _close(shards[0])


def test_a_shard_behind_the_log_start_without_a_covering_snapshot_is_refused(tmp_path, embedder, catalog, events):  # noqa: F811
    log, shards = _log_of_two_shards(tmp_path, embedder, catalog, events)
    behind, cut = len(log) // 4, len(log) // 2
    shards[1].apply_exchange(log[:behind])
    shards[0].apply_exchange(log[:behind])
    write_snapshot(shards[0].kv, tmp_path / "snaps", TOPIC)  # as old as shard 1's state: no help
    broker = RetainedBroker(log_start=cut)
    _published(broker, log)
    kv = shards[1].kv
    assert bootstrap(kv, tmp_path / "snaps", TOPIC, origin=1, log_start=cut) is None
    with pytest.raises(ExchangeBootstrapError, match=f"this shard needs the log from offset {behind} \\(its state has "
                                                     f"applied the log up to position {behind - 1}\\), but the log now "
                                                     f"starts at offset {cut}"):
        catch_up_exchange(shards[1], broker, shards[1].settings.replace(exchange_topic=TOPIC,
                                                                        exchange_snapshot_dir=str(tmp_path / "snaps")))
    _close(*shards)


def test_a_temporary_file_left_by_a_killed_writer_is_cleared_and_never_loaded(tmp_path):
    kv = MemoryKV()
    kv.write({b"x:pos": b"3", b"pop:a": b"1"})
    left = tmp_path / f".{TOPIC}.{'9' * 20}.snapshot.123.456.tmp"
    left.write_bytes(b"RXS1\n{half")
    assert newest_snapshot(tmp_path, TOPIC) is None  # never taken for a snapshot
    os.utime(left, (time.time() - 7200, time.time() - 7200))
    writer = SnapshotWriter(tmp_path, TOPIC, 1, clock=lambda: 1e9)
    writer._last = 0
    assert writer.maybe_write(kv, wait=True) and not left.exists()
    assert newest_snapshot(tmp_path, TOPIC).position == 3


@pytest.mark.parametrize("behind", ["click", "search"])
def test_what_the_exchange_catch_up_releases_from_the_waiting_room_is_sent(tmp_path, embedder, catalog, events, behind):  # noqa: F811
    """A sharing shard crashes while an event waits for its catalog item and a later event of
    the same shopper waits behind it; it stays down longer than the wait (2 s). At its restart
    the exchange catch-up, the first thing to run, finds the wait over: the event is
    dead-lettered as an unknown item and the one behind it applied (a click: recommended for; a
    search: answered). Those outputs are the catch-up's to send. Before 2026-12-06 it dropped
    them: the dead letter and the recommendation were lost, the click applied all the same.
    ``search``: the search-results topic does not exist yet (deleted while the shard was down,
    or renamed with a new recovery directory); until the forty-second session (2026-12-06) it
    was created only later, by the flow, so the answer's send failed, and so did every start."""
    now = [1_000.0]
    settings = _settings(state_dir=str(tmp_path / "s0"), shards=2, shard=0, share_signals=True).replace(
        unknown_items="dead_letter", unknown_item_wait_s=2.0, exchange_topic=TOPIC,
        dead_letters_topic="dead", recommendations_topic="recs", search_results_topic="search")
    shard = Shard(settings, RocksKV(str(tmp_path / "s0" / "rocks")), embedder, clock=lambda: now[0])
    shard.upsert_catalog(catalog)
    ts = events[0].ts
    late = Event("late", "click", "u-late", "late-item", ts)
    after = (Event("after", "click", "u-late", catalog[0].item_id, ts + 1) if behind == "click"
             else Event("after", "search", "u-late", None, ts + 1, query=catalog[0].title))
    out = shard.process([Envelope("events", 0, i, b"u-late", encode(e), e.ts) for i, e in enumerate((late, after))])
    assert out.counts["waited"] == 2 and not out.dead_letters and not out.recommendations and not out.search_results
    shard.kv.close()  # a crash

    broker = InMemoryBroker()
    for name in ("dead", "recs", "search") if behind == "click" else ("dead", "recs"):
        broker.create_topic(name, 1)
    others = _open(tmp_path, embedder, catalog, "s1", shard=1)  # the other shard published meanwhile
    _published(broker, [(i, m) for i, m in enumerate(m for b in _batches(events, 2, 1) for m in others.process(b).exchange)])
    _close(others)
    now[0] += 10.0  # down for longer than the wait
    restarted = Shard(settings, RocksKV(str(tmp_path / "s0" / "rocks")), embedder, clock=lambda: now[0])
    try:
        assert catch_up_exchange(restarted, broker, settings) > 0 and len(restarted.waiting) == 0
        (letter,) = [orjson.loads(r.value) for r in consume_all(broker, "dead")]
        assert "unknown item 'late-item'" in letter["reason"] and letter["source"]["offset"] == 0
        sent = consume_all(broker, "recs" if behind == "click" else "search")
        assert [orjson.loads(r.value)["trigger_event_id"] for r in sent] == ["after"]
        assert not list(restarted.kv.iter_prefix(b"unsent:"))  # delivered: nothing left to send again
    finally:
        _close(restarted)
