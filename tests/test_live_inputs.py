"""The live flow's partitions are never held at an epoch boundary by another input's clock.

Bytewax keeps an epoch clock per input partition, started when the partition is built, and a
partition that has closed an epoch is not polled again until every partition of every input has
closed it too (the boundary is its backpressure). Separate inputs are built at different moments
(a Kafka consumer connecting takes tens of ms) and their clocks drift further apart at every
epoch: on the local broker at 20 events/s the events partitions went unpolled for 150 ms at every
2-second epoch close at first, 390 ms after 100 s (README, Performance). The live flow now reads
all its partitions as one input (:class:`dataflows.flow.Inputs`), whose partitions close their
epochs together.

The first test wires :func:`dataflows.flow.build_flow` with sources whose partitions record when
they are polled, the second partition built 0.3 s after the first (a slow connect), and checks
that no partition goes unpolled for long while the flow runs several epochs.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.testing import TestingSink, run_main

from dataflows.flow import build_flow
from dataflows.kafka_io import ensure_topics
from dataflows.live import live_flow
from recsys.settings import Settings
from recsys.shard.step import Shard

POLL_S = 0.01
EPOCH_S = 0.4
RUN_S = 2.6
SLOW_BUILD_S = 0.3


class _Polled(StatefulSourcePartition[object, None]):
    """Returns nothing, asks to be polled every 10 ms, and records when it was; ends after RUN_S."""

    def __init__(self, name: str, polls: dict[str, list[float]], until: float) -> None:
        self.name, self.polls, self.until = name, polls, until

    def next_batch(self) -> list[object]:
        now = time.monotonic()
        if now > self.until:
            raise StopIteration()
        self.polls.setdefault(self.name, []).append(now)
        return []

    def next_awake(self) -> datetime:
        return datetime.now(timezone.utc) + timedelta(seconds=POLL_S)

    def snapshot(self) -> None:
        return None


class _Source(FixedPartitionedSource[object, None]):
    def __init__(self, name: str, polls: dict[str, list[float]], builds: list[str], until: list[float]) -> None:
        self.name, self.polls, self.builds, self.until = name, polls, builds, until

    def list_parts(self) -> list[str]:
        return [self.name]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _Polled:
        if self.builds:  # the second partition built connects slowly
            time.sleep(SLOW_BUILD_S)
        self.builds.append(for_part)
        if not self.until:
            self.until.append(time.monotonic() + RUN_S)
        return _Polled(for_part, self.polls, self.until[0])


def _no_engine() -> Shard:
    raise AssertionError("no item reaches the step in this test")


def test_no_partition_waits_for_another_inputs_epoch_clock() -> None:
    polls: dict[str, list[float]] = {}
    builds: list[str] = []
    until: list[float] = []
    flow = build_flow(
        "inputs_test",
        events=_Source("events#0", polls, builds, until),
        catalog=_Source("catalog#0", polls, builds, until),
        recommendations=TestingSink([]),
        dead_letters=TestingSink([]),
        shard_factory=_no_engine,
    )
    run_main(flow, epoch_interval=timedelta(seconds=EPOCH_S))
    assert sorted(polls) == ["catalog#0", "events#0"], polls
    for name, times in polls.items():
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(times) > RUN_S / POLL_S / 4, (name, len(times))
        # Separate inputs: the partition built first is not polled for ~SLOW_BUILD_S at every
        # epoch boundary (its clock runs ahead of the other's and it waits for it).
        assert max(gaps) < SLOW_BUILD_S / 2, (
            f"partition {name} went {max(gaps) * 1000:.0f} ms without a poll: held at an epoch boundary "
            f"by another input's clock")


def test_inputs_refuses_two_sources_with_the_same_partition_name() -> None:
    from dataflows.flow import Inputs

    polls: dict[str, list[float]] = {}
    both = Inputs([_Source("x#0", polls, [], []), _Source("x#0", polls, [], [])])
    with pytest.raises(ValueError, match="'x#0'"):
        both.list_parts()


def test_the_live_flow_reads_every_topic_as_one_input(memory_broker, tmp_path) -> None:
    settings = Settings(state_dir=str(tmp_path / "state"), recovery_dir=str(tmp_path / "recovery"),
                        embed_cache_dir=str(tmp_path / "emb"), stop_at_end=False)
    ensure_topics(memory_broker, {settings.events_topic: 2, settings.catalog_topic: 1,
                                  settings.recommendations_topic: 2, settings.dead_letters_topic: 1})
    engine = Shard.open(settings)
    try:
        flow = live_flow(settings, memory_broker, engine=engine, stop=threading.Event())
        inputs = [step for step in flow.substeps if hasattr(step, "source")]
        assert len(inputs) == 1, [step.step_id for step in inputs]
        parts = inputs[0].source.list_parts()
        for topic in (settings.events_topic, settings.catalog_topic, settings.control_topic):
            assert any(p.startswith(topic + "#") for p in parts), (topic, parts)
    finally:
        engine.close()


def _until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_partition_added_while_the_flow_runs_stops_it_in_order_and_the_next_start_reads_it(
        memory_broker, tmp_path, monkeypatch) -> None:
    """Bytewax lists a source's partitions once, at start: events keyed to a partition added
    later were never read until a restart, and nothing said so. Now the flow notices (within
    ``PARTITION_CHECK_S`` of the consumer's metadata), names the topic and partition, and stops
    in order (``recsys run`` then starts again); the next start reads the new partition from
    its first offset, every event applied once across the two runs."""
    from dataflows import kafka_io
    from dataflows.kafka_io import produce_records
    from dataflows.runner import run
    from recsys.events import encode
    from recsys.synthetic import generate_catalog, generate_events

    monkeypatch.setattr(kafka_io, "PARTITION_CHECK_S", 0.2)
    settings = Settings(state_dir=str(tmp_path / "state"), recovery_dir=str(tmp_path / "recovery"),
                        embed_cache_dir=str(tmp_path / "emb"), stop_at_end=False, poll_max_records=100)
    ensure_topics(memory_broker, {settings.events_topic: 1, settings.catalog_topic: 1,
                                  settings.recommendations_topic: 1, settings.dead_letters_topic: 1})
    catalog = generate_catalog(60, seed=3)
    produce_records(memory_broker, settings.catalog_topic, ((c.item_id.encode(), encode(c)) for c in catalog))
    events = generate_events(400, catalog, n_users=40, seed=2)
    produce_records(memory_broker, settings.events_topic, ((e.user_id.encode(), encode(e)) for e in events[:200]))

    def running(engine: Shard, **kw) -> tuple[threading.Thread, threading.Event]:
        stop = threading.Event()
        flow = live_flow(settings, memory_broker, engine=engine, stop=stop, **kw)
        thread = threading.Thread(target=run, args=(flow,), daemon=True,
                                  kwargs={"recovery_dir": settings.recovery_dir, "snapshot_interval_s": 1.0})
        thread.start()
        return thread, stop

    said: list[str] = []
    engine = Shard.open(settings)
    try:
        first, stop = running(engine, on_partitions_added=lambda line: (said.append(line), stop.set()))
        _until(lambda: engine.totals["applied"] == 200, 60, "the first 200 events")
        assert not said
        memory_broker.add_partitions(settings.events_topic, 2)
        produce_records(memory_broker, settings.events_topic, ((e.user_id.encode(), encode(e)) for e in events[200:]))
        on_new = sum(r.partition == 1 for r in memory_broker.records(settings.events_topic))
        assert 0 < on_new < 200, on_new
        first.join(timeout=60)
        assert not first.is_alive(), "the flow did not stop"
        assert said == [f"topic {settings.events_topic!r} has 2 partitions now, 1 of which this process reads; "
                        f"partition 1 was added while it ran"]
        applied_first = engine.totals["applied"]
        assert applied_first <= 400 - on_new  # nothing of partition 1 was read
    finally:
        engine.close()

    engine = Shard.open(settings)  # as `recsys run` starting again
    try:
        second, stop = running(engine)
        _until(lambda: applied_first + engine.totals["applied"] >= 400, 60, "the rest of the events")
        time.sleep(1.0)  # nothing more comes: each event applied once across the two runs
        stop.set()
        second.join(timeout=60)
        assert applied_first + engine.totals["applied"] == 400
        assert engine.positions[(settings.events_topic, 1)] == on_new - 1
    finally:
        engine.close()


def test_a_bulk_catalog_import_is_applied_a_slice_per_batch_with_events_served_between(memory_broker, tmp_path) -> None:
    """New catalog text is embedded in the batch that carries it (~3 ms an item here). The
    catalog was read like the events, up to ``poll_max_records`` (1,000) records a batch: a
    shop's import of 2,000 new items held every event behind it for seconds (the latency
    benchmark with ``--import-items 2000``: max 6.9 s, against 63 ms before the import). Now a
    live batch takes at most ``catalog_poll_max_records`` catalog records, and events offered
    during the import are recommended before its last slice is applied."""
    from dataflows.kafka_io import produce_records
    from dataflows.runner import run
    from recsys.events import CatalogItem, encode
    from recsys.synthetic import generate_catalog, generate_events

    settings = Settings(state_dir=str(tmp_path / "state"), recovery_dir=None, embed_cache_dir=str(tmp_path / "emb"),
                        stop_at_end=False, catalog_poll_max_records=16)
    ensure_topics(memory_broker, {settings.events_topic: 1, settings.catalog_topic: 1,
                                  settings.recommendations_topic: 1, settings.dead_letters_topic: 1})
    catalog = generate_catalog(40, seed=3)
    produce_records(memory_broker, settings.catalog_topic, ((c.item_id.encode(), encode(c)) for c in catalog))
    events = generate_events(120, catalog, n_users=30, seed=2)
    imported = [CatalogItem(item_id=f"new-{j}", title=f"imported lantern model {j}", category="import") for j in range(200)]

    batches: list[tuple[int, int]] = []  # (catalog records, events) per batch the engine processed
    engine = Shard.open(settings)
    process = engine.process

    def counted(envelopes):
        batches.append((sum(e.topic == settings.catalog_topic for e in envelopes),
                        sum(e.topic == settings.events_topic for e in envelopes)))
        return process(envelopes)

    engine.process = counted
    stop = threading.Event()
    try:
        thread = threading.Thread(target=run, args=(live_flow(settings, memory_broker, engine=engine, stop=stop),),
                                  kwargs={"recovery_dir": None, "snapshot_interval_s": 1.0}, daemon=True)
        thread.start()
        produce_records(memory_broker, settings.events_topic, ((e.user_id.encode(), encode(e)) for e in events[:20]))
        _until(lambda: engine.totals["applied"] == 20, 60, "the first events")
        started = len(batches)
        produce_records(memory_broker, settings.catalog_topic, ((c.item_id.encode(), encode(c)) for c in imported))
        produce_records(memory_broker, settings.events_topic, ((e.user_id.encode(), encode(e)) for e in events[20:]))
        _until(lambda: engine.totals["applied"] == 120 and engine.totals["catalog_in"] >= 200, 120, "the import")
        stop.set()
        thread.join(timeout=60)
    finally:
        engine.close()
    during = batches[started:]
    assert max(c for c, _ in during) <= 16, during
    last_slice = max(i for i, (c, _) in enumerate(during) if c)
    served = sum(e for c, e in during[:last_slice])
    assert served == 100, (served, during)  # every later event was served before the import's last slice
