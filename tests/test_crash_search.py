"""The crash test with searches in the stream (issue 13): ``kill -9`` the live flow twice, get
the same learned search signals, the same users, and exactly one answer per search.

A 2,000-event stream (100 users, 120 items) in the real local broker, where about a fifth of
the item events are preceded by a search of the same user (two words of the item: brand or
title word, and category, as ``recsys.synthetic.with_searches`` types them), so the learned
query -> item associations grow throughout. One uninterrupted ``recsys run --stop-at-end`` is
the reference; a crash run of the same command on its own directories is SIGKILLed twice, once
its recommendations topic holds 30% and then 65% of the reference's distinct
recommendations, and restarted until it finishes. Afterwards:

- the learned associations (``sqa:``: every query's engagements and counts), the open search
  windows (``sqw:``) and the shoppers' trails (``sqt:``, what an erasure takes back) equal the
  reference's, record for record (the associations are averaged in
  event time, so the partitions' interleaving, which a restart changes, does not matter);
- every user holds the same history, purchases, applied offsets, counts and interest;
- every search of the input has exactly one distinct answer in the crash run's
  ``search-results`` topic (as many as the reference's), and any second copy is a
  byte-identical re-emission of the stored answer (the search outbox,
  ``recsys/search/outbox.py``), schema-valid;
- nothing was dead-lettered.

The second test does the same to a live run (no ``--stop-at-end``) with ``--embed-worker`` and
a long tail of queries, killed while queries are at the worker (its docstring). It found a
defect, fixed 2026-12-06: a restart's first batch re-delivered a parked search and released it
too, and both were answered (``tests/test_waiting.py``).

Cost: four ``recsys run`` starts each (each ~10-20 s to ``ready:`` on a loaded box, the model
load) and a small stream, ~80 s for both; the helpers come from ``tests/test_crash_recovery.py``.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
from test_crash_recovery import _Child, _distinct_by_partition, _Progress, _run_args, _users

from dataflows.kafka_io import KafkaClients, consume_all, ensure_topics, produce_records
from dataflows.shards import summed_totals
from recsys.events import CatalogItem, Event, encode
from recsys.schemas import validate
from recsys.search.learned import ASSOC_PREFIX, TRAIL_PREFIX, WINDOW_PREFIX
from recsys.settings import Settings
from recsys.shard.waiting import WAIT_PREFIX
from recsys.store.kv import RocksKV
from recsys.synthetic import generate_catalog, generate_events, with_searches

pytestmark = [pytest.mark.slow, pytest.mark.processes]

N_EVENTS = 2_000
N_USERS = 100
N_ITEMS = 120
SEARCH_SHARE = 0.2
PARTITIONS = 2
KILL_AT = (0.3, 0.65)
PROGRESS_TIMEOUT_S = 60.0


def _stream(seed: int, distinct_queries: int | None = None, new_items: int = 0) -> tuple[list, list[Event], dict[int, CatalogItem]]:
    """Synthetic events with a search inserted before about ``SEARCH_SHARE`` of them (same user,
    same time): the engagement that follows teaches the query's association. ``distinct_queries``:
    queries from a long tail (``with_searches``) instead of the catalog's 144 two-word ones.

    Returns the catalog file's items, the events, and ``new_items`` more items to announce on
    the catalog topic during the stream (position in the events -> the item, sent just before
    that event, the first to name it; spread evenly over the stream, earlier events naming them
    moved to known items)."""
    catalog = generate_catalog(N_ITEMS + new_items, seed=seed)
    known = catalog[:N_ITEMS]
    events = generate_events(N_EVENTS, catalog, n_users=N_USERS, seed=seed + 1)
    from_position = {item.item_id: (j + 1) * N_EVENTS // (new_items + 1) for j, item in enumerate(catalog[N_ITEMS:])}
    events = [e if from_position.get(e.item_id, -1) <= i else dataclasses.replace(e, item_id=known[i % N_ITEMS].item_id)
              for i, e in enumerate(events)]
    for item_id, i in from_position.items():  # each new item named from its position on
        events[i] = dataclasses.replace(events[i], item_id=item_id)
    mixed = with_searches(events, catalog, SEARCH_SHARE, seed=seed + 2, distinct_queries=distinct_queries)
    out: list[Event] = []
    for original, maybe in zip(events, mixed):
        if maybe.type == "search":
            out.append(maybe)
        out.append(original)
    announce: dict[int, CatalogItem] = {}
    first = {item.item_id: item for item in catalog[N_ITEMS:]}
    for i, event in enumerate(out):
        if event.item_id in first:
            announce[i] = first.pop(event.item_id)
    return known, out, announce


def _signals(state_dir: str) -> dict[bytes, object]:
    """The stored search signals: ``sqa:`` associations and ``sqw:`` open windows, decoded, and the
    shoppers' trails (``sqt:``, what an erasure takes back) as they are."""
    kv = RocksKV(str(Path(state_dir) / "rocks"))
    try:
        signals: dict[bytes, object] = {k: orjson.loads(v) for prefix in (ASSOC_PREFIX, WINDOW_PREFIX)
                                        for k, v in kv.iter_prefix(prefix) if v}
        return {**signals, **dict(kv.iter_prefix(TRAIL_PREFIX))}
    finally:
        kv.close()


def _answers(clients: KafkaClients, topic: str) -> tuple[dict[str, set[bytes]], int]:
    """Search results by the search's event id (the distinct payloads), and how many records."""
    groups: dict[str, set[bytes]] = defaultdict(set)
    records = consume_all(clients, topic, timeout_s=60)
    for env in records:
        groups[orjson.loads(env.value)["trigger_event_id"]].add(env.value)
    return groups, len(records)


def _args(settings: Settings, catalog_file: Path, *, live_with_worker: bool = False) -> list[str]:
    args = [*_run_args(settings, catalog_file, 1), "--search-results-topic", settings.search_results_topic]
    if live_with_worker:  # no end: the waiting room is on, and with it the embedding worker
        args = [a for a in args if a != "--stop-at-end"] + ["--embed-worker"]
    return args


class _Setup:
    """The stream in the broker, the catalog file, and a reference and a crash run's settings."""

    def __init__(self, bootstrap: str, tmp_path: Path, events: list[Event], catalog: list, tag: str,
                 produce: bool = True) -> None:
        self.events, self.tmp_path = events, tmp_path
        self.searches = {e.event_id for e in events if e.type == "search"}
        assert len(self.searches) > 0.1 * N_EVENTS
        self.catalog_file = tmp_path / "catalog.jsonl"
        self.catalog_file.write_bytes(b"\n".join(encode(c) for c in catalog) + b"\n")
        prefix = f"{tag}-{uuid.uuid4().hex[:8]}-"

        def settings(name: str) -> Settings:
            return Settings(
                bootstrap_servers=bootstrap, events_topic=prefix + "events", catalog_topic=prefix + "catalog",
                recommendations_topic=f"{prefix}{name}-recommendations", dead_letters_topic=f"{prefix}{name}-dead-letters",
                search_results_topic=f"{prefix}{name}-search-results", embed_cache_dir=str(tmp_path / "embeddings"),
                state_dir=str(tmp_path / name / "state"), recovery_dir=str(tmp_path / name / "recovery"),
            )

        self.ref, self.crash = settings("ref"), settings("crash")
        self.clients = KafkaClients(self.ref)
        ensure_topics(self.clients, {self.ref.events_topic: PARTITIONS, self.ref.catalog_topic: 1, **{
            t: p for s in (self.ref, self.crash) for t, p in ((s.recommendations_topic, PARTITIONS), (s.dead_letters_topic, 1),
                                                               (s.search_results_topic, PARTITIONS))}})
        if produce:
            self.produce()

    def produce(self) -> None:
        """The whole stream into the events topic."""
        records = ((e.user_id, encode(e)) for e in self.events)
        assert produce_records(self.clients, self.ref.events_topic, records) == len(self.events)

    def reference(self) -> int:
        """The uninterrupted ``--stop-at-end`` run, without the worker (it embeds the catalog into
        the cache both runs share); returns its distinct recommendations."""
        child = _Child(_args(self.ref, self.catalog_file), self.tmp_path / "ref.log", self.tmp_path)
        try:
            child.wait_ready()
            assert child.wait_exit() == 0, child.output()[-3000:]
        finally:
            child.close()
        return sum(_distinct_by_partition(self.clients, self.ref.recommendations_topic))


def _kill_at_marks(args: list[str], log: Path, progress: _Progress, total: int, *,
                   also: Callable[[], bool] = lambda: True, on_ready: Callable[[], None] = lambda: None,
                   before_kill: Callable[[int], None] = lambda pid: None, after_kill: Callable[[], None] = lambda: None,
                   timeout_s: float = PROGRESS_TIMEOUT_S) -> list[int]:
    """One life per mark of :data:`KILL_AT`: SIGKILLed once ``progress`` (distinct outputs of a
    topic) has passed that fraction of ``total`` and ``also()`` holds; returns the counts at the
    kills. ``on_ready`` runs once each life is ready, ``before_kill(pid)`` just before each kill,
    ``after_kill`` after it (the state is no one's then)."""
    kills: list[int] = []
    for fraction in KILL_AT:
        child = _Child(args, log, log.parent)
        try:
            ready_s = child.wait_ready()
            on_ready()
            mark = max(int(fraction * total), progress.caught_up() + 1)
            while (n := progress()) < mark or not also():
                if child.proc.poll() is not None:
                    pytest.fail(f"crash run exited ({child.proc.returncode}) at {n} of {mark}:\n{child.output()[-3000:]}")
                if time.monotonic() - child.started > ready_s + timeout_s:
                    pytest.fail(f"crash run reached only {n} of {mark} (its other condition: {also()}) "
                                f"in {timeout_s} s:\n{child.output()[-3000:]}")
                time.sleep(0.05)
            before_kill(child.proc.pid)
            assert child.sigkill(), f"the crash run finished before kill {len(kills) + 1}"
            kills.append(progress.caught_up())
        finally:
            child.close()
        after_kill()
    return kills


def _check_crash_run(setup: _Setup, kills: list[int], total: int, label: str, timings: str) -> None:
    """What both crash tests prove (the module docstring): no dead letters, one distinct answer
    per search (copies byte-identical, schema-valid), the reference's search signals and users.
    ``kills``: the crash run's progress at its kills, of ``total``."""
    clients, ref, crash, searches = setup.clients, setup.ref, setup.crash, setup.searches
    ref_answers, _ = _answers(clients, ref.search_results_topic)
    crash_answers, crash_records = _answers(clients, crash.search_results_topic)
    copies = crash_records - len(crash_answers)
    print(f"\n{label}: {len(setup.events)} events, {len(searches)} searches; {timings}, kills at {kills} of "
          f"{total}; search results {crash_records} records, {len(crash_answers)} distinct, "
          f"{copies} re-emitted")

    # both kills were real, the first with output still to come; the last life can emit its last
    # batches between passing its mark and the kill (2,000 events are few batches), as the main
    # crash test allows (tests/test_crash_recovery.py)
    assert len(kills) == len(KILL_AT) and kills[0] < kills[1] <= total and kills[0] < total, kills
    assert consume_all(clients, ref.dead_letters_topic, timeout_s=30) == []
    assert consume_all(clients, crash.dead_letters_topic, timeout_s=30) == []

    # every search answered, exactly one distinct answer each; copies are identical bytes
    assert set(ref_answers) == searches
    assert set(crash_answers) == searches, f"not answered: {sorted(searches - set(crash_answers))}, unknown: {sorted(set(crash_answers) - searches)}"
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
    # each shopper's trail too: every engagement credited and every text typed, once
    trail = {k: v for k, v in want.items() if k.startswith(TRAIL_PREFIX)}
    assert len(trail) > 20 and {k: v for k, v in got.items() if k.startswith(TRAIL_PREFIX)} == trail

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


def test_sigkilled_run_with_searches_keeps_learned_search_signals_and_answers_each_search_once(local_broker, tmp_path):
    t0 = time.monotonic()
    catalog, events, _ = _stream(seed=31)
    setup = _Setup(local_broker.bootstrap, tmp_path, events, catalog, "crash-search")
    ref_total = setup.reference()
    ref_s = time.monotonic() - t0

    # --- the crash run: SIGKILL each life once its output passes the next mark, restart
    t1 = time.monotonic()
    args = _args(setup.crash, setup.catalog_file)
    progress = _Progress(setup.clients, setup.crash.recommendations_topic, PARTITIONS)
    try:
        kills = _kill_at_marks(args, tmp_path / "crash.log", progress, ref_total)
    finally:
        progress.close()
    child = _Child(args, tmp_path / "crash.log", tmp_path)
    try:
        child.wait_ready()
        assert child.wait_exit() == 0, child.output()[-3000:]
    finally:
        child.close()
    _check_crash_run(setup, kills, ref_total, "crash test with searches (kills in distinct recommendations)",
                     f"reference {ref_s:.1f}s, crash run {time.monotonic() - t1:.1f}s")


def _parked(state_dir: str) -> dict[str, int]:
    """Events parked in the waiting room of a stopped run's state (``wait:`` records), by type."""
    kv = RocksKV(str(Path(state_dir) / "rocks"))
    try:
        types = [orjson.loads(base64.b64decode(orjson.loads(raw)[4])).get("type") for _, raw in kv.iter_prefix(WAIT_PREFIX)]
    finally:
        kv.close()
    return {t: types.count(t) for t in sorted(set(types))}


#: Items the worker test announces on the catalog topic during its stream (the worker embeds them).
NEW_ITEMS = 24
#: The worker test's stream, events/s (~24 s of stream; 60/s, ~40 s, until 2026-12-07, when the
#: suite neared CI's 25 minutes): each life's worker loads its own model, a few seconds after the
#: flow's ``ready:``, and must still find new queries to encode before the next mark (~7 s of
#: stream between marks at this rate; nearly every search's query is new).
WORKER_TEST_RATE = 100.0


def test_sigkilled_live_run_with_the_embedding_worker_answers_each_search_once_and_loses_no_event(local_broker, tmp_path):
    """The same crash test for a live run (no ``--stop-at-end``) with ``--embed-worker``, a long
    tail of queries (nearly every search a query's first) and new items announced on the
    catalog topic through the stream, produced while a life runs: new queries and new items'
    text go to the worker, and searches and events for those items wait in the waiting room,
    their shoppers' later events behind them, in state. Each life is SIGKILLed (the worker with it)
    once its search results pass the mark *and* its metrics say queries are at the worker; the
    last life runs until every shopper's last event has its recommendation, then stops with
    SIGTERM. The outcome must be the worker-less ``--stop-at-end`` reference's (run last, on
    the whole stream): the same users, the same learned search signals, one distinct answer per
    search. Before each kill the worker is stopped (SIGSTOP, a busy worker) and the kill waits
    for the flow to send it a query, so a search is parked in the state the kill leaves: the
    parked events are counted, at least one search a kill."""
    from test_metrics_endpoint import _free_port_pair, scrape
    from test_operating import _child_pids

    t0 = time.monotonic()
    catalog, events, announce = _stream(seed=37, distinct_queries=4 * N_EVENTS, new_items=NEW_ITEMS)
    setup = _Setup(local_broker.bootstrap, tmp_path, events, catalog, "crash-worker", produce=False)
    last_of_user = set({e.user_id: e.event_id for e in events}.values())
    port = _free_port_pair()
    # a 100 ms fetch wait: batches of several shoppers at this rate (a search alone in its batch
    # with its shopper's own events is encoded there: no one else would wait for it)
    args = [*_args(setup.crash, setup.catalog_file, live_with_worker=True), "--metrics-port", str(port),
            "--fetch-max-wait-ms", "100"]

    def gauge(name: str) -> float:
        try:
            return scrape(f"http://127.0.0.1:{port}/metrics").get((name, ()), 0.0)
        except OSError:  # not serving yet
            return 0.0

    def queries_to_worker() -> float:
        """Search queries this life has sent to the worker."""
        return gauge("recsys_queries_to_worker_total")

    parked: list[dict[str, int]] = []
    # the stream flows while a life runs, from its ready: (not while the flow is down, so each
    # life's worker, loading beside it, still finds much of the stream to encode queries for)
    flowing = threading.Event()

    def produce() -> None:
        producer = setup.clients.producer()
        try:
            for i, event in enumerate(events):
                flowing.wait()
                time.sleep(1 / WORKER_TEST_RATE)
                if (item := announce.get(i)) is not None:  # a new item, just before its first event
                    producer.send(setup.ref.catalog_topic, key=item.item_id.encode(), value=encode(item))
                producer.send(setup.ref.events_topic, key=event.user_id.encode(), value=encode(event))
            producer.flush()
        finally:
            producer.close()

    producer = threading.Thread(target=produce, daemon=True)

    def stream() -> None:
        flowing.set()
        if producer.ident is None:
            producer.start()

    workers: list[int] = []

    def stop_the_worker(pid: int) -> None:
        """SIGSTOP the flow's worker (a busy worker), then wait 0.3 s (the answers it wrote before
        are taken) and until the flow sends it another query: the flow is killed at the first
        scrape that counts one more query sent to it, so that query's search is parked (a search waits for its query 0.2 s at most,
        ``QUERY_WAIT_S``), and new items' records it was sent are unanswered."""
        workers[:] = [c for c in _child_pids(pid) if b"recsys.items.worker" in Path(f"/proc/{c}/cmdline").read_bytes()]
        for worker in workers:
            os.kill(worker, signal.SIGSTOP)
        time.sleep(0.3)
        before, deadline = queries_to_worker(), time.monotonic() + 10.0
        while queries_to_worker() <= before and time.monotonic() < deadline:
            time.sleep(0.005)

    def after_kill() -> None:
        flowing.clear()
        for worker in workers:  # a stopped process never reads the end of its pipe: ours to kill
            os.kill(worker, signal.SIGKILL)
        parked.append(_parked(setup.crash.state_dir))

    searches = _Progress(setup.clients, setup.crash.search_results_topic, PARTITIONS)
    recommendations = _Progress(setup.clients, setup.crash.recommendations_topic, PARTITIONS)
    try:
        kills = _kill_at_marks(args, tmp_path / "crash.log", searches, len(setup.searches), also=lambda: queries_to_worker() > 0,
                               on_ready=stream, before_kill=stop_the_worker, after_kill=after_kill,
                               timeout_s=len(events) / WORKER_TEST_RATE + PROGRESS_TIMEOUT_S)
        child = _Child(args, tmp_path / "crash.log", tmp_path)
        try:
            ready_s = child.wait_ready()
            stream()
            while not (answered := recommendations.triggers()).issuperset(last_of_user):
                if child.proc.poll() is not None:
                    pytest.fail(f"crash run exited ({child.proc.returncode}):\n{child.output()[-3000:]}")
                if time.monotonic() - child.started > ready_s + len(events) / WORKER_TEST_RATE + PROGRESS_TIMEOUT_S:
                    pytest.fail(f"{len(last_of_user - answered)} shoppers' last events unanswered:\n{child.output()[-3000:]}")
                time.sleep(0.05)
            os.kill(child.proc.pid, signal.SIGTERM)  # stops in order: the batch done is committed
            assert child.wait_exit() == 0, child.output()[-3000:]
        finally:
            child.close()
    finally:
        searches.close()
        recommendations.close()
    producer.join(timeout=60)
    assert not producer.is_alive()
    crash_s = time.monotonic() - t0
    t1 = time.monotonic()
    setup.reference()
    output = (tmp_path / "crash.log").read_text(errors="replace")
    totals = summed_totals(line for line in output.splitlines() if line.startswith("stopped:"))
    _check_crash_run(setup, kills, len(setup.searches), "crash test with the embedding worker (kills in distinct search results)",
                     f"crash run {crash_s:.1f}s, reference {time.monotonic() - t1:.1f}s, events parked at the kills "
                     f"{parked}, queries to the worker in the last life {totals.get('queries_to_worker', 0)}")
    assert "Traceback" not in output and "panicked" not in output, output[-3000:]
    assert all(p.get("search") for p in parked), f"no search was waiting for its query at a kill ({parked})"
