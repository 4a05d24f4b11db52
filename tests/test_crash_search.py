"""The crash test with searches in the stream (issue 13): ``kill -9`` the live flow twice, get
the same learned search signals, the same users, and exactly one answer per search.

A 2,000-event stream (100 users, 120 items) in the real local broker, where about a fifth of
the item events are preceded by a search of the same user (two words of the item: brand or
title word, and category, as ``recsys.synthetic.with_searches`` types them), so the learned
query -> item associations grow throughout. One uninterrupted ``recsys run --stop-at-end`` is
the reference; a crash run of the same command on its own directories is SIGKILLed twice, once
its recommendations topic holds 30% and then 65% of the reference's distinct
recommendations, and restarted until it finishes. Afterwards:

- the learned associations (``sqa:``: every query's engagements and counts) and the open search
  windows (``sqw:``) equal the reference's, record for record (the associations are averaged in
  event time, so the partitions' interleaving, which a restart changes, does not matter);
- every user holds the same history, purchases, applied offsets, counts and interest;
- every search of the input has exactly one distinct answer in the crash run's
  ``search-results`` topic (as many as the reference's), and any second copy is a
  byte-identical re-emission of the stored answer (the search outbox,
  ``recsys/search/outbox.py``), schema-valid;
- nothing was dead-lettered.

Cost: four ``recsys run`` starts (each ~10-20 s to ``ready:`` on a loaded box, the model load)
and a small stream; the helpers come from ``tests/test_crash_recovery.py``.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest
from test_crash_recovery import _Child, _distinct_by_partition, _Progress, _run_args, _users

from dataflows.kafka_io import KafkaClients, consume_all, ensure_topics, produce_records
from recsys.events import Event, encode
from recsys.schemas import validate
from recsys.search.learned import ASSOC_PREFIX, WINDOW_PREFIX
from recsys.settings import Settings
from recsys.store.kv import RocksKV
from recsys.synthetic import generate_catalog, generate_events, with_searches

pytestmark = pytest.mark.slow

N_EVENTS = 2_000
N_USERS = 100
N_ITEMS = 120
SEARCH_SHARE = 0.2
PARTITIONS = 2
KILL_AT = (0.3, 0.65)
PROGRESS_TIMEOUT_S = 60.0


def _stream(seed: int) -> tuple[list, list[Event]]:
    """Synthetic events with a search inserted before about ``SEARCH_SHARE`` of them (same user,
    same time): the engagement that follows teaches the query's association."""
    catalog = generate_catalog(N_ITEMS, seed=seed)
    events = generate_events(N_EVENTS, catalog, n_users=N_USERS, seed=seed + 1)
    mixed = with_searches(events, catalog, SEARCH_SHARE, seed=seed + 2)
    out: list[Event] = []
    for original, maybe in zip(events, mixed):
        if maybe.type == "search":
            out.append(maybe)
        out.append(original)
    return catalog, out


def _signals(state_dir: str) -> dict[bytes, object]:
    """The stored search signals: ``sqa:`` associations and ``sqw:`` open windows, decoded."""
    kv = RocksKV(str(Path(state_dir) / "rocks"))
    try:
        return {k: orjson.loads(v) for prefix in (ASSOC_PREFIX, WINDOW_PREFIX) for k, v in kv.iter_prefix(prefix) if v}
    finally:
        kv.close()


def _answers(clients: KafkaClients, topic: str) -> tuple[dict[str, set[bytes]], int]:
    """Search results by the search's event id (the distinct payloads), and how many records."""
    groups: dict[str, set[bytes]] = defaultdict(set)
    records = consume_all(clients, topic, timeout_s=60)
    for env in records:
        groups[orjson.loads(env.value)["trigger_event_id"]].add(env.value)
    return groups, len(records)


def _args(settings: Settings, catalog_file: Path) -> list[str]:
    return [*_run_args(settings, catalog_file, 1), "--search-results-topic", settings.search_results_topic]


def test_sigkilled_run_with_searches_keeps_learned_search_signals_and_answers_each_search_once(local_broker, tmp_path):
    t0 = time.monotonic()
    catalog, events = _stream(seed=31)
    searches = {e.event_id for e in events if e.type == "search"}
    assert len(searches) > 0.1 * N_EVENTS
    catalog_file = tmp_path / "catalog.jsonl"
    catalog_file.write_bytes(b"\n".join(encode(c) for c in catalog) + b"\n")
    prefix = f"crash-search-{uuid.uuid4().hex[:8]}-"

    def settings(name: str) -> Settings:
        return Settings(
            bootstrap_servers=local_broker.bootstrap, events_topic=prefix + "events", catalog_topic=prefix + "catalog",
            recommendations_topic=f"{prefix}{name}-recommendations", dead_letters_topic=f"{prefix}{name}-dead-letters",
            search_results_topic=f"{prefix}{name}-search-results", embed_cache_dir=str(tmp_path / "embeddings"),
            state_dir=str(tmp_path / name / "state"), recovery_dir=str(tmp_path / name / "recovery"),
        )

    ref, crash = settings("ref"), settings("crash")
    clients = KafkaClients(ref)
    ensure_topics(clients, {ref.events_topic: PARTITIONS, ref.catalog_topic: 1, **{
        t: p for s in (ref, crash) for t, p in ((s.recommendations_topic, PARTITIONS), (s.dead_letters_topic, 1),
                                                (s.search_results_topic, PARTITIONS))}})
    assert produce_records(clients, ref.events_topic, ((e.user_id, encode(e)) for e in events)) == len(events)

    # --- the uninterrupted reference (it embeds the catalog into the cache both runs share)
    child = _Child(_args(ref, catalog_file), tmp_path / "ref.log", tmp_path)
    try:
        child.wait_ready()
        assert child.wait_exit() == 0, child.output()[-3000:]
    finally:
        child.close()
    ref_s = time.monotonic() - t0
    ref_total = sum(_distinct_by_partition(clients, ref.recommendations_topic))

    # --- the crash run: SIGKILL each life once its output passes the next mark, restart
    t1 = time.monotonic()
    log = tmp_path / "crash.log"
    kills: list[int] = []
    progress = _Progress(clients, crash.recommendations_topic, PARTITIONS)
    try:
        for fraction in KILL_AT:
            child = _Child(_args(crash, catalog_file), log, tmp_path)
            try:
                ready_s = child.wait_ready()
                mark = max(int(fraction * ref_total), progress.caught_up() + 1)
                while (n := progress()) < mark:
                    if child.proc.poll() is not None:
                        pytest.fail(f"crash run exited ({child.proc.returncode}) at {n} of {mark}:\n{child.output()[-3000:]}")
                    if time.monotonic() - child.started > ready_s + PROGRESS_TIMEOUT_S:
                        pytest.fail(f"crash run reached only {n} of {mark} recommendations in {PROGRESS_TIMEOUT_S} s")
                    time.sleep(0.05)
                assert child.sigkill(), f"the crash run finished before kill {len(kills) + 1}"
                kills.append(progress.caught_up())
            finally:
                child.close()
    finally:
        progress.close()
    child = _Child(_args(crash, catalog_file), log, tmp_path)
    try:
        child.wait_ready()
        assert child.wait_exit() == 0, child.output()[-3000:]
    finally:
        child.close()
    crash_s = time.monotonic() - t1

    ref_answers, _ = _answers(clients, ref.search_results_topic)
    crash_answers, crash_records = _answers(clients, crash.search_results_topic)
    copies = crash_records - len(crash_answers)
    print(f"\ncrash test with searches: {len(events)} events, {len(searches)} searches; reference {ref_s:.1f}s, "
          f"crash run {crash_s:.1f}s, kills at {kills} of {ref_total} distinct recommendations; "
          f"search results {crash_records} records, {len(crash_answers)} distinct, {copies} re-emitted")

    # both kills were real, the first with output still to come; the last life can emit its last
    # batches between passing its mark and the kill (2,000 events are few batches), as the main
    # crash test allows (tests/test_crash_recovery.py)
    assert len(kills) == len(KILL_AT) and kills[0] < kills[1] <= ref_total and kills[0] < ref_total, kills
    assert consume_all(clients, ref.dead_letters_topic, timeout_s=30) == []
    assert consume_all(clients, crash.dead_letters_topic, timeout_s=30) == []

    # every search answered, exactly one distinct answer each; copies are identical bytes
    assert set(ref_answers) == searches
    assert set(crash_answers) == searches
    differing = {e: v for e, v in crash_answers.items() if len(v) > 1}
    assert not differing, f"{len(differing)} searches answered with different bytes, e.g. {next(iter(differing.items()))}"
    for event_id in list(crash_answers)[:50]:
        (payload,) = crash_answers[event_id]
        assert validate("search_result", orjson.loads(payload)) == [], payload

    # the learned search signals equal the uninterrupted run's
    want, got = _signals(ref.state_dir), _signals(crash.state_dir)
    assert sum(1 for k in want if k.startswith(ASSOC_PREFIX)) > 20  # the stream taught many queries
    assert want.keys() == got.keys()
    for key in (k for k in want if k.startswith(ASSOC_PREFIX)):  # the same engagements, the same order
        assert got[key] == want[key], key
    assert {k: v for k, v in got.items() if k.startswith(WINDOW_PREFIX)} == {
        k: v for k, v in want.items() if k.startswith(WINDOW_PREFIX)}

    # the same users
    want_users, got_users = _users(ref.state_dir), _users(crash.state_dir)
    assert len(want_users) == N_USERS and got_users.keys() == want_users.keys()
    for uid, w in want_users.items():
        g = got_users[uid]
        assert (g.history, g.purchased, g.last_applied, g.updated_ts, g.session_id) == (
            w.history, w.purchased, w.last_applied, w.updated_ts, w.session_id), uid
        assert g.counts.keys() == w.counts.keys(), uid
        assert np.allclose([g.counts[k] for k in w.counts], list(w.counts.values()), rtol=1e-5), uid
        assert (g.interest is None) == (w.interest is None), uid
        if w.interest is not None:
            assert np.allclose(g.interest, w.interest, rtol=1e-5, atol=1e-6), uid
