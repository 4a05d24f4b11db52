"""Replay an event file through the live graph: a file source instead of Kafka, same engine.

The source turns each event back into the JSON bytes a producer would have sent, so replays
exercise the real codec too. Batches are cut with :func:`recsys.shard.batching.user_disjoint_chunks`
so that the engine's "what we would have shown" is exact per event, and each batch travels as
ONE stream item so the runtime cannot re-cut it. Resume state is the index of the next batch,
so a replay survives a crash like the live flow.
"""

from __future__ import annotations

import itertools
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import run_main
from tqdm.auto import tqdm

from dataflows.flow import build_flow
from recsys.backtest.protocols import PrequentialScorer
from recsys.events import Envelope, Event, encode
from recsys.shard.batching import user_disjoint_chunks
from recsys.shard.step import ScoredBatch, Shard


def envelope_batches(events: Iterable[Event], topic: str = "events", batch_size: int = 500, start: int = 0) -> Iterator[list[Envelope]]:
    """Events -> batches of Envelopes on one partition, offsets = position in the file (lazy)."""
    offset = start
    for chunk in user_disjoint_chunks(events, batch_size):
        batch = []
        for event in chunk:
            batch.append(Envelope(topic, 0, offset, event.user_id.encode(), encode(event), event.ts))
            offset += 1
        yield batch


class _ReplayPartition(StatefulSourcePartition[list[Envelope], int]):
    def __init__(self, events: Sequence[Event], start: int, batch_size: int):
        self._next = start  # index of the first event not yet emitted
        self._batches = envelope_batches(itertools.islice(events, start, None), batch_size=batch_size, start=start)

    def next_batch(self) -> list[list[Envelope]]:
        batch = next(self._batches)  # StopIteration at the end of the file ends the partition
        self._next += len(batch)
        return [batch]  # one item: the engine sees exactly this cut

    def snapshot(self) -> int:
        return self._next


class ReplaySource(FixedPartitionedSource[list[Envelope], int]):
    """One partition over an event list, cut into batches lazily (memory stays flat)."""

    def __init__(self, events: Sequence[Event], batch_size: int = 500):
        self._events = events
        self._batch_size = batch_size

    def list_parts(self) -> list[str]:
        return ["replay#0"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _ReplayPartition:
        return _ReplayPartition(self._events, resume_state or 0, self._batch_size)


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
    engine: Shard,
    events: list[Event],
    scorer: PrequentialScorer,
    *,
    batch_size: int = 500,
    model_name: str = "full-system",
    on_recommendations: Callable[[list[tuple[str | None, bytes]]], None] | None = None,
    progress: bool = True,
    stop_on_signals: bool = False,
) -> dict[str, int]:
    """Run the live graph over ``events`` with ``engine`` (evaluate mode) feeding ``scorer``.

    Returns the outputs' counts and ``scoring_s``, the seconds the scorer took (the metrics);
    the engine's own time per phase is in ``engine.phase_totals``.

    ``stop_on_signals`` (the main thread only: ``recsys replay``): Ctrl-C or SIGTERM ends the
    replay's input at the next batch, as the live flow's stop does (:class:`dataflows.runner.StopSignals`;
    an interrupt raised inside the run would come back as Bytewax's panic, its backtrace on
    stderr), and then raises ``KeyboardInterrupt``: a replay cut short measured nothing. The
    signal handlers in place before are put back."""
    counts: dict[str, Any] = {"recommendations": 0, "dead_letters": 0, "scoring_s": 0.0}
    bar = tqdm(total=len(events), disable=not progress, desc="replay (bytewax)", unit="ev", mininterval=1.0)

    def scored(items: list[ScoredBatch]) -> None:
        t0 = time.perf_counter()
        for sb in items:
            scorer.score_chunk(sb.events, {model_name: sb.recommended})
            bar.update(len(sb.events))
        counts["scoring_s"] += time.perf_counter() - t0

    def recs(items: list[tuple[str | None, bytes]]) -> None:
        counts["recommendations"] += len(items)
        if on_recommendations is not None:
            on_recommendations(items)

    def dead(items: list[tuple[str | None, bytes]]) -> None:
        counts["dead_letters"] += len(items)

    stop = None
    if stop_on_signals:
        from dataflows.runner import StopSignals, stoppable

        before = {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS}
        stop = StopSignals().running().requested
    flow = build_flow(
        "recsys_replay",
        events=ReplaySource(events, batch_size) if stop is None else stoppable(ReplaySource(events, batch_size), stop),
        recommendations=CallbackSink(recs),
        dead_letters=CallbackSink(dead),
        scored=CallbackSink(scored),
        shard_factory=lambda: engine,
    )
    try:
        run_main(flow)
    finally:
        if stop is not None:
            for sig, handler in before.items():
                signal.signal(sig, handler)
    bar.close()
    if stop is not None and stop.is_set():
        raise KeyboardInterrupt()
    return counts
