"""The catalog is a table bootstrapped before any event (issue 10, defect 1), on the real broker.

A shop's topics already hold the catalog and a backlog of events when ``recsys run`` starts
with an empty state directory and no catalog file: every event must find its item, so no
event is dead-lettered as "unknown item". Before the fix the flow merged both topics in no set
order, so events read before the catalog record of their item were dead-lettered: ~10 % here,
~80 % with a 5,000-item catalog. The test makes the catalog take several polls cheaply with a
small ``--poll-max-records`` (a big catalog takes several fetches the same way).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from dataflows.kafka_io import KafkaClients, consume_all, ensure_topics, produce_records
from recsys.events import encode
from recsys.synthetic import generate_catalog, generate_events

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
    produce_records(clients, prefix + "catalog", [(c.item_id.encode(), encode(c)) for c in catalog])
    produce_records(clients, prefix + "events", [(e.user_id.encode(), encode(e)) for e in events])
    return catalog, events


def _run(bootstrap: str, prefix: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dataflows.cli", "run", "--stop-at-end", *_topics(prefix), *extra,
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
    _, events = _publish_catalog_then_events(local_broker.bootstrap, prefix, partitions=2)
    done = _run(local_broker.bootstrap, prefix, tmp_path, "--processes", str(processes))
    assert done.returncode == 0, done.stdout + done.stderr
    dead = consume_all(KafkaClients.for_bootstrap(local_broker.bootstrap), prefix + "dead-letters")
    reasons = [orjson.loads(d.value)["reason"] for d in dead]
    assert [r for r in reasons if "unknown item" in r] == []
    totals = _totals(done.stdout)
    assert totals["applied"] == len(events) and totals.get("dead_letters", 0) == 0, done.stdout
