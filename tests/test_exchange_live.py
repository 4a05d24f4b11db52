"""Live sharing on the real local broker: two shard processes exchange their signal operations
through the exchange topic and end with identical global signals (issue 11)."""

from __future__ import annotations

import dataclasses
import re
import signal
import time

import orjson
import pytest
from test_operating import READY_TIMEOUT_S, RECSYS, Child, _stream, _totals, _wait_applied, children  # noqa: F401

from dataflows.kafka_io import KafkaClients, consume_all
from recsys.events import encode
from recsys.signals.exchange import decode_message
from recsys.synthetic import generate_catalog, generate_events

pytestmark = pytest.mark.processes


@pytest.mark.slow
def test_two_sharing_shard_processes_end_with_identical_signal_checksums(local_broker, topic_name, tmp_path, children):
    prefix = topic_name("share") + "-"
    n, flags = _stream(local_broker.bootstrap, prefix, tmp_path, n_users=40)
    exchange_topic = prefix + "exchange"
    supervisor = Child([*RECSYS, "run", "--processes", "2", "--share-signals", "--exchange-topic", exchange_topic, *flags])
    children.append(supervisor)
    supervisor.wait_for("ready: 2 shard processes", 2 * READY_TIMEOUT_S)
    _wait_applied(local_broker.bootstrap, prefix + "recommendations")
    clients = KafkaClients.for_bootstrap(local_broker.bootstrap)
    # drained: every event applied, and the exchange log has stopped growing for a while
    deadline, last, still_since = time.monotonic() + 120, -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(consume_all(clients, exchange_topic, timeout_s=5))
        if count != last:
            last, still_since = count, time.monotonic()
        elif count and time.monotonic() - still_since > 4:
            break
        time.sleep(0.5)
    code, _ = supervisor.stop_with(signal.SIGTERM, timeout_s=30)
    assert code == 0, supervisor.output
    assert _totals(supervisor.lines[-1])["applied"] == n, supervisor.output
    sums = re.findall(r"\[shard (\d)\] global signals: sha256=([0-9a-f]{64}) at exchange position (\d+)", supervisor.output)
    assert len(sums) == 2, supervisor.output
    assert sums[0][1:] == sums[1][1:], supervisor.output  # same bytes at the same log position
    log = consume_all(clients, exchange_topic, timeout_s=5)
    origins = {decode_message(env.value).origin for env in log}
    assert origins == {0, 1} and int(sums[0][2]) == len(log) - 1  # both shards published; both applied it all


@pytest.mark.slow
def test_two_shards_served_by_a_model_trainer_process(local_broker, topic_name, tmp_path, children):
    """``--model-trainer``: the supervisor starts a trainer beside the shards; the trainer learns the
    log and publishes model snapshots, the shards load them (their recommendations name the
    snapshot's version) and still end with identical signals; the trainer stops after them."""
    from recsys.signals.trainer import newest_model_snapshot

    prefix = topic_name("trainer") + "-"
    n, flags = _stream(local_broker.bootstrap, prefix, tmp_path, n_users=150)  # enough for head steps
    exchange_topic = prefix + "exchange"
    snapshots = tmp_path / "snapshots"
    supervisor = Child([*RECSYS, "run", "--processes", "2", "--share-signals", "--model-trainer", "--exchange-topic",
                        exchange_topic, "--exchange-snapshot-dir", str(snapshots), "--trainer-publish-s", "0.2",
                        "--poll-max-records", "60", *flags])  # many batches: re-ranker steps from what was shown
    children.append(supervisor)
    supervisor.wait_for("ready: 2 shard processes", 2 * READY_TIMEOUT_S)
    ready_by = time.monotonic() + 2 * READY_TIMEOUT_S  # its line may come before or after the shards'
    while not any(line.startswith("[trainer] ready: model trainer") for line in supervisor.lines):
        assert time.monotonic() < ready_by and supervisor.proc.poll() is None, supervisor.output
        time.sleep(0.2)
    _wait_applied(local_broker.bootstrap, prefix + "recommendations")
    clients = KafkaClients.for_bootstrap(local_broker.bootstrap)
    deadline, last, still_since = time.monotonic() + 120, -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(consume_all(clients, exchange_topic, timeout_s=5))
        snap = newest_model_snapshot(snapshots, exchange_topic)
        if count != last:
            last, still_since = count, time.monotonic()
        elif count and snap is not None and time.monotonic() - still_since > 4:
            break
        time.sleep(0.5)
    # events after a snapshot was published: the shards answer them with the trainer's models
    snap = newest_model_snapshot(snapshots, exchange_topic)
    assert snap is not None and snap.position >= 0, supervisor.output
    later = [e for e in generate_events(60, generate_catalog(30, seed=7), n_users=150, seed=9)]
    later = [dataclasses.replace(e, event_id="late-" + e.event_id, ts=e.ts + 10**9) for e in later]
    producer = clients.producer()
    for e in later:
        producer.send(prefix + "events", key=e.user_id.encode(), value=encode(e))
    producer.flush()
    producer.close()
    triggers = {e.event_id for e in {e.user_id: e for e in later}.values()}
    deadline, answered = time.monotonic() + 120, {}
    while time.monotonic() < deadline and not triggers <= answered.keys():
        for env in consume_all(clients, prefix + "recommendations", timeout_s=5):
            rec = orjson.loads(env.value)
            answered[rec["trigger_event_id"]] = rec["model_version"]
        time.sleep(0.5)
    assert triggers <= answered.keys(), supervisor.output
    served = {int(answered[t].rpartition("@x")[2]) for t in triggers}
    assert min(served) >= snap.position >= 0, (served, snap)  # named by the snapshot's log position
    code, _ = supervisor.stop_with(signal.SIGTERM, timeout_s=60)
    assert code == 0, supervisor.output
    assert _totals(supervisor.lines[-1])["applied"] == n + len(later), supervisor.output
    sums = re.findall(r"\[shard (\d)\] global signals: sha256=([0-9a-f]{64}) at exchange position (\d+)", supervisor.output)
    assert len(sums) == 2 and sums[0][1:] == sums[1][1:], supervisor.output
    log = consume_all(clients, exchange_topic, timeout_s=5)
    trainer_stop = re.search(r"\[trainer\] stopped: trainer_learned=(\d+), trainer_publications=(\d+), "
                             r"trainer_position=(-?\d+)", supervisor.output)
    assert trainer_stop, supervisor.output
    learned, publications, position = map(int, trainer_stop.groups())
    assert learned == len(log) and position == len(log) - 1 and publications >= 1  # every message learned once
    assert newest_model_snapshot(snapshots, exchange_topic).position <= position
