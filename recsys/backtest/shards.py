"""Prequential replay of N shards that share the global signals through an exchange log (issue 11).

The shards run interleaved in event time, in *rounds*: the stream (in event-time order) is cut
into user-disjoint rounds of up to ``N * batch_size`` events (:func:`recsys.shard.batching.
user_disjoint_chunks`, so each user acts at one moment per round and scoring stays exact), and
in each round every shard processes its own users' events of the round as one batch (users are
owned as Kafka's partitioner would own them). Each shard's batch seals one op message
(:mod:`recsys.signals.exchange`); the round's messages are appended to one in-memory log, shard
order within a round, and every shard applies each message ``lag`` rounds after the round that
sealed it. ``lag=1`` (the default) means a shard's next batch sees everything every shard
learned in the previous round: the live path at its fastest, where the exchange consumer's poll
returns between two event batches (a broker round trip, ~10-50 ms, against a batch's ~100 ms).
A larger lag models a slower exchange. With one shard and ``lag=1`` the scores equal the
unshared run (the ranking before each batch sees exactly the same signals).

With the models shared too (:class:`recsys.signals.exchange.SharedModels`, on with sharing
unless both the head and the re-ranker are off) every shard also trains its head and re-ranker
from each message it applies, so they too learn from every shard's users, one round late.

Shape: ``events`` (time-ordered ``Event`` list) -> the ``scorer`` filled, and a dict of counts
and cost figures (``exchange_bytes``, ``exchange_messages``, ``applied_ops``, ``apply_cpu_s``;
with shared models ``model_checksums``, ``models_identical`` and ``model_versions``).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Sequence

from recsys.backtest.protocols import PrequentialScorer
from recsys.events import Envelope, Event, encode
from recsys.shard.batching import user_disjoint_chunks
from recsys.shard.step import Shard


def replay_shared_shards(
    shards: Sequence[Shard],
    events: Sequence[Event],
    owner: Callable[[str], int],
    scorer: PrequentialScorer,
    *,
    batch_size: int = 500,
    lag: int = 1,
    model_name: str = "full-system",
    on_round: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Run ``shards`` (evaluate mode, sharing on) over ``events`` in rounds; ``owner(user_id)``
    is the shard index of a user. Returns counts and the exchange's cost figures."""
    if lag < 1:
        raise ValueError(f"lag must be >= 1 round (a message cannot be read before it is sealed), got {lag}")
    n = len(shards)
    offsets = [0] * n
    log: list[tuple[int, bytes]] = []
    sealed: deque[list[tuple[int, bytes]]] = deque()  # per round not yet applied: its log records
    stats = {"rounds": 0, "batches": 0, "exchange_messages": 0, "exchange_bytes": 0, "applied_ops": 0,
             "apply_cpu_s": 0.0, "process_cpu_s": 0.0, "events": len(events)}
    owners: dict[str, int] = {}
    for round_events in user_disjoint_chunks(events, n * batch_size):
        parts: list[list[Event]] = [[] for _ in range(n)]
        for event in round_events:
            s = owners.get(event.user_id)
            if s is None:
                s = owners[event.user_id] = owner(event.user_id)
            parts[s].append(event)
        records: list[tuple[int, bytes]] = []
        for s, part in enumerate(parts):
            if not part:
                continue
            envelopes = []
            for event in part:
                envelopes.append(Envelope("events", s, offsets[s], event.user_id.encode(), encode(event), event.ts))
                offsets[s] += 1
            t0 = time.process_time()
            result = shards[s].process(envelopes)
            stats["process_cpu_s"] += time.process_time() - t0
            stats["batches"] += 1
            for sb in result.scored:
                scorer.score_chunk(sb.events, {model_name: sb.recommended})
            for message in result.exchange:
                records.append((len(log), message))
                log.append((len(log), message))
                stats["exchange_messages"] += 1
                stats["exchange_bytes"] += len(message)
        sealed.append(records)
        stats["rounds"] += 1
        if len(sealed) >= lag:
            _apply_all(shards, sealed.popleft(), stats)
        if on_round is not None:
            on_round(len(round_events))
    while sealed:
        _apply_all(shards, sealed.popleft(), stats)
    if any(shard.shared_models is not None for shard in shards):  # the learned models through the log too
        sums = [model_checksum(shard) for shard in shards]
        stats["model_checksums"] = sums
        stats["models_identical"] = len(set(sums)) == 1
        stats["model_versions"] = sorted({shard.model_version for shard in shards})
        stats["model_learn_cpu_s"] = sum(shard.shared_models.learn_cpu_s for shard in shards if shard.shared_models)
    return stats


def model_checksum(shard: Shard) -> str:
    """sha256 (hex) of a shard's learned models: every head parameter and optimizer moment, and
    the re-ranker's weights and example count. Equal on shards that learned the same log."""
    import hashlib

    digest = hashlib.sha256()
    if shard.head is not None:
        state = shard.head.state_dict()
        for name in sorted(state["model"]):
            digest.update(name.encode() + state["model"][name].numpy().tobytes())
        for slot in state["optimizer"]["state"].values():
            for name in sorted(slot):
                digest.update(name.encode() + slot[name].numpy().tobytes())
        digest.update(str(state["n_updates"]).encode())
    digest.update(shard.reranker.w.tobytes() + str(shard.reranker.examples).encode())
    return digest.hexdigest()


def _apply_all(shards: Sequence[Shard], records: list[tuple[int, bytes]], stats: dict) -> None:
    if not records:
        return
    for shard in shards:
        before = shard.exchange.applied_ops
        t0 = time.process_time()
        shard.apply_exchange(records)
        stats["apply_cpu_s"] += time.process_time() - t0
        stats["applied_ops"] += shard.exchange.applied_ops - before
