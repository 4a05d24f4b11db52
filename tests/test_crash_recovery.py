"""The crash test the product promises: ``kill -9`` the live flow repeatedly, get the same result.

Two runs of ``python -m recsys_cli run --stop-at-end`` over one 50k-event stream in the real
local broker: a reference run left alone, and a crash run SIGKILLed several times mid-stream and
restarted on the same state and recovery directories until it finishes. Afterwards:

- both RocksDB states hold the same users with the same history, purchases and applied offsets
  (counts and interest vectors equal within float tolerance), and the same popularity;
- every user's last event triggered a recommendation in the crash run's output;
- duplicates in the crash run's output are byte-identical re-emissions only;
- nothing was dead-lettered.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest

from dataflows.kafka_io import (
    KafkaClients,
    consume_all,
    ensure_topics,
    partition_for_key,
    produce_records,
)
from recsys.events import encode
from recsys.items.catalog import ItemSpace
from recsys.items.embeddings import Embedder
from recsys.schemas import validate
from recsys.settings import Settings
from recsys.signals.popularity import Popularity
from recsys.store.kv import RocksKV
from recsys.store.users import USER_PREFIX, UserState, decode_user
from recsys.synthetic import generate_catalog, generate_events

pytestmark = pytest.mark.slow

N_EVENTS = 50_000
N_USERS = 2000
N_ITEMS = 300
#: When to SIGKILL each life of the crash run, after its "ready" line, as a fraction of the
#: reference run's processing time (clamped to 0.5-2.5 s): varied, and on any machine speed
#: early enough that at least 3 kills land before the stream ends.
KILL_FRACTIONS = (0.04, 0.08, 0.12, 0.06)
READY_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 300.0  # generous: a loaded machine runs the 50k events several times slower
PROGRESS_TIMEOUT_S = 30.0


class _Child:
    """One ``recsys run`` subprocess with its output in a log file (ours to kill, by pid)."""

    def __init__(self, args: list[str], log: Path, cwd: Path) -> None:
        self.log = log
        self._fh = log.open("ab")
        self._start = log.stat().st_size
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)

    def output(self) -> str:
        return self.log.read_bytes()[self._start :].decode("utf-8", "replace")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, marker: str = "ready:") -> float:
        """Block until the child printed its ``ready:`` line; returns the time it took."""
        t0 = time.monotonic()
        while marker not in self.output():
            if self.proc.poll() is not None:
                pytest.fail(f"recsys run exited with {self.proc.returncode} before ready:\n{self.output()[-3000:]}")
            if time.monotonic() - t0 > timeout_s:
                pytest.fail(f"recsys run not ready within {timeout_s} s:\n{self.output()[-3000:]}")
            time.sleep(0.02)
        return time.monotonic() - t0

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


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-shards"])
def test_sigkilled_run_ends_in_the_same_state_with_only_identical_duplicates(local_broker, tmp_path, topic_name, processes):
    """With ``processes=2`` the run is ``recsys run --processes 2`` and each kill SIGKILLs one
    shard process (alternately): its supervisor then stops the other shard and exits failed,
    and the restart resumes both shards from their own directories."""
    started = time.monotonic()
    catalog = generate_catalog(N_ITEMS, seed=11)
    events = generate_events(N_EVENTS, catalog, n_users=N_USERS, seed=12)
    catalog_file = tmp_path / "catalog.jsonl"
    catalog_file.write_bytes(b"\n".join(encode(c) for c in catalog) + b"\n")
    embed_cache = str(tmp_path / "embeddings")
    with Embedder(Settings().model_name, embed_cache) as embedder:  # warm once: the runs never load the model
        ItemSpace(embedder).upsert(catalog)

    prefix = topic_name("crash") + "-"
    base = Settings(
        bootstrap_servers=local_broker.bootstrap,
        events_topic=prefix + "events",
        catalog_topic=prefix + "catalog",
        embed_cache_dir=embed_cache,
    )
    clients = KafkaClients(base)

    def settings_for(name: str) -> Settings:
        return base.replace(
            recommendations_topic=f"{prefix}{name}-recommendations",
            dead_letters_topic=f"{prefix}{name}-dead-letters",
            state_dir=str(tmp_path / name / "state"),
            recovery_dir=str(tmp_path / name / "recovery"),
        )

    ref, crash = settings_for("ref"), settings_for("crash")
    ensure_topics(
        clients,
        {
            base.events_topic: 2,
            base.catalog_topic: 1,
            **{s.recommendations_topic: 2 for s in (ref, crash)},
            **{s.dead_letters_topic: 1 for s in (ref, crash)},
        },
    )
    assert produce_records(clients, base.events_topic, ((e.user_id, encode(e)) for e in events)) == N_EVENTS
    last_event = {e.user_id: e.event_id for e in events}
    setup_s = time.monotonic() - started

    # --- reference run, left alone
    t0 = time.monotonic()
    ready = "ready:" if processes == 1 else f"ready: {processes} shard processes"
    child = _Child(_run_args(ref, catalog_file, processes), tmp_path / "ref.log", tmp_path)
    try:
        ready_s = child.wait_ready(marker=ready)
        assert child.wait_exit() == 0, child.output()[-3000:]
    finally:
        child.close()
    ref_s = time.monotonic() - t0
    ref_processing_s = ref_s - ready_s

    # --- crash run: SIGKILL at several points, restart on the same directories, then finish
    t0 = time.monotonic()
    log = tmp_path / "crash.log"
    kills: list[dict] = []
    seen = 0
    for fraction in KILL_FRACTIONS:
        delay = round(min(2.5, max(0.5, fraction * ref_processing_s)), 2)
        child = _Child(_run_args(crash, catalog_file, processes), log, tmp_path)
        try:
            child.wait_ready(marker=ready)
            time.sleep(delay)
            # kill only once this life made new progress (on a slow box start-up and the
            # re-delivery of what the last life already did may outlast the delay)
            deadline = time.monotonic() + PROGRESS_TIMEOUT_S
            while len(_triggers(clients, crash.recommendations_topic)) <= seen and time.monotonic() < deadline:
                time.sleep(0.3)
            killed = child.sigkill() if processes == 1 else _sigkill_shard(child, len(kills) % processes)
        finally:
            child.close()
        if not killed:  # it finished before the kill: the stream is done, stop killing
            break
        done = len(_triggers(clients, crash.recommendations_topic))
        kills.append({"delay_s": delay, "distinct_recs": done})
        assert done > seen, f"no progress between kills: {kills}"
        seen = done
    child = _Child(_run_args(crash, catalog_file, processes), log, tmp_path)
    try:
        child.wait_ready(marker=ready)
        assert child.wait_exit() == 0, child.output()[-3000:]
        final_output = child.output()
    finally:
        child.close()
    crash_s = time.monotonic() - t0

    ref_recs = consume_all(clients, ref.recommendations_topic, timeout_s=60)
    crash_recs = consume_all(clients, crash.recommendations_topic, timeout_s=60)
    crash_dead = consume_all(clients, crash.dead_letters_topic, timeout_s=60)
    ref_dead = consume_all(clients, ref.dead_letters_topic, timeout_s=60)
    groups: dict[tuple[str, str], set[bytes]] = defaultdict(set)
    copies: dict[tuple[str, str], int] = defaultdict(int)
    for env in crash_recs:
        rec = orjson.loads(env.value)
        key = (rec["user_id"], rec["trigger_event_id"])
        groups[key].add(env.value)
        copies[key] += 1
    duplicates = len(crash_recs) - len(groups)
    print(
        f"\ncrash test: setup {setup_s:.1f}s, reference run {ref_s:.1f}s ({ref_processing_s:.1f}s after ready), "
        f"crash run {crash_s:.1f}s; kills={len(kills)} {kills}; reference recs={len(ref_recs)}, "
        f"crash recs={len(crash_recs)} distinct={len(groups)} duplicates={duplicates} "
        f"(groups with copies: {sum(1 for n in copies.values() if n > 1)}); last run: {final_output.strip().splitlines()[-1]}"
    )

    # the kills were real: at least 3, at different progress points, at least one mid-stream
    assert len(kills) >= 3, f"the run finished before 3 kills ({kills}); slow it down or kill sooner"
    assert any(0 < k["distinct_recs"] < len(groups) for k in kills), kills

    # nothing missing, everything valid
    assert not crash_dead and not ref_dead
    for env in crash_recs:
        assert validate("recommendation", orjson.loads(env.value)) == []
    triggers = set(groups)
    missing = [(u, e) for u, e in last_event.items() if (u, e) not in triggers]
    assert not missing, f"{len(missing)} users' last events have no recommendation, e.g. {missing[:5]}"

    # duplicates are byte-identical re-emissions only
    differing = {k: v for k, v in groups.items() if len(v) > 1}
    example = next(iter(differing.items()), None)
    assert not differing, f"{len(differing)} (user, trigger) pairs emitted with different bytes, e.g. {example}"

    # the same final state
    ref_users, crash_users = {}, {}
    for ref_dir, crash_dir in zip(_shard_dirs(ref.state_dir, processes), _shard_dirs(crash.state_dir, processes)):
        ref_users.update(_users(ref_dir))
        crash_users.update(_users(crash_dir))
    if processes > 1:  # each shard holds exactly the users of its partition
        for shard, shard_dir in enumerate(_shard_dirs(crash.state_dir, processes)):
            assert {u for u in _users(shard_dir)} == {u for u in last_event if partition_for_key(u.encode(), 2) == shard}
    assert len(ref_users) == N_USERS
    assert set(crash_users) == set(ref_users)
    for uid, want in ref_users.items():
        got = crash_users[uid]
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
    now_ts = events[-1].ts
    for ref_dir, crash_dir in zip(_shard_dirs(ref.state_dir, processes), _shard_dirs(crash.state_dir, processes)):
        ref_pop, crash_pop = _popularity(ref_dir, now_ts), _popularity(crash_dir, now_ts)
        assert len(ref_pop) > 0 and ref_pop.keys() == crash_pop.keys()
        for item, score in ref_pop.items():
            assert np.isclose(crash_pop[item], score, rtol=1e-5), item
