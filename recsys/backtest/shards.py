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

With a trainer (``trainer``: an extra engine whose head and re-ranker the trainer trains, the
train/serve split of :mod:`recsys.signals.trainer`; the shards opened with ``model_trainer``) the
shards train nothing: the trainer learns each message when the shards apply it, publishes a
snapshot after every ``publish_every`` messages learned, and the shards load it before the batch
``publish_lag`` rounds after the round it was published in (0: their next batch). With
``publish_every=1`` and ``publish_lag=0`` the shards hold exactly the models they would have
trained themselves, at the same moments.

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
    trainer: Shard | None = None,
    publish_every: int = 1,
    publish_lag: int = 1,
) -> dict[str, float]:
    """Run ``shards`` (evaluate mode, sharing on) over ``events`` in rounds; ``owner(user_id)``
    is the shard index of a user. Returns counts and the exchange's cost figures."""
    if lag < 1:
        raise ValueError(f"lag must be >= 1 round (a message cannot be read before it is sealed), got {lag}")
    if publish_lag < 0:
        raise ValueError(f"publish_lag must be >= 0 rounds, got {publish_lag}")
    model_trainer = None
    published: deque[tuple[int, bytes]] = deque()  # (the round before which shards load it, payload)
    if trainer is not None:
        from recsys.signals.trainer import ModelTrainer

        if trainer.shared_models is None or not trainer.shared_models.train:
            raise ValueError("the trainer engine must share signals with models trained here (model_trainer off)")
        if not all(shard.served_by_trainer for shard in shards):
            raise ValueError("with a trainer every shard must be opened with model_trainer on")
        model_trainer = ModelTrainer(trainer.kv, trainer.shared_models, publish_every_messages=publish_every,
                                     publish_every_s=float("inf"), topic=trainer.settings.exchange_topic,
                                     publish=lambda pos, learned, payload: published.append(
                                         (stats["rounds"] + publish_lag, payload)))
    n = len(shards)
    offsets = [0] * n
    log: list[tuple[int, bytes]] = []
    sealed: deque[list[tuple[int, bytes]]] = deque()  # per round not yet applied: its log records
    stats = {"rounds": 0, "batches": 0, "exchange_messages": 0, "exchange_bytes": 0, "applied_ops": 0,
             "apply_cpu_s": 0.0, "process_cpu_s": 0.0, "events": len(events)}
    owners: dict[str, int] = {}
    for round_events in user_disjoint_chunks(events, n * batch_size):
        _load_published(shards, published, stats)
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
            _apply_all(shards, sealed.popleft(), stats, model_trainer)
        if on_round is not None:
            on_round(len(round_events))
    while sealed:
        _apply_all(shards, sealed.popleft(), stats, model_trainer)
    if model_trainer is not None:  # the end of the stream: what the trainer learned last reaches the shards
        model_trainer.maybe_publish(force=True)
        if published:
            _load_published(shards, deque([(0, published[-1][1])]), stats)
        stats["model_publications"] = model_trainer.publications
        stats["trainer_learn_cpu_s"] = trainer.shared_models.learn_cpu_s
        stats["trainer_version"] = model_trainer.version
    if any(shard.shared_models is not None for shard in shards):  # the learned models through the log too
        # served by a trainer, a shard holds what serves (no training state): compare that
        checksum = serving_checksum if trainer is not None else model_checksum
        sums = [checksum(shard) for shard in shards]
        if trainer is not None:
            stats["trainer_serving_checksum"] = serving_checksum(trainer)
            stats["served_as_trained"] = set(sums) == {stats["trainer_serving_checksum"]}
        stats["model_checksums"] = sums
        stats["models_identical"] = len(set(sums)) == 1
        stats["model_versions"] = sorted({shard.model_version for shard in shards})
        stats["model_learn_cpu_s"] = sum(shard.shared_models.learn_cpu_s for shard in shards if shard.shared_models)
    return stats


def model_checksum(shard: Shard) -> str:
    """sha256 (hex) of a shard's learned models: every head parameter and optimizer moment, and
    the re-rankers' weights and example counts (search's too). Equal on shards that learned the
    same log."""
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
    search = shard.search.reranker
    digest.update(search.w.tobytes() + str(search.examples).encode())
    return digest.hexdigest()


def serving_checksum(shard: Shard) -> str:
    """sha256 (hex) of what serves: the head's parameters and step count, the re-ranker's weights
    and example count (a shard served by a trainer holds these, not the training state)."""
    import hashlib

    digest = hashlib.sha256()
    if shard.head is not None:
        for name, tensor in sorted(shard.head._towers.state_dict().items()):
            digest.update(name.encode() + tensor.numpy().tobytes())
        digest.update(str(shard.head.n_updates).encode())
    digest.update(shard.reranker.w.tobytes() + str(shard.reranker.examples).encode())
    return digest.hexdigest()


def _load_published(shards: Sequence[Shard], published: deque, stats: dict) -> None:
    """Every shard loads the newest snapshot due by this round (older due ones are skipped, as a
    live shard that finds two new files loads the newest)."""
    due = None
    while published and published[0][0] <= stats["rounds"]:
        due = published.popleft()[1]
    if due is None:
        return
    t0 = time.process_time()
    for shard in shards:
        shard.load_models(due)
    stats["model_loads"] = stats.get("model_loads", 0) + len(shards)
    stats["model_load_cpu_s"] = stats.get("model_load_cpu_s", 0.0) + time.process_time() - t0


def _apply_all(shards: Sequence[Shard], records: list[tuple[int, bytes]], stats: dict, trainer=None) -> None:
    if not records:
        return
    if trainer is not None:
        t0 = time.process_time()
        trainer.apply(records)
        stats["trainer_cpu_s"] = stats.get("trainer_cpu_s", 0.0) + time.process_time() - t0
    for shard in shards:
        before = shard.exchange.applied_ops
        t0 = time.process_time()
        shard.apply_exchange(records)
        stats["apply_cpu_s"] += time.process_time() - t0
        stats["applied_ops"] += shard.exchange.applied_ops - before
