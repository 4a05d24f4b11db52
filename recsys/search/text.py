"""Query and item text to search tokens: normalisation, light plural folding, typo repair.

One tokeniser for item text and queries, so both meet in the same vocabulary:

- Unicode NFKD, accents dropped (the marks that spell a word in its script kept: Indic vowel
  signs, Thai marks, kana voicing), lower case (``"Crème Brûlée"`` -> ``"creme brulee"``);
- every run of characters that are not letters, digits or marks (of any script) separates tokens,
  and runs of Han, kana and Hangul, written without spaces, are read as overlapping character
  pairs (``"緑茶ティー"`` -> ``緑茶 茶テ ティ ィー``);
  (``"t-shirt/XL"`` -> 3 tokens; ``"Чай чёрный"`` -> 2, ``"Smørrebrød"`` -> 1);
- a few English stop words dropped, and a light plural fold (``tents`` -> ``tent``,
  ``boxes`` -> ``box``; not ``glass``), applied the same way on both sides;
- :func:`query_key`: the sorted distinct tokens, so ``"tent blue"`` and ``"Blue tents"`` are
  one query for the learned associations (word-order tolerance);
- :func:`query_tokens`: a query is read up to its first :data:`MAX_QUERY_TOKENS` tokens.

>>> tokenize("Crème Brûlée, 2 x 100g Tents!")
['creme', 'brulee', '2', 'x', '100g', 'tent']
>>> tokenize("Чай чёрный, Smørrebrød, 緑茶")
['чаи', 'черныи', 'smørrebrød', '緑茶']
>>> query_key("Blue  TENTS") == query_key("tent blue")
True
>>> Vocabulary(["tent", "tennis", "sleeping", "bag"]).repair(["slepping", "tnet", "bga", "zzzzzz"])
['sleeping', 'tent', 'bga', 'zzzzzz']
"""

from __future__ import annotations

import bisect
import functools
import math
import re
import unicodedata
from collections.abc import Iterable

import numpy as np
import regex
from rapidfuzz import process
from rapidfuzz.distance import DamerauLevenshtein

#: What separates tokens: every run of characters that are neither letters nor digits, in any script
#: (until 2026-12-07 ``[^0-9a-z]``: Cyrillic, Greek and CJK words were no tokens at all, and ``ø``,
#: ``æ``, ``ß`` split Danish and German words, so ``øl`` matched ``l``). ASCII text splits as before.
#: Marks (``\p{M}``: a Devanagari vowel sign, a Thai tone mark) are part of their word; until
#: 2026-12-07 they split it (the ``regex`` module: the standard ``re`` has no Unicode categories).
_SPLIT = regex.compile(r"[^\p{L}\p{N}\p{M}]+")
#: Words that carry no product meaning in a shop query; kept tiny on purpose (``"for men"`` is
#: a real distinction on some catalogs, so only articles and glue words go).
STOP_WORDS = frozenset({"a", "an", "and", "the", "of", "for", "with", "in", "on", "to", "or", "by"})
#: Typo repair: the closest vocabulary word must have at least this normalised Damerau-Levenshtein
#: similarity (``1 - edits / longer length``; a swap of two letters is one edit): 0.75 accepts one
#: edit in a 4-letter word ("tnet" -> "tent") and two in an 8-letter one.
TYPO_MIN_SCORE = 0.75
#: Words shorter than this are never "repaired": too many real words lie one edit apart.
TYPO_MIN_LEN = 4
#: Typo repair tries at most this many words of one query (the first ones not in the vocabulary;
#: the rest are left as typed). Each try reads the vocabulary's words of the lengths that can
#: match (~4.5 ms at 200,000 words, ~0.3 ms at 10,000, with the filters of :class:`Vocabulary`):
#: a query of 16 nonsense words paid 16 tries. A shopper's query rarely holds more than one or
#: two typos.
MAX_TYPO_REPAIRS = 4


#: Combining marks that spell a word rather than accent it, kept by :func:`normalize`: the
#: vowel signs, viramas and nuktas of the Indic scripts, Thai, Lao, Tibetan, Myanmar, Khmer and
#: Balinese marks, and the kana voicing marks (``ガ`` is ``カ`` with one; ``ガム`` is gum, ``カム`` a
#: cam). Until 2026-12-07 every combining mark was dropped, as Latin accents are.
_SPELLING_MARKS = re.compile("[\u0900-\u0dff\u0e00-\u0fff\u1000-\u109f\u1780-\u17ff\u1b00-\u1bff"
                             "\ua8e0-\ua8ff\u3099\u309a]")


def normalize(text: str) -> str:
    """Lower-case text with accents removed (``Crème`` -> ``creme``, ``чёрный`` -> ``черныи``),
    compatibility forms folded (``ｶﾞﾑ`` -> ``ガム``) and the marks that spell a word in its script
    kept (:data:`_SPELLING_MARKS`); other characters as they are.

    >>> normalize("Crème Brûlée"), normalize("ｶﾞﾑ"), normalize("चाय")
    ('creme brulee', 'ガム', 'चाय')
    """
    if text.isascii():
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c) or _SPELLING_MARKS.match(c))
    return unicodedata.normalize("NFC", kept).lower()


def _fold(token: str) -> str:
    """Light English plural folding, the same for items and queries."""
    if len(token) > 4 and token.endswith(("ches", "shes", "xes", "sses")):
        return token[:-2]
    if len(token) > 4 and token.endswith("ies"):
        return token[:-3] + "y"
    if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return token


#: Runs of the scripts written without spaces between words (Han, kana, with the prolonged sound
#: mark and the iteration mark, and Hangul, whose words carry their particles): read as
#: overlapping pairs of characters, as Lucene's CJK analyser reads them, since a dictionary of
#: words is not at hand. Until 2026-12-07 a run was one token, and ``緑茶`` did not match
#: ``緑茶ティーバッグ``.
_CJK_RUN = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\u30fc\u3005]+")


def _pieces(token: str, unigrams: bool = False) -> list[str]:
    """A token as search reads it: whole, or with its CJK runs as overlapping character pairs (a
    run of one character as itself); ``unigrams``: each character of a longer run too, after its
    pairs (what an item's text indexes, so that a query of one character finds the words holding it).

    >>> _pieces("緑茶ティー"), _pieces("iphone用ケース"), _pieces("tent")
    (['緑茶', '茶テ', 'ティ', 'ィー'], ['iphone', '用ケ', 'ケー', 'ース'], ['tent'])
    >>> _pieces("紅茶", unigrams=True)
    ['紅茶', '紅', '茶']
    """
    if token.isascii():
        return [token]
    out, pos = [], 0
    for run in _CJK_RUN.finditer(token):
        if run.start() > pos:
            out.append(token[pos:run.start()])
        text = run.group()
        out.extend([text] if len(text) == 1 else [text[i:i + 2] for i in range(len(text) - 1)])
        if unigrams and len(text) > 1:
            out.extend(text)
        pos = run.end()
    if pos < len(token):
        out.append(token[pos:])
    return out


def tokenize(text: str | None, *, unigrams: bool = False) -> list[str]:
    """Search tokens of a text, in order (duplicates kept: BM25 counts them). ``unigrams`` (an
    item's text, not a query): also each character of a CJK run of two or more (:func:`_pieces`).
    One character is a whole word in Chinese and Japanese (茶 tea, 米 rice), searched alone: until
    2026-12-07 items indexed pairs only, and such a query matched no longer run. A query of two or
    more characters still reads pairs only (Lucene's CJK bigrams with ``outputUnigrams`` on the
    index side), so ``紅茶`` does not match ``緑茶``."""
    if not text:
        return []
    if text.isascii():
        return [_fold(t) for t in _SPLIT.split(text.lower()) if t and t not in STOP_WORDS]
    # a stop word as written, before its accents go: until 2026-12-07 after, and French ``thé`` (tea)
    # was dropped as ``the``. The words are split where normalize's would be (NFKC folds the same
    # compatibility forms; the marks it keeps never separate words), then each is normalised.
    return [_fold(p) for w in _SPLIT.split(unicodedata.normalize("NFKC", text).lower()) if w and w not in STOP_WORDS
            for t in _SPLIT.split(normalize(w)) if t for p in _pieces(t, unigrams)]


def clear_caches() -> None:
    """Empty the memoised per-query results (an erasure: they hold what shoppers typed)."""
    _typed.cache_clear()


@functools.lru_cache(maxsize=4096)
def _typed(query: str) -> dict[str, str]:
    """``token -> the word of ``query`` it came from``, for the words that give one token (a
    CJK run gives pairs, shown by :func:`display_tokens` instead)."""
    typed: dict[str, str] = {}
    for word in _SPLIT.split(query):
        pieces = tokenize(word)
        if len(pieces) == 1:
            typed.setdefault(pieces[0], word)
    return typed


def as_typed(query: str, tokens: list[str]) -> str:
    """Matched query ``tokens`` as a reason shows them: each as the shopper typed its word, not
    as search reads it (until 2026-12-07 reasons showed the folded, accent-free tokens: ``matches
    'чаи'`` for ``чай``, ``'grocery fluid milk product'`` for ``products``); a token the query
    did not hold as typed (typo repair's word) as it is; CJK pairs joined back into their run.

    >>> as_typed("Grocery fluid milk PRODUCTS", ["grocery", "milk", "product"])
    'Grocery milk PRODUCTS'
    >>> as_typed("чай, crème", ["чаи", "creme"]), as_typed("tnet", ["tent"]), as_typed("コーヒー", ["コー", "ーヒ"])
    ('чай crème', 'tent', 'コーヒ')
    """
    typed = _typed(query)
    return display_tokens(list(dict.fromkeys(typed.get(t, t) for t in tokens)))


def display_tokens(tokens: list[str]) -> str:
    """Tokens as a reason shows them: space-separated, with overlapping CJK pairs joined back
    into their run (``コー ーヒ ヒー`` -> ``コーヒー``).

    >>> display_tokens(["コー", "ーヒ", "ヒー"]), display_tokens(["blue", "tent"]), display_tokens(["緑茶", "100g"])
    ('コーヒー', 'blue tent', '緑茶 100g')
    """
    words: list[str] = []
    for token in tokens:
        if (words and len(token) == 2 and _CJK_RUN.fullmatch(token) and len(words[-1]) >= 2
                and _CJK_RUN.fullmatch(words[-1]) and words[-1][-1] == token[0]):
            words[-1] += token[1]
        else:
            words.append(token)
    return " ".join(words)


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


#: Letter counts for typo repair's filter: a-z and 0-9 (what :func:`tokenize` keeps), anything else one slot.
_SLOT = np.full(256, 36, dtype=np.int64)
_SLOT[np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", dtype=np.uint8)] = np.arange(36)
_SLOTS = 37


def _letter_counts(words: list[str]) -> np.ndarray:
    """``(len(words), 37)`` uint8: how often each of a-z, 0-9 and "anything else" occurs in each
    word (capped at 255, which can only shrink a difference between two words)."""
    if not words:
        return np.zeros((0, _SLOTS), dtype=np.uint8)
    data = [w.encode("ascii", "replace") for w in words]  # one byte a character: any other is "?"
    lengths = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
    codes = _SLOT[np.frombuffer(b"".join(data), dtype=np.uint8)]
    rows = np.repeat(np.arange(len(data)), lengths)
    counts = np.bincount(rows * _SLOTS + codes, minlength=len(data) * _SLOTS).reshape(len(data), _SLOTS)
    return np.minimum(counts, 255).astype(np.uint8)


class Vocabulary:
    """The words of the catalog, for typo repair of query tokens (rapidfuzz, in C).

    Repair maps a token missing from the vocabulary to its closest word (similarity at least
    :data:`TYPO_MIN_SCORE`), leaving it as it is when nothing is close enough; among equally
    close words the first in alphabetical order. Words of fewer than :data:`TYPO_MIN_LEN`
    letters and numbers are left alone.

    Two exact filters keep a repair from scanning the whole vocabulary (a large catalog's
    200,000 words cost ~50 ms a word scanned whole):

    - length: a word can only be close enough when the lengths differ by at most
      ``1 - TYPO_MIN_SCORE`` of the longer (an edit changes the length by one at most), so the
      words are kept sorted by length and only those lengths are read;
    - letters: ``d`` edits change the letter counts by at most ``2 d`` in all (a substitution
      moves one count down and one up, an insertion or deletion one, a transposition none), so a
      word whose counts differ from the token's by more cannot be within the edits allowed, and
      only the others go to rapidfuzz (one numpy pass over a count matrix per length).

    Words a catalog upsert adds are merged into their length when a repair next reads it (one
    linear merge), never re-sorted all at once.
    """

    def __init__(self, words: Iterable[str] = ()) -> None:
        self.words: set[str] = set()
        self._by_length: dict[int, list[str]] = {}  # length -> the words of that length, sorted
        self._counts: dict[int, np.ndarray] = {}  # length -> their letter counts, row for row
        self._pending: dict[int, list[str]] = {}  # length -> words added since that length was last read
        self._memo: dict[str, str] = {}
        self.add(words)

    def add(self, words: Iterable[str]) -> None:
        """Take new words (a catalog upsert's tokens): noted now, merged into their length's
        sorted words when a repair next reads that length, so that a catalog of many items,
        added one by one, costs one merge per length and not one insertion per word."""
        new = {w for w in words if w not in self.words}
        if not new:
            return
        self.words.update(new)
        for word in new:
            self._pending.setdefault(len(word), []).append(word)
        self._memo.clear()  # a new word may be closer than a remembered repair

    def _length(self, length: int) -> tuple[list[str], np.ndarray]:
        """The words of ``length``, sorted, and their letter counts, with the pending ones merged in."""
        pending = self._pending.pop(length, None)
        bucket = self._by_length.get(length, [])
        if pending:
            pending.sort()
            counts = _letter_counts(pending)
            if bucket:
                at = [bisect.bisect_left(bucket, word) for word in pending]  # into the old rows, in order
                counts = np.insert(self._counts[length], at, counts, axis=0)
                bucket = sorted(bucket + pending)  # two sorted runs: one linear merge
            else:
                bucket = pending
            self._by_length[length], self._counts[length] = bucket, counts
        return bucket, self._counts.get(length, np.zeros((0, _SLOTS), dtype=np.uint8))

    def __contains__(self, word: object) -> bool:
        return word in self.words

    def repair(self, tokens: list[str]) -> list[str]:
        """Each token, or its closest vocabulary word when it is not a word of the catalog (the
        first :data:`MAX_TYPO_REPAIRS` such tokens; later ones are left as they are).

        >>> Vocabulary(["tent", "stove", "lamp", "rope", "mugs"]).repair(["tnet", "stvoe", "lapm", "rpoe", "mgus"])
        ['tent', 'stove', 'lamp', 'rope', 'mgus']
        """
        out, tried = [], 0
        for token in tokens:
            if self._repairable(token):
                tried += 1
                if tried <= MAX_TYPO_REPAIRS:
                    token = self._repair_one(token)
            out.append(token)
        return out

    def forget_repairs(self) -> None:
        """Drop the remembered repairs (an erasure: they hold words shoppers typed)."""
        self._memo.clear()

    def _repairable(self, token: str) -> bool:
        return token not in self.words and len(token) >= TYPO_MIN_LEN and not token.isdigit()

    def _repair_one(self, token: str) -> str:
        if not self._repairable(token):
            return token
        hit = self._memo.get(token)
        if hit is None:
            hit = self._closest(token)
            if len(self._memo) > 50_000:  # bounded: arbitrary queries must not grow memory
                self._memo.clear()
            self._memo[token] = hit
        return hit

    def _closest(self, token: str) -> str:
        """The most similar word of the lengths and letter counts that can reach
        :data:`TYPO_MIN_SCORE` (normalised by the longer of the two), ties to the first
        alphabetically; else ``token``."""
        n = len(token)
        shortest = math.ceil(n * TYPO_MIN_SCORE - 1e-9)
        longest = math.floor(n / TYPO_MIN_SCORE + 1e-9)
        mine = _letter_counts([token])[0].astype(np.int16)
        best, best_score = token, TYPO_MIN_SCORE
        found = False
        for length in range(shortest, longest + 1):
            bucket, counts = self._length(length)
            if not bucket:
                continue
            edits = math.floor((1 - TYPO_MIN_SCORE) * max(length, n) + 1e-9)  # the most a match may need
            near = np.flatnonzero(np.abs(counts.astype(np.int16) - mine).sum(axis=1) <= 2 * edits)
            if len(near) == 0:
                continue
            candidates = [bucket[i] for i in near.tolist()]  # still in alphabetical order
            # a little under the best so far, so that ties are kept (they may sort first):
            # rapidfuzz 3.14 refuses a 0.8 match with a bar of 0.8, or of 0.8 - 1e-9. A lower bar
            # costs time, never the answer (the bucket's best is compared exactly below)
            hit = process.extractOne(token, candidates, scorer=DamerauLevenshtein.normalized_similarity,
                                     score_cutoff=best_score - 1e-4 if found else TYPO_MIN_SCORE)
            if hit is not None and (not found or hit[1] > best_score or (hit[1] == best_score and hit[0] < best)):
                best, best_score, found = hit[0], hit[1], True
        return best
