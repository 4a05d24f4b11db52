"""Replay an event file through the live graph: a file source instead of Kafka, same engine.

The source turns each event back into the JSON bytes a producer would have sent, so replays
exercise the real codec too. Batches are cut with :func:`recsys.batching.user_disjoint_chunks`
so that the engine's "what we would have shown" is exact per event, and each batch travels as
ONE stream item so the runtime cannot re-cut it. Resume state is the index of the next batch,
so a replay survives a crash like the live flow.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import run_main
from tqdm.auto import tqdm

from dataflows.flow import build_flow
from recsys.batching import user_disjoint_chunks
from recsys.engine import Engine, ScoredBatch
from recsys.evaluation import PrequentialScorer
from recsys.events import Envelope, Event, encode


def envelope_batches(events: Iterable[Event], topic: str = "events", batch_size: int = 500) -> list[list[Envelope]]:
    """Events -> batches of Envelopes on one partition, offsets = position in the file."""
    batches, offset = [], 0
    for chunk in user_disjoint_chunks(events, batch_size):
        batch = []
        for event in chunk:
            batch.append(Envelope(topic, 0, offset, event.user_id.encode(), encode(event), event.ts))
            offset += 1
        batches.append(batch)
    return batches


class _ReplayPartition(StatefulSourcePartition[Envelope, int]):
    def __init__(self, batches: list[list[Envelope]], start: int):
        self._batches = batches
        self._next = start

    def next_batch(self) -> list[list[Envelope]]:
        if self._next >= len(self._batches):
            raise StopIteration()
        batch = self._batches[self._next]
        self._next += 1
        return [batch]  # one item: the engine sees exactly this cut

    def snapshot(self) -> int:
        return self._next


class ReplaySource(FixedPartitionedSource[list[Envelope], int]):
    """One partition holding the pre-cut batches of a replay."""

    def __init__(self, batches: list[list[Envelope]]):
        self._batches = batches

    def list_parts(self) -> list[str]:
        return ["replay#0"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _ReplayPartition:
        return _ReplayPartition(self._batches, resume_state or 0)


class _CallbackPartition(StatelessSinkPartition[Any]):
    def __init__(self, callback: Callable[[list[Any]], None]):
        self._callback = callback

    def write_batch(self, items: list[Any]) -> None:
        self._callback(items)


class CallbackSink(DynamicSink[Any]):
    """Hands every written batch to a function (in-process collectors, metric accumulators)."""

    def __init__(self, callback: Callable[[list[Any]], None]):
        self._callback = callback

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _CallbackPartition:
        return _CallbackPartition(self._callback)


def replay_full_system(
    engine: Engine,
    events: list[Event],
    scorer: PrequentialScorer,
    *,
    batch_size: int = 500,
    model_name: str = "full-system",
    on_recommendations: Callable[[list[tuple[str | None, bytes]]], None] | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Run the live graph over ``events`` with ``engine`` (evaluate mode) feeding ``scorer``."""
    batches = envelope_batches(events, batch_size=batch_size)
    counts = {"recommendations": 0, "dead_letters": 0}
    bar = tqdm(total=len(events), disable=not progress, desc="replay (bytewax)", unit="ev", mininterval=1.0)

    def scored(items: list[ScoredBatch]) -> None:
        for sb in items:
            scorer.score_chunk(sb.events, {model_name: sb.recommended})
            bar.update(len(sb.events))

    def recs(items: list[tuple[str | None, bytes]]) -> None:
        counts["recommendations"] += len(items)
        if on_recommendations is not None:
            on_recommendations(items)

    def dead(items: list[tuple[str | None, bytes]]) -> None:
        counts["dead_letters"] += len(items)

    flow = build_flow(
        "recsys_replay",
        events=ReplaySource(batches),
        recommendations=CallbackSink(recs),
        dead_letters=CallbackSink(dead),
        scored=CallbackSink(scored),
        engine_factory=lambda: engine,
    )
    run_main(flow)
    bar.close()
    return counts
