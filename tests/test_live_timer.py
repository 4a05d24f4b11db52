"""No input of the live flow sleeps longer than a Kafka partition's idle backoff.

Bytewax starts no new epoch on any input until every input has closed the last one (bytewax
issue 353: the epoch boundary is its backpressure), and an input whose partition sleeps
(``next_awake`` in the future) closes it only when it wakes. So the longest sleep of any input
is a hold on the whole flow at every epoch boundary (``RECSYS_SNAPSHOT_INTERVAL_S``). The live
flow's timer used to be an input of its own that slept 250 ms between ticks: every 2-second
epoch close waited for it while events queued, and p99 latency at 1,000 events/s went from
0.4-0.9 s to 1.4-2.0 s (bisected to the commit that added the timer; README, Performance). The
timer now rides on the control source's polls (:class:`dataflows.flow.Ticking`).

This test builds the live flow over the in-memory broker, builds every partition of every
input, polls each while its topic is idle, and checks when each asks to be woken next. The
timer must still tick on an idle stream (the unknown-item wait's deadline depends on it; its
behaviour end to end is tests/test_catalog_bootstrap.py's waiting test).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from bytewax.inputs import DynamicSource, FixedPartitionedSource

from dataflows.flow import TICK, Tick
from dataflows.kafka_io import MAX_IDLE_BACKOFF_MS, ensure_topics
from dataflows.live import TICK_INTERVAL_S, live_flow
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.synthetic import generate_catalog


def _inputs(steps) -> list:
    found = []
    for step in steps:
        if hasattr(step, "source"):
            found.append(step)
        found.extend(_inputs(getattr(step, "substeps", [])))
    return found


def _partitions(step) -> list:
    source = step.source
    if isinstance(source, FixedPartitionedSource):
        return [(f"{step.step_id}/{p}", source.build_part(step.step_id, p, None)) for p in source.list_parts()]
    assert isinstance(source, DynamicSource), source
    return [(f"{step.step_id}/worker0", source.build(step.step_id, 0, 1))]


def test_no_input_of_the_live_flow_sleeps_longer_than_the_idle_backoff_and_the_timer_still_ticks(memory_broker, tmp_path):
    settings = Settings(
        state_dir=str(tmp_path / "state"), recovery_dir=str(tmp_path / "recovery"),
        embed_cache_dir=str(tmp_path / "emb"), stop_at_end=False,
    )
    ensure_topics(memory_broker, {settings.events_topic: 2, settings.catalog_topic: 1,
                                  settings.recommendations_topic: 2, settings.dead_letters_topic: 1})
    engine = Shard.open(settings)
    try:
        engine.upsert_catalog(generate_catalog(20, seed=1))
        flow = live_flow(settings, memory_broker, engine=engine)
        parts = [p for step in _inputs(flow.substeps) for p in _partitions(step)]
        assert len(parts) >= 4, parts  # events x2, catalog, control
        ticks: dict[str, int] = {}
        deadline = time.monotonic() + 3 * TICK_INTERVAL_S
        while time.monotonic() < deadline:  # idle topics: every poll returns nothing but ticks
            for name, part in parts:
                batch = part.next_batch()
                assert all(isinstance(x, Tick) for x in batch), (name, batch)
                ticks[name] = ticks.get(name, 0) + sum(1 for x in batch if x is TICK)
                awake = part.next_awake()
                limit = datetime.now(timezone.utc) + timedelta(milliseconds=MAX_IDLE_BACKOFF_MS)
                assert awake is None or awake <= limit, (
                    f"input {name} asks to sleep until {awake}, past the {MAX_IDLE_BACKOFF_MS} ms idle backoff: "
                    "it would hold every epoch boundary of the flow that long")
            time.sleep(0.01)
        # the timer still ticks while everything is idle, about once per interval
        assert 2 <= sum(ticks.values()) <= 4, ticks
        for _, part in parts:
            part.close()
    finally:
        engine.close()
