"""Personalised search: candidates from three retrievers, one linear score, reasons that name the cause.

Per search ``(query, user state, time)``:

1. **Candidates** (each source bounded by ``config.candidates``): BM25 over the item text
   (:class:`~recsys.search.lexical.LexicalIndex`, query tokens typo-repaired against the catalog
   vocabulary), the frozen sentence-transformer's query vector against the faiss item index
   (vectors of repeated queries come from an LRU cache), the items learned for the query
   (:class:`~recsys.search.learned.QueryAssociations`), and the user's own history items that
   match the query lexically. What does not depend on the shopper -- the BM25 and vector-search
   answers, their merged list with catalog entries, vector rows, lexical signal and category /
   brand codes -- is kept per normalised query (:meth:`Search._base`, an LRU of
   ``retrieval_cache`` entries); after a catalog change an entry is caught up with it
   (BM25 asked again, the vector search only where a changed item is in its answer or could
   enter it, the rest kept unless a changed item is on the list: :meth:`Search._refresh`);
   the learned items (they change with every credited engagement) and the user's matches are
   laid over it per search, in the order one merge of the four gives. So answers are the same
   whether it holds the query or not.
2. **Signals** per candidate, in :data:`FEATURES` order: ``lexical`` (BM25 / the query's best),
   ``semantic`` (cosine of query and item), ``learned`` (association weight, 0-1), ``popular``
   (log decayed popularity / the candidates' best), and the personal ones: ``affinity`` (cosine
   of the user's vector -- the learned head's query, else the decayed interest -- and the item),
   ``category`` and ``brand`` (the share of the user's weighted history in the item's category /
   brand), ``bought`` (bought before), ``seen`` (in the history, not bought), ``price``
   (closeness of the price to the median of the user's history, ``exp(-|log ratio|)``) and
   ``rebuy`` (bought before, times the share of the user's purchases that were repeats: a
   shopper who mostly buys again vs one who mostly tries new things).
3. **Score** = ``weights . signals``; ``personalise=False`` zeroes the personal weights (the
   ablation of the search replay).
4. **No match**: no query word is (close to) a catalog word, nothing was learned for the query
   and no item is semantically closer than ``min_semantic``: the answer is empty with
   ``no_match`` set. Without a lexical match, only items above ``min_semantic`` (or learned) stay.

The reason of a result is its largest contribution: ``matches 'tent'``, ``often chosen after
searching 'tent'``, ``bought before``, ``like the Blue tent you bought``, ...
"""

from __future__ import annotations

import functools
import itertools
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.events import (
    CatalogItem,
    Envelope,
    Event,
    RecommendedItem,
    SearchResult,
    encode,
)
from recsys.feedback import EVENT_WEIGHTS
from recsys.search._kernels import price_closeness
from recsys.search.learned import QueryAssociations, SearchTrail, SearchWindows, tie_break
from recsys.search.lexical import LexicalIndex, item_tokens
from recsys.search.outbox import SearchOutbox
from recsys.search.rerank import SearchReranker
from recsys.search.semantic import QueryEncoder, query_embedder
from recsys.search.text import (
    MAX_TOKENLESS_CHARS,
    as_typed,
    clear_caches,
    display_tokens,
    query_key,
    query_tokens,
)

if TYPE_CHECKING:
    from recsys.items.catalog import ItemSpace
    from recsys.ranking.head import Head
    from recsys.signals.popularity import Popularity
    from recsys.store.kv import KVStore
    from recsys.store.users import UserState

#: Names what ranked a search result (bumped when the ranking changes meaning).
SEARCH_VERSION = "search-2"  # 2: fitted personal weights, only answers to a query teach it

FEATURES = ("lexical", "semantic", "learned", "popular", "affinity", "category", "brand", "bought", "seen", "price", "rebuy")
PERSONAL = ("affinity", "category", "brand", "bought", "seen", "price", "rebuy")
_COL = {name: i for i, name in enumerate(FEATURES)}
_PERSONAL_MASK = np.array([0.0 if f in PERSONAL else 1.0 for f in FEATURES])

#: The non-personal weights are hand-set: ``learned`` is large so that what shoppers actually
#: chose after a query outranks text similarity once a few engagements are in (the top result
#: follows a change of choice within 3 engagements, tests/test_search.py). The personal ones
#: were fitted (``benchmarks/search_weights.py``: listwise softmax with those fixed, both logs
#: weighing equally) on the first half of the derived searches of both search replays of the
#: README (Complete Journey 200k, REES46) and scored on the second halves, never fitted on:
#: NDCG@10 0.4179 -> 0.4259 (CJ) and 0.8090 -> 0.8963 (REES46) against the hand-set affinity
#: 0.3, category 0.5, brand 0.3, bought 1, seen 0.3, price 0.2, rebuy 0 (README, Search).
DEFAULT_WEIGHTS: dict[str, float] = {
    "lexical": 1.0, "semantic": 1.0, "learned": 3.0, "popular": 0.3,
    "affinity": 0.23, "category": 0.0, "brand": 0.16, "bought": 0.58, "seen": 1.37, "price": 0.19, "rebuy": 0.09,
}

#: Rules for which engagements after a search teach its query (``SearchConfig.attribution``).
ATTRIBUTIONS = ("first+match", "match", "all")

#: Baselines of the search replay, ranked from the same candidates and signals as ``full``
#: (``full`` as configured; ``full+rerank``: the default weights plus the learned re-ranker's
#: correction, measured whether or not ``SearchConfig.rerank`` puts it in the live score).
MODES = ("bm25", "semantic", "bm25+semantic", "popular-matches", "no-personal", "full", "full+rerank")
#: The modes that are the system (with or without personalisation), not a baseline.
_SYSTEM_MODES = frozenset({"no-personal", "full", "full+rerank"})


@dataclass(frozen=True)
class SearchConfig:
    k: int = 10  # results per search
    candidates: int = 200  # per retriever
    min_semantic: float = 0.4  # MiniLM cosine below which a text is no match for the query
    personalise: bool = True
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    learn_rate: float = 0.25  # see recsys.search.learned
    max_queries: int = 100_000
    max_items_per_query: int = 50
    query_cache: int = 10_000  # query vectors kept (LRU)
    # shoppers whose last search is kept for the re-ranker's lesson (Search._remember; Settings.search_shown_users)
    shown_users: int = 50_000
    # normalised queries whose candidates before the shopper are kept (LRU, in memory): the
    # BM25 and vector-search answers, the merged candidate list with its catalog entries,
    # vector rows and lexical signal (Search._base). After a catalog change an entry is caught
    # up with it (Search._refresh), so answers are the same with any size (0: nothing kept).
    # Settings.search_query_cache
    retrieval_cache: int = 1_000
    # Add the re-ranker's learned correction to the live score. It always learns (cheap), but
    # is off by default: on derived queries it barely moves REES46 (NDCG@10 0.9214 -> 0.9225)
    # and hurts Complete Journey (0.4095 -> 0.3517); see the README's Search section.
    rerank: bool = False
    # Which engagements after a search are credited to its query (learned associations and the
    # re-ranker), see Search.credits: "first+match" the shopper's first choice after the search
    # and the items whose text matches the query; "match" only the latter; "all" every
    # engagement in the window (the rule before; on Complete Journey a basket's other products).
    attribution: str = "first+match"
    credit_lexical: float = 0.5  # "match": BM25 at least this share of the query's best ...
    seed: int = 0

    def weight_vector(self) -> np.ndarray:
        if self.attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be one of {ATTRIBUTIONS}, got {self.attribution!r}")
        unknown = set(self.weights) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown search signals {sorted(unknown)}; known: {FEATURES}")
        w = np.array([self.weights.get(f, 0.0) for f in FEATURES], dtype=np.float64)
        return w if self.personalise else w * _PERSONAL_MASK


@functools.lru_cache(maxsize=4096)
def _query_text(query: str) -> str:
    """What the sentence-transformer reads of a query (and the key of its cached vector and of
    its candidates); kept for the last 4,096 queries typed, as :func:`_query_key`. A CJK run is
    read whole, as an item's text is (until 2026-12-07 as search's overlapping pairs, ``コー ーヒ
    ヒー``, which the model reads as other text: MiniLM's cosine to ``コーヒー豆 深煎り`` 0.73
    against 0.82 for ``コーヒー``; an operator's probe). Other scripts as before: the model folds
    accents and case itself.

    >>> _query_text("緑茶ティーバッグ 20"), _query_text("Running shoes for the trail")
    ('緑茶ティーバッグ 20', 'running shoe trail')
    """
    return display_tokens(query_tokens(query)) or query[:MAX_TOKENLESS_CHARS]


_query_key = functools.lru_cache(maxsize=4096)(query_key)
#: The vector search asks this many items beyond ``candidates``, to know where its cut falls
#: (:meth:`Search._semantic`).
_SEMANTIC_SPARE = 32
#: A cached query's candidates are caught up with at most this many changed items; beyond,
#: rebuilt (:meth:`Search._refresh`).
_REFRESH_MAX_CHANGES = 256


@dataclass
class Ranked:
    """One answer: the ranked items (with score and reason) and whether nothing matched."""

    items: list[RecommendedItem]
    no_match: bool = False


@dataclass
class _Lexical:
    """One query's BM25 retrieval: the top items (score / best), and every hit (its position
    in the built index, ascending, and its raw score) for the user's own matches."""

    top: dict[str, float]
    hit_rows: np.ndarray
    hit_scores: np.ndarray
    best: float

    def score_at(self, row: int) -> float:
        """The raw BM25 score of the item at ``row`` of the built index (0.0: not a hit)."""
        k = int(np.searchsorted(self.hit_rows, row))
        return float(self.hit_scores[k]) if k < len(self.hit_rows) and self.hit_rows[k] == row else 0.0


@dataclass
class _Base:
    """A query's candidates before the shopper: what every search of the query shares. Built at
    the catalog's (:attr:`Catalog.version`), BM25's (:attr:`LexicalIndex.version`) and the
    vector index's (:attr:`VectorIndex.version`) versions, held in ``version``; after a change
    it is caught up with rather than rebuilt where it can be (:meth:`Search._refresh`). The
    learned items and the user's own matches are added per search."""

    version: tuple[int, int, int]
    qvec: np.ndarray  # the encoder's vector of the query (the entry is rebuilt if the encoder's changes)
    known: list[str]  # repaired query tokens known to BM25
    key: str  # query_key: the learned associations' key
    lexical: _Lexical
    semantic: list[tuple[str, float]]  # the vector search's answer (Search._semantic)
    settled: bool  # whether that answer is the same whatever order faiss scans the items in
    any_semantic: bool  # it found an item at least min_semantic
    ids: list[str]  # available items of the BM25 top, then of the vector search's answer, each once
    n_top: int  # the first n_top ids are from the BM25 top
    rows: np.ndarray  # their vector index rows (-1: not in it)
    lex: np.ndarray  # their lexical signal (BM25 / the query's best; 0 outside the top)
    sem_hit: np.ndarray  # bool: found by the vector search, at least min_semantic
    where: dict[str, int]  # id -> position in ids
    labels: np.ndarray  # (n, 2): their category's and brand's code (Search._label_code; -1: none)
    prices: np.ndarray  # float64: their catalog price (0.0: none)
    pop_slots: np.ndarray  # their Popularity.slots, valid at pop_stamp (refreshed by Search._pop_slots)
    pop_stamp: tuple[int, int]

    @property
    def best_semantic(self) -> float | None:
        """The vector search's best score (None: it found nothing)."""
        return self.semantic[0][1] if self.semantic else None


@dataclass
class _Candidates:
    ids: list[str]
    x: np.ndarray  # (n, len(FEATURES))
    lexical_hit: np.ndarray  # bool (n,)
    semantic_hit: np.ndarray  # bool (n,): from the vector search and above min_semantic
    tokens: list[str]  # repaired query tokens known to BM25
    no_match: bool
    learned_from: str | None = None  # the repaired query whose learned items were taken (None: the query's own)


def _repaired_key(base: _Base) -> str | None:
    """The learned associations' key of the query as typo repair reads it, when repair changed
    it and every word of it is known to BM25 after repair (a query with a word nothing matches is
    not read as another query); else None.

    >>> from types import SimpleNamespace as B
    >>> _repaired_key(B(key="tnet", known=["tent"])), _repaired_key(B(key="tent", known=["tent"]))
    ('tent', None)
    >>> _repaired_key(B(key="tnet xyzzy", known=["tent"])) is None  # xyzzy: no word of the catalog
    True
    """
    typed = base.key.split()
    repaired = sorted(set(base.known))
    if len(repaired) != len(typed) or repaired == typed:
        return None
    return " ".join(repaired)


def _prices(items: Sequence[CatalogItem]) -> np.ndarray:
    """Each item's catalog price as float64, 0.0 where it has none (the price signal's rule)."""
    return np.array([item.price or 0.0 for item in items], dtype=np.float64)


def _median(values: list[float]) -> float:
    """``float(np.median(values))`` (the same float: the middle value, or the two middle values'
    sum halved) without building an array, for the few prices of one history."""
    s = sorted(values)
    m = len(s) // 2
    return float(s[m]) if len(s) % 2 else float((s[m - 1] + s[m]) / 2)


def _top(scores: np.ndarray, ids: list[str], keep: np.ndarray, k: int) -> list[int]:
    """Positions of the ``k`` best kept candidates, by score then id: what
    ``[j for j in np.lexsort((ids, -scores)) if keep[j]][:k]`` gives, sorting only the kept
    candidates that score at least the k-th best (ties at the cut included)."""
    rows = np.flatnonzero(keep)
    if k <= 0 or not len(rows):
        return []
    if len(rows) > k:
        kept = scores[rows]
        rows = rows[kept >= np.partition(kept, len(kept) - k)[len(kept) - k]]
    s = scores.tolist()
    return sorted(rows.tolist(), key=lambda j: (-s[j], ids[j]))[:k]


class Search:
    """The search surface of the engine: catalog text in, events in, ranked answers out."""

    def __init__(self, items: ItemSpace, popularity: Popularity, config: SearchConfig | None = None,
                 *, head: Head | None = None, clock: Callable[[], float] = time.time) -> None:
        self.items = items
        self.popularity = popularity
        self.config = config or SearchConfig()
        self.head = head
        self.clock = clock
        self.lexical = LexicalIndex()
        # the query vectors are kept across restarts, each tagged with the model that made it
        self.encoder = QueryEncoder(query_embedder(items.embedder), self.config.query_cache,
                                    model=str(getattr(items.embedder, "model_id", type(items.embedder).__name__)))
        #: normalised query text -> its candidates before the shopper (_Base), LRU; in memory
        #: only (a restart starts empty), each entry checked against the catalog's and the
        #: indexes' versions on use and caught up with what changed since (_refresh)
        self._base_cache: OrderedDict[str, _Base] = OrderedDict()
        self.base_stats = {"hits": 0, "refreshed": 0, "misses": 0}
        #: category and brand names -> small ints, so a candidate's category and brand signals are
        #: one array look-up (grows with the catalog's distinct names, never reassigned)
        self._label_code: dict[str, int] = {}
        self.associations = QueryAssociations(
            rate=self.config.learn_rate, max_items=self.config.max_items_per_query, max_queries=self.config.max_queries
        )
        self.windows = SearchWindows()
        self.outbox = SearchOutbox()  # answers as first emitted, for re-delivered searches
        self.trail = SearchTrail()  # per shopper, what the above learned from them (for erasures)
        self._weights = self.config.weight_vector()
        self.reranker = SearchReranker(self._weights, seed=self.config.seed)
        #: user -> (candidate ids, their signals, which were eligible) of their last search, until an
        #: engagement teaches the re-ranker (:meth:`_shown_lesson`); tuples of strings and arrays,
        #: untracked by the garbage collector (tests/test_search.py)
        self._shown: OrderedDict[str, tuple[tuple[str, ...], np.ndarray, np.ndarray]] = OrderedDict()
        #: (user_id, search ts) -> the head's query for the user's state before the batch (step only)
        self._head_queries: dict[tuple[str, int], np.ndarray] = {}
        #: engagements in a search window: credited to the query, or not (another product)
        self.credit_counts: Counter[str] = Counter()
        #: Backtests: called with ``(event, state)`` for each newly applied search, before it
        #: is learned from (the search replay ranks its baselines there).
        self.observer: Callable[[Event, UserState], None] | None = None
        #: False: answer nothing (a backtest whose observer ranks by itself)
        self.respond = True
        #: Called with ``(user_id, query key, search ts, item ids)`` for each new search answered
        #: (:class:`recsys.search.intent.SearchIntent` keeps them for the next recommendations).
        self.on_answer: Callable[[str, str, int, list[str]], None] | None = None
        #: Issue 11, with sharing: called with ``(query key, item id, weight, event time, tie-break)``
        #: instead of learning the association here (:meth:`recsys.signals.exchange.SignalExchange.record_search`):
        #: every shard learns it when it applies the exchange log.
        self.record_association: Callable[[str, str, float, int, int], None] | None = None
        #: the same for the re-ranker's steps (:meth:`recsys.signals.exchange.SignalExchange.record_search_step`)
        self.record_rerank: Callable[[np.ndarray], None] | None = None
        #: Called with the user id when a user's search state goes (:meth:`forget_user`), for what
        #: others keep of it in memory (:class:`recsys.search.intent.SearchIntent`'s last answers).
        self.on_forget: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ state

    def warm_up(self) -> None:
        """Load the query model now: the first search would otherwise wait for it (seconds, and
        every event behind it in a live stream waits too). BM25 is current after every upsert."""
        self.encoder.warm_up()

    def upsert(self, items: Sequence[CatalogItem]) -> None:
        self.lexical.upsert(items)

    def export_dirty(self) -> dict[bytes, bytes]:
        out = self.associations.export_dirty()
        out.update(self.windows.export_dirty())
        out.update(self.reranker.export_dirty())
        out.update(self.outbox.export_dirty())
        out.update(self.encoder.export_dirty())
        out.update(self.trail.export_dirty())
        return out

    def load(self, kv: KVStore) -> None:
        self.encoder.load(kv)
        self.outbox.load(kv)
        self.associations.load(kv)
        self.windows.load(kv)
        self.reranker.load(kv)

    @property
    def version(self) -> str:
        """The ranking's version: the search code, the re-ranker's examples, the head's version."""
        version = SEARCH_VERSION
        if self.config.rerank and self.reranker.active:
            version += f"+rerank-{self.reranker.examples}"
        if self.head is not None and self.config.personalise:
            version += f"+{self.head.version}"
        return version

    # ------------------------------------------------------------------ the engine's hook

    def step(self, by_user: dict[str, list[tuple[Envelope, Event]]], states: dict[str, UserState],
             committed: dict[tuple[str, int], int], now_ms: int, model_version: str,
             shared: Callable[[Envelope], bool] | None = None, released: Container[tuple[str, int, int]] = (),
             on_released: Callable[[str, bytes], None] | None = None,
             sent_before: Callable[[Envelope], bool] | None = None) -> list[tuple[str, bytes]]:
        """Answer every search of a batch and learn from its newly applied events.

        ``states`` are the users as committed before this batch (a search is ranked without
        the events that follow it in the batch); ``committed`` the watermarks before it: events
        at or below them were learned from already (re-delivered). A re-delivered search
        re-emits the bytes stored in its user's search outbox when it was first answered
        (:mod:`recsys.search.outbox`), else it is answered again from the current state.
        Returns ``(user_id, SearchResult JSON)`` per search event. ``shared(envelope)`` True
        (issue 11): the exchange log holds that event's associations already (a wiped shard
        re-reading its partition); its user's window follows it, no association is recorded.
        ``released``: positions of events the engine's waiting room held and lets go now: below
        the watermark (later events moved it on meanwhile), yet never applied, so new; each such
        search's answer also goes to ``on_released(user_id, payload)`` (no re-delivery brings it
        back: the engine keeps it until the sink acknowledges it). ``sent_before(envelope)`` True:
        that search's answer was delivered before ``recsys run --rebuild-state`` wiped the state;
        it is ranked as if answered (what shoppers do after it is learned alike), and not sent.
        """
        try:
            if self.respond:
                self._prepare(by_user, states)
            return self._step(by_user, states, committed, now_ms, model_version, shared, released, on_released,
                              sent_before)
        finally:
            self._head_queries.clear()  # only for this batch's states (SearchIntent ranks on later ones)

    def _prepare(self, by_user: dict[str, list[tuple[Envelope, Event]]], states: dict[str, UserState]) -> None:
        """What every search of the batch needs, computed for all at once: the vectors of new
        query texts (one model call) and the head's query for each searching user and time
        (one head call), the same to float rounding as one at a time."""
        searches = [(user_id, event) for user_id, events in by_user.items() for _, event in events
                    if event.type == "search" and event.query]
        if not searches:
            return
        self.encoder.encode_many([_query_text(event.query) for _, event in searches])
        if self.head is not None and self.config.personalise:
            keys = list(dict.fromkeys((user_id, event.ts) for user_id, event in searches if states[user_id].history))
            if keys:
                vecs = self.head.query_vectors([states[u].history for u, _ in keys], [ts for _, ts in keys])
                self._head_queries.update(zip(keys, vecs))

    def _step(self, by_user: dict[str, list[tuple[Envelope, Event]]], states: dict[str, UserState],
              committed: dict[tuple[str, int], int], now_ms: int, model_version: str,
              shared: Callable[[Envelope], bool] | None, released: Container[tuple[str, int, int]],
              on_released: Callable[[str, bytes], None] | None,
              sent_before: Callable[[Envelope], bool] | None) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for user_id, events in by_user.items():
            state, ids = states[user_id], set()
            for env, event in events:
                held = (env.topic, env.partition, env.offset) in released
                new = held or env.offset > committed.get((env.topic, env.partition), -1)
                if new and (state.is_duplicate(event.event_id) or event.event_id in ids):
                    # a producer's retry (its event id applied already, or earlier in this batch): the
                    # engine absorbs it; until 2026-12-07 a search was answered again, and an event
                    # learned from twice here (an operator's probe)
                    continue
                ids.add(event.event_id)
                if event.type == "search" and event.query:
                    if new and self.observer is not None:
                        self.observer(event, states[user_id])
                    if new:
                        self.windows.open(user_id, _query_key(event.query), event.query, event.ts)
                        self.trail.typed(user_id, _query_text(event.query))  # the text its vector is kept under
                    if not self.respond:
                        continue
                    kept_back = sent_before is not None and sent_before(env)
                    if not new and kept_back:
                        continue
                    if not new and (stored := self.outbox.get(user_id, env.partition, env.offset, event.event_id)) is not None:
                        out.append((user_id, stored))
                        continue
                    ranked = self.rank(event.query, states[user_id], event.ts, user_id=user_id if new else None)
                    if kept_back:
                        if self.on_answer is not None:
                            self.on_answer(user_id, _query_key(event.query), event.ts, [i.item_id for i in ranked.items])
                        continue
                    result = SearchResult(
                        user_id, event.query, tuple(ranked.items), ranked.no_match, event.event_id,
                        f"{self.version} ({model_version})", event.ts, max(now_ms, int(self.clock() * 1000)),
                    )
                    payload = encode(result)
                    if new:
                        self.outbox.put(user_id, env.partition, env.offset, event.event_id, payload)
                        if held and on_released is not None:
                            on_released(user_id, payload)
                        if self.on_answer is not None:
                            self.on_answer(user_id, _query_key(event.query), event.ts, [i.item_id for i in ranked.items])
                    out.append((user_id, payload))
                elif new:
                    self.learn_event(event, share=shared is None or not shared(env))
        return out

    def unencoded_query(self, event: Event) -> str | None:
        """The text the query model would read for a search ``event`` whose vector is not cached
        (None: not a search this service answers, or its vector is cached), for the embedding
        worker (``RECSYS_EMBED_WORKER``: new queries encoded off the batch's path)."""
        if not self.respond or event.type != "search" or not event.query:
            return None
        text = _query_text(event.query)
        return None if text in self.encoder else text

    def forget_user(self, user_id: str, kv: KVStore | None = None) -> list[bytes]:
        """The user's own search state goes (the sweep of an idle user; an erasure does more,
        :meth:`erase_user`): their open search window (it holds their last query), what they
        were last shown, their stored search results and, given the store ``kv``, their trail
        (:class:`~recsys.search.learned.SearchTrail`); returns the stored keys to delete in the
        caller's write. What search learned from them stays."""
        self._shown.pop(user_id, None)
        if self.on_forget is not None:
            self.on_forget(user_id)
        trail = self.trail.keys(kv, user_id) if kv is not None else []
        return [*self.windows.forget_user(user_id), *self.outbox.forget_user(user_id), *trail]

    def erase_user(self, user_id: str, kv: KVStore, *, unlearn: bool = True) -> tuple[list[bytes], list[tuple], list[str]]:
        """An erasure (the right to be forgotten): :meth:`forget_user`, and search takes back what
        it learned from the shopper, read from their trail. Their query texts leave the query
        vectors (cache and stored ring) and the candidates cache; their engagements leave the
        associations (:meth:`~recsys.search.learned.QueryAssociations.unlearn`), here when
        ``unlearn``, else on every shard when the exchange log brings back the erasure's op.
        Returns the stored keys to delete, the engagements (``(query key, event time, tie-break,
        item, weight)``; those the associations no longer hold are taken back as nothing) and the
        query texts (as the query model reads them)."""
        texts, engaged, trail = self.trail.read(kv, user_id)
        deletes = [*self.forget_user(user_id), *trail, *self.encoder.forget(texts)]
        if texts:  # what holds queries typed, in memory: their candidates, the memos of recent queries
            for text in texts:
                self._base_cache.pop(text, None)
            _query_text.cache_clear()
            _query_key.cache_clear()
            clear_caches()
            self.lexical.vocabulary.forget_repairs()
        if unlearn:
            for key, ts, tie, item_id, weight in engaged:
                self.associations.unlearn(key, item_id, weight, ts, tie)
        return deletes, engaged, texts

    def learn_event(self, event: Event, *, share: bool = True) -> None:
        """Attribute one non-search event to its user's open search window, if any: an
        engagement the query is credited with (:meth:`credits`) teaches the associations; the
        first one that answers it by its text (:meth:`answers`; with ``all``, the first credited)
        teaches the re-ranker when it was among the search's candidates. A first choice
        credited only as such (not matching) teaches the associations, not the re-ranker."""
        hit = self.windows.follow(event.user_id, event.item_id, event.type, event.ts)
        if hit is None or event.item_id is None:
            return
        key, query, weight, first = hit
        answers = self.config.attribution == "all" or self.answers(query, event.item_id)
        if not answers and not (self.config.attribution == "first+match" and first in (None, event.item_id)):
            self.credit_counts["not credited"] += 1
            return
        self.credit_counts["credited"] += 1
        tie = tie_break(event.event_id)  # the associations' order among equal times
        self.trail.credited(event.user_id, key, event.ts, tie, event.item_id, weight)  # an erasure takes it back
        if self.record_association is not None:  # sharing: learned when the exchange log brings it back
            if share:  # else the log holds it already (issue 11: a wiped shard re-reading its events)
                self.record_association(key, event.item_id, weight, event.ts, tie)
        else:
            self.associations.learn_at(key, event.item_id, weight, event.ts, tie)
        if not answers:  # the first choice, credited for findability: no lesson on ranking text matches
            return
        lesson = self._shown_lesson(event.user_id, event.item_id)
        if lesson is not None:
            if self.record_rerank is None:
                self.reranker.learn(*lesson)
            elif share and (rows := self.reranker.sample(*lesson)) is not None:
                self.record_rerank(rows)  # sharing: every shard learns the step from the exchange log

    def _shown_lesson(self, user_id: str, item_id: str) -> tuple[np.ndarray, int] | None:
        """Forget what ``user_id`` was last shown; if ``item_id`` was among its eligible
        candidates, the re-ranker's lesson: their signals and the item's position among them."""
        shown = self._shown.pop(user_id, None)
        if shown is None:
            return None
        ids, x, keep = shown
        rows = np.flatnonzero(keep)
        kept = [ids[j] for j in rows.tolist()]
        if item_id not in kept:
            return None
        return x[rows], kept.index(item_id)

    def credits(self, query: str, item_id: str, first: str | None = None) -> bool:
        """Whether an engagement with ``item_id`` after searching ``query`` is an answer to it
        (``first``: the item the shopper engaged with first in this search's window, if any).

        Yes when the item's text matches the query -- its BM25 score is at least
        ``credit_lexical`` of the query's best, or its MiniLM cosine with the query at least
        ``min_semantic`` -- and when text cannot judge: the item has no text in the lexical
        index (ids only), or the query matches no item's text (no catalog word, no item above
        ``min_semantic``). With ``first+match`` (the default) also the shopper's first choice
        after the search (``first`` None or the same item), so that an item whose text does
        not say what it is still becomes findable by the queries people choose it after. A
        function of the query, the window and the catalog (replayed the same after a crash).
        """
        rule = self.config.attribution
        if rule == "all" or (rule == "first+match" and first in (None, item_id)):
            return True
        return self.answers(query, item_id)

    def answers(self, query: str, item_id: str) -> bool:
        """The text part of :meth:`credits`: the item's text matches the query, or text cannot judge."""
        if not self.lexical.docs.get(item_id):
            return True
        base = self._base(query)
        lexical = base.lexical
        j = self.lexical.position(item_id)
        if j >= 0 and lexical.hit_rows.size and lexical.score_at(j) >= self.config.credit_lexical * lexical.best:
            return True  # matches the query's words
        if not lexical.hit_rows.size:  # no item's words match: does any item's meaning?
            if base.best_semantic is None or base.best_semantic < self.config.min_semantic:
                return True  # text cannot judge
        vec = self.items.index.vectors_or_zero([item_id])[0]
        return float(vec @ base.qvec) >= self.config.min_semantic

    def _remember(self, user_id: str, c: _Candidates, keep: np.ndarray) -> None:
        """What the user was shown: the eligible candidates and their signals, for the
        re-ranker's lesson at their next credited engagement (:meth:`_shown_lesson`). Kept as
        the candidates are, ``keep`` beside them: most searches are never followed by such an
        engagement, so the eligible rows are taken out then, not at every search. The ids as a
        tuple (copied in C), which the collector stops tracking (see :attr:`_shown`)."""
        if self.config.shown_users <= 0:
            return
        self._shown[user_id] = (tuple(c.ids), c.x, keep)
        self._shown.move_to_end(user_id)
        if len(self._shown) > self.config.shown_users:  # bounded: a user who never engages is forgotten
            self._shown.popitem(last=False)

    def _scores(self, x: np.ndarray) -> np.ndarray:
        scores = x @ self._weights
        return scores + self.reranker.correction(x) if self.config.rerank else scores

    # ------------------------------------------------------------------ ranking

    def rank(self, query: str, state: UserState | None, now_ts: int, *, k: int | None = None,
             user_id: str | None = None) -> Ranked:
        """The top ``k`` items for ``query`` and this user (``state`` None: anonymous);
        ``user_id``: remember the candidates, so the re-ranker learns from what the user picks."""
        k = self.config.k if k is None else k
        cands = self.candidates(query, state, now_ts)
        items: list[RecommendedItem] = []
        if not cands.no_match:
            keep = self._eligible(cands)
            if user_id is not None:
                self._remember(user_id, cands, keep)
            scores = self._scores(cands.x)
            order = _top(scores, cands.ids, keep, k)
            causes = self._causes(cands.x[order])
            items = [RecommendedItem(cands.ids[j], round(float(scores[j]), 6), self._reason(query, cands, j, state, cause))
                     for j, cause in zip(order, causes)]
        if (exact := self._item_named(query)) is not None and (not items or items[0].item_id != exact):
            # a query that is an item's id (a SKU typed into the search box) finds that item first; until
            # 2026-12-07 ids were not searched at all (an operator's probe)
            rest = [i for i in items if i.item_id != exact][: k - 1]
            best = rest[0].score + 1.0 if rest else 1.0
            items = [RecommendedItem(exact, round(best, 6), f"item id {exact!r}"), *rest]
        # nothing left to show (every candidate withdrawn or excluded) is no match to the shopper: until
        # 2026-12-07 answered ``items: []`` with ``no_match: false``, against the schema
        return Ranked(items, no_match=not items)

    def _item_named(self, query: str) -> str | None:
        """The available item whose id is ``query`` as typed (spaces around it aside), if any."""
        item_id = query.strip()
        return item_id if item_id and self.items.catalog.is_recommendable(item_id) else None

    def rank_modes(self, query: str, state: UserState | None, now_ts: int, k: int, modes: Sequence[str] = MODES,
                   *, user_id: str | None = None,
                   on_candidates: Callable[[list[str], np.ndarray], None] | None = None) -> dict[str, list[str]]:
        """Item ids per ranking mode (:data:`MODES`) from one candidate set: the search replay.
        ``user_id``: remember the candidates for the re-ranker, as a live search does;
        ``on_candidates``: called with the eligible candidates' ids and signals (offline fits). The
        system's modes (``no-personal``, ``full``, ``full+rerank``) put an item whose id is the
        query first, as :meth:`rank` does live; the baselines do not."""
        cands = self.candidates(query, state, now_ts)
        if cands.no_match:
            exact = self._item_named(query)
            return {m: [exact] if exact is not None and m in _SYSTEM_MODES else [] for m in modes}
        if user_id is not None:
            self._remember(user_id, cands, self._eligible(cands))
        if on_candidates is not None:
            rows = np.flatnonzero(self._eligible(cands))
            on_candidates([cands.ids[j] for j in rows.tolist()], cands.x[rows])
        ids = np.array(cands.ids, dtype=object).astype(str)
        x = cands.x
        out: dict[str, list[str]] = {}
        for mode in modes:
            if mode == "bm25":
                score, keep = x[:, _COL["lexical"]], cands.lexical_hit
            elif mode == "semantic":
                score, keep = x[:, _COL["semantic"]], cands.semantic_hit
            elif mode == "bm25+semantic":
                score, keep = x[:, _COL["lexical"]] + x[:, _COL["semantic"]], self._eligible(cands)
            elif mode == "popular-matches":
                score, keep = x[:, _COL["popular"]], self._eligible(cands)
            elif mode == "no-personal":
                score, keep = x @ (self._weights * _PERSONAL_MASK), self._eligible(cands)
            elif mode == "full":
                score, keep = self._scores(x), self._eligible(cands)
            elif mode == "full+rerank":
                score, keep = x @ self._weights + self.reranker.correction(x), self._eligible(cands)
            else:
                raise ValueError(f"unknown search mode {mode!r}; known: {MODES}")
            order = np.lexsort((ids, -score))
            out[mode] = [cands.ids[j] for j in order if keep[j]][:k]
        if (exact := self._item_named(query)) is not None:
            for mode in _SYSTEM_MODES.intersection(out):
                out[mode] = [exact, *(i for i in out[mode] if i != exact)][:k]
        return out

    @staticmethod
    def _eligible(c: _Candidates) -> np.ndarray:
        learned = c.x[:, _COL["learned"]] > 0
        return c.lexical_hit | c.semantic_hit | learned

    def _known_tokens(self, query: str) -> list[str]:
        """The query's tokens, typo-repaired against the catalog vocabulary, that BM25 knows."""
        return self.lexical.known(self.lexical.vocabulary.repair(query_tokens(query)))

    def _lexical_retrieval(self, known: list[str]) -> _Lexical:
        """BM25 for these (known, repaired) query tokens: the top ``candidates`` items and every hit's score."""
        cfg = self.config
        lex_ids, lex_scores = self.lexical.scores(known)
        hits = np.flatnonzero(lex_scores > 0) if len(lex_ids) else np.zeros(0, dtype=np.int64)
        hit_scores = lex_scores[hits]
        top = hits[np.argpartition(-hit_scores, min(cfg.candidates, len(hits)) - 1)[: cfg.candidates]] if len(hits) else hits
        best = float(hit_scores.max()) if len(hits) else 1.0
        # float64 of each float32 score over the best: the floats float(score) / best gives
        shares = (lex_scores[top].astype(np.float64) / best).tolist()
        return _Lexical(dict(zip(map(lex_ids.__getitem__, top.tolist()), shares)), hits, hit_scores, best)

    def _base(self, query: str) -> _Base:
        """The query's candidates before the shopper (:class:`_Base`): from the cache while the
        catalog, BM25 and the vector index are as they were when it was built (and the query's
        vector is the encoder's); after a change, the cached entry caught up with it
        (:meth:`_refresh`); else built now. Cached in an LRU of ``retrieval_cache`` normalised
        queries (0: never cached, the same answers)."""
        qtext = _query_text(query)
        qvec = self.encoder(qtext)
        version = (self.items.catalog.version, self.lexical.version, self.items.index.version)
        cache = self._base_cache
        got = cache.get(qtext)
        if got is not None and got.qvec is qvec:
            if got.version == version:
                cache.move_to_end(qtext)
                self.base_stats["hits"] += 1
                return got
            got = self._refresh(got, query, version)
        if got is None:
            self.base_stats["misses"] += 1
            got = self._build(query, qvec, version)
        if self.config.retrieval_cache > 0:
            cache[qtext] = got
            cache.move_to_end(qtext)
            while len(cache) > self.config.retrieval_cache:
                cache.popitem(last=False)
        return got

    def _semantic(self, qvec: np.ndarray) -> tuple[list[tuple[str, float]], bool]:
        """The vector search's top ``candidates`` items for the query, best first and equal scores
        by id, and whether that answer is *settled*: the same whatever order faiss scans the
        items in (faiss breaks equal scores by its scan order, which removals and re-adds
        change). A few more are asked so that the cut is known to fall between two different
        scores; where it does not (ties across it), the answer is not settled and is searched
        again after any change to the index (:meth:`_semantic_unmoved`)."""
        k = self.config.candidates
        if not len(self.items.index):
            return [], True
        got = self.items.search(qvec, k + _SEMANTIC_SPARE)[0]
        scores = [score for _, score in got]
        if any(a == b for a, b in zip(scores, scores[1:])):  # equal scores: by id
            got.sort(key=lambda hit: (-hit[1], hit[0]))
        settled = len(got) <= k or len(got) < k + _SEMANTIC_SPARE or got[-1][1] < got[k - 1][1]
        return got[:k], settled

    def _semantic_unmoved(self, base: _Base, changed: set[str]) -> bool:
        """Whether the vector search's answer in ``base`` is still the answer after the index
        changed these items: none of them is in it, and each of them now in the index scores
        clearly below its last item (so it cannot have entered; an item that left from outside
        the answer took nothing from it). Needs a settled answer of ``candidates`` items when
        an item was added (with fewer, every item searched was in it)."""
        answer = base.semantic
        if not base.settled or any(item_id in changed for item_id, _ in answer):
            return False
        index = self.items.index
        present = [item_id for item_id in changed if item_id in index]
        if not present:
            return True
        if len(answer) < self.config.candidates:
            return False
        # float32 dot products as faiss computes them, up to rounding: a margin far above it
        scores = index.vectors(present) @ base.qvec
        return bool((scores < answer[-1][1] - 1e-4).all())

    def _refresh(self, old: _Base, query: str, version: tuple[int, int, int]) -> _Base | None:
        """``old`` caught up with the catalog, BM25 and vector index as they are now, as
        :meth:`_build` would give it, or None (build it). BM25 is asked again whenever it
        changed (a new item moves every score: the document count and mean length); the
        vector search only when a changed item is in its answer or could have entered it; the
        merged list's catalog entries, rows and signals are kept when the two answers give the
        same list and no changed item is on it. So a new item costs a cached query one BM25
        scoring instead of a new build, and a price change of an item off its list nothing
        more (``base_stats["refreshed"]``)."""
        catalog_changed = self.items.catalog.changed_since(old.version[0])
        index_changed = self.items.index.changed_since(old.version[2])
        if catalog_changed is None or index_changed is None:
            return None
        changed = catalog_changed | index_changed
        if len(changed) > _REFRESH_MAX_CHANGES:
            return None
        self.base_stats["refreshed"] += 1
        known, lexical = old.known, old.lexical
        if old.version[1] != version[1]:  # (the vocabulary, hence the repaired tokens, only moves with BM25)
            known = self._known_tokens(query)
            lexical = self._lexical_retrieval(known)
        semantic, settled = old.semantic, old.settled
        if index_changed and not self._semantic_unmoved(old, index_changed):
            semantic, settled = self._semantic(old.qvec)
        if (semantic != old.semantic or list(lexical.top) != list(old.lexical.top)
                or any(item_id in old.where or item_id in old.lexical.top for item_id in changed)):
            return self._build(query, old.qvec, version, known=known, lexical=lexical, semantic=(semantic, settled))
        lex = old.lex if lexical is old.lexical else np.fromiter(
            map(lexical.top.get, old.ids, itertools.repeat(0.0)), dtype=np.float64, count=len(old.ids))
        return replace(old, version=version, known=known, lexical=lexical, lex=lex)

    def _build(self, query: str, qvec: np.ndarray, version: tuple[int, int, int], *, known: list[str] | None = None,
               lexical: _Lexical | None = None, semantic: tuple[list[tuple[str, float]], bool] | None = None) -> _Base:
        """The query's candidates before the shopper, from the retrievers' answers (asked here
        unless given: :meth:`_refresh` passes those it has)."""
        cfg = self.config
        if known is None:
            known = self._known_tokens(query)
        if lexical is None:
            lexical = self._lexical_retrieval(known)
        sem_hits, settled = semantic if semantic is not None else self._semantic(qvec)
        sem_set = frozenset(i for i, s in sem_hits if s >= cfg.min_semantic)
        known_items = self.items.catalog.items
        top = lexical.top
        entries = [(i, item) for i in dict.fromkeys([*top, *(i for i, _ in sem_hits)])
                   if (item := known_items.get(i)) is not None and item.available]  # is_recommendable
        ids = [i for i, _ in entries]
        n = len(ids)
        return _Base(
            version, qvec, known, _query_key(query), lexical, sem_hits, settled, bool(sem_set), ids,
            sum(1 for i in ids if i in top), self.items.index.rows(ids),
            np.fromiter(map(top.get, ids, itertools.repeat(0.0)), dtype=np.float64, count=n),
            np.array([i in sem_set for i in ids], dtype=bool), {i: j for j, i in enumerate(ids)},
            self._labels([item for _, item in entries]), _prices([item for _, item in entries]),
            self.popularity.slots(ids), self.popularity.stamp,
        )

    def _pop_slots(self, base: _Base) -> np.ndarray:
        """The base's candidates' popularity slots, looked up again only for those unknown then
        when popularity has learned items since (all of them after it reloaded)."""
        stamp = self.popularity.stamp
        if base.pop_stamp != stamp:
            if base.pop_stamp[0] != stamp[0]:
                base.pop_slots = self.popularity.slots(base.ids)
            elif (missing := np.flatnonzero(base.pop_slots < 0)).size:
                base.pop_slots[missing] = self.popularity.slots([base.ids[j] for j in missing.tolist()])
            base.pop_stamp = stamp
        return base.pop_slots

    def _labels(self, items: list[CatalogItem]) -> np.ndarray:
        """``(len(items), 2)`` codes of each item's category and brand (-1: none)."""
        codes = self._label_code
        out = np.full((len(items), 2), -1, dtype=np.int64)
        for j, item in enumerate(items):
            for k, name in enumerate((item.category, item.brand)):
                if name:
                    out[j, k] = codes.setdefault(name, len(codes))
        return out

    def candidates(self, query: str, state: UserState | None, now_ts: int) -> _Candidates:
        """Every candidate of the query for this user and its signals: the query's base
        candidates (:meth:`_base`, the same for every user), the user's own history items that
        match the query lexically, and the items learned for the query (never cached: they
        change with every credited engagement), in that order, each once."""
        cfg = self.config
        base = self._base(query)
        lexical = base.lexical
        # the user's own lexical matches beyond the query's top
        extra: dict[str, float] = {}
        if lexical.hit_rows.size and state is not None and state.history:
            pos, top = self.lexical.position, lexical.top
            for item_id, _t, _ts in state.history:
                if item_id not in top and (j := pos(item_id)) >= 0 and (score := lexical.score_at(j)) > 0:
                    extra[item_id] = score / lexical.best
        learned, learned_from = self.associations.weights(base.key), None
        if not learned and (repaired := _repaired_key(base)) is not None:
            # a query never engaged after, typed with a typo ("tnet"): the items learned for the
            # query it repairs to ("tent"). Until 2026-12-07 only BM25 saw the repair, and an item
            # with no text to match was not found for a misspelt query however often it was chosen
            learned = self.associations.weights(repaired)
            learned_from = repaired if learned else None
        if not lexical.top and not extra and not base.any_semantic and not learned:
            return _Candidates([], np.zeros((0, len(FEATURES))), np.zeros(0, bool), np.zeros(0, bool), base.known, True)
        known_items = self.items.catalog.items
        ids, where = base.ids, base.where
        index = self.items.index
        n_top = base.n_top
        pop_slots = self._pop_slots(base)
        if extra:  # the user's matches come right after the query's top (the order of a fresh merge)
            extra_entries = [(i, item) for i in extra if (item := known_items.get(i)) is not None and item.available]
            # the vector search's others: those the user's matches did not take up to the front
            moved = {j for i in extra if (j := where.get(i, -1)) >= 0}  # (never in the top)
            rest: slice | list[int] = slice(n_top, None)
            rest_ids = ids[n_top:]
            if moved:
                rest = [j for j in range(n_top, len(ids)) if j not in moved]
                rest_ids = [ids[j] for j in rest]
            ids = [*ids[:n_top], *(i for i, _ in extra_entries), *rest_ids]
            rows = np.concatenate([base.rows[:n_top], index.rows([i for i, _ in extra_entries]), base.rows[rest]])
            lex_col = np.concatenate([base.lex[:n_top], np.array([extra[i] for i, _ in extra_entries], dtype=np.float64),
                                      base.lex[rest]])
            sem_hit = np.concatenate([base.sem_hit[:n_top], np.array([i in where and base.sem_hit[where[i]] for i, _ in extra_entries], dtype=bool),
                                      base.sem_hit[rest]])
            labels = np.concatenate([base.labels[:n_top], self._labels([item for _, item in extra_entries]), base.labels[rest]])
            prices = np.concatenate([base.prices[:n_top], _prices([item for _, item in extra_entries]), base.prices[rest]])
            slots = np.concatenate([pop_slots[:n_top], self.popularity.slots([i for i, _ in extra_entries]), pop_slots[rest]])
            n_lex = n_top + len(extra_entries)
        else:
            rows, lex_col, sem_hit, labels, n_lex = base.rows, base.lex, base.sem_hit, base.labels, n_top
            prices, slots = base.prices, pop_slots
        new = [(i, item) for i in learned if i not in where and i not in extra
               and (item := known_items.get(i)) is not None and item.available]
        if new:
            ids = [*ids, *(i for i, _ in new)]
            rows = np.concatenate([rows, index.rows([i for i, _ in new])])
            lex_col = np.concatenate([lex_col, np.zeros(len(new))])
            sem_hit = np.concatenate([sem_hit, np.zeros(len(new), dtype=bool)])
            labels = np.concatenate([labels, self._labels([item for _, item in new])])
            prices = np.concatenate([prices, _prices([item for _, item in new])])
            slots = np.concatenate([slots, self.popularity.slots([i for i, _ in new])])
        n = len(ids)
        lex_hit = np.zeros(n, dtype=bool)
        lex_hit[:n_lex] = True  # the query's top and the user's matches: the lexical candidates
        x = np.zeros((n, len(FEATURES)), dtype=np.float64)
        vecs = index.vectors_of_rows_or_zero(rows)
        x[:, _COL["lexical"]] = lex_col
        x[:, _COL["semantic"]] = np.clip(vecs @ base.qvec, 0.0, None)
        if learned:
            x[:, _COL["learned"]] = np.fromiter(map(learned.get, ids, itertools.repeat(0.0)), dtype=np.float64, count=n)
        pop = np.log1p(self.popularity.scores_at(slots, now_ts))
        x[:, _COL["popular"]] = pop / pop.max() if n and pop.max() > 0 else 0.0
        if state is not None and cfg.personalise:
            self._personal(x, ids, vecs, labels, prices, state, now_ts)
        return _Candidates(ids, x, lex_hit, sem_hit, base.known, False, learned_from)

    def _personal(self, x: np.ndarray, ids: list[str], vecs: np.ndarray, labels: np.ndarray,
                  cand_prices: np.ndarray, state: UserState, now_ts: int) -> None:
        """The personal signals of each candidate, written into ``x`` (``vecs``, ``labels`` and
        ``cand_prices``: the candidates' vectors, category and brand codes (:meth:`_labels`) and
        catalog prices (0.0: none), row for row)."""
        catalog = self.items.catalog
        history = state.history
        if not history and not state.bought:
            return
        # the user's vector: the learned head's query when there is one, else the decayed interest
        user = None
        if self.head is not None and history:
            user = self._head_queries.get((state.user_id, now_ts))
            if user is None:
                user = self.head.query_vectors([history], [now_ts])[0]
        elif state.interest is not None:
            user = state.interest
        if user is not None and float(np.linalg.norm(user)) > 0:
            x[:, _COL["affinity"]] = np.clip(vecs @ (user / np.linalg.norm(user)), 0.0, None)
        cats: Counter[str] = Counter()
        brands: Counter[str] = Counter()
        prices: list[float] = []
        for item_id, etype, _ts in history:
            item = catalog.get(item_id)
            if item is None:
                continue
            w = EVENT_WEIGHTS.get(etype, 0.0)
            if item.category:
                cats[item.category] += w
            if item.brand:
                brands[item.brand] += w
            if item.price:
                prices.append(item.price)
        total_c, total_b = sum(cats.values()) or 1.0, sum(brands.values()) or 1.0
        median = _median(prices) if prices else None
        seen = {h[0] for h in history}
        purchases = sum(state.bought.values())
        rebuy = (purchases - len(state.bought)) / purchases if purchases else 0.0  # share of purchases that were repeats
        bought = state.bought
        # column by column (one list per signal, then one numpy write), the same floats as item by item
        # the user's share per category (brand) code, then one look-up per candidate: the same
        # floats as ``cats.get(item.category, 0.0) / total_c`` item by item (0.0 without one)
        for k, (col, counts, total) in enumerate(((_COL["category"], cats, total_c), (_COL["brand"], brands, total_b))):
            if counts:
                share = np.zeros(len(self._label_code) + 1)  # the last: code -1, no name
                for name, w in counts.items():
                    if (code := self._label_code.get(name)) is not None:
                        share[code] = w / total
                x[:, col] = share[labels[:, k]]
        # membership of each candidate in the user's few bought and seen items, tested in C (map)
        is_bought = np.fromiter(map(bought.__contains__, ids), dtype=bool, count=len(ids))
        if is_bought.any():
            x[:, _COL["bought"]] = is_bought
            x[:, _COL["rebuy"]] = np.where(is_bought, rebuy, 0.0)
        x[:, _COL["seen"]] = ~is_bought & np.fromiter(map(seen.__contains__, ids), dtype=bool, count=len(ids))
        if median:  # the C library's log and exp per candidate, as math's (recsys/search/_kernels.py)
            x[:, _COL["price"]] = price_closeness(cand_prices, float(median))

    # ------------------------------------------------------------------ reasons

    def _causes(self, x: np.ndarray) -> list[str]:
        """Each row's largest weighted signal (``semantic`` when none is positive)."""
        if not len(x):
            return []
        contrib = x * self._weights
        best, top = contrib.argmax(axis=1).tolist(), contrib.max(axis=1).tolist()
        return [FEATURES[b] if t > 0 else "semantic" for b, t in zip(best, top)]

    def _reason(self, query: str, c: _Candidates, j: int, state: UserState | None, cause: str) -> str:
        """Why candidate ``j`` is shown, from its largest weighted signal ``cause`` (:meth:`_causes`).
        A candidate only the learned associations brought (no lexical or semantic match) is
        shown because shoppers chose it after the query, whichever of its query-side signals
        weighs most (until 2026-12-08 a weakly learned, popular one read ``popular for 'gift'``, and
        one under the cosine cut-off ``close to 'gift'``: an operator's probe)."""
        q = query.strip()
        if cause in ("popular", "semantic") and not c.lexical_hit[j] and not c.semantic_hit[j] \
                and c.x[j, _COL["learned"]] > 0:
            cause = "learned"
        if cause == "lexical":
            # the lexical index holds every available item's current tokens (tokenising the
            # item again here was a fifth of a search's cost)
            tokens = self.lexical.docs.get(c.ids[j])
            if tokens is None:
                item = self.items.catalog.get(c.ids[j])
                tokens = item_tokens(item) if item is not None else []
            words = set(tokens)
            matched = [t for t in dict.fromkeys(c.tokens) if t in words]
            return f"matches '{as_typed(q, matched) or q}'"
        if cause == "learned":
            return f"often chosen after searching '{c.learned_from or q}'"
        if cause == "popular":
            return f"popular for '{q}'"
        if cause in ("bought", "rebuy"):
            return "bought before"
        if cause == "seen":
            return "you looked at this recently"
        if cause in ("affinity", "category", "brand", "price") and state is not None and state.history:
            return self._like(c.ids[j], state)
        return f"close to '{q}'"

    def _like(self, item_id: str, state: UserState) -> str:
        """``like the <title> you bought/viewed``: the latest history item of the same category."""
        catalog = self.items.catalog
        item = catalog.get(item_id)
        pick = None
        for hid, etype, _ts in reversed(state.history):
            h = catalog.get(hid)
            if h is not None and hid != item_id and (item is None or h.category == item.category):
                pick = (h, etype)
                break
        if pick is None:
            hid, etype, _ = state.history[-1]
            h = catalog.get(hid)
            if h is None:
                return "suits your taste"
            pick = (h, etype)
        h, etype = pick
        title = h.title if len(h.title) <= 50 else h.title[:47] + "..."
        verb = "bought" if etype == "purchase" else "added to cart" if etype == "add_to_cart" else "viewed"
        return f"like the {title} you {verb}"

    def stats(self) -> dict[str, Any]:
        return {"lexical_items": len(self.lexical), "lexical_terms": self.lexical.terms,
                "queries_learned": len(self.associations),
                **{f"engagements_{k.replace(' ', '_')}": v for k, v in sorted(self.credit_counts.items())},
                **{f"query_cache_{k}": v for k, v in self.encoder.stats.items()},
                **{f"base_cache_{k}": v for k, v in self.base_stats.items()}, "base_cache_size": len(self._base_cache)}
