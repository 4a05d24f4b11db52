"""The one Bytewax graph. Live runs, replays and tests differ only in what is passed in.

::

    catalog source ─┐
                    ├─ merge ─► process (Engine.process, once per polled batch)
    events source ──┘              │ stream of Out("rec" | "dead" | "scored", key, payload)
                                   ├─► recommendations sink   (user_id, json bytes)
                                   ├─► dead-letters sink      (key, json bytes)
                                   ├─► search-results sink    (user_id, json bytes; issue 13)
                                   └─► scored sink (backtests only: what we would have shown)

Sources yield :class:`recsys.events.Envelope`; sinks take ``(key, bytes)`` pairs. The engine
is built lazily inside the worker (not when the flow is imported), so
``python -m bytewax.run dataflows.live:live_flow`` works without module-level globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import FixedPartitionedSink, Sink

from recsys.engine import Engine
from recsys.events import Envelope


@dataclass(frozen=True, slots=True)
class Out:
    kind: str  # "rec" | "dead" | "scored" | "search"
    key: str | None
    payload: Any


class EngineStep:
    """The callable given to ``flat_map_batch``: builds the engine on first use in the worker."""

    def __init__(self, engine_factory: Callable[[], Engine]):
        self._factory = engine_factory
        self.engine: Engine | None = None

    def __call__(self, batch: list[Envelope] | list[list[Envelope]]) -> list[Out]:
        if self.engine is None:
            self.engine = self._factory()
        # Kafka sources send Envelopes (the runtime's batch is the engine's batch); the replay
        # source sends pre-cut batches as single items, processed one by one.
        batches = batch if batch and isinstance(batch[0], list) else [batch]
        out: list[Out] = []
        for envelopes in batches:
            result = self.engine.process(envelopes)
            out.extend(Out("rec", key, payload) for key, payload in result.recommendations)
            out.extend(Out("dead", key, payload) for key, payload in result.dead_letters)
            out.extend(Out("scored", None, s) for s in result.scored)
            out.extend(Out("search", key, payload) for key, payload in result.search_results)  # issue 13
        return out


def build_flow(
    flow_id: str,
    *,
    events: Source[Envelope],
    recommendations: Sink[tuple[str | None, bytes]],
    dead_letters: Sink[tuple[str | None, bytes]],
    engine_factory: Callable[[], Engine],
    catalog: Source[Envelope] | None = None,
    scored: Sink[Any] | None = None,
    search_results: Sink[tuple[str | None, bytes]] | None = None,
) -> Dataflow:
    """Wire sources, the engine step and sinks into a dataflow (``search_results``: answers to
    ``search`` events; without that sink they are dropped)."""
    flow = Dataflow(flow_id)
    stream = op.input("events_in", flow, events)  # Envelope
    if catalog is not None:
        catalog_stream = op.input("catalog_in", flow, catalog)  # Envelope
        stream = op.merge("merge_inputs", catalog_stream, stream)  # Envelope
    outs = op.flat_map_batch("process", stream, EngineStep(engine_factory))  # Out
    recs = op.filter_map("recommendations", outs, lambda o: (o.key, o.payload) if o.kind == "rec" else None)
    dead = op.filter_map("dead_letters", outs, lambda o: (o.key, o.payload) if o.kind == "dead" else None)
    _output("recommendations_out", recs, recommendations)  # (user_id, json)
    _output("dead_letters_out", dead, dead_letters)  # (key, json)
    if search_results is not None:  # issue 13
        found = op.filter_map("search_results", outs, lambda o: (o.key, o.payload) if o.kind == "search" else None)
        _output("search_results_out", found, search_results)  # (user_id, json)
    if scored is not None:
        evals = op.filter_map("scored", outs, lambda o: o.payload if o.kind == "scored" else None)
        op.output("scored_out", evals, scored)  # recsys.engine.ScoredBatch
    return flow


def _output(step_id: str, stream: Any, sink: Sink[Any]) -> None:
    """``op.output``; a partitioned sink gets ``(routing key, (key, value))``, as Bytewax routes
    by the first element and hands only the second to the partition."""
    if isinstance(sink, FixedPartitionedSink):
        stream = op.map(step_id + "_route", stream, lambda kv: (kv[0] or "", kv))
    op.output(step_id, stream, sink)
