"""Live metrics (issue 10): the Prometheus endpoint scraped over real HTTP during a live run on
the local broker, its counters checked against what was produced; and the status line."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dataflows.kafka_io import KafkaClients, consume_all, ensure_topics, produce_records
from dataflows.metrics import FlowMetrics
from recsys.events import encode
from recsys.settings import Settings
from recsys.synthetic import generate_catalog, generate_events

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[1]
BAD = [b"not json", b'{"event_id": "b", "type": "hover", "user_id": "u-bad", "item_id": "i1", "ts": 1}',
       b'{"event_id": "c", "type": "click", "user_id": "u-bad", "ts": 1}']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_pair() -> int:
    """A port P with P and P + 1 both free, below Linux's ephemeral range (32768-60999): a port
    the kernel picked as free, plus the next one, was taken by a client connection's local port
    in one CI run (the second shard could not serve)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 32_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two free consecutive ports in 20000-32000")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` from one GET of the endpoint."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_every_metric_is_named_recsys_thing_unit_with_help_text():
    metrics = FlowMetrics(Settings(), status=None)
    families = list(metrics.registry.collect())
    assert len(families) >= 20
    for family in families:
        assert family.name.startswith("recsys_"), family.name
        assert family.documentation, family.name


@pytest.mark.serial
def test_a_watched_partition_reports_the_time_between_its_polls():
    from bytewax.inputs import StatefulSourcePartition

    from dataflows.metrics import Watched

    class _Inner(StatefulSourcePartition):
        def next_batch(self):
            return []

        def snapshot(self):
            return None

    class _Source:
        def list_parts(self):
            return ["events#0"]

        def build_part(self, step_id, for_part, resume_state):
            return _Inner()

    metrics = FlowMetrics(Settings(), status=None)
    part = Watched(_Source(), "events", metrics).build_part("in", "events#0", None)
    part.next_batch()  # the first poll has no interval
    time.sleep(0.12)
    part.next_batch()
    part.next_batch()
    buckets = {s.labels["le"]: s.value for s in metrics.registry.collect() for s in s.samples
               if s.name == "recsys_input_poll_interval_seconds_bucket" and s.labels["topic"] == "events"}
    assert buckets["+Inf"] == 2 and buckets["0.1"] == 1, buckets  # one of 120 ms, one immediate
    assert 0.12 <= metrics.poll_interval_max.labels("events")._value.get() < 1.0


def test_partitions_reading_through_one_consumer_count_its_connections_once():
    """A process reads all its partitions through one consumer: ``recsys_broker_connections`` is
    that consumer's count, not the count times the partitions."""
    from bytewax.inputs import StatefulSourcePartition

    from dataflows.metrics import Watched

    class _Inner(StatefulSourcePartition):
        def __init__(self, consumer: object) -> None:
            self.consumer_id = id(consumer)

        def next_batch(self):
            return []

        def snapshot(self):
            return None

        def connections(self) -> int:
            return 3

    one, other = object(), object()
    consumers = {"events#0": one, "events#1": one, "catalog#0": one, "exchange#0": other}

    class _Source:
        def list_parts(self):
            return list(consumers)

        def build_part(self, step_id, for_part, resume_state):
            return _Inner(consumers[for_part])

    metrics = FlowMetrics(Settings(), status=None)
    for part in consumers:
        Watched(_Source(), part.split("#")[0], metrics).build_part("in", part, None)
    (value,) = [s.value for f in metrics.registry.collect() for s in f.samples if s.name == "recsys_broker_connections"]
    assert value == 6  # two consumers of three connections each


def test_the_endpoint_counts_what_was_produced_during_a_live_run(local_broker, topic_name, tmp_path):
    prefix = topic_name("m") + "-"
    bootstrap = local_broker.bootstrap
    clients = KafkaClients.for_bootstrap(bootstrap)
    catalog = generate_catalog(30, seed=31)
    events = generate_events(600, catalog, n_users=60, seed=32)
    ensure_topics(bootstrap, {prefix + "events": 2, prefix + "catalog": 1, prefix + "recommendations": 2,
                              prefix + "dead-letters": 1})
    produce_records(clients, prefix + "catalog", [(c.item_id.encode(), encode(c)) for c in catalog])
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_cli", "run", "--events-topic", prefix + "events",
         "--catalog-topic", prefix + "catalog", "--recommendations-topic", prefix + "recommendations",
         "--dead-letters-topic", prefix + "dead-letters", "--bootstrap-servers", bootstrap,
         "--metrics-port", str(port), "--status-interval-s", "1", "--state-dir", str(tmp_path / "state"),
         "--recovery-dir", str(tmp_path / "recovery"), "--embed-cache-dir", str(tmp_path / "emb")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "RUST_BACKTRACE": "0"},
    )
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        for line in proc.stdout:
            if line.startswith("metrics:"):
                assert line.split()[1] == url
                break
        # the endpoint answers before any event
        assert total(scrape(url), "recsys_catalog_items") == len(catalog)
        records = [(e.user_id.encode(), encode(e)) for e in events] + [(b"u-bad", v) for v in BAD]
        produce_records(clients, prefix + "events", records)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            samples = scrape(url)
            if total(samples, "recsys_events_applied_total") == len(events) and \
                    total(samples, "recsys_dead_letters_total") == len(BAD):
                break
            time.sleep(0.5)
        time.sleep(1.5)  # one more status line and timer tick
        samples = scrape(url)
        recs = consume_all(clients, prefix + "recommendations")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    by_type = Counter(e.type for e in events)
    for event_type, n in by_type.items():
        assert total(samples, "recsys_events_in_total", type=event_type) == n, event_type
    assert total(samples, "recsys_records_consumed_total", topic=prefix + "events") == len(events) + len(BAD)
    assert total(samples, "recsys_events_applied_total") == len(events)
    assert total(samples, "recsys_recommendations_out_total") == len(recs) > 0
    assert total(samples, "recsys_dead_letters_total", reason="malformed_json") == 1
    assert total(samples, "recsys_dead_letters_total", reason="unknown_event_type") == 1
    assert total(samples, "recsys_dead_letters_total", reason="missing_field") == 1
    assert total(samples, "recsys_dead_letters_total", reason="unknown_item") == 0
    for partition in ("0", "1"):
        assert total(samples, "recsys_consumer_lag_records", topic=prefix + "events", partition=partition) == 0
    assert total(samples, "recsys_input_poll_interval_seconds_count", topic=prefix + "events") > 0
    assert 0 < total(samples, "recsys_input_poll_interval_max_seconds", topic=prefix + "events") < 30
    assert total(samples, "recsys_event_to_recommendation_seconds_count") == len(recs)
    assert 0 < total(samples, "recsys_event_to_recommendation_seconds_sum") < 60 * len(recs)
    assert total(samples, "recsys_batch_processing_seconds_count") > 0
    assert 0 < total(samples, "recsys_batch_phase_seconds_total", phase="rank") \
        < total(samples, "recsys_batch_phase_seconds_total") <= total(samples, "recsys_batch_processing_seconds_sum")
    assert total(samples, "recsys_state_users") == len({e.user_id for e in events})
    assert total(samples, "recsys_state_size_bytes") > 0
    assert total(samples, "recsys_process_resident_memory_bytes") > 100e6  # the model is loaded
    assert total(samples, "recsys_model_version", model="head") >= 0
    assert total(samples, "recsys_model_update_age_seconds", model="reranker") >= 0
    assert 0 <= total(samples, "recsys_rolling_hit_rate_ratio") <= 1
    status = [line for line in stderr if line.startswith("status:")]
    assert status and "events/s" in status[-1] and "lag" in status[-1] and "p99" in status[-1], stderr
    assert any("3 dead letters" in line or "(3 in all)" in line for line in status), status


@pytest.mark.slow
def test_each_shard_serves_its_own_port(local_broker, topic_name, tmp_path):
    """--processes 2: shard i serves on RECSYS_METRICS_PORT + i; together they count every event."""
    prefix = topic_name("m2") + "-"
    bootstrap = local_broker.bootstrap
    clients = KafkaClients.for_bootstrap(bootstrap)
    catalog = generate_catalog(20, seed=41)
    events = generate_events(300, catalog, n_users=40, seed=42)
    ensure_topics(bootstrap, {prefix + "events": 2, prefix + "catalog": 1, prefix + "recommendations": 2,
                              prefix + "dead-letters": 1})
    produce_records(clients, prefix + "catalog", [(c.item_id.encode(), encode(c)) for c in catalog])
    produce_records(clients, prefix + "events", [(e.user_id.encode(), encode(e)) for e in events])
    port = _free_port_pair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_cli", "run", "--processes", "2", "--events-topic", prefix + "events",
         "--catalog-topic", prefix + "catalog", "--recommendations-topic", prefix + "recommendations",
         "--dead-letters-topic", prefix + "dead-letters", "--bootstrap-servers", bootstrap, "--quiet",
         "--metrics-port", str(port), "--state-dir", str(tmp_path / "state"),
         "--recovery-dir", str(tmp_path / "recovery"), "--embed-cache-dir", str(tmp_path / "emb")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "RUST_BACKTRACE": "0"},
    )
    try:
        urls = set()
        for line in proc.stdout:
            if "metrics: " in line:  # each shard says where, after its catalog bootstrap
                urls.add(line.split("metrics: ")[1].strip())
            if len(urls) == 2:
                break
        assert urls == {f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{port + 1}/metrics"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            applied = [total(scrape(u), "recsys_events_applied_total") for u in sorted(urls)]
            if sum(applied) == len(events):
                break
            time.sleep(0.5)
        assert sum(applied) == len(events) and all(a > 0 for a in applied), applied
        shards = [total(scrape(u), "recsys_shard_info", shard=str(i), shards="2") for i, u in enumerate(sorted(urls))]
        assert shards == [1, 1]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _engine_data(tmp_path):
    """The plain attributes FlowMetrics reads from an engine (the real one is tested live above)."""
    from types import SimpleNamespace

    search = SimpleNamespace(base_stats={"hits": 0, "refreshed": 0, "misses": 0},
                             encoder=SimpleNamespace(stats={"hits": 0, "misses": 0}))
    return SimpleNamespace(waiting=[], deferred_records=0, queries_at_worker=0, items=SimpleNamespace(catalog={"i1": 1}), monitor=SimpleNamespace(hit_rate=0.25),
                           reranker=SimpleNamespace(examples=3), head=None, users=SimpleNamespace(count=lambda: 7),
                           search=search)


def test_search_s_caches_are_counted_by_outcome(tmp_path):
    """``recsys_search_cache_total{cache,outcome}`` from a real engine: a query's first search
    rebuilds its candidates and encodes its text, the next is a hit, and after a price change a
    refresh (the counts grow by what happened since the last tick)."""
    from recsys.events import CatalogItem, Envelope, Event
    from recsys.shard.step import Shard

    engine = Shard.open(Settings(state_dir=str(tmp_path / "state"), embed_cache_dir=str(tmp_path / "emb"),
                                 head_snapshot_interval_s=3600), in_memory=True)
    tent = CatalogItem("tent", "Blue dome tent", category="Camping", price=120.0)
    engine.upsert_catalog([tent, CatalogItem("mug", "Enamel coffee mug", category="Camping", price=12.0)])
    metrics = FlowMetrics(Settings(state_dir=str(tmp_path), quiet=True))

    def search(n: int) -> None:
        ev = Event(f"s{n}", "search", f"u{n}", None, 1_700_000_000_000 + n, query="tent")
        assert len(engine.process([Envelope("events", 0, n, ev.user_id.encode(), encode(ev), ev.ts)]).search_results) == 1

    def counts() -> dict[tuple[str, str], float]:
        return {(s.labels["cache"], s.labels["outcome"]): s.value for f in metrics.registry.collect()
                if f.name == "recsys_search_cache" for s in f.samples if s.name.endswith("_total")}

    search(0)
    search(1)
    metrics.tick(engine)
    # a batch encodes its new queries first, then each search reads its vector: a hit each
    assert counts() == {("candidates", "rebuilt"): 1, ("candidates", "hit"): 1,
                        ("query_vectors", "encoded"): 1, ("query_vectors", "hit"): 2}
    engine.upsert_catalog([CatalogItem("tent", "Blue dome tent", category="Camping", price=99.0)])
    search(2)
    metrics.tick(engine)
    metrics.tick(engine)  # nothing new: nothing added
    assert counts() == {("candidates", "rebuilt"): 1, ("candidates", "hit"): 1, ("candidates", "refreshed"): 1,
                        ("query_vectors", "encoded"): 1, ("query_vectors", "hit"): 3}
    engine.close()


def test_the_users_gauge_takes_off_the_users_swept_and_erased(tmp_path):
    """``recsys_state_users`` added the users first seen and never took any off: the expiry
    sweep's and the erasures' deletions left it growing until a restart counted again (an
    operator's probe, 2026-12-07). An erasure of a user the state never held takes nothing off."""
    import orjson

    from recsys.events import CatalogItem, Envelope, Event
    from recsys.shard.step import Shard

    day = 86_400_000
    engine = Shard.open(Settings(state_dir=str(tmp_path / "state"), embed_cache_dir=str(tmp_path / "emb"),
                                 head_enabled=False, state_ttl_days=1.0))
    engine.upsert_catalog([CatalogItem("tent", "Blue dome tent"), CatalogItem("mug", "Enamel coffee mug")])
    metrics = FlowMetrics(Settings(state_dir=str(tmp_path), quiet=True))
    offset = iter(range(1000))

    def batch(*envs: Envelope) -> None:
        metrics.batch(engine, list(envs), engine.process(list(envs)), 0.01)

    def click(user: str, ts: int) -> Envelope:
        ev = Event(f"e{user}{ts}", "click", user, "tent", ts)
        return Envelope("events", 0, next(offset), user.encode(), encode(ev), ts)

    def forget(user: str) -> Envelope:
        return Envelope("control", 0, next(offset), None, orjson.dumps({"type": "forget_user", "user_id": user}),
                        1_800_000_000_000)

    def users() -> float:
        return next(s.value for f in metrics.registry.collect() for s in f.samples if s.name == "recsys_state_users")

    try:
        metrics.tick(engine)
        batch(*(click(u, 1_700_000_000_000) for u in ("u1", "u2", "u3")))
        assert users() == 3 == engine.users.count()
        batch(forget("u1"), forget("nobody"))
        assert users() == 2 == engine.users.count()
        for _ in range(3):  # two days later: the sweep's pass deletes u2 and u3
            batch(click("u4", 1_700_000_000_000 + 2 * day))
        assert users() == engine.users.count() == 1
    finally:
        engine.close()


@pytest.mark.parametrize("quiet", [False, True])
def test_a_status_line_every_interval_on_stderr_unless_quiet(tmp_path, quiet):
    import io

    from recsys.events import Envelope
    from recsys.shard.step import BatchResult

    now = [1000.0]
    out = io.StringIO()
    metrics = FlowMetrics(Settings(state_dir=str(tmp_path), status_interval_s=5.0, quiet=quiet), status=out,
                          clock=lambda: now[0])
    engine = _engine_data(tmp_path)
    result = BatchResult(recommendations=[("u1", b"{}")], dead_letters=[(None, orjson.dumps({"reason": "payload: empty message"}))])
    result.counts.update(events_in=10, applied=9)
    envelopes = [Envelope("events", 0, i, b"u1", b"{}", timestamp_ms=int(now[0] * 1000) - 40) for i in range(10)]
    metrics.batch(engine, envelopes, result, 0.01)
    now[0] += 4.0
    metrics.tick(engine)
    assert out.getvalue() == ""  # not due yet
    now[0] += 1.0
    metrics.tick(engine)
    lines = out.getvalue().splitlines()
    if quiet:
        assert lines == []
    else:
        assert lines == ["status: 2 events/s, lag 0, p99 40 ms (append -> recommendation), 1 dead letters (1 in all), "
                         "1 recommendations timed"]


def test_a_slow_batch_is_logged_with_its_phases_at_most_once_a_second(tmp_path):
    """``RECSYS_SLOW_BATCH_MS``: a batch that took longer gets one line naming where its time went,
    longest phase first; more slow batches within the second are counted in the next line; a
    batch under the threshold, a threshold of 0 and ``--quiet`` print nothing."""
    import io

    from recsys.events import Envelope
    from recsys.shard.step import BatchResult

    now = [1000.0]
    out = io.StringIO()
    metrics = FlowMetrics(Settings(state_dir=str(tmp_path), slow_batch_ms=100), status=out, clock=lambda: now[0])
    engine = _engine_data(tmp_path)
    envelopes = [Envelope("events", 0, i, b"u1", b"{}", timestamp_ms=int(now[0] * 1000)) for i in range(40)]

    def batch(seconds: float, **phases: float) -> None:
        result = BatchResult(phase_seconds=phases)
        result.counts.update(applied=38)
        metrics.batch(engine, envelopes, result, seconds)

    batch(0.09, rank=0.08)  # under the threshold
    batch(0.25, decode=0.002, rank=0.06, head=0.15, commit=0.0004)
    now[0] += 0.5
    batch(0.3, rank=0.3)  # within the second: counted, not printed
    batch(0.2, rank=0.2)
    now[0] += 0.6
    batch(0.12, commit=0.11)
    assert out.getvalue().splitlines() == [
        "slow batch: 250 ms for 40 records (38 applied, 0 recommendations): head 150 ms, rank 60 ms, decode 2 ms, "
        "other 38 ms",
        "slow batch: 120 ms for 40 records (38 applied, 0 recommendations): commit 110 ms, other 10 ms "
        "(2 more slow batches since the last line)",
    ]
    phases = {s.labels["phase"]: s.value for f in metrics.registry.collect() if f.name == "recsys_batch_phase_seconds"
              for s in f.samples if s.name.endswith("_total")}
    assert phases["rank"] == pytest.approx(0.64) and phases["head"] == pytest.approx(0.15) and phases["models"] == 0
    for settings in (Settings(state_dir=str(tmp_path), slow_batch_ms=0), Settings(state_dir=str(tmp_path), quiet=True)):
        silent = io.StringIO()
        FlowMetrics(settings, status=silent, clock=lambda: now[0]).batch(engine, envelopes, BatchResult(), 5.0)
        assert silent.getvalue() == ""


def test_a_metrics_port_in_use_is_one_clear_line_not_a_traceback(local_broker, topic_name, tmp_path):
    """Another process holds the metrics port: `recsys run` says which port and what to do, in
    one line, and exits 1 (it raised OSError from the HTTP server's bind before, a traceback)."""
    prefix = topic_name("mp") + "-"
    bootstrap = local_broker.bootstrap
    ensure_topics(bootstrap, {prefix + "events": 1, prefix + "catalog": 1, prefix + "recommendations": 1,
                              prefix + "dead-letters": 1})
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "recsys_cli", "run", "--events-topic", prefix + "events",
             "--catalog-topic", prefix + "catalog", "--recommendations-topic", prefix + "recommendations",
             "--dead-letters-topic", prefix + "dead-letters", "--bootstrap-servers", bootstrap,
             "--metrics-port", str(port), "--state-dir", str(tmp_path / "state"),
             "--recovery-dir", str(tmp_path / "recovery"), "--embed-cache-dir", str(tmp_path / "emb")],
            cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "RUST_BACKTRACE": "0"},
        )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert f"metrics: cannot serve on 127.0.0.1:{port} (RECSYS_METRICS_PORT {port})" in out, out
    assert "choose another --metrics-port" in out and "Traceback" not in out, out
