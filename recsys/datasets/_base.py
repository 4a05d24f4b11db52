"""Shared pieces of the dataset adapters: the :class:`Dataset` record, the skip log, row
reading with line numbers, and time parsing.

Adapters never raise on a bad row: they count it in :attr:`Dataset.skipped` under a reason
kind (``"truncated row"``) and keep the first few occurrences, with line numbers, in
:attr:`Dataset.examples`. They do raise :class:`ValueError` for a wrong file or a wrong
configuration (missing columns, unknown mapping keys), which no amount of skipping fixes.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from operator import attrgetter
from typing import Any

import orjson
from tqdm import tqdm

from recsys.events import CatalogItem, DecodeError, Event
from recsys.files import open_input, plain_name

#: A byte that is not UTF-8, as ``errors="surrogateescape"`` keeps it.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")

#: How many example lines each skip reason keeps: enough to find the pattern in the file,
#: few enough that a file full of bad rows does not keep a million strings alive.
EXAMPLES_PER_REASON = 3


@dataclass
class Dataset:
    """A loaded event log: events sorted by ``ts`` (stable, so ties keep file order),
    the catalog of the items they touch, and what was skipped and why.

    >>> ds = Dataset("tiny", [Event("t:2", "click", "u1", "i1", 5), Event("t:3", "purchase", "u2", "i1", 9)],
    ...              [CatalogItem("i1", "item i1")])
    >>> s = ds.stats()
    >>> (s["events"], s["types"], s["users"], s["items"], s["skipped"])
    (2, {'click': 1, 'purchase': 1}, 2, 1, 0)
    """

    name: str
    events: list[Event]
    catalog: list[CatalogItem]
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        """Counts for a report: events by type, distinct users/items/sessions, time span, skips."""
        types = Counter(e.type for e in self.events)
        first = self.events[0].ts if self.events else None
        last = self.events[-1].ts if self.events else None
        return {
            "name": self.name,
            "events": len(self.events),
            "types": dict(sorted(types.items())),
            "users": len({e.user_id for e in self.events}),
            "items": len({e.item_id for e in self.events if e.item_id is not None}),
            "sessions": len({e.session_id for e in self.events if e.session_id is not None}),
            "catalog_items": len(self.catalog),
            "first_ts": first,
            "last_ts": last,
            "first_time": _iso(first),
            "last_time": _iso(last),
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped.most_common()),
            "examples": list(self.examples),
        }

    def repeated_events(self) -> tuple[int, tuple[str, str] | None]:
        """How many events repeat an earlier one in every field but the id (an export that wrote a
        row twice, or a log's genuine same-time repeats), and the first such pair of ids
        ``(repeat, original)``. Events with one id are not counted: the engine takes those once.

        >>> Dataset("t", [Event("t:2", "click", "u", "i", 5), Event("t:3", "click", "u", "i", 5),
        ...               Event("t:4", "click", "u", "i", 6)], []).repeated_events()
        (1, ('t:3', 't:2'))
        """
        count, example = 0, None
        seen: dict[tuple[Any, ...], str] = {}
        current_ts = None
        for e in self.events:  # sorted by time: a repeat has its original's time, so one time's set at once
            if e.ts != current_ts:
                seen.clear()
                current_ts = e.ts
            key = (e.type, e.user_id, e.item_id, e.session_id, e.query, e.price, e.quantity,
                   orjson.dumps(e.context, option=orjson.OPT_SORT_KEYS) if e.context else None)
            first = seen.setdefault(key, e.event_id)
            if first != e.event_id:
                count += 1
                example = example or (e.event_id, first)
        return count, example

    def items_not_in_catalog(self) -> list[str]:
        """The item ids the events name that the catalog lacks, sorted (a replay admits them
        without text).

        >>> Dataset("tiny", [Event("t:1", "click", "u", "i2", 1), Event("t:2", "click", "u", "i1", 2)],
        ...         [CatalogItem("i1", "item i1")]).items_not_in_catalog()
        ['i2']
        """
        known = {c.item_id for c in self.catalog}
        return sorted({e.item_id for e in self.events if e.item_id is not None and e.item_id not in known})


def _iso(ts: int | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts / 1000, UTC).isoformat().replace("+00:00", "Z")


class SkipLog:
    """Counts skipped rows by reason kind and keeps the first few as readable examples.

    >>> log = SkipLog()
    >>> log.add("truncated row", 17, "data.csv", "8 of 9 fields")
    >>> log.counts, log.examples
    (Counter({'truncated row': 1}), ['truncated row at line 17 of data.csv: 8 of 9 fields'])
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def add(self, kind: str, line: int, source: str | None = None, detail: str | None = None) -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= EXAMPLES_PER_REASON:
            where = f" of {source}" if source else ""
            what = f": {detail}" if detail else ""
            self.examples.append(f"{kind} at line {line}{where}{what}")

    def decode_error(self, exc: DecodeError, line: int, source: str | None = None) -> None:
        """Record a codec refusal; the kind is the field it names (``invalid field 'ts'``)."""
        msg = str(exc)
        head = msg.split(":", 1)[0]
        self.add(f"invalid {head}", line, source, msg)


def finish(
    name: str,
    events: list[Event],
    skips: SkipLog,
    limit: int | None,
    catalog: Callable[[list[Event]], list[CatalogItem]],
) -> Dataset:
    """Sort events by time (stable), cut to ``limit``, then build the catalog of what is left."""
    events.sort(key=attrgetter("ts"))
    if limit is not None:
        del events[limit:]
    return Dataset(name, events, catalog(events), skips.counts, skips.examples)


_SEPARATED = {",": "comma-separated", ";": "semicolon-separated", "\t": "tab-separated", "|": "pipe-separated"}


def csv_rows(
    path: str | os.PathLike[str],
    *,
    delimiter: str,
    required: tuple[str, ...],
    skips: SkipLog,
    limit: int | None,
    progress: bool,
    desc: str,
    delimiter_flag: str = "with --format csv, --map delimiter=",
    fixed_format: str | None = None,
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line number, {column: value})`` for each well-formed data row of a CSV file.
    ``delimiter_flag``: how the caller's command sets another delimiter, for the hint given when
    the header looks separated by one; ``fixed_format``: the ``--format`` of a reader whose
    delimiter cannot be set (the hint then says to read the file with ``--format csv``).

    Line numbers count from 1 at the header. Rows with fewer fields than the header are
    skipped as ``"truncated row"``, rows with more as ``"extra fields"``; blank lines are
    ignored. Raises :class:`ValueError` when a ``required`` column is absent from the header.
    """
    source = plain_name(path)
    # undecodable bytes kept as lone surrogates, so that a row holding any is told apart: replaced
    # by U+FFFD, distinct ids in another encoding (thé, thè) merged into one without a word
    with open_input(path, text=True, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            other = next((d for d in (";", "\t", "|", ",") if d != delimiter and len(header) == 1 and d in header[0]), None)
            as_flag = "tab" if other == "\t" else other
            if not other:
                hint = ""
            elif fixed_format:  # until 2026-12-07 told "with --format csv, --map delimiter=," for a comma
                hint = (f" (it looks separated by {other!r}: --format {fixed_format} reads {_SEPARATED[delimiter]} "
                        f"files; convert this one, or read it with --format csv and "
                        + ("" if other == "," else f"--map delimiter={as_flag} and ") + "--map FIELD=COLUMN for its columns)")
            else:
                hint = f" (it looks separated by {other!r}: {delimiter_flag}{as_flag})"
            raise ValueError(f"{path}: header {header} lacks column(s) {missing}{hint}")
        width = len(header)
        read = 0
        ended = reader.line_num  # the line the last row read ended on
        try:
            for row in tqdm(reader, desc=desc, unit=" rows", disable=not progress, mininterval=1.0):
                began, ended = ended + 1, reader.line_num
                if not row:
                    continue
                if limit is not None and read >= limit:
                    break
                read += 1
                if len(row) != width and ended > began and any("\n" in field or "\r" in field for field in row):
                    # a quoted field that ran over lines into a row of the wrong width: a quote never
                    # closed swallowed the rows after it (until 2026-12-07 one "truncated row" skip said so
                    # only when over 128 KiB were swallowed; below that the rows were lost unsaid)
                    raise ValueError(f"{path}: the row from line {began} to line {ended} has {len(row)} of {width} "
                                     f"fields, one of them running over lines: a quote opened at line {began} and "
                                     f"never closed? The rows after it were read into that field")
                if len(row) != width:
                    kind = "truncated row" if len(row) < width else "extra fields"
                    skips.add(kind, reader.line_num, source, f"{len(row)} of {width} fields")
                    continue
                if (odd := _NOT_UTF8.search("\x1f".join(row))) is not None:
                    bad = odd.group().encode("utf-8", "surrogateescape")
                    skips.add("not UTF-8 text", reader.line_num, source, f"byte {bad!r} (Latin-1 or cp1252? convert "
                                                                         f"the file: iconv -f cp1252 -t utf-8)")
                    continue
                yield reader.line_num, dict(zip(header, row))
        except csv.Error as exc:  # a quote opened and never closed swallows the lines after it
            why = ("a quote opened there and never closed?" if '"' in _line_at(path, ended + 1) else
                   "a field longer than a log's fields are")  # no quote to blame (until 2026-12-07 it was blamed)
            raise ValueError(f"{path}: the row from line {ended + 1} on cannot be read ({exc}): {why}") from None


def _line_at(path: str, number: int) -> str:
    """The first 1 MiB of line ``number`` of ``path`` (1-based), as text ('' past the end)."""
    with open_input(path, text=True, newline="", encoding="utf-8", errors="replace") as fh:
        for at, line in enumerate(fh, start=1):
            if at == number:
                return line[: 1 << 20]
    return ""


def parse_float(text: str) -> float | None:
    """A float from a CSV cell, ``None`` for an empty cell; raises ValueError when malformed."""
    text = text.strip()
    return float(text) if text else None


_ISO_CACHE: dict[str, int] = {}


def iso_to_ms(text: str) -> int:
    """Epoch ms from an ISO 8601 time; a trailing ``UTC``/``Z`` or none at all means UTC.

    Logs repeat the same second many times, so parsed values are cached.

    >>> iso_to_ms("2019-10-01 00:00:01 UTC"), iso_to_ms("2019-10-01T00:00:01Z"), iso_to_ms("2019-10-01T02:00:01+02:00")
    (1569888001000, 1569888001000, 1569888001000)
    """
    cached = _ISO_CACHE.get(text)
    if cached is not None:
        return cached
    clean = text.strip()
    if clean.endswith(" UTC"):
        clean = clean[:-4]
    elif clean.endswith("Z"):
        clean = clean[:-1]
    dt = datetime.fromisoformat(clean)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    ms = int(dt.timestamp() * 1000)
    if len(_ISO_CACHE) < 1_000_000:  # a bound, so a log of all-distinct times cannot grow it forever
        _ISO_CACHE[text] = ms
    return ms


_DAY_CACHE: dict[str, int] = {}


def day_to_ms(text: str) -> int:
    """Epoch ms of midnight UTC of a ``YYYY-MM-DD`` date.

    >>> day_to_ms("2016-05-09")
    1462752000000
    """
    cached = _DAY_CACHE.get(text)
    if cached is None:
        d = date.fromisoformat(text.strip())
        cached = int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()) * 1000
        _DAY_CACHE[text] = cached
    return cached


def id_catalog(events: list[Event], categories: dict[str, str] | None = None) -> list[CatalogItem]:
    """One id-only :class:`CatalogItem` per item the events touch, in order of first appearance.

    ``categories`` maps item id to a category label, for logs that carry one.
    """
    seen: dict[str, None] = dict.fromkeys(e.item_id for e in events if e.item_id is not None)
    cats = categories or {}
    return [CatalogItem(item, f"item {item}", category=cats.get(item)) for item in seen]
