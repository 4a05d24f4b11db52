"""The catalog is a table bootstrapped before any event (issue 10, defect 1), on the real broker.

A shop's topics already hold the catalog and a backlog of events when ``recsys run`` starts
with an empty state directory and no catalog file: every event must find its item, so no
event is dead-lettered as "unknown item". Before the fix the flow merged both topics in no set
order, so events read before the catalog record of their item were dead-lettered: ~10 % here,
~80 % with a 5,000-item catalog. The test makes the catalog take several polls cheaply with a
small ``--poll-max-records`` (a big catalog takes several fetches the same way).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from dataflows.kafka_io import KafkaClients, consume_all, ensure_topics, produce_records
from recsys.events import Event, encode
from recsys.synthetic import generate_catalog, generate_events

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[1]


def _topics(prefix: str) -> list[str]:
    return ["--events-topic", prefix + "events", "--catalog-topic", prefix + "catalog",
            "--recommendations-topic", prefix + "recommendations", "--dead-letters-topic", prefix + "dead-letters"]


def _publish_catalog_then_events(bootstrap: str, prefix: str, *, partitions: int, n_events: int = 2000):
    catalog = generate_catalog(200, seed=11)
    events = generate_events(n_events, catalog, n_users=200, seed=12)
    ensure_topics(bootstrap, {prefix + "events": partitions, prefix + "catalog": 1,
                              prefix + "recommendations": partitions, prefix + "dead-letters": 1})
    clients = KafkaClients.for_bootstrap(bootstrap)
    # and one record no shard can read, which must be dead-lettered once, not once per shard
    produce_records(clients, prefix + "catalog", [*((c.item_id.encode(), encode(c)) for c in catalog),
                                                  (b"broken", b'{"item_id": "broken", "title": ')])
    produce_records(clients, prefix + "events", [(e.user_id.encode(), encode(e)) for e in events])
    return catalog, events


def _run(bootstrap: str, prefix: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recsys_cli", "run", "--stop-at-end", *_topics(prefix), *extra,
         "--poll-max-records", "20", "--bootstrap-servers", bootstrap, "--state-dir", str(tmp_path / "state"),
         "--recovery-dir", str(tmp_path / "recovery"), "--embed-cache-dir", str(tmp_path / "emb")],
        cwd=ROOT, timeout=300, capture_output=True, text=True,
    )


def _totals(stdout: str) -> dict[str, int]:
    last = [line for line in stdout.splitlines() if line.startswith("stopped:")][-1]
    return {k.strip(): int(v) for k, v in (p.split("=") for p in last.split(":", 1)[1].split(",") if "=" in p)}


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_fresh_start_on_topics_with_data_dead_letters_no_event_as_unknown_item(local_broker, topic_name, tmp_path, processes):
    prefix = topic_name("boot") + "-"
    # 600 events (2,000 until 2026-12-07, read 20 a batch: 20 s) name 190-odd of the 200 items
    _, events = _publish_catalog_then_events(local_broker.bootstrap, prefix, partitions=2, n_events=600)
    assert len({e.item_id for e in events}) > 150
    done = _run(local_broker.bootstrap, prefix, tmp_path, "--processes", str(processes))
    assert done.returncode == 0, done.stdout + done.stderr
    dead = consume_all(KafkaClients.for_bootstrap(local_broker.bootstrap), prefix + "dead-letters")
    reasons = [orjson.loads(d.value)["reason"] for d in dead]
    assert [r for r in reasons if "unknown item" in r] == []
    # the broken catalog record once, however many shards read it (twice with two before 2026-12-04)
    assert [orjson.loads(d.value)["source"]["topic"] for d in dead] == [prefix + "catalog"], reasons
    totals = _totals(done.stdout)
    assert totals["applied"] == len(events) and totals.get("dead_letters", 0) == 1, done.stdout


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout_s} s")


@pytest.mark.serial
def test_an_event_waits_for_its_late_catalog_item_and_an_unknown_one_is_dead_lettered_after_the_bound(
        local_broker, topic_name, tmp_path):
    """Live (no --stop-at-end): an event whose item's catalog record comes 0.5 s later is applied;
    one whose item never comes is dead-lettered once it has waited RECSYS_UNKNOWN_ITEM_WAIT_S."""
    prefix = topic_name("wait") + "-"
    bootstrap = local_broker.bootstrap
    clients = KafkaClients.for_bootstrap(bootstrap)
    catalog = generate_catalog(10, seed=21)
    ensure_topics(bootstrap, {prefix + t: 1 for t in ("events", "catalog", "recommendations", "dead-letters")})
    produce_records(clients, prefix + "catalog", [(c.item_id.encode(), encode(c)) for c in catalog])
    wait_s = 3.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_cli", "run", *_topics(prefix), "--bootstrap-servers", bootstrap,
         "--unknown-item-wait-s", str(wait_s), "--state-dir", str(tmp_path / "state"),
         "--recovery-dir", str(tmp_path / "recovery"), "--embed-cache-dir", str(tmp_path / "emb"), "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "RUST_BACKTRACE": "0"},
    )
    try:
        for line in proc.stdout:  # the catalog line comes once the flow is about to start
            if line.startswith("catalog:"):
                break
        late = dataclasses.replace(catalog[0], item_id="late-item")
        first = Event("e-late", "click", "u-late", "late-item", ts=1_000)
        then = Event("e-after", "click", "u-late", catalog[1].item_id, ts=2_000)  # queued behind it
        never = Event("e-never", "click", "u-never", "never-item", ts=1_000)
        sent_at = time.time()
        produce_records(clients, prefix + "events", [(e.user_id.encode(), encode(e)) for e in (first, then, never)])
        time.sleep(0.5)
        produce_records(clients, prefix + "catalog", [(late.item_id.encode(), encode(late))])

        def recs():
            return [orjson.loads(r.value) for r in consume_all(clients, prefix + "recommendations")]

        answered = _wait_for(lambda: [r for r in recs() if r["user_id"] == "u-late"], 30, "recommendation for u-late")
        assert answered[-1]["trigger_event_id"] in ("e-late", "e-after")
        dead = _wait_for(lambda: consume_all(clients, prefix + "dead-letters"), 30, "dead letter")
        letters = [orjson.loads(d.value) for d in dead]
        assert len(letters) == 1 and "unknown item 'never-item'" in letters[0]["reason"], letters
        assert letters[0]["failed_at"] / 1000 - sent_at >= wait_s
        _wait_for(lambda: any(r["trigger_event_id"] == "e-after" for r in recs()), 10, "the queued event applied")
        assert not [r for r in recs() if r["user_id"] == "u-never"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    totals = _totals(out)
    assert totals["applied"] == 2 and totals["waited"] >= 2 and totals["dead_letters"] == 1, out
    # stopped in order: the restart's bootstrap starts where the flow stopped reading the catalog
    # (before, it read again the record the flow had applied, and every other one since its start)
    again = _run(bootstrap, prefix, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    boot_line = [line for line in again.stdout.splitlines() if line.startswith("catalog:")]
    assert boot_line and boot_line[0].startswith("catalog: 0 records of"), again.stdout
    assert _totals(again.stdout).get("catalog_in", 0) == 0 and len(consume_all(clients, prefix + "dead-letters")) == 1


def test_a_long_catalog_bootstrap_says_how_far_it_is(memory_broker, tmp_path, capsys):
    """30,000 items of new text took 73 s to bootstrap with nothing on the screen but "loading
    the model and state"; now every ``progress_every_s`` (5 s; 0 here: every chunk) it prints
    how many records of how many are applied, and nothing when the bootstrap is short."""
    from dataflows.catalog_table import bootstrap_catalog
    from recsys.settings import Settings
    from recsys.shard.step import Shard

    catalog = generate_catalog(120, seed=21)
    ensure_topics(memory_broker, {"catalog": 1, "dead": 1, "recs": 1})
    produce_records(memory_broker, "catalog", [(c.item_id.encode(), encode(c)) for c in catalog])
    settings = Settings(state_dir=str(tmp_path / "state"), embed_cache_dir=str(tmp_path / "emb"))
    engine = Shard.open(settings, in_memory=True)
    try:
        boot = bootstrap_catalog(engine, memory_broker, "catalog", dead_letters_topic="dead", recommendations_topic="recs",
                                 chunk=50, progress_every_s=0.0)
        assert boot.records == 120
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("catalog: ")]
        assert lines and lines[-1].startswith("catalog: 120 of 120 records of 'catalog' applied ("), lines
        assert all(" of 120 records" in line for line in lines), lines
        counts = [int(line.split()[1].replace(",", "")) for line in lines]
        assert counts == sorted(counts) and counts[0] < 120, lines

        produce_records(memory_broker, "catalog", [(c.item_id.encode(), encode(c)) for c in catalog[:10]])
        bootstrap_catalog(engine, memory_broker, "catalog", dead_letters_topic="dead", recommendations_topic="recs")
        assert "records of 'catalog' applied (" not in capsys.readouterr().out  # short: no progress line
    finally:
        engine.close()


def test_answers_released_by_the_restarts_catalog_bootstrap_are_sent_with_its_other_outputs(memory_broker, tmp_path):
    """A search waits in state behind its shopper's click on an item the catalog has not
    delivered; the flow stops (a crash); the item's record arrives. The restart's catalog
    bootstrap applies the record, which releases the click and the search: their answers are
    the bootstrap's to send. Before 2026-12-06 it sent the recommendations and dead letters it
    caused, not the search results: the answer was lost (found by the crash test with the
    embedding worker, tests/test_crash_search.py, where a search also waits for its query)."""
    from dataflows.catalog_table import bootstrap_catalog
    from recsys.events import CatalogItem, Envelope
    from recsys.settings import Settings
    from recsys.shard.step import Shard

    ensure_topics(memory_broker, {"catalog": 1, "dead": 1, "recs": 1, "search": 1})
    settings = Settings(state_dir=str(tmp_path / "state"), embed_cache_dir=str(tmp_path / "emb"))
    ts = 1_700_000_000_000
    tent = CatalogItem("tent", "Red dome tent", category="Camping")
    boots = CatalogItem("boots", "Green hiking boots", category="Footwear/Hiking")
    click, search = Event("c1", "click", "u1", "boots", ts), Event("s1", "search", "u1", None, ts + 1, query="camping tent")
    engine = Shard.open(settings)
    engine.upsert_catalog([tent])
    first = engine.process([Envelope("events", 0, i, b"u1", encode(e), e.ts) for i, e in enumerate((click, search))])
    assert first.counts["waited"] == 2 and not first.search_results
    engine.kv.close()  # a crash: the engine is dropped unclosed

    produce_records(memory_broker, "catalog", [(b"boots", encode(boots))])
    restarted = Shard.open(settings)
    try:
        boot = bootstrap_catalog(restarted, memory_broker, "catalog", dead_letters_topic="dead", recommendations_topic="recs",
                                 search_results_topic="search")
        assert boot.records == 1 and len(restarted.waiting) == 0
        (answer,) = [orjson.loads(r.value) for r in consume_all(memory_broker, "search")]
        assert answer["trigger_event_id"] == "s1" and answer["items"]
        assert [orjson.loads(r.value)["trigger_event_id"] for r in consume_all(memory_broker, "recs")] == ["s1"]
        assert not list(restarted.kv.iter_prefix(b"unsent:"))  # delivered: nothing left to send again
    finally:
        restarted.close()


def test_a_restart_whose_search_results_topic_is_new_sends_the_answers_its_bootstrap_releases(memory_broker, tmp_path):
    """A search waits in state behind its shopper's click on an item not yet in the catalog; the
    flow stops; the item's record arrives; the operator restarts it with another search-results
    topic (``--search-results-topic``), which does not exist yet, and a new recovery directory
    (``recsys run`` refuses a renamed topic on the old one: tests/test_pipeline.py).
    ``live_flow`` creates that topic when it is missing, but before 2026-12-06 (forty-second
    session) only after the catalog bootstrap and the re-send of unsent outputs: the bootstrap's
    answer to the search was sent to a topic that did not exist, and the start failed, every
    time (a broker without auto-create; the flow's producers never auto-create)."""
    from dataflows.live import live_flow
    from dataflows.runner import run
    from recsys.events import CatalogItem, Envelope
    from recsys.settings import Settings
    from recsys.shard.step import Shard

    settings = Settings(state_dir=str(tmp_path / "state"), recovery_dir=str(tmp_path / "recovery"),
                        embed_cache_dir=str(tmp_path / "emb"), stop_at_end=True)
    ensure_topics(memory_broker, {settings.events_topic: 1, settings.catalog_topic: 1,
                                  settings.recommendations_topic: 1, settings.dead_letters_topic: 1,
                                  settings.search_results_topic: 1})
    ts = 1_700_000_000_000
    tent = CatalogItem("tent", "Red dome tent", category="Camping")
    boots = CatalogItem("boots", "Green hiking boots", category="Footwear/Hiking")
    click, search = Event("c1", "click", "u1", "boots", ts), Event("s1", "search", "u1", None, ts + 1, query="camping tent")
    produce_records(memory_broker, settings.catalog_topic, [(b"tent", encode(tent))])
    produce_records(memory_broker, settings.events_topic, [(b"u1", encode(click)), (b"u1", encode(search))])
    first_life = Shard.open(settings.replace(stop_at_end=False))  # a live run: the two events wait for "boots"
    first_life.upsert_catalog([tent])
    first = first_life.process([Envelope(settings.events_topic, 0, i, b"u1", encode(e), e.ts)
                                for i, e in enumerate((click, search))])
    assert first.counts["waited"] == 2 and not first.search_results
    first_life.kv.close()  # a crash: the engine is dropped unclosed

    produce_records(memory_broker, settings.catalog_topic, [(b"boots", encode(boots))])
    renamed = settings.replace(search_results_topic="shop-search")
    engine = Shard.open(renamed)
    try:
        run(live_flow(renamed, memory_broker, engine=engine), recovery_dir=renamed.recovery_dir, snapshot_interval_s=1.0)
        # the flow then reads the two events again from offset 0 (the first life's engine was
        # driven by hand, with no Bytewax recovery), skips them and re-sends the stored answer:
        # a copy of the same bytes, as after any crash
        (value,) = {r.value for r in consume_all(memory_broker, "shop-search")}
        answer = orjson.loads(value)
        assert answer["trigger_event_id"] == "s1" and answer["items"]
        assert not list(engine.kv.iter_prefix(b"unsent:"))  # delivered: nothing left to send again
    finally:
        engine.close()
