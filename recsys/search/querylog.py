"""A shop's own search log as a search backtest: one CSV row per search, with what was engaged.

Columns, named by ``--map FIELD=COLUMN`` (``recsys replay --task search --query-log FILE``):

- ``user_id``, ``query``, ``query_ts`` (required): who searched what, when;
- ``item_id``, ``ts`` (optional per row): the item engaged after the search and when; a row
  without an item is a search nobody engaged with (answered and learned from, not scored);
- ``type`` (optional column; else ``default_type``, default ``click``): the engagement's type;
  ``type_map``: the log's own type values to ours, as for ``--format csv``
  (``--map type_map=view:click,buy:purchase``; a value not in it is read as it is);
- ``ts_unit`` (``ms``, ``s`` or ``iso``, as for ``--format csv``), ``delimiter``.

A row whose mapped fields repeat an earlier row's (an export that wrote it twice) is skipped as a
``duplicate row``. Each row becomes a ``search`` event at ``query_ts`` and, with an item, an engagement event at
``ts`` (at least 1 ms after the search: one logged in the same millisecond, or the same second
with ``ts_unit=s``, is moved there). Rows with a missing field or a bad time are skipped and
counted, as are rows the flow would refuse (an id with a control character, a query over 1,000
characters); an engagement logged before its search, or with a bad time, is not scored, and its
search is still replayed. The catalog is the ids the log names (``item <id>``: no text at all, the
``--unknown-items admit`` case) unless ``--catalog`` gives one (JSONL); with ids only, search
has only what it learns from the log's own engagements to go on.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "log.csv")
>>> _ = open(path, "w").write("uid,q,qt,item,et\\nu1,red shoe,1000,i9,5000\\nu2,tent,2000,,\\n")
>>> ds, targets = load_query_log(path, {"user_id": "uid", "query": "q", "query_ts": "qt", "item_id": "item", "ts": "et"})
>>> [(e.type, e.user_id, e.item_id, e.ts, e.query) for e in ds.events]
[('search', 'u1', None, 1000, 'red shoe'), ('search', 'u2', None, 2000, 'tent'), ('click', 'u1', 'i9', 5000, None)]
>>> targets, [c.item_id for c in ds.catalog]
({'querylog:2:s': 'i9'}, ['i9'])
"""

from __future__ import annotations

from typing import Any

from recsys.datasets._base import Dataset, SkipLog, csv_rows, id_catalog
from recsys.datasets.generic_csv import csv_options, ts_parser
from recsys.datasets.jsonl import load_jsonl_catalog
from recsys.events import EVENT_TYPES, MAX_TS_MS, DecodeError, Event, event_from_dict
from recsys.files import plain_name

_COLUMNS = ("user_id", "query", "query_ts", "item_id", "ts", "type")
_OPTIONS = ("ts_unit", "default_type", "type_map", "delimiter")
_REQUIRED = ("user_id", "query", "query_ts")


def load_query_log(path: str, mapping: dict[str, Any] | None, catalog_path: str | None = None, *,
                   limit: int | None = None, progress: bool = False) -> tuple[Dataset, dict[str, str]]:
    """``(dataset, search event id -> engaged item)`` from a query log (see the module)."""
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(_COLUMNS) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"query log mapping: unknown key(s) {unknown} (known: {', '.join(_COLUMNS + _OPTIONS)})")
    missing = [k for k in _REQUIRED if not mapping.get(k)]
    if missing:
        raise ValueError(f"query log mapping: missing column name(s) for {missing} (--map FIELD=COLUMN)")
    default_type = mapping.get("default_type", "click")
    if default_type not in EVENT_TYPES or default_type == "search":
        raise ValueError(f"query log mapping['default_type']: {default_type!r} is not an engagement type")
    mapping.update(csv_options(mapping))  # delimiter=tab and type_map=view:click as for --format csv
    type_map: dict[str, str] = mapping.get("type_map") or {}  # until 2026-12-07 not taken: a log's own types
    # (view, buy) were each skipped as an unknown engagement type
    to_ms = ts_parser(mapping.get("ts_unit", "ms"))
    col = {k: mapping[k] for k in _COLUMNS if mapping.get(k)}
    skips = SkipLog()
    source = plain_name(path)
    events: list[Event] = []
    targets: dict[str, str] = {}
    rows = csv_rows(path, delimiter=mapping.get("delimiter", ","), required=tuple(col[k] for k in _REQUIRED),
                    skips=skips, limit=limit, progress=progress, desc="query log", delimiter_flag="--map delimiter=")
    seen: dict[int, int] = {}  # the hash of a row's mapped fields, as read -> its first line (a
    # hash, not the fields: ~100 bytes a row; two distinct rows collide once in ~10^12 row pairs)
    for line, row in rows:
        # an export that wrote a row twice: one search, engaged once (until 2026-12-07 replayed,
        # learned from and scored twice)
        fields = hash(tuple(row.get(name, "").strip() for name in col.values()))
        if (first := seen.setdefault(fields, line)) != line:
            skips.add("duplicate row", line, source, f"the same as line {first}")
            continue
        user, query, raw_qt = (row.get(col[k], "").strip() for k in _REQUIRED)
        if not user or not query:
            skips.add("missing user or query", line, source)
            continue
        try:
            qts = to_ms(raw_qt)
        except (ValueError, TypeError, OverflowError):  # "inf" too
            qts = -1
        if not 0 <= qts <= MAX_TS_MS:  # a time no event can have (ts_unit=s on milliseconds: the year 55,000)
            skips.add("bad query time", line, source, raw_qt)
            continue
        sid = f"querylog:{line}:s"
        try:  # the ids and the query as the flow checks them: until 2026-12-07 a row the engine then refused
            # vanished from the backtest unsaid (a report of no searches, exit 0), where --format csv names it
            events.append(event_from_dict({"event_id": sid, "type": "search", "user_id": user, "ts": qts,
                                           "query": query}))  # over 1,000 characters: refused, as the flow does
        except DecodeError as exc:
            skips.decode_error(exc, line, source)
            continue
        item = row.get(col["item_id"], "").strip() if "item_id" in col else ""
        if not item:
            continue
        etype = type_map.get(raw := row.get(col["type"], "").strip(), raw) if "type" in col else default_type
        if etype not in EVENT_TYPES or etype == "search":
            skips.add("unknown engagement type", line, source, f"{etype!r} (the search is replayed, not scored)")
            continue
        try:
            ets = to_ms(row.get(col["ts"], "")) if "ts" in col and row.get(col["ts"], "").strip() else qts + 1
        except (ValueError, TypeError, OverflowError):
            ets = -1
        if not 0 <= ets <= MAX_TS_MS:
            skips.add("bad engagement time", line, source,
                      f"{row.get(col.get('ts', ''), '')!r} (the search is replayed, not scored)")
            continue
        if ets < qts:  # not caused by the search: until 2026-12-07 moved after it and scored, unsaid
            skips.add("engagement before its search", line, source,
                      f"engaged at {ets}, searched at {qts} (the search is replayed, not scored)")
            continue
        try:
            events.append(event_from_dict({"event_id": f"querylog:{line}:e", "type": etype, "user_id": user,
                                           "item_id": item, "ts": max(ets, qts + 1)}))
        except DecodeError as exc:
            skips.decode_error(exc, line, source)
            continue
        targets[sid] = item
    events.sort(key=lambda e: e.ts)
    catalog = load_jsonl_catalog(catalog_path, skips) if catalog_path else id_catalog(events)
    return Dataset("querylog", events, catalog, skips.counts, skips.examples), targets
