"""The crash test with shared signals (issue 11): ``kill -9`` one of two sharing shard processes
at seeded moments mid-stream, restart, and get the same users and one exchange log applied once.

One 6k-event stream (300 users, 300 items) in the real local broker. A reference ``recsys run
--processes 2 --share-signals`` is left alone until it has drained (every user's last event
answered, the exchange log still for a while) and stopped with SIGTERM; a crash run of the same
command on its own state, output and exchange topic has one shard SIGKILLed twice, once its
output holds a seeded, random fraction of the reference's distinct recommendations (in
``KILL_RANGES``), and is restarted on the same directories; its last life is drained and stopped
the same way. Neither runs ``--stop-at-end``: a shard reads the exchange log to its end *at
start* there, so it would stop before the other shard's last messages.

Why the crash run's signals cannot be compared byte for byte with the reference's: the exchange
log's order interleaves the two shards' messages as they happen to be published, and the
signals are order-dependent (``recsys/signals/exchange.py``), so two uninterrupted runs differ
too (the summary prints whether these two did). What the exchange promises, and what is checked:

- both shards stop at the same log position (the log's last record) with the same checksum;
- every op was published and applied exactly once across the kills: the log, each ``(origin,
  seq)`` taken once, holds per origin the sequence numbers 1..k without a gap, and the same
  multiset of ops (user, session, item, type, time, history tail) as the reference's log; a
  message published twice (an outbox re-sent after a kill) is counted;
- the shards' signals are exactly that log applied once in its order: a fresh set of signals
  fed the whole log (re-sent copies included) in memory ends with the shards' checksum (and,
  as a check of that replay, the reference's log gives the reference's checksum);
- the per-user states equal the reference's, each shard holds its partition's users, and each
  shard's popularity (the part of the signals that adds up in any order, up to rounding)
  equals the reference shards' within float tolerance: with sharing each holds the whole
  stream's;
- every user's last event was answered, duplicates in the output are byte-identical
  re-emissions, nothing was dead-lettered.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest
from kafka.structs import TopicPartition
from test_crash_recovery import (
    NEAR_END,
    _assert_same_users,
    _Child,
    _popularity,
    _produce_stream,
    _Progress,
    _run_args,
    _shard_dirs,
    _shard_to_kill,
    _sigkill_shard,
    _triggers,
    _users,
    _wait_for_mark,
)

from dataflows.kafka_io import (
    KafkaClients,
    consume_all,
    ensure_topics,
    partition_for_key,
)
from recsys.settings import Settings
from recsys.signals.covisitation import CoVisitation
from recsys.signals.exchange import SignalExchange, decode_message, signal_checksum
from recsys.signals.popularity import Popularity
from recsys.signals.sessions import SessionNeighbours
from recsys.store.kv import MemoryKV
from recsys.store.users import UserState

pytestmark = [pytest.mark.slow, pytest.mark.processes]

N_EVENTS = 6_000
N_USERS = 300
SHARDS = 2
#: Each kill lands once the crash run's output holds a fraction of the reference's distinct
#: recommendations drawn from one of these ranges (seeded: the same moments every run).
KILL_RANGES = ((0.15, 0.4), (0.45, 0.75))
KILL_SEED = 1111
MIN_STEP = 0.03
#: Drained: every user's last event answered and the exchange log unchanged this long.
STILL_S = 5.0  # a shard under load may take seconds to poll the last message
DRAIN_TIMEOUT_S = 240.0
_CHECKSUM = re.compile(r"\[shard (\d)\] global signals: sha256=([0-9a-f]{64}) at exchange position (-?\d+)")


def _args(settings: Settings, catalog_file: Path, exchange_topic: str) -> list[str]:
    """``recsys run --processes 2`` with sharing, running until stopped (no ``--stop-at-end``)."""
    args = [a for a in _run_args(settings, catalog_file, SHARDS) if a != "--stop-at-end"]
    return [*args, "--share-signals", "--exchange-topic", exchange_topic]


class _LogCount:
    """How many records the exchange log holds so far, read incrementally."""

    def __init__(self, clients: KafkaClients, topic: str) -> None:
        self._consumer = clients.consumer()
        tp = TopicPartition(topic, 0)
        self._consumer.assign([tp])
        self._consumer.seek_to_beginning(tp)
        self.n = 0

    def __call__(self) -> int:
        for records in self._consumer.poll(timeout_ms=20).values():
            self.n += len(records)
        return self.n

    def close(self) -> None:
        self._consumer.close()


def _drain_and_stop(child: _Child, clients: KafkaClients, recs_topic: str, exchange_topic: str,
                    last_event: dict[str, str], progress: _Progress) -> list[tuple[int, str, int]]:
    """Wait until every user's last event is answered and the exchange log has been still for
    ``STILL_S``, stop the run with SIGTERM (in order), and return each shard's ``(shard,
    checksum, position)`` as printed at stop."""
    want = set(last_event.items())
    log = _LogCount(clients, exchange_topic)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    try:
        answered = False
        last_n, still_since = -1, time.monotonic()
        while True:
            if child.proc.poll() is not None:
                pytest.fail(f"the sharing run exited ({child.proc.returncode}) before draining:\n{child.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not drained within {DRAIN_TIMEOUT_S} s (answered={answered}, log={last_n}):\n{child.output()[-3000:]}")
            if not answered:
                progress()
                seen = set().union(*progress._seen)
                answered = want <= seen
            n = log()
            if n != last_n:
                last_n, still_since = n, time.monotonic()
            elif answered and n and time.monotonic() - still_since > STILL_S:
                break
            time.sleep(0.1)
    finally:
        log.close()
    os.kill(child.proc.pid, signal.SIGTERM)
    assert child.wait_exit() == 0, child.output()[-3000:]
    sums = [(int(s), c, int(p)) for s, c, p in _CHECKSUM.findall(child.output())]
    assert sorted(s for s, _, _ in sums) == list(range(SHARDS)), child.output()[-3000:]
    return sorted(sums)


def _replayed_checksum(records: list[tuple[int, bytes]]) -> str:
    """A fresh shard's signals (default settings, as ``recsys run`` builds them) fed the ops of
    the log's messages in log order, each ``(origin, seq)`` once (its first copy), committed
    to memory: their checksum. The once-only rule is this function's own, not the library's
    (:meth:`SignalExchange.apply`), so a message applied twice or skipped there shows here."""
    s = Settings()
    kv = MemoryKV()
    pop = Popularity(half_life_h=s.popularity_half_life_h)
    cov = CoVisitation(half_life_h=s.covisit_half_life_h, max_neighbours=s.covisit_neighbours, window=5)
    nxt = CoVisitation(half_life_h=s.covisit_half_life_h, max_neighbours=s.covisit_neighbours, window=1, directed=True)
    ses = SessionNeighbours()
    exchange = SignalExchange(kv, SHARDS + 1, cov, nxt, pop, ses)  # applies ops as a shard's step would
    seen: set[tuple[int, int]] = set()
    for _, raw in records:
        message = decode_message(raw)
        if (message.origin, message.seq) not in seen:
            seen.add((message.origin, message.seq))
            exchange.apply_ops(message.ops)
    puts: dict[bytes, bytes] = {}
    for signal_ in (pop, cov, nxt, ses):
        puts.update(signal_.export_dirty())
    kv.write(puts, [])
    return signal_checksum(kv)


def _once(records: list[tuple[int, bytes]]) -> tuple[dict[int, list[int]], Counter, int]:
    """The log read as the appliers read it: per origin the sequence numbers in order of first
    appearance, the multiset of ops of the messages taken once, and how many were re-sent."""
    seqs: dict[int, list[int]] = defaultdict(list)
    ops: Counter = Counter()
    seen: set[tuple[int, int]] = set()
    for _, raw in records:
        message = decode_message(raw)
        if (message.origin, message.seq) in seen:
            continue
        seen.add((message.origin, message.seq))
        seqs[message.origin].append(message.seq)
        ops.update(orjson.dumps(op) for op in message.ops)
    return dict(seqs), ops, len(records) - len(seen)


def _log(clients: KafkaClients, topic: str) -> list[tuple[int, bytes]]:
    return [(env.offset, env.value) for env in consume_all(clients, topic, timeout_s=60)]


@dataclass
class _Reference:
    base: Settings
    clients: KafkaClients
    catalog_file: Path
    last_event: dict[str, str]
    now_ts: int
    ref_records: list[int]  # distinct (user, trigger) per output partition
    log: list[tuple[int, bytes]]
    sums: list[tuple[int, str, int]]
    shard_users: list[dict[str, UserState]]
    shard_pop: list[dict[str, float]]
    timings: str


@pytest.fixture(scope="module")
def reference(local_broker, tmp_path_factory) -> _Reference:
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("crash-sharing")
    base, clients, catalog_file, events = _produce_stream(local_broker.bootstrap, root, "crashshare", n_events=N_EVENTS,
                                                          n_users=N_USERS, seed=13, partitions=SHARDS,
                                                          extra_topics={"ref-exchange": 1})
    exchange_topic = base.events_topic.removesuffix("events") + "ref-exchange"
    last_event = {e.user_id: e.event_id for e in events}
    setup_s = time.monotonic() - t0

    t0 = time.monotonic()
    child = _Child(_args(base, catalog_file, exchange_topic), root / "ref.log", root)
    progress = _Progress(clients, base.recommendations_topic, SHARDS)
    try:
        ready_s = child.wait_ready(marker=f"ready: {SHARDS} shard processes")
        sums = _drain_and_stop(child, clients, base.recommendations_topic, exchange_topic, last_event, progress)
    finally:
        progress.close()
        child.close()
    ref_s = time.monotonic() - t0
    assert consume_all(clients, base.dead_letters_topic, timeout_s=60) == []
    dirs = _shard_dirs(base.state_dir, SHARDS)
    per: list[set[tuple[str, str]]] = [set() for _ in range(SHARDS)]
    for env in consume_all(clients, base.recommendations_topic, timeout_s=60):
        rec = orjson.loads(env.value)
        per[env.partition].add((rec["user_id"], rec["trigger_event_id"]))
    return _Reference(
        base=base, clients=clients, catalog_file=catalog_file, last_event=last_event, now_ts=events[-1].ts,
        ref_records=[len(s) for s in per], log=_log(clients, exchange_topic), sums=sums,
        shard_users=[_users(d) for d in dirs], shard_pop=[_popularity(d, events[-1].ts) for d in dirs],
        timings=f"setup {setup_s:.1f}s, reference {ref_s:.1f}s ({ready_s:.1f}s to ready)",
    )  # fmt: skip


def test_reference_sharing_shards_applied_their_whole_log_to_identical_signals(reference):
    """The uninterrupted run itself: what the crash run is held to holds there."""
    (_, c0, p0), (_, c1, p1) = reference.sums
    assert c0 == c1 and p0 == p1 == len(reference.log) - 1, reference.sums
    seqs, ops, resent = _once(reference.log)
    assert sorted(seqs) == list(range(SHARDS)) and resent == 0
    assert all(s == list(range(1, len(s) + 1)) for s in seqs.values()), seqs
    assert _replayed_checksum(reference.log) == c0  # the replay helper rebuilds a shard's signals


def test_sigkilled_sharing_shard_ends_with_the_same_users_and_the_log_applied_once(reference, tmp_path):
    clients = reference.clients
    name = reference.base.recommendations_topic.replace("ref-recommendations", "crash")
    crash = reference.base.replace(
        recommendations_topic=f"{name}-recommendations",
        dead_letters_topic=f"{name}-dead-letters",
        state_dir=str(tmp_path / "state"),
        recovery_dir=str(tmp_path / "recovery"),
    )
    exchange_topic = f"{name}-exchange"
    ensure_topics(clients, {crash.recommendations_topic: SHARDS, crash.dead_letters_topic: 1, exchange_topic: 1})
    rng = random.Random(KILL_SEED)
    fractions = [rng.uniform(lo, hi) for lo, hi in KILL_RANGES]
    ready = f"ready: {SHARDS} shard processes"
    args = _args(crash, reference.catalog_file, exchange_topic)

    t0 = time.monotonic()
    log = tmp_path / "crash.log"
    kills: list[dict] = []
    ref_total = sum(reference.ref_records)
    progress = _Progress(clients, crash.recommendations_topic, SHARDS)
    try:
        for fraction in fractions:
            child = _Child(args, log, tmp_path)
            try:
                ready_s = child.wait_ready(marker=ready)
                at_ready = progress.caught_up()
                step = min(at_ready + int(MIN_STEP * ref_total), int(NEAR_END * ref_total))
                mark = max(int(fraction * ref_total), step, kills[-1]["distinct"] + 1 if kills else 1)
                _wait_for_mark(child, progress, mark, ready_s, kills)
                shard = _shard_to_kill(progress, reference.ref_records, len(kills))
                killed = _sigkill_shard(child, shard)
            finally:
                child.close()
            assert killed, f"the crash run finished before kill {len(kills) + 1}: {kills}"
            kills.append({"fraction": round(fraction, 3), "ready_s": round(ready_s, 1), "shard": shard,
                          "distinct": len(_triggers(clients, crash.recommendations_topic)),
                          "exchange_records": len(_log(clients, exchange_topic))})  # fmt: skip
        child = _Child(args, log, tmp_path)
        try:
            child.wait_ready(marker=ready)
            sums = _drain_and_stop(child, clients, crash.recommendations_topic, exchange_topic,
                                   reference.last_event, progress)
        finally:
            child.close()
    finally:
        progress.close()
    crash_s = time.monotonic() - t0

    crash_log = _log(clients, exchange_topic)
    seqs, ops, resent = _once(crash_log)
    ref_seqs, ref_ops, _ = _once(reference.log)
    (_, c0, p0), (_, c1, p1) = sums
    print(f"\ncrash test (2 sharing shards): {reference.timings}; crash run {crash_s:.1f}s, kills={kills}; "
          f"exchange log {len(crash_log)} records ({resent} re-sent copies), reference {len(reference.log)}; "
          f"{sum(ops.values())} ops; checksum {c0[:12]} at {p0} "
          f"({'equal to' if c0 == reference.sums[0][1] else 'not'} the reference's {reference.sums[0][1][:12]}: "
          f"its log interleaves the shards otherwise)")

    # the kills were real: two, each after new progress, the first mid-stream. A sharing run
    # never ends by itself, and on a loaded box the restarted run can finish the stream before
    # the second mark is seen: that kill then lands on a drained run, and what it proves is the
    # restart (outbox re-sends skipped, nothing applied twice), not a mid-stream cut.
    assert len(kills) == len(KILL_RANGES)
    distinct = [k["distinct"] for k in kills]
    assert 0 < distinct[0] < ref_total and distinct[0] < distinct[1] <= ref_total, kills

    # both shards: the same signals at the same position, the log's last
    assert (c0, p0) == (c1, p1), sums
    assert p0 == len(crash_log) - 1, (sums, len(crash_log))

    # every op published once and applied once: no gap per origin, the reference's ops exactly
    assert sorted(seqs) == list(range(SHARDS))
    for origin, got in seqs.items():
        assert got == list(range(1, len(got) + 1)), f"origin {origin}: sequence numbers {got}"
    assert sum(ops.values()) == sum(ref_ops.values())
    assert ops == ref_ops, f"ops lost: {list(ref_ops - ops)[:3]}, ops extra: {list(ops - ref_ops)[:3]}"

    # and the shards' signals are that log applied once, in its order
    assert _replayed_checksum(crash_log) == c0

    # output: every user's last event answered, duplicates byte-identical, no dead letters
    assert consume_all(clients, crash.dead_letters_topic, timeout_s=60) == []
    groups: dict[tuple[str, str], set[bytes]] = defaultdict(set)
    for env in consume_all(clients, crash.recommendations_topic, timeout_s=60):
        rec = orjson.loads(env.value)
        groups[(rec["user_id"], rec["trigger_event_id"])].add(env.value)
    assert all(key in groups for key in reference.last_event.items())
    differing = [k for k, v in groups.items() if len(v) > 1]
    assert not differing, f"{len(differing)} recommendations re-emitted with other bytes, e.g. {differing[:3]}"

    # the same users, each on its partition's shard; popularity of the whole stream on each
    dirs = _shard_dirs(crash.state_dir, SHARDS)
    shard_users = [_users(d) for d in dirs]
    for shard, users in enumerate(shard_users):
        assert set(users) == {u for u in reference.last_event if partition_for_key(u.encode(), SHARDS) == shard}
    _assert_same_users({u: s for sh in shard_users for u, s in sh.items()},
                       {u: s for sh in reference.shard_users for u, s in sh.items()})
    for d in dirs:
        got = _popularity(d, reference.now_ts)
        for want in reference.shard_pop:
            assert len(want) > 0 and got.keys() == want.keys()
            for item, score in want.items():
                assert np.isclose(got[item], score, rtol=1e-5), item

