"""The per-batch step every flow runs: raw messages in, recommendations and dead letters out.

One code path for live runs, replays, benchmarks and tests: the Bytewax dataflow calls
:meth:`Shard.process` once per polled batch; the plain-Python backtest loop calls the same
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

import gc
import hashlib
import logging
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Container

import orjson

from recsys.control import (
    TOMBSTONE_PREFIX,
    ControlMessage,
    decode_control,
    tombstone_key,
    user_hash,
)
from recsys.events import (
    OFFSETS_RESET_FROM,
    OFFSETS_RESET_TO,
    CatalogItem,
    DeadLetter,
    DecodeError,
    Envelope,
    Event,
    Recommendation,
    RecommendedItem,
    decode_catalog_item,
    decode_event,
    encode,
    stored_catalog_item,
)
from recsys.feedback import EVENT_WEIGHTS, MS_PER_DAY
from recsys.items.catalog import ItemSpace
from recsys.items.embeddings import Embedder
from recsys.items.worker import EmbeddingWorker, WorkerGone
from recsys.ranking.head import Example, Head, HeadConfig
from recsys.ranking.recommender import MODEL_VERSION, Recommender, RecommenderConfig
from recsys.ranking.reranker import (
    PairwiseReranker,
    QualityMonitor,
    ShownCache,
    learn_from_next_item,
)
from recsys.search import Search, SearchConfig  # issue 13
from recsys.search.intent import SearchIntent
from recsys.settings import Settings
from recsys.shard.outbox import (
    SENT_BEFORE_PREFIX,
    decode_outbox,
    encode_outbox,
    load_offsets,
    load_waiting_at_rebuild,
    outbox_without,
    user_without,
)
from recsys.shard.snapshots import ModelSnapshots
from recsys.shard.waiting import Sorted, WaitingRoom
from recsys.signals.covisitation import CoVisitation
from recsys.signals.exchange import SharedModels, SignalExchange, signal_checksum
from recsys.signals.popularity import Popularity
from recsys.signals.sessions import SessionNeighbours
from recsys.store.kv import KVStore, MemoryKV, RocksKV, StoreClosedError
from recsys.store.users import USER_PREFIX, UserState, UserStore, user_key
from recsys.threads import one_blas_thread

_log = logging.getLogger(__name__)

_ITEM_PREFIX = b"item:"
#: item id -> digest of the record the start-up catalog file last gave for it (:meth:`Shard.upsert_catalog_file`)
_FILE_ITEM_PREFIX = b"catfile:"
_WATERMARK_PREFIX = b"wm:"
_OUTBOX_PREFIX = b"o:"
#: ``pos:<topic>:<partition>`` -> the last offset processed, whatever became of the message
#: (applied, skipped, dead-lettered): checked at start against the recovery offsets
#: (:func:`dataflows.runner.check_state_against_recovery`).
_POSITION_PREFIX = b"pos:"
_OFFSET_RESET_PREFIX = b"rst:"  # rst:<topic>:<partition> -> "<old>><new>": the last source move absorbed
#: The longest a search waits for the embedding worker to encode its query (``RECSYS_EMBED_WORKER``):
#: then it is answered with its query encoded in the batch, as without the worker. The worker's
#: call takes 6-9 ms and the next batch picks its answer up, so this rarely cuts a wait short; it
#: bounds the ones behind a bulk import, whose item texts keep the worker busy for seconds
#: (without it a search waited up to ``RECSYS_UNKNOWN_ITEM_WAIT_S``, 2 s). 50 ms was tried too:
#: no better tail, the runs' spread on this 2-core box being larger (benchmarks/README.md, "new
#: queries off the batch's path").
QUERY_WAIT_S = 0.2
#: A bulk catalog import: a batch that brings a full catalog slice (``catalog_poll_max_records``
#: records) with items new to the catalog leaves more on the topic, maybe the item an event waits
#: for, so the time until the next batch's new items, if it comes within this many seconds, is
#: import time too and stops the unknown-item wait's clock, not just the upserts' own time: until
#: 2026-12-07 each slice's ranking, commit and fetch ran the clock, and events for the items of a
#: 20,000-item import (a catalog probe) were dead-lettered after 27-40 s of wall time, their items
#: still on the topic. A trickle of catalog changes (fewer than a slice a batch), and a feed of
#: changes to known items however large (prices, stock), stop it only for their upserts: an event
#: for an item that never comes still runs out.
IMPORT_GAP_S = 1.0
#: ``unsent:<output>:<stamp>`` -> ``[[key, payload], ...]``: outputs no re-delivery can bring back
#: (a list whose trigger waited for its catalog item, the answer of a search that waited, the dead
#: letter of an event whose wait ran out: Bytewax committed the event's offset long before), kept
#: until acknowledged; the next life sends what is left again before its first batch
#: (``Shard.unsent``, ``dataflows.live``).
UNSENT_PREFIX = b"unsent:"  # also what `recsys run --rebuild-state` carries into the fresh state (dataflows/runner.py)
#: The field of an unsent output compared with its user's erasure time: a list of an event at or
#: before the erasure, or a dead letter refused before it, is not sent again (``Shard.unsent``).
_UNSENT_TIME_FIELD = {"recommendations": "event_ts", "search_results": "event_ts", "dead_letters": "failed_at"}
_LAYOUT_KEY = b"meta:shard"  # "<shard>/<shards>" of the process that wrote this state
#: A dead letter's key: the refused message's key, cut to this many bytes (ids are <= 256 chars).
_DEAD_LETTER_KEY_BYTES = 1024
#: Erasures are logged here, with the id's hash only (``recsys.control.user_hash``). An audit
#: record must not vanish because nobody configured logging: without a handler of its own the
#: logger writes INFO to stderr (an application's handlers on the root see it too).
AUDIT_LOG = logging.getLogger("recsys.audit")
if not AUDIT_LOG.handlers:
    _audit_handler = logging.StreamHandler()
    _audit_handler.setFormatter(logging.Formatter("%(asctime)s recsys.audit %(message)s"))
    AUDIT_LOG.addHandler(_audit_handler)
    AUDIT_LOG.setLevel(logging.INFO)


class StateLayoutError(RuntimeError):
    """The state directory was written by a different shard layout (``--shards``)."""


def check_state_layout(settings: Settings) -> None:
    """Refuse to start one process on a state directory that shard processes wrote, or a shard on
    one that a single process wrote (``settings`` as :meth:`Settings.for_shard` gives them: one
    process keeps ``<state_dir>/rocks``, shard ``i`` of ``N`` ``<state_dir>/shard-<i>/rocks``).
    :meth:`Shard._check_layout` sees only the directory it opens, so until 2026-12-07 going
    from ``--processes 1`` to ``2`` on the same directories opened two empty states beside the
    old one: every event was applied again and every answer sent again, in other bytes.

    >>> import tempfile
    >>> base = Path(tempfile.mkdtemp()); (base / "rocks").mkdir(); (base / "rocks" / "CURRENT").touch()
    >>> check_state_layout(Settings(state_dir=str(base)))  # one process on a one-process state
    >>> check_state_layout(Settings(state_dir=str(base), shards=2, shard=1).for_shard())
    Traceback (most recent call last):
    ...
    recsys.shard.step.StateLayoutError: the state in ... was written by one process (its rocks directory), and this process is shard 1 of 2 (...shard-1): a new shard count moves users between shards, and this shard would start from nothing and apply every event again. Keep --processes/--shards 1, or start from new state and recovery directories.
    """
    def holds(d: Path) -> bool:  # a RocksDB there, as recsys.shard.offline.state_dirs reads it (it imports
        return (d / "rocks" / "CURRENT").is_file()  # this module: calling it here would make an import circle)

    here = Path(settings.state_dir)
    if settings.shards > 1 and here.name == f"shard-{settings.shard}" and holds(here.parent):
        raise StateLayoutError(
            f"the state in {here.parent} was written by one process (its rocks directory), and this process is "
            f"shard {settings.shard} of {settings.shards} ({here}): a new shard count moves users between shards, "
            f"and this shard would start from nothing and apply every event again. Keep --processes/--shards 1, "
            f"or start from new state and recovery directories.")
    if settings.shards == 1 and here.is_dir():
        shards = sorted(d.name for d in here.iterdir() if d.name.startswith("shard-") and holds(d))
        if shards:
            raise StateLayoutError(
                f"the state in {here} was written by {len(shards)} shard processes ({', '.join(shards)}), and this "
                f"is one process: a new shard count moves users between shards, and this process would start "
                f"from nothing and apply every event again. Keep --processes/--shards {len(shards)}, or start from "
                f"new state and recovery directories.")
#: Training examples waiting for a head step; older ones are dropped past this (bounded memory).
_MAX_PENDING_EXAMPLES = 4096
#: The head serves its background step at the end of the batch that brings the messages read
#: since the step started (its own batch's included) to this many (:meth:`Shard._publish_head`):
#: in a replay (hundreds of events a batch) at the end of the batch that started it, live a few
#: batches later (~16 events a batch at 1,000 events/s, ~60 ms: the step takes ~20).
_HEAD_PUBLISH_AFTER = 64
#: A shard served by a model trainer looks for a newer snapshot at most this often (one listing).
MODEL_POLL_S = 0.5


@dataclass
class ScoredBatch:
    """Backtests: a batch's valid events and what each of its users would have been shown
    right before it (the input of :class:`recsys.backtest.protocols.PrequentialScorer`)."""

    events: list[Event]
    recommended: dict[str, list[str]]


@dataclass
class BatchResult:
    recommendations: list[tuple[str, bytes]] = field(default_factory=list)  # (user_id, json)
    dead_letters: list[tuple[str | None, bytes]] = field(default_factory=list)  # (key, json)
    scored: list[ScoredBatch] = field(default_factory=list)  # only when evaluating
    stamp: int = 0  # this batch's outbox stamp: ``Shard.acknowledge(stamp)`` once its lists are delivered
    counts: Counter = field(default_factory=Counter)
    # issue 10 (metrics, plain data for dataflows/metrics.py): decoded events by type, and users
    # with no stored state before this batch (new, or reset after their TTL)
    event_types: Counter = field(default_factory=Counter)
    new_users: int = 0
    search_results: list[tuple[str, bytes]] = field(default_factory=list)  # (user_id, json); issue 13
    exchange: list[bytes] = field(default_factory=list)  # issue 11: signal-op messages to publish
    # wall seconds of each phase of the step (see ``PHASES``), for the slow-batch log and metrics
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # broker append times (ms) of the catalog records applied in this batch: its own, and with the
    # embedding worker those of earlier batches whose vectors came back (the new-item metric)
    catalog_applied_ms: list[int] = field(default_factory=list)


#: What :meth:`Shard.expect_acknowledgements` may name: the outputs kept until acknowledged.
_ACKNOWLEDGED_OUTPUTS = ("recommendations", "search_results", "dead_letters")


#: The phases of ``Shard.process`` in order, as ``BatchResult.phase_seconds`` names them:
#: models (the trainer's newest, between two batches), decode, admit (the waiting room and the
#: checks), load (user records and outboxes), score (backtests only: the list before the batch),
#: search, apply (signals, user state, the re-ranker's learning), head (its training step's
#: inputs; the step itself runs on the head's thread), rank (candidates, scores, reasons,
#: payloads), commit (the changed signals exported, the sweep, the one atomic write; then the
#: head's step served, when due, :meth:`Shard._publish_head`).
PHASES = ("models", "decode", "admit", "load", "score", "search", "apply", "head", "rank", "commit")


class _Laps:
    """Wall time per phase of one batch: ``lap(name)`` adds the time since the previous lap."""

    __slots__ = ("seconds", "_at")

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self._at = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._at
        self._at = now


def _no_embed_worker(s: Settings, cached_state: bool) -> str | None:
    """Why no embedding worker can run with these settings (None: one can): only where an event
    can wait for its item (the waiting room), on persistent state with a cached embedder, and not
    with shared signals (their hold for the catalog is not measured with it)."""
    if s.share_signals:
        return "not with --share-signals yet"
    if s.unknown_items == "admit":
        return "not with --unknown-items admit (an event never waits for its item)"
    if s.stop_at_end:
        return "not with --stop-at-end (a replay of the topics embeds in the batch)"
    if s.unknown_item_wait_s <= 0:
        return "not with RECSYS_UNKNOWN_ITEM_WAIT_S=0 (an event never waits for its item)"
    if not cached_state:
        return "not with this state (in memory, or an embedder without a cache)"
    return None


class Shard:
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
        one_blas_thread()  # recsys/threads.py: a second BLAS thread only spins (issue 12)
        self.settings = settings
        self.kv = kv
        self.clock = clock
        self.evaluate = evaluate
        self.eval_k = eval_k
        self.emit = emit  # False: a backtest that only scores skips the output recommendations
        # Backtest ablation (issue 14): after freeze(), the head, the re-ranker, co-visitation,
        # transitions and popularity stop learning; user state and session memory go on.
        self.learning = True
        self.users = UserStore(kv, ttl_days=settings.state_ttl_days)
        self.embedder = embedder
        self.items = ItemSpace(embedder, nprobe=settings.ivf_nprobe)
        self.popularity = Popularity(half_life_h=settings.popularity_half_life_h)
        self.covisit = CoVisitation(
            half_life_h=settings.covisit_half_life_h, max_neighbours=settings.covisit_neighbours, window=5
        )
        # directed, adjacent pairs only: "what did people engage with right after this item"
        self.transitions = CoVisitation(
            half_life_h=settings.covisit_half_life_h, max_neighbours=settings.covisit_neighbours, window=1, directed=True
        )
        # whole-session neighbours (V-SKNN): the strongest signal on anonymous click sessions
        self.sessions = SessionNeighbours(query_items=settings.session_query_items,
                                          postings_scanned=settings.session_postings_scanned,
                                          vote_items=settings.session_vote_items)
        self._check_layout(kv, settings)
        self.popularity.load(kv)
        self.covisit.load(kv)
        self.transitions.load(kv)
        self.sessions.load(kv)
        # issue 11: with sharing, signal updates go through the exchange log (recsys/signals/exchange.py)
        self.exchange = SignalExchange(kv, settings.shard, self.covisit, self.transitions, self.popularity,
                                       self.sessions) if settings.share_signals else None
        self.watermarks: dict[tuple[str, int], int] = {}
        for key, value in kv.iter_prefix(_WATERMARK_PREFIX):
            topic, _, partition = key[len(_WATERMARK_PREFIX) :].decode().rpartition(":")
            self.watermarks[(topic, int(partition))] = int(value)
        self.positions = load_offsets(kv, _POSITION_PREFIX)  # (topic, partition) -> last offset processed
        # a rebuilt state (`recsys run --rebuild-state`): below these offsets the wiped state's
        # outputs were delivered; their messages are applied and ranked, nothing is sent for them
        # (but for the events it still held waiting); the marks passed are let go here, in memory
        self._sent_before = load_offsets(kv, SENT_BEFORE_PREFIX)
        self._waiting_at_rebuild = load_waiting_at_rebuild(kv) if self._sent_before else None
        self._let_go_of_passed_marks()
        self._processed_before: dict[tuple[str, int], int] = {}  # the positions before the current batch
        self._in_batch = False  # a batch began and its write is not done (it failed, if still so)
        # erased users: id hash -> erasure time (events older than that are dropped)
        self.tombstones: dict[str, int] = {
            key[len(TOMBSTONE_PREFIX) :].decode(): int(orjson.loads(v)["erased_at"]) for key, v in kv.iter_prefix(TOMBSTONE_PREFIX)
        }
        # the incremental expiry sweep: the next user key to look at, and the stream's clock
        # (newest applied event time; events too far ahead of the broker never get here)
        self._sweep_from = b""
        self._stream_ts = 0
        # a lower bound of updated_ts over every stored user record, known once a full sweep pass
        # has read them all (None before), kept by every write of user records since: while the
        # stream's clock is within the TTL of it, no record can have expired and no slice is read
        self._sweep_floor: int | None = None
        self._pass_oldest: int | None = None  # the same over the current pass and what it wrote
        # The outbox (recsys.shard.outbox): each batch's stamp, and the newest stamp whose lists
        # the sink has had acknowledged. Stamps start from the clock (ns), so a life's stamps
        # are above every earlier life's; entries of an earlier life count as acknowledged when
        # one of the user's events is newly applied: every earlier trigger of theirs (one
        # partition, in order) has been re-delivered by then and its entry re-stamped, so an
        # entry not re-stamped had its trigger committed by Bytewax, which happens only after
        # the sink flushed it. A re-delivery alone lets no entry go. Without a sink that acknowledges
        # (replays, tests calling ``process``), a batch's lists count as delivered once
        # ``process`` returned them (``expect_acknowledgements``). The search outbox
        # (recsys.search.outbox) follows the same rule with the search sink's acknowledgements.
        self._stamp = time.time_ns()
        self._acknowledged = dict.fromkeys(_ACKNOWLEDGED_OUTPUTS, self._stamp)  # per output
        self._acknowledging: set[str] = set()
        # an earlier life's unacknowledged unsent outputs (UNSENT_PREFIX), for ``unsent``; this
        # life's: the stamps written per output, and the batch's own
        self._left_unsent = dict(kv.iter_prefix(UNSENT_PREFIX))
        self._unsent: dict[str, list[int]] = {output: [] for output in _ACKNOWLEDGED_OUTPUTS}
        self._batch_unsent: dict[str, list[list[str | None]]] = {}
        # read as stored: a rule added since must not stop the state from opening (tests/test_engine.py)
        stored_items = [stored_catalog_item(orjson.loads(v)) for _, v in kv.iter_prefix(_ITEM_PREFIX)]
        if stored_items:
            self.items.upsert(stored_items)
        # Online re-ranking: the blend learns from what users did after what we showed them;
        # the monitor (river: rolling mean + ADWIN) tracks that hit rate and counts drops.
        rec_config = RecommenderConfig(k=settings.top_k)
        # issue 11: sharing shards pool their re-ranker steps, so each draws its negatives from a
        # stream of its own (shard 0: one process's); with one seed everywhere, N shards would
        # draw the same negative positions in lock-step, every draw N times over
        rerank_seed = [settings.seed, settings.shard] if settings.share_signals and settings.shard > 0 else settings.seed
        self.reranker = PairwiseReranker(rec_config.weights.vector(), seed=rerank_seed)
        self.shown = ShownCache()
        self.monitor = QualityMonitor()
        self.head: Head | None = None
        self._pending: list[Example] = []  # head training examples not yet learned
        self._head_behind: int | None = None  # messages read since the head's step in flight started
        if settings.head_enabled:
            import torch

            # One thread: the head's per-batch tensors are small, and a second thread only adds
            # synchronisation (measured 4x slower on 2-event batches); bulk embedding raises it.
            torch.set_num_threads(1)
            self.head = Head(
                HeadConfig(dim=embedder.dim, lr=settings.head_lr, max_steps_per_call=settings.head_steps_per_batch, seed=settings.seed),
                self.items.index.vectors_or_zero,
            )
        # In-memory engines (backtests) neither load nor write model snapshots, nor sweep
        # (their input is finite, and a MemoryKV scan from a key sorts the whole store).
        persistent = self._persistent = not isinstance(kv, MemoryKV)
        self.models = ModelSnapshots(Path(settings.state_dir) / "models" if persistent else None, settings.head_snapshot_interval_s, clock)
        # issue 11: with sharing the head and the re-ranker learn from the exchange log, the same on
        # every shard; their state is then in RocksDB with the log position (not the snapshot files)
        self.shared_models: SharedModels | None = None
        # issue 11 train/serve split: a trainer trains them (recsys/signals/trainer.py); this shard loads
        # the trainer's snapshots between batches (poll_model_snapshots) and trains nothing itself
        self.served_by_trainer = settings.model_trainer and self.exchange is not None
        self._model_poll_at = float("-inf")
        #: when (epoch seconds) the trainer wrote the model snapshot served now (None: none loaded)
        self.served_snapshot_written_at: float | None = None
        if self.exchange is not None and (self.head is not None or settings.rerank_enabled):
            self.shared_models = SharedModels(
                kv, self.head, self.reranker if settings.rerank_enabled else None,
                history_len=self.head.config.history_len if self.head is not None else 0,
                vectors_for=self._admit_remote_items if settings.unknown_items == "admit" else None,
                persistent=persistent, checkpoint_interval_s=settings.head_snapshot_interval_s, clock=clock,
                train=not self.served_by_trainer)
            self.exchange.share_models(self.shared_models)
            self.shared_models.is_known = self.items.catalog.__contains__
        else:
            self.models.restore(self)
        self.recommender = Recommender(
            self.items, self.popularity, self.covisit, rec_config,
            reranker=self.reranker, head=self.head, transitions=self.transitions, sessions=self.sessions,
        )
        # issue 13: search (recsys/search); its learned associations commit with the other signals
        self.search = Search(self.items, self.popularity, SearchConfig(k=settings.search_k, personalise=settings.search_personalise,
                                                                        attribution=settings.search_attribution,
                                                                        retrieval_cache=settings.search_query_cache,
                                                                        shown_users=settings.search_shown_users),
                             head=self.head, clock=clock)
        self.search.upsert(list(self.items.catalog.items.values()))
        self.search.load(kv)
        if self.exchange is not None:  # issue 11: the learned associations through the exchange log too
            self.exchange.share_search(self.search.associations, self.search.reranker)
            self.search.record_association = self.exchange.record_search
            self.search.record_rerank = self.exchange.record_search_step
        if settings.search_in_history:  # a recent query enters the next recommendations
            self.recommender = SearchIntent(self.recommender, self.search)
        self.totals: Counter = Counter()
        #: wall seconds of each phase (``PHASES``) summed over every batch so far: where a replay's
        #: time went (``recsys replay`` reports them)
        self.phase_totals: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        if self.served_by_trainer and persistent:  # a (re)started shard serves the newest published models at once
            self.poll_model_snapshots()
        # issue 11: exchange records held back until this shard's catalog knows every item their head
        # examples name (position -> message; in memory: the state's log position has not moved, so
        # after a restart they are read from the log again), and since when the first one waits
        self._exchange_held: dict[int, bytes] = {}
        self._held_at: tuple[int, float] | None = None
        # issue 10: an event whose item is not in the catalog yet waits for it (bounded, in state;
        # recsys/shard/waiting.py). Not in backtests that admit unknown items, nor in a run that stops
        # at the end seen at start: the catalog was read to that end before any event.
        wait_s = 0.0 if settings.unknown_items == "admit" or settings.stop_at_end else settings.unknown_item_wait_s
        self.waiting = WaitingRoom(kv, wait_s, clock, settings.max_message_bytes)
        # New item text embedded by a process of its own, off the batch's path (_defer_catalog).
        # Only where an event can wait for its item (the waiting room), on persistent state (a
        # backtest or an in-memory engine embeds in the batch, so it gives the same result every
        # time), and not with shared signals (their hold for the catalog is not measured with it).
        self._worker: EmbeddingWorker | None = None
        # (job, records, their texts, their broker append times), in the order sent
        self._deferred: deque[tuple[int | None, list[CatalogItem], list[str], list[int]]] = deque()
        self._deferred_ids: Counter[str] = Counter()  # items with a record in _deferred
        self._credit_mark: float | None = None
        # the end of the last batch's catalog upserts when that batch brought a full catalog slice
        # (a bulk import under way: see IMPORT_GAP_S)
        self._import_mark: float | None = None
        # issue 13: new search queries encoded by the worker too (_queries_off_path): its jobs
        # (job -> the texts), and the texts asked and not answered (their searches wait)
        self._query_jobs: dict[int, list[str]] = {}
        self._query_pending: set[str] = set()
        #: query texts at the worker for an erased shopper's waiting searches: their vectors are let go
        self._query_withheld: set[str] = set()
        #: why ``RECSYS_EMBED_WORKER`` asked for a worker and none runs (None: it runs, or was not
        #: asked for): what ``recsys run`` says at start (until 2026-12-07 nothing did)
        self.embed_worker_off_because = (_no_embed_worker(settings, persistent and isinstance(embedder, Embedder))
                                         if settings.embed_worker else None)
        if settings.embed_worker and self.embed_worker_off_because is None:
            # the cache's parent directory, as the engine's embedder was given it: one cache for both
            cache_dir = None if embedder.cache_path is None else str(Path(embedder.cache_path).parent)
            self._worker = EmbeddingWorker(settings.model_name, cache_dir, settings.embed_batch_size)

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
    def open(cls, settings: Settings, *, evaluate: bool = False, in_memory: bool = False, emit: bool = True) -> "Shard":
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

    def checkpoint_shared_models(self) -> None:
        """Checkpoint the shared models (issue 11) in the state, replacing the messages kept to learn
        again since the last checkpoint: for a stop in order, after the last batch is committed
        (`recsys run` calls it then). A restart then learns nothing again, where it would read the
        catalog as it is by then (an item whose text changed meanwhile: its new vector)."""
        if self.shared_models is not None and self._persistent:
            self.shared_models.write_checkpoint(self.kv)

    def close(self) -> None:
        # not after a batch that failed before its write: the models learned from events the
        # state does not hold, which a restart applies and learns again
        if not self._in_batch:
            self.models.save(self, force=True)
        if self.head is not None:
            try:
                self.head.close()
            except Exception:  # a failed step: the state and the snapshot never held it
                _log.exception("the head's last training step failed")
        if self._worker is not None:  # records it had not answered are in the state: the next start embeds them
            self._worker.close()
        self.kv.close()
        self.embedder.close()

    @property
    def model_version(self) -> str:
        """Names what produced a recommendation: the blend and the head snapshot in use; with
        shared models also the exchange-log position they were last changed at (``@x<position>``:
        any shard that applied the log that far holds the same models)."""
        version = MODEL_VERSION if self.head is None else f"{MODEL_VERSION}+{self.head.version}"
        return version if self.shared_models is None else f"{version}@{self.shared_models.version}"

    def _admit_remote_items(self, item_ids: list[str]) -> None:
        """Shared models with ``unknown_items=admit``: an item another shard admitted is admitted
        here too, as the origin did (so every shard's head reads the same vector for it)."""
        catalog = self.items.catalog
        missing = [i for i in dict.fromkeys(item_ids) if i not in catalog]
        if missing:
            # written at once, before the message's position: a crash between reads the message again
            self.kv.write(self._admit_placeholders(missing))

    def _admit_placeholders(self, item_ids: list[str]) -> dict[bytes, bytes]:
        """Admit items the catalog lacks, titled by their id (``unknown_items=admit``), into the
        item index and search (which reads them as it reads an id-only catalog's items, as the
        restart that upserts the stored catalog into search will); returns their state records,
        kept as a catalog record is. Until 2026-12-07 they were admitted in memory only, and after
        a restart what was learned for them (a query, co-visits) led nowhere."""
        admitted = [CatalogItem(i, title=f"item {i}") for i in item_ids]
        self.items.upsert(admitted)
        if (search := getattr(self, "search", None)) is not None:  # None: the exchange's catch-up at start,
            search.upsert(admitted)  # before search is built from the whole catalog
        return {_ITEM_PREFIX + item.item_id.encode(): encode(item) for item in admitted}

    # ------------------------------------------------------------------ catalog

    def upsert_catalog(self, items: list[CatalogItem], *, progress: bool = False) -> int:
        """Add or update items (embedding only new or changed text) and persist them."""
        if not items:
            return 0
        self._head_quiet()
        changed = self.items.upsert(items, progress=progress)
        self.search.upsert(items)  # issue 13
        self.kv.write({_ITEM_PREFIX + i.item_id.encode(): encode(i) for i in items})
        return changed

    def upsert_catalog_file(self, items: list[CatalogItem], *, progress: bool = False) -> int:
        """The start-up catalog file (``RECSYS_CATALOG_FILE``): apply its records that are new to this
        state or changed since the file last gave them; returns how many. A record the file gave
        before is not applied again: the catalog topic may have changed that item since (until
        2026-12-07 a file left in the settings put every item back as the file had it at every
        start, a withdrawn item available again, an old price back; a day-2 operator's probe)."""
        digests = {i.item_id: hashlib.blake2b(encode(i), digest_size=16).digest() for i in items}
        given = {i: self.kv.get(_FILE_ITEM_PREFIX + i.encode()) for i in digests}
        fresh = [i for i in items if given[i.item_id] != digests[i.item_id]]
        if fresh:
            self.upsert_catalog(fresh, progress=progress)
            self.kv.write({_FILE_ITEM_PREFIX + i.item_id.encode(): digests[i.item_id] for i in fresh})
        return len(fresh)

    # ------------------------------------------------------------------ the step

    def expect_acknowledgements(self, *outputs: str) -> None:
        """The ``outputs`` (of :data:`_ACKNOWLEDGED_OUTPUTS`; all if none named) of a batch are
        kept (the outboxes; :data:`UNSENT_PREFIX`) until :meth:`acknowledge` is called with its
        stamp (or a later one): for sinks that deliver them later than ``process`` returns (the
        Kafka sink: at its producer's flush, once per epoch)."""
        unknown = set(outputs) - set(_ACKNOWLEDGED_OUTPUTS)
        if unknown:
            raise ValueError(f"expect_acknowledgements: unknown outputs {sorted(unknown)} (known: {_ACKNOWLEDGED_OUTPUTS})")
        self._acknowledging.update(outputs or _ACKNOWLEDGED_OUTPUTS)

    def acknowledge(self, stamp: int, output: str = "recommendations") -> None:
        """Every one of ``output`` of the batches up to ``BatchResult.stamp == stamp`` has been
        delivered: their outbox entries may go (the next time their user's outbox is written)."""
        if output not in self._acknowledged:
            raise ValueError(f"acknowledge: unknown output {output!r} (known: {_ACKNOWLEDGED_OUTPUTS})")
        self._acknowledged[output] = max(self._acknowledged[output], stamp)
        # unsent outputs go at once: the sinks' last acknowledgement in a stop in order comes
        # after the last batch, and what stays would be sent again by the next start
        stamps, done = self._unsent[output], []
        while stamps and stamps[0] <= stamp:
            done.append(unsent_key(output, stamps.pop(0)))
        if done:
            try:
                self.kv.write({}, done)
            except StoreClosedError:  # closed already: the next start sends them again (identical copies)
                pass

    def process(self, envelopes: list[Envelope]) -> BatchResult:
        """Decode, validate, apply and recommend for one batch; commit it atomically.

        The phases, each a method below: decode (catalog upserts and erasures first), admit
        (the waiting room, catalog and clock checks; events grouped by user in each user's
        order), answer the batch's searches, apply (global signals, then user state), learn the
        head, rank for every user with a newly applied event, and one atomic write of it all.

        Python's cyclic garbage collector is paused for the batch (:func:`_collector_paused`).
        """
        with _collector_paused():
            result = self._process(envelopes)
        for phase, seconds in result.phase_seconds.items():
            self.phase_totals[phase] = self.phase_totals.get(phase, 0.0) + seconds
        return result

    def _process(self, envelopes: list[Envelope]) -> BatchResult:
        self._in_batch = True  # until the batch's write is done (:meth:`_committed`)
        read = len(envelopes)  # the messages the batch read (the head's step is served by their count)
        self._stamp += 1
        # without acknowledgements, the caller took the previous batch's outputs (see __init__)
        for output in _ACKNOWLEDGED_OUTPUTS:
            if output not in self._acknowledging:
                self._acknowledged[output] = self._stamp - 1
        self.search.outbox.stamp = self._stamp
        self.search.outbox.acknowledged = self._acknowledged["search_results"]
        result = BatchResult(stamp=self._stamp)
        counts = result.counts
        laps = _Laps(result.phase_seconds)
        if self.served_by_trainer and self._persistent:  # between two batches: the trainer's newest models
            self.poll_model_snapshots()
            laps.lap("models")
        now_ms = int(self.clock() * 1000)
        if any(env.extra for env in envelopes):
            envelopes = self._absorb_offset_resets(envelopes)
        events, puts = self._decode(envelopes, result, now_ms)
        laps.lap("decode")
        by_user, waited = self._admit(events, result, puts, now_ms)
        if self.exchange is not None:  # issue 11: what the batch's sealed ops cover (with this batch's write)
            self._cover()
        laps.lap("admit")
        if not by_user:
            self._commit({**puts, **self._unsent_puts()}, waited.deletes)
            self._committed(read)
            laps.lap("commit")
            self.totals.update(counts)
            return result

        user_ids = list(by_user)
        # expiry per user, against the user's own next event: no event may reset another user
        states = self.users.get_many(user_ids, now_ts={u: evs[0][1].ts for u, evs in by_user.items()})
        outboxes = self._load_outboxes(user_ids)
        result.new_users = sum(1 for state in states.values() if not state.last_applied)
        laps.lap("load")

        # what we would have shown each user right before this batch (backtests only)
        if self.evaluate:
            self._score_before(result, [ev for _, ev in waited.ready if ev.user_id in by_user], states)
            laps.lap("score")

        # issue 13: answer the batch's searches from the state before it; learn from its new events
        result.search_results = self.search.step(
            by_user, states, self.watermarks, now_ms, self.model_version,
            shared=self._covered if self.exchange is not None else None, released=waited.released,
            on_released=lambda user_id, payload: self._keep_unsent("search_results", user_id, payload),
            sent_before=self._search_sent_before(waited.released, counts) if self._sent_before else None)
        counts["search_results"] += len(result.search_results)
        laps.lap("search")

        fresh_users, reemit, examples = self._apply(by_user, states, outboxes, waited, puts, counts)
        laps.lap("apply")
        self._learn_head(examples, counts)
        laps.lap("head")
        self._rank_and_emit(fresh_users, by_user, states, outboxes, reemit, puts, result, now_ms, waited.released)
        laps.lap("rank")

        # one atomic write: users + signals + watermarks + outboxes + catalog + expired users
        puts.update(self.users.puts([states[u] for u in fresh_users]))
        if fresh_users:  # what the sweep may skip: the oldest record written counts too
            written = min(states[u].updated_ts for u in fresh_users)
            self._pass_oldest = written if self._pass_oldest is None else min(self._pass_oldest, written)
            if self._sweep_floor is not None:
                self._sweep_floor = min(self._sweep_floor, written)
        if self.exchange is not None and (message := self.exchange.seal(puts)) is not None:
            result.exchange.append(message)  # issue 11: this batch's signal ops, sealed with it
        self._commit({**puts, **self._unsent_puts()}, [*waited.deletes, *self._sweep(by_user, counts)])
        self._committed(read)
        laps.lap("commit")
        self.totals.update(counts)
        return result

    def _committed(self, read: int) -> None:
        """The batch (``read`` messages) is in the state: the models may be saved with what they learned from it (at
        most every ``head_snapshot_interval_s``). Before 2026-12-04 the snapshot was written after
        the head's step, before the batch's write: a batch that failed in between (a full disk, a
        crash) was in the models but not in the state, and a restart learned it twice."""
        self._in_batch = False
        if self._head_behind is not None:
            self._publish_head(read)
        self.models.save(self)

    def _covered(self, env: Envelope) -> bool:
        """Issue 11: whether the exchange log holds the ops of this input message already (a wiped
        shard re-reading its partition): applied to the user, it records no op."""
        return self.exchange is not None and self.exchange.covers(env.topic, env.partition, env.offset)

    def _cover(self) -> None:
        """Note the events positions the next sealed exchange message covers: each events
        partition up to the last offset processed (this batch's included: it is committed with
        the seal), but below any event of that partition still waiting for its catalog item
        (its ops are recorded when it is released)."""
        others = (self.settings.catalog_topic, self.settings.control_topic, self.settings.exchange_topic)
        high = {at: offset for at, offset in self.positions.items() if at[0] not in others}
        if self.waiting.positions:
            for topic, partition, offset in self.waiting.positions:
                if (topic, partition) in high and offset <= high[(topic, partition)]:
                    high[(topic, partition)] = offset - 1
        for (topic, partition), offset in high.items():
            self.exchange.cover(topic, partition, offset)

    def _decode(self, envelopes: list[Envelope], result: BatchResult,
                now_ms: int) -> tuple[list[tuple[Envelope, Event]], dict[bytes, bytes]]:
        """Decode every message (a bad one is dead-lettered); apply catalog upserts and erasures
        at once. Returns the decoded events and the batch's first puts (positions, catalog)."""
        counts = result.counts
        catalog_topic = self.settings.catalog_topic
        control_topic = self.settings.control_topic
        exchange_topic = self.settings.exchange_topic if self.exchange is not None else None
        max_bytes = self.settings.max_message_bytes
        # what earlier batches (an earlier life's included) processed: its refusals were made then
        self._processed_before = dict(self.positions)
        # catalog first, so an item and its first event in one batch work in either order
        catalog_items: list[CatalogItem] = []
        catalog_ms: list[int] = []  # their broker append times
        controls: list[tuple[Envelope, ControlMessage]] = []
        events: list[tuple[Envelope, Event]] = []
        exchanged: list[tuple[int, bytes]] = []  # issue 11: the exchange log's records, in log order
        for env in envelopes:
            try:
                if env.topic == exchange_topic:
                    exchanged.append((env.offset, b"" if env.value is None else env.value))
                elif env.topic == catalog_topic:
                    counts["catalog_in"] += 1
                    item = decode_catalog_item(env.value, max_bytes) if env.value is not None else self._withdrawal(env, catalog_items)
                    if item is not None and env.key is not None and env.key != item.item_id.encode():
                        # applied (every shard reads the whole catalog: nothing splits), and counted: on
                        # the compacted topic a tombstone keyed by item_id would not remove this record
                        counts["catalog_key_mismatch"] += 1
                    if item is not None:
                        catalog_items.append(item)
                        catalog_ms.append(env.timestamp_ms)
                elif env.topic == control_topic:
                    counts["control_in"] += 1
                    controls.append((env, decode_control(env.value, max_bytes)))
                else:
                    counts["events_in"] += 1
                    event = decode_event(env.value, max_bytes)
                    if env.key != event.user_id.encode():
                        self._check_key(env, event, counts)
                    events.append((env, event))
            except DecodeError as exc:
                if self._refused_on_shard_0(env):
                    counts["refused_on_shard_0"] += 1
                else:
                    self._dead_letter(result, env, str(exc), now_ms)
        result.event_types.update(event.type for _, event in events)
        puts: dict[bytes, bytes] = self._advance_positions(envelopes)
        if self._deferred:
            puts.update(self._apply_embedded(result))
        if catalog_items:
            began = self.clock()
            worker_crediting = self._credit_mark is not None  # _apply_embedded credits all time from its mark
            known = self.items.catalog.items
            brought_new = any(item.item_id not in known for item in catalog_items)
            now_items, now_ms = catalog_items, catalog_ms
            if self._worker is not None:
                now_items, now_ms = self._defer_catalog(catalog_items, catalog_ms, result)
            if now_items:
                self._head_quiet()
                self.items.upsert(now_items)
                self.search.upsert(now_items)  # issue 13
            result.catalog_applied_ms += now_ms
            for item in catalog_items:  # every record in the state at once, deferred ones too
                puts[_ITEM_PREFIX + item.item_id.encode()] = encode(item)
            # the catalog was catching up meanwhile: no event's wait for an item runs out for it
            full_slice = counts["catalog_in"] >= self.settings.catalog_poll_max_records
            puts.update(self.waiting.credit_catalog(self._catalog_credit(began, worker_crediting,
                                                                         full_slice and brought_new)))
        # after the batch's catalog records: a held exchange message may be waiting for one of them
        if exchanged or self._exchange_held:  # committed at once with its log position (recsys/signals/exchange.py)
            counts["exchange_applied"] += self.apply_exchange(exchanged)
        # erasures before any event of the batch: committed at once, so no event below can
        # read the erased records back
        for env, message in controls:
            self._apply_control(env, message, now_ms, result)
        return events, puts

    def _catalog_credit(self, began: float, worker_crediting: bool, importing: bool) -> float:
        """Seconds of this batch's catalog work (from ``began``) that stop the unknown-item wait's
        clock: the upserts, less what the embedding worker's path credits (all time from its mark:
        credited twice, the clock ran backwards), plus, during a bulk import of new items, the time
        since its last slice (:data:`IMPORT_GAP_S`). ``importing``: this batch brought a full slice
        of new items, so the time until the next batch's is import time too."""
        end = self.clock()
        mark = self._credit_mark
        credit = (end if mark is None else min(end, max(mark, began))) - began
        if not worker_crediting and self._import_mark is not None and 0 <= began - self._import_mark <= IMPORT_GAP_S:
            credit += began - self._import_mark
        self._import_mark = end if importing else None
        return credit

    def _withdrawal(self, env: Envelope, pending: list[CatalogItem]) -> CatalogItem | None:
        """A catalog tombstone (a null value: Kafka's deletion of its key from the compacted
        topic) as the record it means: the item's latest record, unavailable. It keeps its
        title, so histories and reasons that name it still read well, and a record sent again
        brings it back. None for an item never seen (nothing to withdraw); a tombstone without
        a key names no item and is refused."""
        if env.key is None:
            raise DecodeError("payload: a tombstone (null value) without a key: it names no item to withdraw")
        try:
            item_id = env.key.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"key: a tombstone's key is not UTF-8 text, so it names no item ({env.key[:40]!r})") from None
        deferred = (item for _, later, _, _ in reversed(self._deferred) for item in reversed(later))
        latest = next((item for item in (*reversed(pending), *deferred) if item.item_id == item_id),
                      None) or self.items.catalog.get(item_id)
        return None if latest is None else replace(latest, available=False)

    def _defer_catalog(self, items: list[CatalogItem], appended_ms: list[int],
                       result: BatchResult) -> tuple[list[CatalogItem], list[int]]:
        """Send the texts of the records that need the model to the embedding worker; returns
        the records to apply now and their broker append times. Deferred: a record whose text
        the index has no vector for (:meth:`ItemSpace.needs_vector`), and every later record of
        an item with one deferred (an item's records apply in their order). A new item is not
        in the catalog until its record applies, so its events wait for it in the waiting room;
        an item with a new text keeps its old vector until then. Each record is in the batch's
        write as before, so a crash loses nothing: the next start embeds what the worker had not
        answered."""
        try:
            if not self._deferred and not self._worker.started():
                return items, appended_ms  # its model is still loading (a few seconds after start): in the batch
        except WorkerGone as exc:
            self._worker_gone(exc)
            return items, appended_ms
        deferred = [bool(self._deferred_ids[item.item_id]) or self.items.needs_vector(item) for item in items]
        later = [item for item, d in zip(items, deferred) if d]
        if not later:
            return items, appended_ms
        texts = list(dict.fromkeys(item.text for item in later if item.available))
        try:
            job = self._worker.submit(texts) if texts else None
        except WorkerGone as exc:
            self._worker_gone(exc)
            self._apply_embedded(result)  # what was deferred before these, first (the credit's put follows)
            return items, appended_ms
        if self._credit_mark is None:
            self._credit_mark = self.clock()
        self._deferred.append((job, later, texts, [ms for ms, d in zip(appended_ms, deferred) if d]))
        self._deferred_ids.update(item.item_id for item in later)
        result.counts["catalog_deferred"] += len(later)
        return ([item for item, d in zip(items, deferred) if not d],
                [ms for ms, d in zip(appended_ms, deferred) if not d])

    def _apply_embedded(self, result: BatchResult) -> dict[bytes, bytes]:
        """Apply, in order, the deferred catalog records whose vectors the worker has sent back
        (all of them if the worker is gone). Returns the waiting room's credit: while records
        wait for the worker the catalog is catching up, and no event's wait runs out for it."""
        now = self.clock()
        credit = now - self._credit_mark if self._credit_mark is not None else 0.0
        self._credit_mark = now
        while self._deferred:
            job, records, texts, appended = self._deferred[0]
            answer = None  # none: the texts are embedded here
            if job is not None and self._worker is not None:
                try:
                    answer = self._worker.take(job)
                    if answer is None:
                        break  # not back yet; the ones after it neither (answered in order)
                except WorkerGone as exc:
                    self._worker_gone(exc)  # this record and the ones after it: embedded here
            if isinstance(answer, str):
                _log.warning("the embedding worker failed on %d text(s) (%s); embedding them in the batch",
                             len(texts), answer)
                answer = None
            self._deferred.popleft()
            vectors = None if answer is None else dict(zip(texts, answer))
            if vectors is None:
                self._head_quiet()
            self.items.upsert(records, vectors=vectors)
            self.search.upsert(records)  # issue 13
            self._deferred_ids.subtract(item.item_id for item in records)
            result.counts["catalog_deferred_applied"] += len(records)
            result.catalog_applied_ms += appended
        self._deferred_ids = +self._deferred_ids  # drop the zeros
        if not self._deferred:
            self._credit_mark = None
        return self.waiting.credit_catalog(credit) if credit > 0 else {}

    @property
    def queries_at_worker(self) -> int:
        """Search queries sent to the embedding worker and not answered yet (their searches wait)."""
        return len(self._query_pending)

    @property
    def deferred_records(self) -> int:
        """Catalog records waiting for the embedding worker's vectors."""
        return sum(len(records) for _, records, _, _ in self._deferred)

    def _worker_gone(self, exc: WorkerGone) -> None:
        """The worker died: from now on new item text is embedded in the batch (what it had not
        answered is, at :meth:`_apply_embedded`)."""
        _log.error("%s; new item and query text is embedded in the batch from now on (RECSYS_EMBED_WORKER)", exc)
        self._worker = None
        self._query_jobs.clear()  # their searches are released at the next sort: encoded in the batch
        self._query_pending.clear()
        self._query_withheld.clear()

    def _queries_off_path(self, events: list[tuple[Envelope, Event]], result: BatchResult) -> Callable[[Event], bool] | None:
        """Issue 13: the batch's new search queries are encoded by the embedding worker, off the
        batch's path, as new item text is (``RECSYS_EMBED_WORKER``). Without it every event of a
        batch waits for the query model (~6-9 ms a call on one thread, memory-bound on its
        weights: on a long tail of queries two thirds of a live batch; benchmarks/README.md,
        "new queries off the batch's path"). A search whose query was sent waits in the waiting
        room, its user's later events behind it, and is answered at the first batch after the
        vector came back, on its user's state as it was before it; the other users' events go on
        at once. Returns the waiting room's test (None: nothing waits for a query).

        A search waits :data:`QUERY_WAIT_S` at most: a wait for a query only saves the batch the
        model's time, so past that the search is answered with its query encoded in the batch.
        The vectors come back into the query encoder's cache as if made here: the same model on
        one thread, a batch's new queries in one call (queries queued at the worker share its
        call, so a vector may differ from the one made here in its last bits, as a query encoded
        with other texts does anyway). A search still waiting after a restart (the worker's jobs
        are not state), or once the worker is gone, is released too.
        Not while the worker still loads its model (a few seconds after start)."""
        search = self.search
        if self._worker is None or not search.respond:
            return None
        try:
            for job, texts in list(self._query_jobs.items()):  # answers back since the last batch
                answer = self._worker.take(job)
                if answer is None:
                    continue
                del self._query_jobs[job]
                self._query_pending.difference_update(texts)
                withheld = self._query_withheld.intersection(texts)  # an erased shopper's (until 2026-12-08
                self._query_withheld.difference_update(texts)  # cached and stored, linked to no one)
                if isinstance(answer, str):  # released below; encoded in the batch
                    _log.warning("the embedding worker failed on %d quer%s (%s); encoding them in the batch",
                                 len(texts), "y" if len(texts) == 1 else "ies", answer)
                    continue
                if withheld:
                    kept = [j for j, text in enumerate(texts) if text not in withheld]
                    texts, answer = [texts[j] for j in kept], [answer[j] for j in kept]
                search.encoder.put_many(texts, answer)
            if self._worker.started():
                committed = self._processed_before  # copies of messages processed before: not new
                parked = self.waiting.positions
                asking = [(event.user_id, text) for env, event in events
                          if env.offset > committed.get((env.topic, env.partition), -1)
                          and (env.topic, env.partition, env.offset) not in parked
                          and (text := search.unencoded_query(event)) is not None and text not in self._query_pending]
                fresh = list(dict.fromkeys(text for _, text in asking))
                searchers = {user for user, _ in asking}
                # only where someone else would wait for the model: a batch of the searching users'
                # own events (a quiet stream's batch of one search) encodes in the batch, sooner than
                # a round trip to the worker and the next batch (p99 +24 ms at 50 events/s, measured)
                if fresh and any(event.user_id not in searchers for _, event in events):
                    self._query_jobs[self._worker.submit(fresh, cached=False)] = fresh
                    self._query_pending.update(fresh)
                    result.counts["queries_to_worker"] += len(fresh)
        except WorkerGone as exc:
            self._worker_gone(exc)
            return None
        if not self._query_pending:
            return None
        pending = self._query_pending
        return lambda event: (text := search.unencoded_query(event)) is not None and text in pending

    def _admit(self, events: list[tuple[Envelope, Event]], result: BatchResult, puts: dict[bytes, bytes],
               now_ms: int) -> tuple[dict[str, list[tuple[Envelope, Event]]], Sorted]:
        """The events that may be applied now, grouped by user in each user's order, and what the
        waiting room did (parked, released, expired, its puts and deletes)."""
        counts = result.counts
        # validate against the catalog, group by user (keeping each user's order)
        # issue 10: events for items not in the catalog yet wait for it (recsys/shard/waiting.py)
        encoding = self._queries_off_path(events, result) if self._worker is not None else None
        # what earlier batches processed (read): an event at or below it is a re-delivered copy
        waited = self.waiting.sort(events, self.items.catalog, self._processed_before, encoding, QUERY_WAIT_S)
        events = waited.ready
        puts.update(waited.puts)
        if waited.parked:
            counts["waited"] += waited.parked
        if waited.refused_before:
            counts["redelivered_skipped"] += waited.refused_before
        for env, reason in waited.unreadable:
            self._dead_letter(result, env, reason, now_ms, released=True)
        for env, event in waited.expired:
            if self.tombstones and self._erased_before(event):
                counts["forgotten_dropped"] += 1  # an erased user's data is never published again
                continue
            self._dead_letter(result, env, f"field 'item_id': unknown item {event.item_id!r} (not in the catalog "
                                           f"after waiting {self.waiting.wait_s:g} s)", now_ms, released=True)
        by_user: dict[str, list[tuple[Envelope, Event]]] = {}
        admit_unknown = self.settings.unknown_items == "admit"
        for env, event in events:
            ahead = self._ahead_of_broker(env, event)
            if ahead is not None:
                self._dead_letter(result, env, ahead, now_ms, released=(env.topic, env.partition, env.offset) in waited.released)
                continue
            if self.tombstones and self._erased_before(event):
                counts["forgotten_dropped"] += 1  # no dead letter: it would publish their data again
                continue
            if event.item_id is not None and event.item_id not in self.items.catalog:
                if not admit_unknown:
                    self._dead_letter(result, env, f"field 'item_id': unknown item {event.item_id!r} (not in the catalog)", now_ms)
                    continue
                puts.update(self._admit_placeholders([event.item_id]))  # in the state with the batch
            by_user.setdefault(event.user_id, []).append((env, event))
        counts["valid_events"] += sum(len(v) for v in by_user.values())
        return by_user, waited

    def _apply(self, by_user: dict[str, list[tuple[Envelope, Event]]], states: dict[str, UserState],
               outboxes: dict[str, dict[tuple[int, int], tuple[bytes, int]]], waited: Sorted, puts: dict[bytes, bytes],
               counts: Counter) -> tuple[list[str], list[tuple[str, bytes]], list[Example]]:
        """Apply each new event: the re-ranker learns from it, the global signals absorb it (they
        need the history before it), then the user's state. A re-delivered event is skipped (its
        stored recommendation re-emitted), a duplicate absorbed. Returns the users with a newly
        applied event, the re-emissions and the head's new training examples."""
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
                if env.offset <= committed.get(wm_key, -1) and (env.topic, env.partition, env.offset) not in waited.released:
                    counts["redelivered_skipped"] += 1
                    box = outboxes.get(user_id, {})
                    stored = box.get((env.partition, env.offset))
                    if stored is not None:
                        reemit.append((user_id, stored[0]))
                        # in doubt again until this batch is acknowledged (see __init__)
                        box[(env.partition, env.offset)] = (stored[0], self._stamp)
                    continue
                if state.is_duplicate(event.event_id):  # a producer retry: absorbed, not applied
                    counts["duplicates"] += 1
                    self._advance_watermark(env, puts)
                    continue
                if event.item_id is not None and self.exchange is not None:  # applied from the log
                    if not self.exchange.covers(env.topic, env.partition, env.offset):  # else the log holds it
                        self.exchange.record(event.user_id, event.session_id, event.item_id, event.type, event.ts,
                                             state.history if self.learning else None)
                elif event.item_id is not None:
                    if self.learning:
                        self.covisit.update(state.history, event.item_id, event.type, event.ts)
                        self.transitions.update(state.history, event.item_id, event.type, event.ts)
                        self.popularity.update(event.item_id, EVENT_WEIGHTS[event.type], event.ts)
                    self.sessions.update(event.user_id, event.session_id, event.item_id, event.ts)
                vector = self.items.vector(event.item_id) if event.item_id is not None else None
                if self.head is not None and event.item_id is not None and state.history and self.shared_models is None:
                    examples.append(Example(list(state.history), event.item_id, event.type, event.ts))
                state.apply(
                    event,
                    vector,
                    env.partition,
                    env.offset,
                    history_len=self.settings.history_len,
                    half_life_h=self.settings.interest_half_life_h,
                    dedup_window=self.settings.dedup_window,
                )
                self._advance_watermark(env, puts)
                self._stream_ts = max(self._stream_ts, event.ts)
                applied_any = True
                counts["applied"] += 1
            if applied_any:
                fresh_users.append(user_id)
        return fresh_users, reemit, examples

    def _learn_head(self, examples: list[Example], counts: Counter) -> None:
        """The head learns once a full training batch has accumulated (a bounded buffer, so the
        cost per event is fixed however the stream is batched); only newly applied events enter
        it, so a re-delivery is never learned twice (a crash loses the buffer: never learned).
        Model snapshots are written after the batch's write (:meth:`_committed`).

        The step runs on the head's own thread (``Head.learn(background=True)``): its ~20 ms at
        256 examples (~2/3 of it in torch, off the interpreter) overlap the batches after it.
        The head serves it at the end of the batch in which :data:`_HEAD_PUBLISH_AFTER`
        messages have been read since it started (:meth:`_publish_head`), so the lists never
        depend on the thread's timing; the batch that started it is ranked with the head before
        it (before 2026-12-05 the step ran in the batch's path, before its ranking: the live
        latency tail's most frequent slow batch).
        """
        self._pending.extend(examples)
        del self._pending[: -_MAX_PENDING_EXAMPLES]
        if self.head is not None and self.learning and len(self._pending) >= self.head.config.batch_size:
            examples, self._pending = self._pending, []
            stats = self.head.learn(examples, background=True)
            counts["head_steps"] += stats["steps"]
            self._head_behind = 0 if stats["steps"] else None

    def _publish_head(self, read: int) -> None:
        """After a batch's write (``read``: its messages): serve the head's step in flight once
        :data:`_HEAD_PUBLISH_AFTER` messages have been read since it started (the batch that
        started it included). Counted in messages, so what is served never depends on the
        thread's timing; at the end of a batch, so what the next batch and a backtest's list
        before it (``recommend_for``) see is the same. Served from the next read of the head on
        (``Head.serve_at_next_read``): the wait for the step, if any is left, is there, so the
        step also overlaps the next batch's decoding, loading and its ranking's other sources
        (a replay's batch is past the count when its write ends: it waited there before)."""
        self._head_behind += read
        if self._head_behind >= _HEAD_PUBLISH_AFTER:
            self.head.serve_at_next_read()
            self._head_behind = None

    def _head_quiet(self) -> None:
        """Wait for the head's step in flight: before text is embedded, since a bulk embedding
        gives torch more threads, and a step that ran on them would not be the same to the bit."""
        if self.head is not None:
            self.head.wait()

    def _rank_and_emit(self, fresh_users: list[str], by_user: dict[str, list[tuple[Envelope, Event]]],
                       states: dict[str, UserState], outboxes: dict[str, dict[tuple[int, int], tuple[bytes, int]]],
                       reemit: list[tuple[str, bytes]], puts: dict[bytes, bytes], result: BatchResult, now_ms: int,
                       released: Container[tuple[str, int, int]] = ()) -> None:
        """Rank for every user with a newly applied event (coalesced per batch), each list into
        the user's outbox (written with the batch) and the result, re-emissions after them.
        A list whose trigger waited for its item (``released``) is also kept as unsent until
        acknowledged (:data:`UNSENT_PREFIX`)."""
        counts = result.counts
        if fresh_users and self.emit:
            now_ts = max(by_user[u][-1][1].ts for u in fresh_users)
            ranked = self.recommender.rank([states[u] for u in fresh_users], now_ts)
            for user_id, (items, shown) in zip(fresh_users, ranked):
                self.shown.put(user_id, shown)
                env, trigger = by_user[user_id][-1]
                if self._sent_before and self._sent_before_rebuild(env, (env.topic, env.partition, env.offset) in released):
                    counts["sent_before_rebuild"] += 1  # ranked (the re-ranker learns from it), not sent
                    continue
                payload = encode(self._recommendation(user_id, items, trigger, now_ms))
                result.recommendations.append((user_id, payload))
                box = outboxes.setdefault(user_id, {})
                box[(env.partition, env.offset)] = (payload, self._stamp)
                puts[_OUTBOX_PREFIX + user_id.encode()] = encode_outbox(box, self._acknowledged["recommendations"])
                if (env.topic, env.partition, env.offset) in released:
                    self._keep_unsent("recommendations", user_id, payload)
        # users with re-emitted lists only: their entries re-stamped, none let go (the later
        # triggers of theirs may not be re-delivered yet: see __init__)
        for user_id in dict.fromkeys(u for u, _ in reemit):
            if _OUTBOX_PREFIX + user_id.encode() not in puts:
                puts[_OUTBOX_PREFIX + user_id.encode()] = encode_outbox(outboxes[user_id], acknowledged=-1)
        result.recommendations.extend(reemit)  # last: the metrics time all but these counts["reemitted"]
        counts["recommendations"] += len(result.recommendations)
        counts["reemitted"] += len(reemit)

    # ------------------------------------------------------------------ issue 11: the exchange

    def apply_exchange(self, records: list[tuple[int, bytes]]) -> int:
        """Apply exchange-log records ``(position, message)`` in log order, committed with the
        log position in one atomic write (:meth:`recsys.signals.exchange.SignalExchange.apply`)."""
        puts: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        if self._exchange_held:  # what waited for the catalog goes first, in log order (a re-read once)
            records = sorted({**self._exchange_held, **dict(records)}.items())
        applied = self.exchange.apply(records, puts, deletes, hold=self._hold_for_catalog)
        self._exchange_held = {p: raw for p, raw in records if p > self.exchange.position}
        if not self._exchange_held:
            self._held_at = None
        if deletes:  # an erasure's freed session slot reused by a later op: its new record stays
            puts.update(self.sessions.export_dirty())
            deletes = [key for key in deletes if key not in puts]
        self._commit(puts, deletes)
        return applied

    def _hold_for_catalog(self, position: int, items: list[str]) -> bool:
        """Whether to hold the exchange log at ``position``, whose message teaches the shared head
        about ``items`` this shard's catalog does not hold yet (their catalog records are on
        their way: the origin knew them). Learned now, the head would read zero vectors for them
        where other shards read the items' own, and the shards' models would part for good; so
        the log waits (signals and models alike, this shard's events go on) until a batch brings
        the records, up to ``unknown_item_wait_s`` (the wait an event gets), then goes on
        without them, logged and counted (``exchange_unknown_items``). Time spent applying
        catalog records does not count (the waiting room's clock)."""
        now = self.waiting.now()
        if self._held_at is None or self._held_at[0] != position:
            self._held_at = (position, now)
        if now - self._held_at[1] < self.settings.unknown_item_wait_s:
            return True
        _log.warning("exchange log position %d: %d item(s) still not in the catalog after %.1f s (%s); the shared "
                     "head learns zero vectors for them here, so this shard's models may differ from the others'",
                     position, len(items), now - self._held_at[1], ", ".join(items[:5]))
        self.totals["exchange_unknown_items"] += len(items)
        return False

    def load_models(self, payload: bytes) -> None:
        """Serve the models of a trainer's snapshot (:meth:`SharedModels.serving_state` bytes) from
        the next ranking on; their log position becomes the version recommendations name."""
        if self.shared_models is None:
            return
        self.shared_models.load_serving(payload)
        self.totals["model_snapshots_loaded"] += 1

    def poll_model_snapshots(self, *, force: bool = False) -> bool:
        """Load the trainer's newest model snapshot when it is newer than the models served (looked
        for at most every :data:`MODEL_POLL_S` unless ``force``). True when one was loaded."""
        from recsys.signals import trainer

        now = time.monotonic()
        directory = self.settings.exchange_snapshot_dir
        if self.shared_models is None or not directory or (not force and now - self._model_poll_at < MODEL_POLL_S):
            return False
        self._model_poll_at = now
        info = trainer.newest_model_snapshot(directory, self.settings.exchange_topic, newer_than=self.shared_models.position)
        if info is None:
            return False
        try:
            header, payload = trainer.read_model_snapshot(info.path)
        except (OSError, trainer.ModelSnapshotError) as exc:  # replaced meanwhile: the next poll finds a newer one
            _log.warning("model snapshot %s not loaded: %s", info.path, exc)
            return False
        self.load_models(payload)
        written_ms = header.get("written_at_ms")
        self.served_snapshot_written_at = written_ms / 1000 if written_ms is not None else None
        return True

    def signal_checksum(self) -> str:
        """sha256 of the committed global signals: equal on shards holding identical ones."""
        return signal_checksum(self.kv)

    # ------------------------------------------------------------------ helpers

    def _advance_watermark(self, env: Envelope, puts: dict[bytes, bytes]) -> None:
        """Record that the message at ``env`` is absorbed (written with this batch)."""
        wm_key = (env.topic, env.partition)
        if env.offset > self.watermarks.get(wm_key, -1):
            self.watermarks[wm_key] = env.offset
            puts[_WATERMARK_PREFIX + f"{env.topic}:{env.partition}".encode()] = str(env.offset).encode()

    def _ahead_of_broker(self, env: Envelope, event: Event) -> str | None:
        """The dead-letter reason for an event time further ahead of its message's broker
        timestamp than ``max_event_ahead_s`` (a producer clock bug: absorbed, it would push
        the decay clocks of trending and co-visitation far ahead); None when it is fine or
        the broker time is unknown (0)."""
        limit_ms = self.settings.max_event_ahead_s * 1000
        if limit_ms <= 0 or env.timestamp_ms <= 0 or event.ts - env.timestamp_ms <= limit_ms:
            return None
        return (
            f"field 'ts': {event.ts} is {(event.ts - env.timestamp_ms) / 1000:.0f} s ahead of the message's broker "
            f"timestamp {env.timestamp_ms} (limit RECSYS_MAX_EVENT_AHEAD_S={self.settings.max_event_ahead_s:g})"
        )

    def _commit(self, puts: dict[bytes, bytes], deletes: list[bytes] = ()) -> None:
        puts.update(self.popularity.export_dirty())
        puts.update(self.covisit.export_dirty())
        puts.update(self.transitions.export_dirty())
        puts.update(self.sessions.export_dirty())
        search = self.search.export_dirty()  # issue 13
        # an empty record is one that went (a query no longer held, a closed window): deleted, as
        # its key names a query or a user (until 2026-12-08 written empty, the key kept)
        if gone := [key for key, value in search.items() if not value]:
            for key in gone:
                del search[key]
            deletes = [*deletes, *gone]
        puts.update(search)
        if self._sent_before:
            self._let_go_of_passed_marks()
        if puts or deletes:
            self.kv.write(puts, deletes)

    def _check_key(self, env: Envelope, event: Event, counts: Counter) -> None:
        """An event whose Kafka key is not its ``user_id`` (or that has none) may sit in another
        partition than the user's other events. One process holds every partition: it is
        applied and counted (``key_mismatch``). With shards it would live on a shard that does not
        own the user and split their state: it is refused (a dead letter naming both)."""
        if self.settings.shards == 1:
            counts["key_mismatch"] += 1
            return
        key = "no key" if env.key is None else f"key {env.key[:64].decode('utf-8', 'replace')!r}"
        raise DecodeError(
            f"key: {key} is not the event's user_id {event.user_id!r}; with {self.settings.shards} shards the user's "
            f"events must all be keyed by user_id to reach the shard that owns them (producers: key by user_id)"
        )

    def _advance_positions(self, envelopes: list[Envelope]) -> dict[bytes, bytes]:
        """``pos:`` records for what this batch consumed, where it moved a partition forward."""
        puts: dict[bytes, bytes] = {}
        for env in envelopes:
            key = (env.topic, env.partition)
            if env.offset > self.positions.get(key, -1):
                self.positions[key] = env.offset
                puts[_POSITION_PREFIX + f"{env.topic}:{env.partition}".encode()] = str(env.offset).encode()
        return puts

    def _absorb_offset_resets(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Take the source's control envelopes out of the batch (:data:`OFFSETS_RESET_FROM`):
        the source moved a partition's position because its log lost the flow's offset. Record
        the new position; when the offsets went backwards (the topic was re-created), the old
        ones mean nothing any more, so first forget every mark of them (the watermark, each
        user's last applied offset, outbox entries), before the new log's messages are applied.
        Once per move: it is recorded under ``rst:`` last, so a crash part-way repeats it, and the
        same move sent again after a crash (recovery still at the old offset) is not repeated."""
        kept = []
        for env in envelopes:
            old, new = env.extra.get(OFFSETS_RESET_FROM), env.extra.get(OFFSETS_RESET_TO)
            if old is None or new is None:
                kept.append(env)
                continue
            tag = f"{env.topic}:{env.partition}".encode()
            done = self.kv.get(_OFFSET_RESET_PREFIX + tag) == f"{old}>{new}".encode()
            if new < old and not done:
                _log.warning("%s[%d]: offsets went backwards (%d -> %d): forgetting the old ones", env.topic, env.partition, old, new)
                if env.topic != self.settings.catalog_topic:  # users and outboxes hold events offsets only
                    for prefix, rewrite in ((USER_PREFIX, user_without), (_OUTBOX_PREFIX, outbox_without)):
                        puts: dict[bytes, bytes] = {}
                        for key, raw in self.kv.iter_prefix(prefix):
                            changed = rewrite(raw, env.partition)
                            if changed is not None:
                                puts[key] = changed
                            if len(puts) >= 10_000:
                                self.kv.write(puts)
                                puts = {}
                        self.kv.write(puts)
                self.watermarks.pop((env.topic, env.partition), None)
                # a rebuild's mark of the old log means nothing in the new one either
                self._sent_before.pop((env.topic, env.partition), None)
                self.kv.write({}, [_WATERMARK_PREFIX + tag, SENT_BEFORE_PREFIX + tag])
                if self.exchange is not None:  # issue 11: the old offsets' coverage means nothing either
                    self.exchange.uncover(env.topic, env.partition)
            if not done:
                # the source's position is now `new`: everything below it counts as processed
                self.positions[(env.topic, env.partition)] = new - 1
                self.kv.write({_POSITION_PREFIX + tag: str(new - 1).encode(), _OFFSET_RESET_PREFIX + tag: f"{old}>{new}".encode()})
        return kept
    def _sweep(self, batch_users: dict, counts: Counter) -> list[bytes]:
        """One bounded step of the expiry sweep: of the next ``sweep_keys_per_batch`` user
        records (a cursor over ``u:`` keys, wrapping around), the keys of those idle longer
        than the TTL at the stream's clock, with their outboxes, to delete in this batch's
        write. Users of this batch are never deleted (their records are being written).

        The slice is ``sweep_keys_per_batch`` keys, or twice the batch's users if more: a batch
        adds at most that many users, so a full pass always outpaces new users and the number
        of stored users stays within a small multiple of those active within the TTL."""
        if self.settings.sweep_keys_per_batch <= 0 or not self._persistent or self._stream_ts == 0:
            return []
        # Every stored record is at least as new as _sweep_floor: while the clock is within the
        # TTL of it, any slice would find nothing (the same test as UserStore._expired), so none
        # is read. This was >=500 record reads per batch, ~7% of the engine at live-sized batches.
        if self._sweep_floor is not None and self._stream_ts - self._sweep_floor <= self.users.ttl_days * MS_PER_DAY:
            return []
        limit = max(self.settings.sweep_keys_per_batch, 2 * len(batch_users))
        expired, self._sweep_from = self.users.sweep_slice(self._stream_ts, self._sweep_from, limit)
        oldest = self.users.last_slice_oldest
        if oldest is not None:
            self._pass_oldest = oldest if self._pass_oldest is None else min(self._pass_oldest, oldest)
        if not self._sweep_from:  # the pass wrapped: it read every record stored when it began
            self._sweep_floor = self._pass_oldest if self._pass_oldest is not None else self._stream_ts
            self._pass_oldest = None
        doomed = [u for u in expired if u not in batch_users]
        counts["swept_users"] += len(doomed)
        deletes = []
        for u in doomed:  # what memory holds of the user goes too (the open search window: their last query)
            self.shown.discard(u)
            deletes += [user_key(u), _OUTBOX_PREFIX + u.encode(), *self.search.forget_user(u, self.kv)]
        return deletes

    # ------------------------------------------------------------------ erasure

    def forget(self, user_ids: list[str], *, erased_at_ms: int | None = None, source: str = "cli") -> int:
        """Erase users (the right to be forgotten) in one atomic write; returns how many.

        Deleted: the user record (with its dedup window), the outbox of past recommendations,
        every session of theirs (:meth:`SessionNeighbours.forget_user`) and, in memory, what
        they were last shown. Written: a tombstone ``fg:<sha256 of id>`` with the erasure time
        (``erased_at_ms``, default now): their events older than that are dropped, newer ones
        start a new user. Each erasure is logged to ``recsys.audit`` with the id's hash only.
        Search takes back what it learned from them (:meth:`recsys.search.Search.erase_user`).
        Global aggregates (popularity, co-visitation, the head) hold no ids and are kept.
        """
        erased_at = int(self.clock() * 1000) if erased_at_ms is None else erased_at_ms
        puts: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        for user_id in dict.fromkeys(user_ids):
            deletes.extend(self._erase(user_id, erased_at, source, puts))
        if self.exchange is not None:  # issue 11: the op waits in the outbox, published at the next start
            self.exchange.seal(puts)
        self._commit(puts, deletes)
        return len(dict.fromkeys(user_ids))

    def _erase(self, user_id: str, erased_at: int, source: str, puts: dict[bytes, bytes], *,
               share: bool = True) -> list[bytes]:
        """The keys to delete and the tombstone to write (into ``puts``) for one erasure
        (``share`` False: the exchange log holds its op already, none is recorded)."""
        # what search learned from them: taken back here, or with sharing on every shard at the op's position
        searched, engaged, texts = self.search.erase_user(user_id, self.kv, unlearn=self.exchange is None)
        if self._query_pending:  # their texts still at the worker (searches waiting, or released by the
            # query-wait bound and answered since): not kept when their vectors come back
            waiting = (t for t in map(self.search.unencoded_query, self.waiting.events_of(user_id)) if t is not None)
            self._query_withheld.update(t for t in (*texts, *waiting) if t in self._query_pending)
        if self.exchange is None:
            sessions = self.sessions.forget_user(user_id)
        else:  # issue 11: every shard drops the sessions at the same exchange-log position
            sessions = []
            if share:
                self.exchange.record_forget(user_id, erased_at, engaged)
        deletes = [user_key(user_id), _OUTBOX_PREFIX + user_id.encode(), *sessions,
                   *self.waiting.forget_user(user_id), *searched]
        self.shown.discard(user_id)
        digest = user_hash(user_id)
        erased_at = max(erased_at, self.tombstones.get(digest, 0))
        self.tombstones[digest] = erased_at
        puts[tombstone_key(user_id)] = orjson.dumps({"erased_at": erased_at, "source": source})
        # the keys that held something of theirs (until 2026-12-07 the deletes issued: 4 for a user never seen)
        held = sum(self.kv.get(key) is not None for key in dict.fromkeys(deletes))
        # search_engagements: those of theirs search learned (taken back where still held; with sharing, when
        # the exchange log brings the op back)
        AUDIT_LOG.info("forget_user user_sha256=%s erased_at=%d source=%s search_engagements=%d keys_deleted=%d",
                       digest, erased_at, source, len(engaged), held)
        return deletes

    def _apply_control(self, env: Envelope, message: ControlMessage, now_ms: int, result: BatchResult) -> None:
        """One control message, committed in its own atomic write with its offset (so a
        re-delivered request is skipped, and a crash before the write re-runs it whole). With
        sharing, that write also seals the erasure's op for the exchange log (``result``)."""
        counts = result.counts
        if env.offset <= self.watermarks.get((env.topic, env.partition), -1):
            counts["redelivered_skipped"] += 1
            return
        puts: dict[bytes, bytes] = {}
        source = f"{env.topic}:{env.partition}:{env.offset}"
        held = self.kv.get(user_key(message.user_id)) is not None  # a user of this state, not just a request
        # issue 11: a wiped shard re-reading the control topic erases again, but its op is in the log already
        deletes = self._erase(message.user_id, env.timestamp_ms or now_ms, source, puts, share=not self._covered(env))
        self._advance_watermark(env, puts)
        if self.exchange is not None:
            self.exchange.cover(env.topic, env.partition, env.offset)
            if (sealed := self.exchange.seal(puts)) is not None:
                result.exchange.append(sealed)  # issue 11: the sessions go at the op's log position
        self._commit(puts, deletes)
        counts["forgotten"] += 1  # requests
        counts["forgotten_users"] += held  # users this state held (until 2026-12-07 only requests were counted)

    def _erased_before(self, event: Event) -> bool:
        """Whether ``event``'s user was erased at or after the event's time."""
        erased_at = self.tombstones.get(user_hash(event.user_id))
        return erased_at is not None and event.ts <= erased_at

    def _refused_on_shard_0(self, env: Envelope) -> bool:
        """Whether another shard dead-letters this refused message: every shard reads the whole
        catalog and control topics, and only shard 0 dead-letters what they hold (the others count
        ``refused_on_shard_0``). Before 2026-12-04 each of N shards sent its own dead letter for
        the same bad catalog record."""
        return (self.settings.shards > 1 and self.settings.shard != 0
                and env.topic in (self.settings.catalog_topic, self.settings.control_topic))

    def _sent_before_rebuild(self, env: Envelope, released: bool = False) -> bool:
        """Whether what ``env`` triggers was delivered before ``recsys run --rebuild-state`` wiped
        the state (:data:`recsys.shard.outbox.SENT_BEFORE_PREFIX`): below its partition's mark,
        and not among the events the wiped state held waiting for their item
        (:data:`recsys.shard.outbox.REBUILD_WAITING_KEY`), never answered. When those are not
        known, an event the waiting room lets go now (``released``) is taken for one of them.
        Until 2026-12-07 (an operator's probe) every event let go was sent, and so a dead
        letter the first life had sent for an event whose wait ran out was sent again."""
        bound = self._sent_before.get((env.topic, env.partition))
        if bound is None or env.offset >= bound:
            return False
        if self._waiting_at_rebuild is None:
            return not released
        return (env.topic, env.partition, env.offset) not in self._waiting_at_rebuild

    def _search_sent_before(self, released: Container[tuple[str, int, int]], counts: Counter) -> Callable[[Envelope], bool]:
        """:meth:`_sent_before_rebuild` for the search service, counting what it keeps back."""
        def sent(env: Envelope) -> bool:
            if self._sent_before_rebuild(env, (env.topic, env.partition, env.offset) in released):
                counts["sent_before_rebuild"] += 1
                return True
            return False
        return sent

    def _let_go_of_passed_marks(self) -> None:
        """Stop checking the rebuild's marks the positions have passed (every message below them
        processed). They stay in the state (:data:`recsys.shard.outbox.SENT_BEFORE_PREFIX`)."""
        for at in [at for at, bound in self._sent_before.items() if self.positions.get(at, -1) >= bound - 1]:
            del self._sent_before[at]

    def _dead_letter(self, result: BatchResult, env: Envelope, reason: str, now_ms: int, *, released: bool = False) -> None:
        """Refuse the message at ``env``, once. Its dead letter is kept unsent until its sink
        acknowledges it (:data:`UNSENT_PREFIX`), so a restart sends those a crash left in doubt,
        with the bytes first sent. A message re-delivered after a crash (at or below its
        partition's position committed before this batch) was refused by that earlier batch:
        nothing again (its refusal would carry another ``failed_at``; before 2026-12-04 every
        restart refused the messages since the last epoch again). ``released``: an event that
        waited for its catalog item, whose offset was committed long ago."""
        if not released and env.offset <= self._processed_before.get((env.topic, env.partition), -1):
            result.counts["redelivered_skipped"] += 1
            return
        if self._sent_before and self._sent_before_rebuild(env, released):
            result.counts["sent_before_rebuild"] += 1
            return
        letter = DeadLetter(payload=b"" if env.value is None else env.value, reason=reason, source=env.position, failed_at=now_ms)
        # the key is bounded like the payload: a poison message's key must not outgrow the request
        key = env.key[:_DEAD_LETTER_KEY_BYTES].decode("utf-8", "replace") if env.key else None
        payload = encode(letter)
        result.dead_letters.append((key, payload))
        result.counts["dead_letters"] += 1
        self._keep_unsent("dead_letters", key, payload)

    def _recommendation(self, user_id: str, items: list[RecommendedItem], trigger: Event, now_ms: int) -> Recommendation:
        return Recommendation(
            user_id=user_id,
            items=tuple(items),
            trigger_event_id=trigger.event_id,
            model_version=self.model_version,
            event_ts=trigger.ts,
            emitted_at=max(now_ms, int(self.clock() * 1000)),
        )

    def _keep_unsent(self, output: str, key: str | None, payload: bytes) -> None:
        """Keep an output no re-delivery can bring back until its sink acknowledges it
        (:data:`UNSENT_PREFIX`); only for outputs whose sink acknowledges at all."""
        if output in self._acknowledging:
            self._batch_unsent.setdefault(output, []).append([key, payload.decode()])

    def unsent(self) -> dict[str, list[tuple[str | None, bytes]]]:
        """What an earlier life emitted and its sinks never acknowledged, of the outputs no
        re-delivery brings back (:data:`UNSENT_PREFIX`), per output, in emission order; a list
        of a user erased since, or a dead letter of a message keyed by them refused before the
        erasure (it holds their event), is left out. The flow sends them again before its first
        batch, then calls :meth:`drop_unsent`."""
        out: dict[str, list[tuple[str | None, bytes]]] = {}
        for key, raw in sorted(self._left_unsent.items(), key=lambda kv: unsent_key_parts(kv[0])[1]):
            output = unsent_key_parts(key)[0]
            for out_key, payload in orjson.loads(raw):
                erased_at = self.tombstones.get(user_hash(out_key)) if out_key is not None else None
                when = _UNSENT_TIME_FIELD.get(output)
                if erased_at is not None and when is not None and orjson.loads(payload)[when] <= erased_at:
                    continue
                out.setdefault(output, []).append((out_key, payload.encode()))
        return out

    def drop_unsent(self) -> None:
        """Forget what :meth:`unsent` returned (sent again, and acknowledged)."""
        if self._left_unsent:
            self.kv.write({}, list(self._left_unsent))
            self._left_unsent = {}

    def _unsent_puts(self) -> dict[bytes, bytes]:
        """This batch's unsent outputs under its stamp, for the batch's write (deleted by
        :meth:`acknowledge`)."""
        puts = {unsent_key(output, self._stamp): orjson.dumps(entries) for output, entries in self._batch_unsent.items()}
        for output in self._batch_unsent:
            self._unsent[output].append(self._stamp)
        self._batch_unsent = {}
        return puts

    def _load_outboxes(self, user_ids: list[str]) -> dict[str, dict[tuple[int, int], tuple[bytes, int]]]:
        raw = self.kv.multi_get([_OUTBOX_PREFIX + u.encode() for u in user_ids])
        return {u: decode_outbox(r) for u, r in zip(user_ids, raw) if r is not None}

    def _score_before(self, result: BatchResult, events: list[Event], states: dict[str, UserState]) -> None:
        users = list(dict.fromkeys(ev.user_id for ev in events if ev.item_id is not None))
        ranked = self.recommender.rank([states[u] for u in users], events[0].ts, self.eval_k, explain=False) if users else []
        recommended = {}
        for u, (items, shown) in zip(users, ranked):
            recommended[u] = [i.item_id for i in items]
            self.shown.put(u, shown)
        result.scored.append(ScoredBatch(events, recommended))

    def freeze(self) -> None:
        """Stop all learning from here on (backtest ablation: what learning online adds); the
        head serves every step it took (the last one ran in the background)."""
        self.learning = False
        self.serve_all_learned()

    def serve_all_learned(self) -> None:
        """Serve every head step learned so far, the one on the head's thread included (a
        backtest's end of training; the frozen ablation), instead of at the message count."""
        if self.head is not None:
            self.head.publish()
            self._head_behind = None

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
        """Teach the re-ranker with the user's first new event (one with an item, not a re-delivery)
        against what they were last shown (:func:`recsys.ranking.reranker.learn_from_next_item`)."""
        shown = self.shown.get(user_id)
        if shown is None or not shown.items or not (self.learning and self.settings.rerank_enabled):
            return
        for env, event in user_events:
            if event.item_id is None or env.offset <= committed.get((env.topic, env.partition), -1):
                continue
            if self._covered(env):
                return  # issue 11: re-read by a wiped shard; the step it taught is in the log already
            record = self.exchange.record_pair if self.shared_models is not None else None  # issue 11
            if learn_from_next_item(self.reranker, self.monitor, self.shown, user_id, event.item_id, self.settings.top_k, record):
                counts["drift_detected"] += 1
            return


def unsent_key(output: str, stamp: int) -> bytes:
    """The state key of one batch's unsent outputs (:data:`UNSENT_PREFIX`).

    >>> unsent_key_parts(unsent_key("dead_letters", 7))
    ('dead_letters', 7)
    """
    return UNSENT_PREFIX + f"{output}:{stamp:020d}".encode()


def unsent_key_parts(key: bytes) -> tuple[str, int]:
    """``(output, stamp)`` of an :func:`unsent_key`."""
    output, _, stamp = key[len(UNSENT_PREFIX):].decode().rpartition(":")
    return output, int(stamp)


@contextmanager
def _collector_paused():
    """Pause the cyclic garbage collector for one batch; it runs again right after.

    A batch allocates tens of thousands of short-lived containers (events, states, candidate
    lists, payloads), freed by reference counting as it goes. Collections triggered in the
    middle of it found the batch's working set alive and moved it to the oldest generation,
    and that generation's growth is what triggers full passes over every tracked object: ~10
    per 20k events in the engine benchmark, each rescanning the whole heap (~50 CPU-us per
    event, and the stream stood still meanwhile). After the batch only what it keeps is young,
    so the next collection is short and promotes little. Nothing is collected later than
    one batch; a collector already disabled by the caller stays disabled.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
