"""Query and item text to search tokens: normalisation, light plural folding, typo repair.

One tokeniser for item text and queries, so both meet in the same vocabulary:

- Unicode NFKD, accents dropped, lower case (``"Crème Brûlée"`` -> ``"creme brulee"``);
- every run of non-alphanumeric characters separates tokens (``"t-shirt/XL"`` -> 3 tokens);
- a few English stop words dropped, and a light plural fold (``tents`` -> ``tent``,
  ``boxes`` -> ``box``; not ``glass``), applied the same way on both sides;
- :func:`query_key`: the sorted distinct tokens, so ``"tent blue"`` and ``"Blue tents"`` are
  one query for the learned associations (word-order tolerance);
- :func:`query_tokens`: a query is read up to its first :data:`MAX_QUERY_TOKENS` tokens.

>>> tokenize("Crème Brûlée, 2 x 100g Tents!")
['creme', 'brulee', '2', 'x', '100g', 'tent']
>>> query_key("Blue  TENTS") == query_key("tent blue")
True
>>> Vocabulary(["tent", "tennis", "sleeping", "bag"]).repair(["slepping", "tnet", "bga", "zzzzzz"])
['sleeping', 'tent', 'bga', 'zzzzzz']
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from rapidfuzz import process
from rapidfuzz.distance import DamerauLevenshtein

_SPLIT = re.compile(r"[^0-9a-z]+")
#: Words that carry no product meaning in a shop query; kept tiny on purpose (``"for men"`` is
#: a real distinction on some catalogs, so only articles and glue words go).
STOP_WORDS = frozenset({"a", "an", "and", "the", "of", "for", "with", "in", "on", "to", "or", "by"})
#: Typo repair: the closest vocabulary word must have at least this normalised Damerau-Levenshtein
#: similarity (``1 - edits / longer length``; a swap of two letters is one edit): 0.75 accepts one
#: edit in a 4-letter word ("tnet" -> "tent") and two in an 8-letter one.
TYPO_MIN_SCORE = 0.75
#: Words shorter than this are never "repaired": too many real words lie one edit apart.
TYPO_MIN_LEN = 4


def normalize(text: str) -> str:
    """Lower-case ASCII-folded text (accents removed); other characters kept."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def _fold(token: str) -> str:
    """Light English plural folding, the same for items and queries."""
    if len(token) > 4 and token.endswith(("ches", "shes", "xes", "sses")):
        return token[:-2]
    if len(token) > 4 and token.endswith("ies"):
        return token[:-3] + "y"
    if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return token


def tokenize(text: str | None) -> list[str]:
    """Search tokens of a text, in order (duplicates kept: BM25 counts them)."""
    if not text:
        return []
    return [_fold(t) for t in _SPLIT.split(normalize(text)) if t and t not in STOP_WORDS]


#: How much of a query search reads: its first this many tokens (retrieval, typo repair, the
#: query model and the learned associations). Shoppers type a few words; a search event may carry
#: up to 1,000 characters, and the query model reads up to 256 word pieces, so one such query
#: cost 85-214 CPU-ms against ~15-25 for a short one (benchmarks/README.md, "Search: long
#: queries"): a cheap way to hold a shard's batch. The answer still names the query as sent.
MAX_QUERY_TOKENS = 16
#: What the query model reads of a query without a token (only stop words or punctuation).
MAX_TOKENLESS_CHARS = 64


def query_tokens(query: str) -> list[str]:
    """:func:`tokenize` of a query, its first :data:`MAX_QUERY_TOKENS` tokens.

    >>> len(query_tokens("tent " * 100))
    16
    """
    return tokenize(query)[:MAX_QUERY_TOKENS]


def query_key(query: str) -> str:
    """The order-free identity of a query: its sorted distinct tokens (the first
    :data:`MAX_QUERY_TOKENS`), space-joined ("" if none)."""
    return " ".join(sorted(set(query_tokens(query))))


class Vocabulary:
    """The words of the catalog, for typo repair of query tokens (rapidfuzz, in C).

    Repair maps a token missing from the vocabulary to its closest word (similarity at least
    :data:`TYPO_MIN_SCORE`), leaving it as it is when nothing is close enough. Words of
    fewer than :data:`TYPO_MIN_LEN` letters and numbers are left alone.
    """

    def __init__(self, words: Iterable[str] = ()) -> None:
        self.words: set[str] = set(words)
        self._list: list[str] | None = None
        self._memo: dict[str, str] = {}

    def add(self, words: Iterable[str]) -> None:
        before = len(self.words)
        self.words.update(words)
        if len(self.words) != before:
            self._list = None
            self._memo.clear()

    def __contains__(self, word: object) -> bool:
        return word in self.words

    def repair(self, tokens: list[str]) -> list[str]:
        """Each token, or its closest vocabulary word when it is not a word of the catalog."""
        return [self._repair_one(t) for t in tokens]

    def _repair_one(self, token: str) -> str:
        if token in self.words or len(token) < TYPO_MIN_LEN or token.isdigit():
            return token
        hit = self._memo.get(token)
        if hit is None:
            if self._list is None:
                self._list = sorted(self.words)  # sorted: ties resolve the same way every run
            best = process.extractOne(token, self._list, scorer=DamerauLevenshtein.normalized_similarity,
                                       score_cutoff=TYPO_MIN_SCORE)
            hit = best[0] if best is not None else token
            if len(self._memo) > 50_000:  # bounded: arbitrary queries must not grow memory
                self._memo.clear()
            self._memo[token] = hit
        return hit
