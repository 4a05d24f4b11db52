"""The crash test the product promises: ``kill -9`` the live flow repeatedly, get the same result.

One 10k-event stream (500 users, 300 items) in the real local broker, shared by both cases. A
reference ``python -m recsys_cli run --stop-at-end --processes 2`` is left alone (once per
module); then, per case (one process, or two shards), a crash run of the same command is
SIGKILLed three times, each time once its output topic holds a different fraction of the
reference's distinct recommendations (so every kill lands mid-stream, at varied points), and restarted on the same
state and recovery directories until it finishes. With two shards a kill lands on one shard and
the supervisor then stops the other in order; on a fast box that other shard can finish its
partition meanwhile, so the output can be complete after a kill, or a later life finishes its
stream before its kill lands: then the test goes on with the kills it made (at least one, with
output still to come; every run printed says how many). Afterwards:

- the crash state holds the same users with the same history, purchases and applied offsets
  (counts and interest vectors equal within float tolerance) as the reference; with two shards
  each shard holds exactly its partition's users and the same popularity as the reference's
  shard, and one process holds the reference's popularity summed over its two shards (decayed
  scores add up);
- every user's last event triggered a recommendation in the crash run's output, which holds as
  many distinct (user, trigger) recommendations as the reference's; those and every re-emitted
  one are schema-valid;
- duplicates in the crash run's output are byte-identical re-emissions only;
- the stream's hostile messages (a truncated event every ``HOSTILE_EVERY``, spread over the
  whole stream, so the kills' re-deliveries hold some) are dead-lettered as in the reference:
  each one at least once, any copy byte-identical (before 2026-12-04 every restart refused
  the re-delivered ones again with a new ``failed_at``).

Where the time goes (printed per case): every ``recsys run`` start costs ~10-20 s on a loaded
2-core box before its ``ready:`` line (importing torch and sentence-transformers, loading the
model), so the test starts as few as it can: one reference for both cases, three kills each (fewer on a box fast enough to finish first),
and the catalog is embedded once, by the first run, into a cache every run shares.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest
from kafka.structs import TopicPartition

from dataflows.kafka_io import (
    KafkaClients,
    consume_all,
    ensure_topics,
    partition_for_key,
    produce_records,
)
from recsys.events import encode
from recsys.schemas import validate
from recsys.settings import Settings
from recsys.signals.popularity import Popularity
from recsys.store.kv import RocksKV
from recsys.store.users import USER_PREFIX, UserState, decode_user
from recsys.synthetic import generate_catalog, generate_events

pytestmark = [pytest.mark.slow, pytest.mark.processes]

N_EVENTS = 10_000
N_USERS = 500
N_ITEMS = 300
#: one truncated event (the previous event's JSON cut short, keyed by its user) after every this many
HOSTILE_EVERY = 250
PARTITIONS = 2
REF_PROCESSES = 2
#: Kill each life of a crash run once its output topic holds this fraction of the reference
#: run's distinct recommendations (and MIN_STEP more than when it got ready, up to NEAR_END: a shard that got
#: ready first may have run ahead): three kills, all mid-stream, at varied points, at any speed.
KILL_AT = (0.2, 0.45, 0.7)
MIN_STEP = 0.03
#: With two shards, kill the other shard instead when the next one's partition holds this
#: fraction of its reference output (it may be about to finish).
NEAR_END = 0.85
READY_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 300.0  # generous: a loaded machine runs the stream several times slower
PROGRESS_TIMEOUT_S = 60.0


class _Child:
    """One ``recsys run`` subprocess with its output in a log file (ours to kill, by pid)."""

    def __init__(self, args: list[str], log: Path, cwd: Path) -> None:
        self.log = log
        self._fh = log.open("ab")
        self._start = log.stat().st_size
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)

    def output(self) -> str:
        return self.log.read_bytes()[self._start :].decode("utf-8", "replace")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, marker: str = "ready:") -> float:
        """Block until the child printed its ``ready:`` line; returns seconds since it started."""
        while marker not in self.output():
            if self.proc.poll() is not None:
                pytest.fail(f"recsys run exited with {self.proc.returncode} before ready:\n{self.output()[-3000:]}")
            if time.monotonic() - self.started > timeout_s:
                pytest.fail(f"recsys run not ready within {timeout_s} s:\n{self.output()[-3000:]}")
            time.sleep(0.02)
        return time.monotonic() - self.started

    def wait_exit(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"recsys run did not finish within {timeout_s} s:\n{self.output()[-3000:]}")

    def sigkill(self) -> bool:
        """SIGKILL our child if it is still running; True if it was."""
        if self.proc.poll() is not None:
            return False
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        return True

    def close(self) -> None:
        try:
            self.sigkill()
        finally:
            self._fh.close()


def _run_args(settings: Settings, catalog_file: Path, processes: int) -> list[str]:
    return [
        sys.executable, "-m", "recsys_cli", "run", "--stop-at-end",
        "--bootstrap-servers", settings.bootstrap_servers,
        "--events-topic", settings.events_topic,
        "--catalog-topic", settings.catalog_topic,
        "--recommendations-topic", settings.recommendations_topic,
        "--dead-letters-topic", settings.dead_letters_topic,
        "--state-dir", settings.state_dir,
        "--recovery-dir", str(settings.recovery_dir),
        "--embed-cache-dir", settings.embed_cache_dir,
        "--catalog-file", str(catalog_file),
        "--snapshot-interval-s", "0.5",
        "--poll-max-records", "500",
        "--processes", str(processes),
    ]  # fmt: skip


def _ready_marker(processes: int) -> str:
    return "ready:" if processes == 1 else f"ready: {processes} shard processes"


def _shard_dirs(state_dir: str, processes: int) -> list[str]:
    return [state_dir] if processes == 1 else [str(Path(state_dir) / f"shard-{i}") for i in range(processes)]


def _sigkill_shard(supervisor: _Child, shard: int) -> bool:
    """SIGKILL one shard process of a ``--processes N`` run (its pid is in the supervisor's ready
    line), then wait for the supervisor to stop the others and exit; False if it had finished."""
    if supervisor.proc.poll() is not None:
        return False
    pid = int(re.search(rf"shard {shard} pid (\d+)", supervisor.output()).group(1))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # that shard already finished its partition
        pass
    code = supervisor.wait_exit()
    return code != 0


def _users(state_dir: str) -> dict[str, UserState]:
    kv = RocksKV(str(Path(state_dir) / "rocks"))
    try:
        return {s.user_id: s for s in (decode_user(v) for _, v in kv.iter_prefix(USER_PREFIX))}
    finally:
        kv.close()


def _popularity(state_dir: str, now_ts: int) -> dict[str, float]:
    """Every item's stored popularity decayed to ``now_ts``: ``{item_id: score}``."""
    kv = RocksKV(str(Path(state_dir) / "rocks"))
    try:
        pop = Popularity(half_life_h=Settings().popularity_half_life_h)
        pop.load(kv)
    finally:
        kv.close()
    return dict(pop.top(len(pop), now_ts))


def _triggers(clients: KafkaClients, topic: str) -> set[tuple[str, str]]:
    """Distinct ``(user_id, trigger_event_id)`` of the recommendations in ``topic`` so far."""
    recs = (orjson.loads(e.value) for e in consume_all(clients, topic, timeout_s=60))
    return {(r["user_id"], r["trigger_event_id"]) for r in recs}


class _Progress:
    """The distinct ``(user_id, trigger_event_id)`` recommendations in a topic so far, per
    partition, read incrementally (a re-emission after a restart is not progress), so a crash
    run can be killed the moment it passes a mark."""

    def __init__(self, clients: KafkaClients, topic: str, partitions: int) -> None:
        self._consumer = clients.consumer()
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]
        self._consumer.assign(self._tps)
        self._consumer.seek_to_beginning(*self._tps)
        self._seen: list[set[tuple[str, str]]] = [set() for _ in self._tps]

    def by_partition(self) -> list[int]:
        for tp, records in self._consumer.poll(timeout_ms=20).items():
            for r in records:
                rec = orjson.loads(r.value)
                self._seen[tp.partition].add((rec["user_id"], rec["trigger_event_id"]))
        return [len(s) for s in self._seen]

    def __call__(self) -> int:
        return sum(self.by_partition())

    def triggers(self) -> set[str]:
        """The trigger event ids seen so far (after reading what has come since)."""
        self.by_partition()
        return {trigger for seen in self._seen for _, trigger in seen}

    def caught_up(self) -> int:
        """Like calling it, after reading what is already there (a few polls at most)."""
        last, n = -1, self()
        for _ in range(20):
            if n == last:
                break
            last, n = n, self()
        return n

    def close(self) -> None:
        self._consumer.close()


def _distinct_by_partition(clients: KafkaClients, topic: str) -> list[int]:
    per: list[set[tuple[str, str]]] = [set() for _ in range(PARTITIONS)]
    for env in consume_all(clients, topic, timeout_s=60):
        rec = orjson.loads(env.value)
        per[env.partition].add((rec["user_id"], rec["trigger_event_id"]))
    return [len(s) for s in per]


def _dead_letters_by_source(clients: KafkaClients, topic: str) -> dict[tuple[str, int, int], set[bytes]]:
    """The dead letters in ``topic``, grouped by the refused message's coordinates: every copy's bytes."""
    out: dict[tuple[str, int, int], set[bytes]] = defaultdict(set)
    for env in consume_all(clients, topic, timeout_s=60):
        source = orjson.loads(env.value)["source"]
        out[(source["topic"], source["partition"], source["offset"])].add(env.value)
    return dict(out)


def _shard_to_kill(count: _Progress, ref_records: list[int], turn: int) -> int:
    """Shards are killed in turn, unless the one whose turn it is has nearly finished its
    partition (shards start at different moments on a loaded box): then the other.
    Producers and the flow key by user, so output partition ``i`` is shard ``i``'s."""
    done = [n / max(1, ref) for n, ref in zip(count.by_partition(), ref_records)]
    shard = turn % PARTITIONS
    return shard if done[shard] < NEAR_END else min(range(PARTITIONS), key=done.__getitem__)


@dataclass
class _Stream:
    """The shared input, its embed cache, and the reference run's results."""

    base: Settings
    clients: KafkaClients
    catalog_file: Path
    last_event: dict[str, str]  # user -> id of their last event
    now_ts: int
    ref_records: list[int]  # distinct (user, trigger) in each partition of the reference's output
    ref_shard_users: list[dict[str, UserState]]
    ref_shard_pop: list[dict[str, float]]
    ref_dead_sources: set[tuple[str, int, int]]  # where the refused messages were (topic, partition, offset)
    timings: str


def _wait_for_mark(child: _Child, progress: "_Progress", mark: int, ready_s: float, kills: list[dict],
                   complete: int | None = None) -> bool:
    """Wait until the crash run's output holds ``mark`` distinct recommendations (True); fail if
    the run exits first or makes no such progress within :data:`PROGRESS_TIMEOUT_S`. False: after
    a kill the run exited in order with the whole output (``complete`` distinct, when given) written:
    the stream was done before this life could be killed."""
    while (n := progress()) < mark:
        if child.proc.poll() is not None:
            if complete is not None and child.proc.returncode == 0 and kills and n >= complete:
                return False
            pytest.fail(f"crash run exited ({child.proc.returncode}) at {n} of {mark} distinct recommendations:\n{child.output()[-3000:]}")
        if time.monotonic() - child.started > ready_s + PROGRESS_TIMEOUT_S:
            pytest.fail(f"crash run reached only {n} of {mark} distinct recommendations in {PROGRESS_TIMEOUT_S} s: {kills}")
        time.sleep(0.05)
    return True


def _assert_same_users(got_users: dict[str, UserState], want_users: dict[str, UserState]) -> None:
    """Users equal field by field (float sums and the interest vector to float tolerance)."""
    assert set(got_users) == set(want_users)
    for uid, want in want_users.items():
        got = got_users[uid]
        assert got.history == want.history, uid
        assert got.purchased == want.purchased, uid
        assert got.last_applied == want.last_applied, uid
        assert got.updated_ts == want.updated_ts, uid
        assert got.session_id == want.session_id, uid
        assert got.counts.keys() == want.counts.keys(), uid
        assert np.allclose([got.counts[k] for k in want.counts], list(want.counts.values()), rtol=1e-5), uid
        assert (got.interest is None) == (want.interest is None), uid
        if want.interest is not None:
            assert np.allclose(got.interest, want.interest, rtol=1e-5, atol=1e-6), uid


def _produce_stream(bootstrap: str, root: Path, name: str, *, n_events: int, n_users: int, seed: int,
                    partitions: int, extra_topics: dict[str, int] | None = None, hostile_every: int = 0):
    """A synthetic catalog file and event stream on fresh topics (``<name>-<random>-``), with the
    settings of the uninterrupted reference run: ``(base settings, clients, catalog file, events)``.
    ``hostile_every``: after every that many events, the last one again cut short (undecodable).
    Shared by the crash tests (this module, ``test_crash_sharing.py``)."""
    catalog = generate_catalog(N_ITEMS, seed=11)
    events = generate_events(n_events, catalog, n_users=n_users, seed=seed)
    catalog_file = root / "catalog.jsonl"
    catalog_file.write_bytes(b"\n".join(encode(c) for c in catalog) + b"\n")
    prefix = f"{name}-{uuid.uuid4().hex[:8]}-"
    base = Settings(
        bootstrap_servers=bootstrap,
        events_topic=prefix + "events",
        catalog_topic=prefix + "catalog",
        recommendations_topic=prefix + "ref-recommendations",
        dead_letters_topic=prefix + "ref-dead-letters",
        embed_cache_dir=str(root / "embeddings"),
        state_dir=str(root / "ref" / "state"),
        recovery_dir=str(root / "ref" / "recovery"),
    )
    clients = KafkaClients(base)
    ensure_topics(clients, {base.events_topic: partitions, base.catalog_topic: 1,
                            base.recommendations_topic: partitions, base.dead_letters_topic: 1,
                            **{prefix + t: n for t, n in (extra_topics or {}).items()}})  # fmt: skip
    records: list[tuple[str, bytes]] = []
    for i, e in enumerate(events, 1):
        records.append((e.user_id, encode(e)))
        if hostile_every and i % hostile_every == 0:
            records.append((e.user_id, encode(e)[:-7]))
    assert produce_records(clients, base.events_topic, records) == len(records)
    return base, clients, catalog_file, events


@pytest.fixture(scope="module")
def stream(local_broker, tmp_path_factory) -> _Stream:
    """Produce the stream once, then run the uninterrupted two-shard reference over it (which
    embeds the catalog into the cache every later run reads)."""
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("crash")
    base, clients, catalog_file, events = _produce_stream(local_broker.bootstrap, root, "crash", n_events=N_EVENTS,
                                                          n_users=N_USERS, seed=12, partitions=PARTITIONS,
                                                          hostile_every=HOSTILE_EVERY)
    setup_s = time.monotonic() - t0

    t0 = time.monotonic()
    child = _Child(_run_args(base, catalog_file, REF_PROCESSES), root / "ref.log", root)
    try:
        ready_s = child.wait_ready(marker=_ready_marker(REF_PROCESSES))
        assert child.wait_exit() == 0, child.output()[-3000:]
    finally:
        child.close()
    ref_s = time.monotonic() - t0
    ref_dead = _dead_letters_by_source(clients, base.dead_letters_topic)
    assert len(ref_dead) == N_EVENTS // HOSTILE_EVERY and all(len(v) == 1 for v in ref_dead.values())
    assert all("malformed or truncated JSON" in orjson.loads(next(iter(v)))["reason"] for v in ref_dead.values())
    dirs = _shard_dirs(base.state_dir, REF_PROCESSES)
    now_ts = events[-1].ts
    return _Stream(
        base=base,
        clients=clients,
        catalog_file=catalog_file,
        last_event={e.user_id: e.event_id for e in events},
        now_ts=now_ts,
        ref_records=_distinct_by_partition(clients, base.recommendations_topic),
        ref_shard_users=[_users(d) for d in dirs],
        ref_shard_pop=[_popularity(d, now_ts) for d in dirs],
        ref_dead_sources=set(ref_dead),
        timings=f"shared setup {setup_s:.1f}s, reference run {ref_s:.1f}s ({ready_s:.1f}s to ready, "
        f"{ref_s - ready_s:.1f}s processing)",
    )


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-shards"])
def test_sigkilled_run_ends_in_the_same_state_with_only_identical_duplicates(stream, tmp_path, processes):
    """With ``processes=2`` the run is ``recsys run --processes 2`` and each kill SIGKILLs one
    shard process (in turn, unless that one has nearly finished its partition): its supervisor then stops the other shard and exits failed,
    and the restart resumes both shards from their own directories."""
    clients = stream.clients
    name = stream.base.recommendations_topic.replace("ref-recommendations", f"crash{processes}")
    crash = stream.base.replace(
        recommendations_topic=f"{name}-recommendations",
        dead_letters_topic=f"{name}-dead-letters",
        state_dir=str(tmp_path / "state"),
        recovery_dir=str(tmp_path / "recovery"),
    )
    ensure_topics(clients, {crash.recommendations_topic: PARTITIONS, crash.dead_letters_topic: 1})
    ready = _ready_marker(processes)

    # --- SIGKILL each life once its output passes the next mark, restart on the same directories
    t0 = time.monotonic()
    log = tmp_path / "crash.log"
    kills: list[dict] = []
    ref_total = sum(stream.ref_records)
    progress = _Progress(clients, crash.recommendations_topic, PARTITIONS)
    try:
        for fraction in KILL_AT:
            child = _Child(_run_args(crash, stream.catalog_file, processes), log, tmp_path)
            try:
                ready_s = child.wait_ready(marker=ready)
                at_ready = progress.caught_up()
                step = min(at_ready + int(MIN_STEP * ref_total), int(NEAR_END * ref_total))
                mark = max(int(fraction * ref_total), step, kills[-1]["distinct"] + 1 if kills else 1)
                if not _wait_for_mark(child, progress, mark, ready_s, kills, ref_total):
                    break  # the output was complete after the last kill (see the module docstring)
                run_s = time.monotonic() - child.started - ready_s
                shard = 0 if processes == 1 else _shard_to_kill(progress, stream.ref_records, len(kills))
                killed = child.sigkill() if processes == 1 else _sigkill_shard(child, shard)
            finally:
                child.close()
            if not killed and kills and progress.caught_up() >= ref_total:
                break  # this life finished the stream before its kill landed (module docstring)
            assert killed, f"the crash run finished before kill {len(kills) + 1}: {kills}"
            kills.append({"ready_s": round(ready_s, 1), "at_ready": at_ready, "ran_s": round(run_s, 1),
                          **({"shard": shard} if processes > 1 else {}),
                          "distinct": len(_triggers(clients, crash.recommendations_topic))})  # fmt: skip
    finally:
        progress.close()
    child = _Child(_run_args(crash, stream.catalog_file, processes), log, tmp_path)
    try:
        ready_s = child.wait_ready(marker=ready)
        assert child.wait_exit() == 0, child.output()[-3000:]
        final_output = child.output()
    finally:
        child.close()
    last_s = time.monotonic() - child.started
    crash_s = time.monotonic() - t0

    t0 = time.monotonic()
    crash_recs = consume_all(clients, crash.recommendations_topic, timeout_s=60)
    crash_dead = _dead_letters_by_source(clients, crash.dead_letters_topic)
    groups: dict[tuple[str, str], set[bytes]] = defaultdict(set)
    copies: dict[tuple[str, str], int] = defaultdict(int)
    for env in crash_recs:
        rec = orjson.loads(env.value)
        key = (rec["user_id"], rec["trigger_event_id"])
        groups[key].add(env.value)
        copies[key] += 1
    duplicates = len(crash_recs) - len(groups)
    read_s = time.monotonic() - t0
    summary = (
        f"\ncrash test ({processes} process{'es' if processes > 1 else ''}): {stream.timings}; crash run {crash_s:.1f}s, "
        f"kills={len(kills)} {kills}, last life {last_s:.1f}s ({ready_s:.1f}s to ready); reference recs="
        f"{sum(stream.ref_records)} distinct, crash recs={len(crash_recs)} distinct={len(groups)} "
        f"duplicates={duplicates} (groups with copies: {sum(1 for n in copies.values() if n > 1)}); "
        f"last run: {final_output.strip().splitlines()[-1]}"
    )
    print(summary)

    # the kills were real: one to three, each after new progress, the first with output still to come
    assert 1 <= len(kills) <= len(KILL_AT), kills
    distinct = [k["distinct"] for k in kills]
    assert 0 < distinct[0] and all(a < b for a, b in zip(distinct, distinct[1:])), kills
    assert distinct[0] < len(groups), kills

    # nothing missing; what a restart re-emitted and what the last events triggered is valid
    # (validating all ~6k costs seconds: test_pipeline and test_schemas cover the plain path)
    # each hostile message refused, any copy the same bytes (not refused again, differently)
    assert set(crash_dead) == stream.ref_dead_sources, sorted(set(crash_dead) ^ stream.ref_dead_sources)[:5]
    refused_again = {at: v for at, v in crash_dead.items() if len(v) > 1}
    assert not refused_again, f"{len(refused_again)} messages refused again with other bytes, e.g. {next(iter(refused_again.items()))}"
    missing = [(u, e) for u, e in stream.last_event.items() if (u, e) not in groups]
    assert not missing, f"{len(missing)} users' last events have no recommendation, e.g. {missing[:5]}"
    t1 = time.monotonic()
    checked = [k for k, n in copies.items() if n > 1] + list(stream.last_event.items())
    for key in checked:
        for payload in groups[key]:
            assert validate("recommendation", orjson.loads(payload)) == [], payload
    validate_s = time.monotonic() - t1
    assert len(groups) == sum(stream.ref_records)

    # duplicates are byte-identical re-emissions only
    differing = {k: v for k, v in groups.items() if len(v) > 1}
    example = next(iter(differing.items()), None)
    assert not differing, f"{len(differing)} (user, trigger) pairs emitted with different bytes, e.g. {example}"

    # the same final state
    crash_dirs = _shard_dirs(crash.state_dir, processes)
    crash_shard_users = [_users(d) for d in crash_dirs]
    ref_users = {u: s for shard in stream.ref_shard_users for u, s in shard.items()}
    crash_users = {u: s for shard in crash_shard_users for u, s in shard.items()}
    if processes > 1:  # each shard holds exactly the users of its partition
        for shard, users in enumerate(crash_shard_users):
            assert set(users) == {u for u in stream.last_event if partition_for_key(u.encode(), PARTITIONS) == shard}
    assert len(ref_users) == N_USERS
    assert set(crash_users) == set(ref_users)
    _assert_same_users(crash_users, ref_users)
    if processes == REF_PROCESSES:  # shard by shard
        pairs = list(zip(stream.ref_shard_pop, (_popularity(d, stream.now_ts) for d in crash_dirs)))
    else:  # one process holds what the reference's shards hold together
        summed: dict[str, float] = defaultdict(float)
        for shard in stream.ref_shard_pop:
            for item, score in shard.items():
                summed[item] += score
        pairs = [(dict(summed), _popularity(crash.state_dir, stream.now_ts))]
    for ref_pop, crash_pop in pairs:
        assert len(ref_pop) > 0 and ref_pop.keys() == crash_pop.keys()
        for item, score in ref_pop.items():
            assert np.isclose(crash_pop[item], score, rtol=1e-5), item
    print(f"comparison {time.monotonic() - t0:.1f}s (reading the output {read_s:.1f}s, validating it {validate_s:.1f}s)")
