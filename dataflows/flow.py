"""The one Bytewax graph. Live runs, replays and tests differ only in what is passed in.

::

    catalog source ─┐
    events source ──┼─ one input ─► process (Shard.process, once per polled batch)
    control (+ticks)┤  (Inputs)        │ stream of Out("rec" | "dead" | "scored", key, payload)
    exchange log ───┘                  │ (issue 11, with sharing: every shard's signal operations)
                                   ├─► recommendations sink   (user_id, json bytes)
                                   ├─► dead-letters sink      (key, json bytes)
                                   ├─► search-results sink    (user_id, json bytes; issue 13)
                                   ├─► exchange sink (issue 11: this shard's op messages, (shard, bytes))
                                   └─► scored sink (backtests only: what we would have shown)

Sources yield :class:`recsys.events.Envelope`; sinks take ``(key, bytes)`` pairs. The live flow
has a timer (:class:`Ticking`, on its control source): on an idle stream, events waiting for
their catalog item still meet their deadline, and the metrics and the status line stay current. The engine comes from
a factory called on the first batch inside the worker (not when the flow is imported), so no
flow needs a module-level global (the live flow opens it before, for the catalog bootstrap).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from datetime import datetime
from typing import Any, Callable, Protocol

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, Source, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, Sink

from dataflows.kafka_io import Acknowledgement

from recsys.events import Envelope
from recsys.shard.step import BatchResult, Shard


@dataclass(frozen=True, slots=True)
class Out:
    kind: str  # "rec" | "dead" | "scored" | "search" | "exchange"
    key: str | None
    payload: Any


class Tick:
    """The timer's item: no data, a call of the engine step (see :class:`Ticking`)."""

    __slots__ = ()


TICK = Tick()


class _TickingPartition(StatefulSourcePartition[Any, Any]):
    def __init__(self, inner: StatefulSourcePartition[Any, Any], interval_s: float,
                 clock: Callable[[], float]) -> None:
        self._inner, self._interval_s, self._clock = inner, interval_s, clock
        self._last = clock()

    def next_batch(self) -> list[Any]:
        batch = self._inner.next_batch()
        if batch:
            return batch
        now = self._clock()
        if now - self._last < self._interval_s:
            return []
        self._last = now
        return [TICK]

    def next_awake(self) -> datetime | None:
        # the inner partition's own idle backoff (a few ms), never the tick interval: see Ticking
        return self._inner.next_awake()

    def snapshot(self) -> Any:
        return self._inner.snapshot()

    def close(self) -> None:
        self._inner.close()


class Ticking(FixedPartitionedSource[Any, Any]):
    """``source`` whose every partition also yields a :data:`TICK` once ``interval_s`` has
    passed while it had nothing to return: the live flow's timer.

    The timer rides on a source that is polled anyway (the control topic: idle almost always)
    instead of being an input of its own. A Bytewax input partition that sleeps holds the whole
    flow at every epoch boundary: no partition is polled in a new epoch until every partition has
    closed the last one (bytewax issue 353; see :class:`Inputs`), and a sleeping one closes it
    only when it wakes. A timer source that
    slept 250 ms between ticks made every 2-second epoch close wait up to 250 ms, with events
    queueing behind it: p99 latency 1.4-2.0 s at 1,000 events/s instead of 0.4-0.9 s
    (README, Performance). Here the partition wakes as often as the Kafka partition under it.
    Resume states are the inner source's, unchanged.
    """

    def __init__(self, source: FixedPartitionedSource[Any, Any], interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.interval_s, self.clock = source, interval_s, clock

    def list_parts(self) -> list[str]:
        return self.source.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _TickingPartition:
        return _TickingPartition(self.source.build_part(step_id, for_part, resume_state), self.interval_s, self.clock)


class Inputs(FixedPartitionedSource[Any, Any]):
    """Several partitioned sources read as one Bytewax input: the live flow's events, catalog,
    control and exchange partitions side by side, each built by the source that lists it.

    One input, because Bytewax keeps an epoch clock per input partition, started when the
    partition is built and restarted each time it closes an epoch, and a partition that has
    closed an epoch is not polled again until every partition of every input has closed it too
    (the epoch boundary is its backpressure, bytewax issue 353). Partitions of *one* input are
    checked in the same activation and close their epochs together; partitions of separate
    inputs were built at different moments (a Kafka consumer connecting takes tens of ms) and
    their clocks drift further apart at every epoch, an idle partition closing late by up to its
    poll interval. Measured with four inputs at 20 events/s: the events partitions went unpolled
    for 150 ms at every 2-second epoch close at the start, 390 ms after 100 s, growing ~3 ms per
    epoch (README, Performance); one input has one clock and no such hold.

    Partition names must be distinct across the sources (Kafka's are ``topic#partition``).
    Resume states are each source's own, under this input's step id.
    """

    def __init__(self, sources: list[FixedPartitionedSource[Any, Any]]) -> None:
        self.sources = sources
        self._owners: dict[str, FixedPartitionedSource[Any, Any]] | None = None

    def list_parts(self) -> list[str]:
        owners: dict[str, FixedPartitionedSource[Any, Any]] = {}
        for source in self.sources:
            for part in source.list_parts():
                if part in owners:
                    raise ValueError(f"two of the flow's sources list a partition named {part!r} "
                                     f"({owners[part]!r} and {source!r}); each needs its own names")
                owners[part] = source
        self._owners = owners
        return list(owners)

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> StatefulSourcePartition[Any, Any]:
        if self._owners is None:  # built on a worker that did not list the parts itself
            self.list_parts()
        owners = self._owners
        assert owners is not None
        if for_part not in owners:
            raise ValueError(f"no source of this flow lists a partition named {for_part!r} (known: {sorted(owners)})")
        return owners[for_part].build_part(step_id, for_part, resume_state)


class StepObserver(Protocol):
    """Watches the engine step (``dataflows.metrics.FlowMetrics``): plain data in, no effect."""

    def batch(self, engine: Shard, envelopes: list[Envelope], result: BatchResult, seconds: float) -> None: ...

    def tick(self, engine: Shard) -> None: ...


class ShardStep:
    """The callable given to ``flat_map_batch``: builds the engine on first use in the worker.

    ``acknowledged``: the outputs (``"recommendations"``, ``"dead_letters"``, ``"search_results"``) whose sink
    acknowledges what it delivered (the Kafka sink, at its epoch flush); each batch's output is
    then followed by an :class:`Acknowledgement` and stays in the engine's outbox until that is
    done (:mod:`recsys.shard.outbox`, :mod:`recsys.search.outbox`)."""

    def __init__(self, shard_factory: Callable[[], Shard], observer: StepObserver | None = None,
                 acknowledged: tuple[str, ...] = ()):
        self._factory = shard_factory
        self.engine: Shard | None = None
        self.observer = observer
        self.acknowledged = acknowledged

    def __call__(self, batch: list[Any]) -> list[Out]:
        out: list[Out] = []
        if self.engine is None:
            self.engine = self._factory()
            if self.acknowledged:
                self.engine.expect_acknowledgements(*self.acknowledged)
            if self.engine.exchange is not None:  # issue 11: sealed before a crash, maybe never published
                origin = str(self.engine.exchange.origin)
                out.extend(Out("exchange", origin, m) for m in self.engine.exchange.pending())
        # Kafka sources send Envelopes (the runtime's batch is the engine's batch); the replay
        # source sends pre-cut batches as single items, processed one by one; the timer's ticks
        # call the engine with no data only while events wait (for their catalog item, or their
        # search's query vector) or catalog records wait for the embedding worker's vectors.
        if batch and isinstance(batch[0], list):
            batches = batch
        else:
            envelopes = [e for e in batch if not isinstance(e, Tick)]
            ticked = len(envelopes) < len(batch)
            waiting = ticked and (len(self.engine.waiting) or self.engine.deferred_records)
            batches = [envelopes] if envelopes or waiting else []
            if ticked and self.observer is not None:
                self.observer.tick(self.engine)
        for envelopes in batches:
            started = time.perf_counter()
            result = self.engine.process(envelopes)
            if self.observer is not None:
                self.observer.batch(self.engine, envelopes, result, time.perf_counter() - started)
            out.extend(Out("rec", key, payload) for key, payload in result.recommendations)
            out.extend(Out("dead", key, payload) for key, payload in result.dead_letters)
            out.extend(Out("scored", None, s) for s in result.scored)
            out.extend(Out("search", key, payload) for key, payload in result.search_results)  # issue 13
            for kind, output, items in (("rec", "recommendations", result.recommendations),
                                        ("dead", "dead_letters", result.dead_letters),
                                        ("search", "search_results", result.search_results)):
                if items and output in self.acknowledged:  # behind the batch's items in that sink's stream
                    out.append(Out(kind, None, Acknowledgement(result.stamp, partial(self.engine.acknowledge, output=output))))
            out.extend(Out("exchange", str(self.engine.exchange.origin), m) for m in result.exchange)  # issue 11
        return out


def build_flow(
    flow_id: str,
    *,
    events: Source[Envelope],
    recommendations: Sink[tuple[str | None, bytes]],
    dead_letters: Sink[tuple[str | None, bytes]],
    shard_factory: Callable[[], Shard],
    catalog: Source[Envelope] | None = None,
    scored: Sink[Any] | None = None,
    observer: StepObserver | None = None,
    control: Source[Envelope] | None = None,
    search_results: Sink[tuple[str | None, bytes]] | None = None,
    exchange: Source[Envelope] | None = None,
    exchange_out: Sink[tuple[str | None, bytes]] | None = None,
) -> Dataflow:
    """Wire sources, the engine step and sinks into a dataflow (``control``: erasure requests;
    ``search_results``: answers to ``search`` events, dropped without that sink; ``exchange``
    and ``exchange_out``: the exchange log read whole and written to, with sharing on)."""
    flow = Dataflow(flow_id)
    extra = [source for source in (catalog, control, exchange) if source is not None]
    if extra and all(isinstance(s, FixedPartitionedSource) for s in (events, *extra)):
        # one input, one epoch clock (see Inputs); the step id stays the events input's, so a
        # recovery directory from before keeps its events offsets
        stream = op.input("events_in", flow, Inputs([events, *extra]))  # Envelope
    else:
        stream = op.input("events_in", flow, events)  # Envelope
        for name, source in (("catalog", catalog), ("control", control), ("exchange", exchange)):
            if source is not None:
                stream = op.merge(f"merge_{name}", op.input(f"{name}_in", flow, source), stream)  # Envelope
    acknowledged = tuple(name for name, sink in (("recommendations", recommendations), ("dead_letters", dead_letters),
                                                 ("search_results", search_results))
                         if getattr(sink, "acknowledges", False))  # the Kafka sink: at its flush
    outs = op.flat_map_batch("process", stream, ShardStep(shard_factory, observer, acknowledged))  # Out
    recs = op.filter_map("recommendations", outs, lambda o: (o.key, o.payload) if o.kind == "rec" else None)
    dead = op.filter_map("dead_letters", outs, lambda o: (o.key, o.payload) if o.kind == "dead" else None)
    _output("recommendations_out", recs, recommendations)  # (user_id, json)
    _output("dead_letters_out", dead, dead_letters)  # (key, json)
    if search_results is not None:  # issue 13
        found = op.filter_map("search_results", outs, lambda o: (o.key, o.payload) if o.kind == "search" else None)
        _output("search_results_out", found, search_results)  # (user_id, json)
    if exchange_out is not None:  # issue 11
        ops = op.filter_map("exchange", outs, lambda o: (o.key, o.payload) if o.kind == "exchange" else None)
        _output("exchange_out", ops, exchange_out)  # (origin shard, op message)
    if scored is not None:
        evals = op.filter_map("scored", outs, lambda o: o.payload if o.kind == "scored" else None)
        op.output("scored_out", evals, scored)  # recsys.shard.step.ScoredBatch
    return flow


def _output(step_id: str, stream: Any, sink: Sink[Any]) -> None:
    """``op.output``; a partitioned sink gets ``(routing key, (key, value))``, as Bytewax routes
    by the first element and hands only the second to the partition."""
    if isinstance(sink, FixedPartitionedSink):
        stream = op.map(step_id + "_route", stream, lambda kv: (kv[0] or "", kv))
    op.output(step_id, stream, sink)
