"""Lexical retrieval: BM25 over an item's title, description, category, brand and attributes,
updated in place by every catalog upsert.

Why not a library's index: ``bm25s`` (used here until 2026-12-03) precomputes every
(term, item) score into an immutable sparse matrix, so every catalog change meant rebuilding it
over the whole catalog, lazily, on the next search: ~0.1 s at 10,000 items on the 2-core box
(1.85 s at Complete Journey's 29,977), inside the batch's path, at most once a second while
changes kept arriving; a live shop whose catalog changes every second spent that on every
search batch, and a changed item kept its old text until the rebuild. ``rank_bm25`` rebuilds
too; ``tantivy`` would update in place but tokenises and scores otherwise (every search figure
moves) and adds an index with its own commits. So the index is kept here as postings (term ->
{position: term frequency}), item lengths and the corpus totals, and a query's scores are
computed when asked, from the statistics as they are at that moment:

    score(q, d) = sum over q's known tokens t of  idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)),
    idf(t) = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

(Lucene's BM25, ``bm25s``'s default), with the same floats ``bm25s`` gives for the same
documents: each term's score rounded to float32 from the same float64 arithmetic, and the
query's terms added in float32 in query order. ``tests/test_search.py`` checks them bit for bit
against a fresh ``bm25s`` build over the current documents through upserts, text changes,
withdrawals and returns; ``bm25s`` stays a test dependency for that.

Positions follow the order the items entered the catalog (an item withdrawn and back takes a
new one, as it would in a fresh build), so ties among equal scores fall as in a fresh build;
the positions of withdrawn items are reclaimed when they outnumber the live ones.

>>> from recsys.events import CatalogItem
>>> lex = LexicalIndex()
>>> lex.upsert([CatalogItem("t1", "Blue tent", category="Camping"), CatalogItem("b1", "Sleeping bag")])
>>> [item for item, _ in lex.search(["tent"], 5)]
['t1']
>>> lex.upsert([CatalogItem("b1", "Sleeping bag for a tent")])    # found by its new text at once
>>> lex.search(["tent"], 5)                                         # equal scores: by id
[('b1', 0.08287344127893448), ('t1', 0.08287344127893448)]
>>> lex.search(["unknownword"], 5)
[]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import numpy as np

from recsys.events import CatalogItem
from recsys.search.text import Vocabulary, tokenize


#: BM25 reads each part of an item (title, brand, category, description, each string attribute)
#: up to its first this many tokens, as the sentence-transformer reads its text up to 256 word
#: pieces. Until 2026-12-07 every token was indexed: 2,000 valid items of ~45 KB of random words
#: (a catalog probe) took the flow from 1.15 to 3.5 GB and held it ~5 s a 64-record batch, and a
#: new typo query searched the vocabulary they filled for 8 s. The shared logs' texts are far
#: shorter: nothing they index changed.
MAX_PART_TOKENS = 256
#: ... and an item up to this many in all (its attributes are parts of their own: 45 KB of words
#: spread over a hundred attribute values would pass the cap above).
MAX_ITEM_TOKENS = 1_024


def item_tokens(item: CatalogItem) -> list[str]:
    """What BM25 sees of an item: title, brand, category and description tokens (with each
    character of a CJK run beside its pairs: :func:`recsys.search.text.tokenize`), and string
    attribute values (``attributes`` such as colour or material); numbers and flags skipped;
    each part up to its first :data:`MAX_PART_TOKENS` tokens, the item up to :data:`MAX_ITEM_TOKENS`."""
    parts = [item.title, item.brand, item.category, item.description]
    for value in (item.attributes or {}).values():
        if isinstance(value, str):
            parts.append(value)
    tokens: list[str] = []
    for part in parts:
        tokens.extend(tokenize(part, unigrams=True)[:MAX_PART_TOKENS])
        if len(tokens) >= MAX_ITEM_TOKENS:
            return tokens[:MAX_ITEM_TOKENS]
    return tokens


class LexicalIndex:
    """BM25 over the available catalog items, current after every upsert (see the module)."""

    def __init__(self, *, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b
        self.docs: dict[str, list[str]] = {}
        self.vocabulary = Vocabulary()
        self._ids: list[str] = []  # position -> item id (withdrawn items keep theirs until reclaimed)
        self._slot: dict[str, int] = {}  # item id -> position, for every item in docs
        self._length = np.zeros(1024, dtype=np.int64)  # position -> token count (0: none, withdrawn)
        self._postings: dict[str, dict[int, int]] = {}  # term -> {position: term frequency}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # term -> (positions, tf), as asked
        self._n_docs = 0  # items with at least one token
        self._total_len = 0
        #: bumped whenever an answer of :meth:`known`, :meth:`scores`, :meth:`position` or
        #: ``vocabulary.repair`` could change: every upsert that changed an item's tokens
        self.version = 0

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def terms(self) -> int:
        """Distinct terms in the index."""
        return len(self._postings)

    def upsert(self, items: Iterable[CatalogItem]) -> None:
        """Take catalog upserts: unavailable items leave, others get their current tokens."""
        for item in items:
            if not item.available:
                old = self.docs.pop(item.item_id, None)
                if old is not None:
                    self._unindex(item.item_id, old)
                    del self._slot[item.item_id]
                    self.version += 1
                continue
            tokens = item_tokens(item)
            old = self.docs.get(item.item_id)
            if old == tokens:
                continue
            if old is None:
                self._slot[item.item_id] = self._new_position(item.item_id)
            else:
                self._unindex(item.item_id, old)
            self.docs[item.item_id] = tokens
            self.vocabulary.add(tokens)
            self._index(item.item_id, tokens)
            self.version += 1
        if len(self._ids) > 2 * len(self.docs) + 1024:
            self._reclaim()

    def _new_position(self, item_id: str) -> int:
        pos = len(self._ids)
        self._ids.append(item_id)
        if pos == len(self._length):
            self._length = np.concatenate([self._length, np.zeros(pos, dtype=np.int64)])
        return pos

    def _index(self, item_id: str, tokens: list[str]) -> None:
        if not tokens:
            return
        pos = self._slot[item_id]
        self._length[pos] = len(tokens)
        self._n_docs += 1
        self._total_len += len(tokens)
        for term, tf in Counter(tokens).items():
            self._postings.setdefault(term, {})[pos] = tf
            self._arrays.pop(term, None)

    def _unindex(self, item_id: str, tokens: list[str]) -> None:
        if not tokens:
            return
        pos = self._slot[item_id]
        self._length[pos] = 0
        self._n_docs -= 1
        self._total_len -= len(tokens)
        for term in set(tokens):
            postings = self._postings[term]
            del postings[pos]
            if not postings:
                del self._postings[term]
            self._arrays.pop(term, None)

    def _reclaim(self) -> None:
        """Number the items again in catalog order, dropping withdrawn items' positions."""
        docs = self.docs
        self.docs, self._ids, self._slot = {}, [], {}
        self._length = np.zeros(max(1024, 2 * len(docs)), dtype=np.int64)
        self._postings, self._arrays = {}, {}
        self._n_docs = self._total_len = 0
        for item_id, tokens in docs.items():
            self.docs[item_id] = tokens
            self._slot[item_id] = self._new_position(item_id)
            self._index(item_id, tokens)
        self.version += 1

    def position(self, item_id: str) -> int:
        """The item's position in :meth:`scores`'s arrays (-1: not in the index, or no tokens)."""
        pos = self._slot.get(item_id, -1)
        return pos if pos >= 0 and self._length[pos] else -1

    def known(self, tokens: list[str]) -> list[str]:
        """The tokens that occur in the index (others cannot match anything)."""
        postings = self._postings
        return [t for t in tokens if t in postings]

    def _term(self, term: str) -> tuple[np.ndarray, np.ndarray]:
        got = self._arrays.get(term)
        if got is None:
            postings = self._postings[term]
            got = (np.fromiter(postings.keys(), dtype=np.int64, count=len(postings)),
                   np.fromiter(postings.values(), dtype=np.float32, count=len(postings)))
            self._arrays[term] = got
        return got

    def scores(self, tokens: list[str]) -> tuple[list[str], np.ndarray]:
        """BM25 score of every position for these query tokens: ``(ids, scores)`` (float32; 0
        at withdrawn items' positions), or ``([], [])`` when no token is known."""
        known = self.known(tokens)
        if not known:
            return [], np.zeros(0, dtype=np.float32)
        n, k1, b = self._n_docs, self.k1, self.b
        avg = self._total_len / n
        out = np.zeros(len(self._ids), dtype=np.float32)
        for term in known:  # in query order, repeats included: float32 sums as bm25s adds them
            pos, tf = self._term(term)
            df = len(pos)
            idf = np.float32(math.log(1 + (n - df + 0.5) / (df + 0.5)))
            tf64 = tf.astype(np.float64)
            tfc = tf64 / (k1 * ((1 - b) + b * self._length[pos] / avg) + tf64)
            out[pos] += (np.float64(idf) * tfc).astype(np.float32)
        return self._ids, out

    def search(self, tokens: list[str], k: int) -> list[tuple[str, float]]:
        """Top ``k`` ``(item_id, bm25)`` with a positive score, best first (ties by id)."""
        ids, scores = self.scores(tokens)
        if not ids or k <= 0:
            return []
        hits = np.flatnonzero(scores > 0)
        if len(hits) > k:
            hits = hits[np.argpartition(-scores[hits], k - 1)[:k]]
        ranked = sorted(hits.tolist(), key=lambda j: (-scores[j], ids[j]))
        return [(ids[j], float(scores[j])) for j in ranked]
