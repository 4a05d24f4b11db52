"""Faults on the Kafka side, on the real local broker: what an operator's bad day looks like.

- a poison message far larger than any producer limit (2 MB, 10 MB) is dead-lettered with a
  bounded payload, and the flow goes on;
- a partition whose log no longer holds the offset the flow recovered (topic re-created,
  retention, broker data loss) stops the flow with a message naming the topic, partition and
  both offsets, unless ``--on-offset-reset earliest|latest`` says how to go on;
- state behind (or missing while) the recovery offsets is refused at start, and
  ``--rebuild-state`` rebuilds it from the earliest offset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import orjson
import pytest

from dataflows.kafka_io import KafkaClients, consume_all, ensure_topics, produce_records
from dataflows.live import live_flow
from dataflows.runner import run
from recsys.engine import Engine
from recsys.events import DEAD_LETTER_PAYLOAD_BYTES, encode
from recsys.schemas import validate
from recsys.settings import Settings
from recsys.synthetic import generate_catalog, generate_events


@pytest.fixture(scope="module")
def catalog():
    return generate_catalog(60, seed=11)


@pytest.fixture(scope="module")
def embed_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("embeddings"))


def _settings(local_broker, tmp_path: Path, embed_cache: str, prefix: str, **kw) -> Settings:
    return Settings(
        bootstrap_servers=local_broker.bootstrap,
        events_topic=prefix + "events",
        catalog_topic=prefix + "catalog",
        recommendations_topic=prefix + "recommendations",
        dead_letters_topic=prefix + "dead-letters",
        state_dir=str(tmp_path / "state"),
        recovery_dir=str(tmp_path / "recovery"),
        embed_cache_dir=embed_cache,
        stop_at_end=True,
        poll_max_records=200,
        snapshot_interval_s=0.5,
        **kw,
    )


def _topics(clients: KafkaClients, s: Settings, events_partitions: int = 1) -> None:
    ensure_topics(clients, {s.events_topic: events_partitions, s.catalog_topic: 1, s.recommendations_topic: 1, s.dead_letters_topic: 1})


def _run(clients: KafkaClients, settings: Settings) -> dict:
    """One life of the live flow in this process, until the end of input; its totals."""
    engine = Engine.open(settings)
    try:
        run(live_flow(settings, clients, engine=engine), recovery_dir=settings.recovery_dir, snapshot_interval_s=settings.snapshot_interval_s)
        return dict(engine.totals)
    finally:
        engine.close()


def _records(events: Iterable) -> list[tuple[bytes, bytes]]:
    return [(e.user_id.encode(), encode(e)) for e in events]


# ------------------------------------------------------------------ defect 1: poison message


@pytest.mark.slow
def test_a_2mb_and_a_10mb_poison_message_are_dead_lettered_and_the_flow_goes_on(
    local_broker, tmp_path, embed_cache, catalog, topic_name
):
    settings = _settings(local_broker, tmp_path, embed_cache, topic_name("poison") + "-")
    clients = KafkaClients(settings)
    _topics(clients, settings)
    produce_records(clients, settings.catalog_topic, [(c.item_id.encode(), encode(c)) for c in catalog])
    events = generate_events(300, catalog, n_users=30, seed=12)
    poison = {2 * 2**20: b'{"event_id": "p1", "x": "' + b"a" * (2 * 2**20 - 27) + b'"}',
              10 * 2**20: b"\x00\xff" * (5 * 2**20)}
    # the upstream producer (and the broker, which Tansu does not limit) accept up to 16 MB here
    big = KafkaClients(settings.replace()).producer(max_request_size=16 * 2**20)
    try:
        for e in events[:100]:
            big.send(settings.events_topic, key=e.user_id.encode(), value=encode(e))
        for payload in poison.values():
            big.send(settings.events_topic, key=b"u-poison", value=payload)
        for e in events[100:]:
            big.send(settings.events_topic, key=e.user_id.encode(), value=encode(e))
        big.flush()
    finally:
        big.close()

    totals = _run(clients, settings)  # on the old dead letter format: MessageSizeTooLargeError

    assert totals["applied"] == len(events) and totals["dead_letters"] == 2
    dead = [orjson.loads(d.value) for d in consume_all(clients, settings.dead_letters_topic, timeout_s=30)]
    assert len(dead) == 2
    for letter, (size, payload) in zip(dead, poison.items()):
        assert validate("dead_letter", letter) == []
        assert "oversized" in letter["reason"]
        assert letter["payload_truncated"] is True and letter["payload_size"] == size
        assert letter["payload_sha256"] == hashlib.sha256(payload).hexdigest()
        assert len(letter["payload_b64"]) <= 4 * DEAD_LETTER_PAYLOAD_BYTES // 3 + 4
        assert letter["source"]["topic"] == settings.events_topic
    recs = consume_all(clients, settings.recommendations_topic, timeout_s=30)
    assert {orjson.loads(r.value)["user_id"] for r in recs} == {e.user_id for e in events}
