"""The local Tansu broker: start, readiness, stop, CLI, and how it agrees with the in-memory broker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from dataflows.kafka_io import (
    KafkaClients,
    KafkaSource,
    consume_all,
    ensure_topics,
    produce_records,
)
from dataflows.testing.memory_broker import InMemoryBroker
from recsys_cli.local_broker import LocalBroker, LocalBrokerError

pytestmark = [pytest.mark.broker, pytest.mark.processes]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_started_broker_serves_metadata_on_its_bootstrap() -> None:
    with LocalBroker(topics={"events": 3}) as broker:
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
        try:
            assert consumer.partitions_for_topic("events") == {0, 1, 2}
        finally:
            consumer.close()


def test_stop_kills_the_broker_even_with_a_client_connected() -> None:
    broker = LocalBroker().start()
    pid, port = broker.pid, broker.port
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)  # keeps it from exiting on SIGTERM
    try:
        consumer.topics()
        broker.stop()
        assert not _pid_alive(pid)
        assert not _port_open(port)
        assert broker.pid is None
    finally:
        consumer.close()


def test_start_on_a_taken_port_says_so_before_starting_a_broker() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = LocalBroker(port, startup_timeout_s=5)
        with pytest.raises(LocalBrokerError, match=f"127.0.0.1:{port} is already in use"):
            broker.start()
    assert not broker.running and broker.pid is None


def test_highwater_counts_every_record_across_produce_batches(kafka_clients: KafkaClients, topic_name) -> None:
    topic = topic_name("hw")
    ensure_topics(kafka_clients, {topic: 1})
    for start in range(0, 9, 3):  # three separate batches
        produce_records(kafka_clients, topic, [(None, str(i).encode()) for i in range(start, start + 3)])
    consumer = kafka_clients.consumer()
    tp = TopicPartition(topic, 0)
    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        deadline = time.monotonic() + 5
        while consumer.highwater(tp) is None and time.monotonic() < deadline:
            consumer.poll(timeout_ms=50)
        assert consumer.highwater(tp) == 9
    finally:
        consumer.close()


def test_stop_at_end_source_reads_every_batch_on_the_real_broker(kafka_clients: KafkaClients, topic_name) -> None:
    topic = topic_name("batches")
    ensure_topics(kafka_clients, {topic: 1})
    for start in range(0, 12, 4):
        produce_records(kafka_clients, topic, [(None, str(i).encode()) for i in range(start, start + 4)])
    source = KafkaSource(kafka_clients, topic, poll_max_records=5, stop_at_end=True)
    part = source.build_part("in", source.list_parts()[0], None)
    got = []
    with pytest.raises(StopIteration):
        for _ in range(10_000):
            got.extend(part.next_batch())
    assert [e.offset for e in got] == list(range(12))


def test_memory_broker_routes_keys_to_the_real_brokers_partitions(kafka_clients: KafkaClients, topic_name) -> None:
    topic = topic_name("route")
    memory = InMemoryBroker()
    records = [(f"user-{i}", b"v") for i in range(40)]
    for target in (kafka_clients, memory):
        ensure_topics(target, {topic: 4})
        produce_records(target, topic, records)
    real = {e.key: e.partition for e in consume_all(kafka_clients, topic, timeout_s=10)}
    assert real == {e.key: e.partition for e in memory.records(topic)}
    assert len(set(real.values())) > 1


def test_ensure_topics_leaves_existing_topics_alone(local_broker: LocalBroker, topic_name) -> None:
    topic = topic_name("twice")
    assert ensure_topics(local_broker.bootstrap, {topic: 2}) == [topic]
    assert ensure_topics(local_broker.bootstrap, {topic: 2}) == []


def test_module_main_runs_until_interrupted() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_cli.local_broker", "--port", "0", "--topic", "demo:2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a test run started in the background (`pytest &`) ignores SIGINT, and children inherit
        # that: give the broker the default disposition a terminal's Ctrl-C would meet
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = proc.stdout.readline()
        assert "on 127.0.0.1:" in line, line + proc.stderr.read()
        bootstrap = line.split(" on ", 1)[1].split(",")[0]
        broker_pid = int(line.split("pid ", 1)[1].split(";")[0])
        consumer = KafkaConsumer(bootstrap_servers=bootstrap)
        try:
            assert consumer.partitions_for_topic("demo") == {0, 1}
        finally:
            consumer.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not _pid_alive(broker_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
