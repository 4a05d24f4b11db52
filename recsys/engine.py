"""The per-batch step every flow runs: raw messages in, recommendations and dead letters out.

One code path for live runs, replays, benchmarks and tests: the Bytewax dataflow calls
:meth:`Engine.process` once per polled batch; the plain-Python backtest loop calls the same
methods. Nothing here knows about Kafka or Bytewax.

Exactly-once effect on state (decided in ARCHITECTURE.md): Bytewax rewinds sources to its last
snapshot after a crash and re-delivers messages, while RocksDB has already absorbed some of
them. So each batch is committed to RocksDB in ONE atomic write holding the touched user
records (each with the last applied offset per partition), the changed global signals, the
per-partition watermark of what the signals absorbed, the catalog upserts, and the outbox of
emitted recommendations. A re-delivered message at or below the watermark changes nothing;
if it triggered a recommendation, the exact bytes emitted the first time are re-emitted from
the outbox, so output is at-least-once with identical duplicates only.

Shape of one batch::

    [Envelope(topic, partition, offset, key, value, timestamp_ms), ...]
      -> BatchResult(recommendations=[(user_id, bytes)], dead_letters=[(key, bytes)], ...)
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import orjson

from recsys.batching import user_disjoint_chunks
from recsys.blend import Blend, QualityMonitor, Shown, ShownCache
from recsys.embeddings import Embedder
from recsys.head import Example, Head, HeadConfig
from recsys.events import (
    CatalogItem,
    DeadLetter,
    DecodeError,
    Envelope,
    Event,
    Recommendation,
    RecommendedItem,
    catalog_item_from_dict,
    decode_catalog_item,
    decode_event,
    encode,
)
from recsys.items import ItemSpace
from recsys.recommender import MODEL_VERSION, Recommender, RecommenderConfig
from recsys.search import Search, SearchConfig  # issue 13
from recsys.sessions import SessionNeighbours
from recsys.settings import Settings
from recsys.signals import EVENT_WEIGHTS, CoVisitation, Popularity
from recsys.state import KVStore, MemoryKV, RocksKV, UserState, UserStore

_ITEM_PREFIX = b"item:"
_WATERMARK_PREFIX = b"wm:"
_OUTBOX_PREFIX = b"o:"
_LAYOUT_KEY = b"meta:shard"  # "<shard>/<shards>" of the process that wrote this state


class StateLayoutError(RuntimeError):
    """The state directory was written by a different shard layout (``--shards``)."""
#: Recommendations kept per user for identical re-emission after a crash. The sink flushes
#: every batch right after it is committed, so more than a couple can never be in doubt.
_OUTBOX_LEN = 4
#: Training examples waiting for a head step; older ones are dropped past this (bounded memory).
_MAX_PENDING_EXAMPLES = 4096


@dataclass
class ScoredBatch:
    """Backtests: a batch's valid events and what each of its users would have been shown
    right before it (the input of :class:`recsys.evaluation.PrequentialScorer`)."""

    events: list[Event]
    recommended: dict[str, list[str]]


@dataclass
class BatchResult:
    recommendations: list[tuple[str, bytes]] = field(default_factory=list)  # (user_id, json)
    dead_letters: list[tuple[str | None, bytes]] = field(default_factory=list)  # (key, json)
    scored: list[ScoredBatch] = field(default_factory=list)  # only when evaluating
    counts: Counter = field(default_factory=Counter)
    search_results: list[tuple[str, bytes]] = field(default_factory=list)  # (user_id, json); issue 13


class Engine:
    """User state, global signals, items and the recommender behind one ``process`` call."""

    def __init__(
        self,
        settings: Settings,
        kv: KVStore,
        embedder: Embedder,
        *,
        clock: Callable[[], float] = time.time,
        evaluate: bool = False,
        eval_k: int = 20,
        emit: bool = True,
    ):
        self.settings = settings
        self.kv = kv
        self.clock = clock
        self.evaluate = evaluate
        self.eval_k = eval_k
        self.emit = emit  # False: a backtest that only scores skips the output recommendations
        self.users = UserStore(kv, ttl_days=settings.state_ttl_days)
        self.embedder = embedder
        self.items = ItemSpace(embedder)
        self.popularity = Popularity(half_life_h=settings.popularity_half_life_h)
        self.covisit = CoVisitation(
            half_life_h=settings.covisit_half_life_h, max_neighbours=settings.covisit_neighbours, window=5
        )
        # directed, adjacent pairs only: "what did people engage with right after this item"
        self.transitions = CoVisitation(
            half_life_h=settings.covisit_half_life_h, max_neighbours=settings.covisit_neighbours, window=1, directed=True
        )
        # whole-session neighbours (V-SKNN): the strongest signal on anonymous click sessions
        self.sessions = SessionNeighbours()
        self._check_layout(kv, settings)
        self.popularity.load(kv)
        self.covisit.load(kv)
        self.transitions.load(kv)
        self.sessions.load(kv)
        self.watermarks: dict[tuple[str, int], int] = {}
        for key, value in kv.iter_prefix(_WATERMARK_PREFIX):
            topic, _, partition = key[len(_WATERMARK_PREFIX) :].decode().rpartition(":")
            self.watermarks[(topic, int(partition))] = int(value)
        stored_items = [catalog_item_from_dict(orjson.loads(v)) for _, v in kv.iter_prefix(_ITEM_PREFIX)]
        if stored_items:
            self.items.upsert(stored_items)
        # Online re-ranking: the blend learns from what users did after what we showed them;
        # the monitor (river: rolling mean + ADWIN) tracks that hit rate and counts drops.
        rec_config = RecommenderConfig(k=settings.top_k)
        self.blend = Blend(rec_config.weights.vector(), seed=settings.seed)
        self.shown = ShownCache()
        self.monitor = QualityMonitor()
        self.head: Head | None = None
        self._pending: list[Example] = []  # head training examples not yet learned
        if settings.head_enabled:
            import torch

            # One thread: the head's per-batch tensors are small, and a second thread only adds
            # synchronisation (measured 4x slower on 2-event batches); bulk embedding raises it.
            torch.set_num_threads(1)
            self.head = Head(
                HeadConfig(dim=embedder.dim, lr=settings.head_lr, max_steps_per_call=settings.head_steps_per_batch, seed=settings.seed),
                self.items.index.vectors_or_zero,
            )
        # In-memory engines (backtests) neither load nor write model snapshots.
        persistent = not isinstance(kv, MemoryKV)
        self.models = ModelStore(Path(settings.state_dir) / "models" if persistent else None, settings.head_snapshot_interval_s, clock)
        self.models.restore(self)
        self.recommender = Recommender(
            self.items, self.popularity, self.covisit, rec_config,
            blend=self.blend, head=self.head, transitions=self.transitions, sessions=self.sessions,
        )
        # issue 13: search (recsys/search); its learned associations commit with the other signals
        self.search = Search(self.items, self.popularity, SearchConfig(k=settings.search_k, personalise=settings.search_personalise),
                             head=self.head, clock=clock)
        self.search.upsert(list(self.items.catalog.items.values()))
        self.search.load(kv)
        self.totals: Counter = Counter()

    @staticmethod
    def _check_layout(kv: KVStore, settings: Settings) -> None:
        """Refuse state written under another shard count: users belong to shards by partition,
        so with another count some of them (and their partitions' offsets) live elsewhere."""
        layout = f"{settings.shard}/{settings.shards}".encode()
        stored = kv.get(_LAYOUT_KEY)
        if stored is None:
            kv.write({_LAYOUT_KEY: layout})
        elif stored != layout:
            old_shard, _, old_shards = stored.decode().partition("/")
            raise StateLayoutError(
                f"the state in {settings.state_dir} was written by shard {old_shard} of {old_shards}, and this "
                f"process is shard {settings.shard} of {settings.shards}: a new shard count moves users between "
                f"shards. Keep --processes/--shards {old_shards}, or start from new state and recovery directories."
            )

    @classmethod
    def open(cls, settings: Settings, *, evaluate: bool = False, in_memory: bool = False, emit: bool = True) -> "Engine":
        """An engine on the RocksDB state directory and embedding cache named by ``settings``."""
        if in_memory:
            kv: KVStore = MemoryKV()
        else:
            Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
            kv = RocksKV(str(Path(settings.state_dir) / "rocks"))
        embedder = Embedder(settings.model_name, settings.embed_cache_dir, batch_size=settings.embed_batch_size)
        try:
            return cls(settings, kv, embedder, evaluate=evaluate, emit=emit)
        except BaseException:
            kv.close()  # a refused state directory stays openable by the next attempt
            embedder.close()
            raise

    def close(self) -> None:
        self.models.save(self, force=True)
        self.kv.close()
        self.embedder.close()

    @property
    def model_version(self) -> str:
        """Names what produced a recommendation: the blend and the head snapshot in use."""
        return MODEL_VERSION if self.head is None else f"{MODEL_VERSION}+{self.head.version}"

    # ------------------------------------------------------------------ catalog

    def upsert_catalog(self, items: list[CatalogItem], *, progress: bool = False) -> int:
        """Add or update items (embedding only new or changed text) and persist them."""
        if not items:
            return 0
        changed = self.items.upsert(items, progress=progress)
        self.search.upsert(items)  # issue 13
        self.kv.write({_ITEM_PREFIX + i.item_id.encode(): encode(i) for i in items})
        return changed

    # ------------------------------------------------------------------ the step

    def process(self, envelopes: list[Envelope]) -> BatchResult:
        """Decode, validate, apply and recommend for one batch; commit it atomically."""
        result = BatchResult()
        counts = result.counts
        now_ms = int(self.clock() * 1000)
        catalog_topic = self.settings.catalog_topic
        max_bytes = self.settings.max_message_bytes

        # 1. catalog first, so an item and its first event in one batch work in either order
        catalog_items: list[CatalogItem] = []
        events: list[tuple[Envelope, Event]] = []
        for env in envelopes:
            try:
                if env.topic == catalog_topic:
                    counts["catalog_in"] += 1
                    catalog_items.append(decode_catalog_item(env.value, max_bytes))
                else:
                    counts["events_in"] += 1
                    events.append((env, decode_event(env.value, max_bytes)))
            except DecodeError as exc:
                self._dead_letter(result, env, str(exc), now_ms)
        puts: dict[bytes, bytes] = {}
        if catalog_items:
            self.items.upsert(catalog_items)
            self.search.upsert(catalog_items)  # issue 13
            for item in catalog_items:
                puts[_ITEM_PREFIX + item.item_id.encode()] = encode(item)

        # 2. validate against the catalog, group by user (keeping each user's order)
        by_user: dict[str, list[tuple[Envelope, Event]]] = {}
        admit_unknown = self.settings.unknown_items == "admit"
        for env, event in events:
            if event.item_id is not None and event.item_id not in self.items.catalog:
                if not admit_unknown:
                    self._dead_letter(result, env, f"field 'item_id': unknown item {event.item_id!r} (not in the catalog)", now_ms)
                    continue
                self.items.upsert([CatalogItem(event.item_id, title=f"item {event.item_id}")])
            by_user.setdefault(event.user_id, []).append((env, event))
        counts["valid_events"] += sum(len(v) for v in by_user.values())
        if not by_user:
            self._commit(puts)
            self.totals.update(counts)
            return result

        user_ids = list(by_user)
        states = self.users.get_many(user_ids, now_ts=max(ev.ts for v in by_user.values() for _, ev in v))
        outboxes = self._load_outboxes(user_ids)

        # 3. what we would have shown each user right before this batch (backtests only)
        if self.evaluate:
            self._score_before(result, [ev for _, ev in events if ev.user_id in by_user], states)

        # 3b. issue 13: answer the batch's searches from the state before it; learn from its new events
        result.search_results = self.search.step(by_user, states, self.watermarks, now_ms, self.model_version)
        counts["search_results"] += len(result.search_results)

        # 4. apply: signals first (they need the history before the event), then user state
        fresh_users: list[str] = []
        reemit: list[tuple[str, bytes]] = []
        examples: list[Example] = []  # for the head: each newly applied event, after its history
        # Offsets are checked against the watermark as committed before this batch: users are
        # processed in turn, not in offset order, so the watermark only moves at the end.
        committed = dict(self.watermarks)
        for user_id, user_events in by_user.items():
            state = states[user_id]
            applied_any = False
            self._learn_from_shown(user_id, user_events, committed, counts)
            for env, event in user_events:
                wm_key = (env.topic, env.partition)
                if env.offset <= committed.get(wm_key, -1):
                    counts["redelivered_skipped"] += 1
                    stored = outboxes.get(user_id, {}).get((env.partition, env.offset))
                    if stored is not None:
                        reemit.append((user_id, stored))
                    continue
                if event.item_id is not None:
                    self.covisit.update(state.history, event.item_id, event.type, event.ts)
                    self.transitions.update(state.history, event.item_id, event.type, event.ts)
                    self.popularity.update(event.item_id, EVENT_WEIGHTS[event.type], event.ts)
                    self.sessions.update(event.user_id, event.session_id, event.item_id, event.ts)
                vector = self.items.vector(event.item_id) if event.item_id is not None else None
                if self.head is not None and event.item_id is not None and state.history:
                    examples.append(Example(list(state.history), event.item_id, event.type, event.ts))
                state.apply(
                    event,
                    vector,
                    env.partition,
                    env.offset,
                    history_len=self.settings.history_len,
                    half_life_h=self.settings.interest_half_life_h,
                )
                if env.offset > self.watermarks.get(wm_key, -1):
                    self.watermarks[wm_key] = env.offset
                    puts[_WATERMARK_PREFIX + f"{env.topic}:{env.partition}".encode()] = str(env.offset).encode()
                applied_any = True
                counts["applied"] += 1
            if applied_any:
                fresh_users.append(user_id)

        # 5. learn once a full training batch has accumulated (a bounded buffer, so the cost per
        #    event is fixed however the stream is batched); only newly applied events enter it,
        #    so a re-delivery is never learned twice (a crash loses the buffer: never learned)
        self._pending.extend(examples)
        del self._pending[: -_MAX_PENDING_EXAMPLES]
        if self.head is not None and len(self._pending) >= self.head.config.batch_size:
            examples, self._pending = self._pending, []
            stats = self.head.learn(examples)
            counts["head_steps"] += stats["steps"]
        self.models.save(self)

        # 6. recommend for every user with a newly applied event (coalesced per batch)
        if fresh_users and self.emit:
            now_ts = max(by_user[u][-1][1].ts for u in fresh_users)
            ranked = self.recommender.rank([states[u] for u in fresh_users], now_ts)
            for user_id, (items, shown) in zip(fresh_users, ranked):
                self.shown.put(user_id, shown)
                env, trigger = by_user[user_id][-1]
                payload = encode(self._recommendation(user_id, items, trigger, now_ms))
                result.recommendations.append((user_id, payload))
                box = outboxes.setdefault(user_id, {})
                box[(env.partition, env.offset)] = payload
                puts[_OUTBOX_PREFIX + user_id.encode()] = _encode_outbox(box)
        result.recommendations.extend(reemit)
        counts["recommendations"] += len(result.recommendations)
        counts["reemitted"] += len(reemit)

        # 7. one atomic write: users + signals + watermarks + outboxes + catalog
        puts.update(self.users.puts([states[u] for u in fresh_users]))
        self._commit(puts)
        self.totals.update(counts)
        return result

    # ------------------------------------------------------------------ helpers

    def _commit(self, puts: dict[bytes, bytes]) -> None:
        puts.update(self.popularity.export_dirty())
        puts.update(self.covisit.export_dirty())
        puts.update(self.transitions.export_dirty())
        puts.update(self.sessions.export_dirty())
        puts.update(self.search.export_dirty())  # issue 13
        if puts:
            self.kv.write(puts)

    def _dead_letter(self, result: BatchResult, env: Envelope, reason: str, now_ms: int) -> None:
        letter = DeadLetter(payload=env.value, reason=reason, source=env.position, failed_at=now_ms)
        result.dead_letters.append((env.key.decode("utf-8", "replace") if env.key else None, encode(letter)))
        result.counts["dead_letters"] += 1

    def _recommendation(self, user_id: str, items: list[RecommendedItem], trigger: Event, now_ms: int) -> Recommendation:
        return Recommendation(
            user_id=user_id,
            items=tuple(items),
            trigger_event_id=trigger.event_id,
            model_version=self.model_version,
            event_ts=trigger.ts,
            emitted_at=max(now_ms, int(self.clock() * 1000)),
        )

    def _load_outboxes(self, user_ids: list[str]) -> dict[str, dict[tuple[int, int], bytes]]:
        raw = self.kv.multi_get([_OUTBOX_PREFIX + u.encode() for u in user_ids])
        return {u: _decode_outbox(r) for u, r in zip(user_ids, raw) if r is not None}

    def _score_before(self, result: BatchResult, events: list[Event], states: dict[str, UserState]) -> None:
        users = list(dict.fromkeys(ev.user_id for ev in events if ev.item_id is not None))
        ranked = self.recommender.rank([states[u] for u in users], events[0].ts, self.eval_k, explain=False) if users else []
        recommended = {}
        for u, (items, shown) in zip(users, ranked):
            recommended[u] = [i.item_id for i in items]
            self.shown.put(u, shown)
        result.scored.append(ScoredBatch(events, recommended))

    def recommend_for(
        self, user_ids: list[str], now_ts: int, k: int | None = None, *, explain: bool = True, remember: bool = False
    ) -> list[list[RecommendedItem]]:
        """Recommendations for users from committed state. ``remember``: count them as shown,
        so the re-ranker learns from what these users do next (backtests); else no side effect."""
        states = self.users.get_many(user_ids, now_ts=now_ts)
        ranked = self.recommender.rank([states[u] for u in user_ids], now_ts, k, explain=explain)
        if remember:
            for user_id, (_, shown) in zip(user_ids, ranked):
                self.shown.put(user_id, shown)
        return [items for items, _ in ranked]

    def _learn_from_shown(self, user_id: str, user_events, committed: dict, counts: Counter) -> None:
        """Teach the re-ranker with the user's first new event against what they were last shown."""
        shown = self.shown.get(user_id)
        if shown is None or not shown.items:
            return
        for env, event in user_events:
            if event.item_id is None or env.offset <= committed.get((env.topic, env.partition), -1):
                continue
            position = shown.position(event.item_id)
            self.blend.learn(shown.features, position)
            if self.monitor.update(position is not None and position < self.settings.top_k):
                # A drop in the live hit rate is counted (dashboards), and nothing else: resetting
                # the re-ranker to the hand-set blend on each detected drop cost REES46
                # leave-last-out Recall@10 0.142 -> 0.126 and left DIGINETICA's (8 drops) almost
                # untrained, and the head's 5x learning-rate boost after a drop cost REES46 as
                # much again; both learners keep adapting at their constant rates anyway.
                counts["drift_detected"] += 1
            self.shown.put(user_id, Shown((), shown.features[:0], ()))  # learned once
            return


def _encode_outbox(box: dict[tuple[int, int], bytes]) -> bytes:
    recent = sorted(box.items())[-_OUTBOX_LEN:]
    return orjson.dumps([[p, o, payload.decode()] for (p, o), payload in recent])


def _decode_outbox(raw: bytes) -> dict[tuple[int, int], bytes]:
    return {(p, o): payload.encode() for p, o, payload in orjson.loads(raw)}


class EngineModel:
    """The full system as a backtest :class:`recsys.evaluation.Model`: ``learn`` runs the very
    ``Engine.process`` step the dataflow runs (events re-encoded to the bytes a producer sends),
    ``recommend`` reads committed state.

    ``learn`` cuts what it is given into user-disjoint batches of ``batch_size`` (as the replay
    and a live poll do), and an engine in evaluate mode ranks for each batch's users first: so
    the re-ranker learns from what users did after what it would have shown them, as it does
    live. (Fed 10k-event chunks with nothing shown, it never learned at all in leave-last-out.)
    """

    name = "full-system"

    def __init__(self, engine: Engine, topic: str = "events", batch_size: int = 500):
        self.engine = engine
        self.topic = topic
        self.batch_size = batch_size
        self._offset = 0

    def recommend(self, user_ids: list[str], k: int, now_ts: int) -> list[list[str]]:
        return [[i.item_id for i in items] for items in self.engine.recommend_for(user_ids, now_ts, k, explain=False, remember=True)]

    def learn(self, events: list[Event]) -> None:
        for chunk in user_disjoint_chunks(events, self.batch_size):
            envelopes = []
            for event in chunk:
                envelopes.append(Envelope(self.topic, 0, self._offset, event.user_id.encode(), encode(event), event.ts))
                self._offset += 1
            self.engine.process(envelopes)


class ModelStore:
    """Versioned snapshots of the learned models (head with its optimizer, re-ranker) on disk.

    Written at most every ``interval_s`` (and on close) as ``models-<head version>.pt``
    (atomic: temp file, then rename); the newest is loaded at start-up, so learning continues
    where it stopped. The events between the last snapshot and a crash are in RocksDB state but
    not in the restored head: they are not learned again (never twice), only lost to learning.
    """

    KEEP = 3

    def __init__(self, directory: Path | None, interval_s: float, clock: Callable[[], float]):
        self.directory = directory
        self.interval_s = interval_s
        self.clock = clock
        self._last = clock()

    def restore(self, engine: "Engine") -> str | None:
        if self.directory is None:
            return None
        snapshots = sorted(self.directory.glob("models-*.pt"), key=lambda p: p.stat().st_mtime)
        if not snapshots:
            return None
        import pickle

        import torch

        state = torch.load(snapshots[-1], weights_only=False)
        if engine.head is not None and state.get("head") is not None:
            engine.head.load_state_dict(state["head"])
        if state.get("blend") is not None:
            engine.blend.__dict__.update(pickle.loads(state["blend"]).__dict__)
        return snapshots[-1].name

    def save(self, engine: "Engine", *, force: bool = False) -> Path | None:
        now = self.clock()
        if self.directory is None or (not force and now - self._last < self.interval_s):
            return None
        self._last = now
        import pickle

        import torch

        self.directory.mkdir(parents=True, exist_ok=True)
        version = engine.head.version if engine.head is not None else "nohead"
        path = self.directory / f"models-{version}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"head": engine.head.state_dict() if engine.head else None, "blend": pickle.dumps(engine.blend)}, tmp)
        os.replace(tmp, path)
        for old in sorted(self.directory.glob("models-*.pt"), key=lambda p: p.stat().st_mtime)[: -self.KEEP]:
            old.unlink(missing_ok=True)
        return path
