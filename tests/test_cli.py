"""The command line against the real local broker: produce, tail, and the Bytewax entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from dataflows.cli import main
from dataflows.kafka_io import KafkaClients, consume_all, ensure_topics
from dataflows.memory_broker import partition_for_key
from recsys.events import encode
from recsys.synthetic import generate_catalog, generate_events

ROOT = Path(__file__).resolve().parents[1]


def test_produce_sends_a_jsonl_file_keyed_by_user(local_broker, topic_name, tmp_path):
    topic = topic_name("events")
    ensure_topics(local_broker.bootstrap, {topic: 3})
    events = generate_events(200, generate_catalog(20, seed=1), n_users=15, seed=2)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(encode(e) for e in events) + b"\n")
    assert main(["produce", str(path), "--topic", topic, "--bootstrap-servers", local_broker.bootstrap]) == 0
    records = consume_all(KafkaClients.for_bootstrap(local_broker.bootstrap), topic)
    assert len(records) == 200
    for r in records:  # keyed by user, so each user's events share a partition, in order
        assert r.key == orjson.loads(r.value)["user_id"].encode()
        assert r.partition == partition_for_key(r.key, 3)


def test_tail_prints_recommendations_readably(local_broker, topic_name, capsys):
    topic = topic_name("recs")
    ensure_topics(local_broker.bootstrap, {topic: 1})
    rec = {"schema_version": 1, "user_id": "u1", "items": [{"item_id": "i9", "score": 0.5, "reason": "trending"}],
           "trigger_event_id": "e1", "model_version": "blend-v1", "event_ts": 1, "emitted_at": 2}
    producer = KafkaClients.for_bootstrap(local_broker.bootstrap).producer()
    producer.send(topic, key=b"u1", value=orjson.dumps(rec))
    producer.flush()
    producer.close()
    assert main(["tail", "--recommendations-topic", topic, "--bootstrap-servers", local_broker.bootstrap]) == 0
    out = capsys.readouterr().out
    assert "user u1 (after e1, blend-v1): i9 0.50 [trending]" in out


def _published_stream(bootstrap: str, prefix: str, tmp_path: Path, *, partitions: int, seed: int, n_users: int):
    """A catalog file and the four ``prefix``-ed topics, with synthetic events keyed by user in
    ``<prefix>events`` (``partitions`` partitions); returns the events and the catalog file."""
    catalog = generate_catalog(30, seed=seed)
    events = generate_events(10 * n_users, catalog, n_users=n_users, seed=seed + 1)
    catalog_file = tmp_path / "catalog.jsonl"
    catalog_file.write_bytes(b"\n".join(encode(c) for c in catalog) + b"\n")
    ensure_topics(bootstrap, {prefix + "events": partitions, prefix + "catalog": 1,
                              prefix + "recommendations": partitions, prefix + "dead-letters": 1})
    producer = KafkaClients.for_bootstrap(bootstrap).producer()
    for e in events:
        producer.send(prefix + "events", key=e.user_id.encode(), value=encode(e))
    producer.flush()
    producer.close()
    return events, catalog_file


def test_bytewax_run_entry_point_runs_the_live_flow(local_broker, topic_name, tmp_path):
    """`python -m bytewax.run dataflows.live:live_flow` with settings from the environment."""
    prefix = topic_name("bw") + "-"
    events, catalog_file = _published_stream(local_broker.bootstrap, prefix, tmp_path, partitions=1, seed=3, n_users=20)
    env = {
        **os.environ,
        "RECSYS_BOOTSTRAP_SERVERS": local_broker.bootstrap,
        "RECSYS_EVENTS_TOPIC": prefix + "events",
        "RECSYS_CATALOG_TOPIC": prefix + "catalog",
        "RECSYS_RECOMMENDATIONS_TOPIC": prefix + "recommendations",
        "RECSYS_DEAD_LETTERS_TOPIC": prefix + "dead-letters",
        "RECSYS_STATE_DIR": str(tmp_path / "state"),
        "RECSYS_EMBED_CACHE_DIR": str(tmp_path / "emb"),
        "RECSYS_CATALOG_FILE": str(catalog_file),
        "RECSYS_STOP_AT_END": "true",
        "HF_HUB_OFFLINE": "1",
    }
    subprocess.run(
        [sys.executable, "-m", "bytewax.run", "dataflows.live:live_flow"], env=env, cwd=ROOT, check=True, timeout=300,
        capture_output=True,
    )
    recs = consume_all(KafkaClients.for_bootstrap(local_broker.bootstrap), prefix + "recommendations")
    assert {orjson.loads(r.value)["user_id"] for r in recs} == {e.user_id for e in events}


def test_run_with_two_processes_splits_the_users_between_two_shards(local_broker, topic_name, tmp_path):
    """`recsys run --processes 2`: two shard processes, each with its own partition, users, state."""
    prefix = topic_name("sh") + "-"
    events, catalog_file = _published_stream(local_broker.bootstrap, prefix, tmp_path, partitions=2, seed=5, n_users=40)
    topics = ["--events-topic", prefix + "events", "--catalog-topic", prefix + "catalog",
              "--recommendations-topic", prefix + "recommendations", "--dead-letters-topic", prefix + "dead-letters"]
    done = subprocess.run(
        [sys.executable, "-m", "dataflows.cli", "run", "--processes", "2", "--stop-at-end", *topics,
         "--bootstrap-servers", local_broker.bootstrap, "--state-dir", str(tmp_path / "state"),
         "--recovery-dir", str(tmp_path / "recovery"), "--embed-cache-dir", str(tmp_path / "emb"),
         "--catalog-file", str(catalog_file)],
        cwd=ROOT, check=True, timeout=300, capture_output=True, text=True,
    )
    lines = done.stdout.splitlines()
    assert any(line.startswith("ready: 2 shard processes") for line in lines), done.stdout
    shard_totals = [line for line in lines if line.startswith("[shard ") and "stopped:" in line]
    assert len(shard_totals) == 2
    n = len(events)
    assert lines[-1].startswith("stopped:") and f"applied={n}," in lines[-1] and f"events_in={n}," in lines[-1]
    # every user is answered, by the shard that owns the user's partition
    owner = {e.user_id: partition_for_key(e.user_id.encode(), 2) for e in events}
    assert len(set(owner.values())) == 2
    recs = consume_all(KafkaClients.for_bootstrap(local_broker.bootstrap), prefix + "recommendations")
    assert {orjson.loads(r.value)["user_id"] for r in recs} == set(owner)
    for i in (0, 1):
        assert (tmp_path / "state" / f"shard-{i}").is_dir() and (tmp_path / "recovery" / f"shard-{i}").is_dir()
        mine = sum(1 for p in owner.values() if p == i)
        assert f"[shard {i}] ready:" in done.stdout
        assert any(line.startswith(f"[shard {i}] stopped:") for line in shard_totals)
        assert mine > 0


def test_run_refuses_more_processes_than_events_partitions(local_broker, topic_name, tmp_path):
    prefix = topic_name("sh1") + "-"
    ensure_topics(local_broker.bootstrap, {prefix + t: 1 for t in ("events", "catalog", "recommendations", "dead-letters")})
    done = subprocess.run(
        [sys.executable, "-m", "dataflows.cli", "run", "--processes", "2", "--stop-at-end",
         "--events-topic", prefix + "events", "--catalog-topic", prefix + "catalog",
         "--recommendations-topic", prefix + "recommendations", "--dead-letters-topic", prefix + "dead-letters",
         "--bootstrap-servers", local_broker.bootstrap, "--state-dir", str(tmp_path / "state"),
         "--recovery-dir", str(tmp_path / "recovery"), "--embed-cache-dir", str(tmp_path / "emb")],
        cwd=ROOT, timeout=300, capture_output=True, text=True,
    )
    assert done.returncode != 0
    assert "shard 1 of 2 would read none" in done.stderr and "at least 2 partitions" in done.stderr


def test_a_sigint_inside_a_source_call_counts_as_a_stop_and_other_errors_do_not():
    from bytewax.errors import BytewaxRuntimeError

    from dataflows.cli import _interrupted

    def raised(inner: BaseException) -> BytewaxRuntimeError:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise BytewaxRuntimeError("error calling `StatefulSourcePartition.next_batch`") from exc
        except BytewaxRuntimeError as outer:
            return outer

    assert _interrupted(raised(KeyboardInterrupt()))
    assert _interrupted(BytewaxRuntimeError("signal received"))
    assert not _interrupted(raised(ValueError("topic 'events' has 1 partition(s)")))
