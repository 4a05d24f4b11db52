"""Any delimited event log, described by a column mapping.

``mapping`` names, for each of our fields, the column that holds it:

- ``user_id``, ``item_id``, ``ts`` (required); ``type``, ``session_id``, ``price``,
  ``quantity``, ``query`` (optional columns);
- ``ts_unit``: ``"ms"`` (default), ``"s"`` (may have a fraction) or ``"iso"`` (ISO 8601;
  no offset or a trailing ``UTC``/``Z`` means UTC);
- ``default_type``: the event type of every row when there is no ``type`` column
  (default ``"click"``); ``type_map``: raw type values to ours (``{"view": "browse"}``, or on
  the command line ``--map type_map=view:browse,buy:purchase``);
- ``delimiter`` (default ``","``; one character, ``tab`` or ``\\t`` for a tab); ``name``
  (default: the file's stem).

Event ids are ``<name>:<line number>``. ``catalog_path`` may be a JSONL catalog (``.jsonl``)
or a CSV whose header uses our field names (``item_id,title,description,category,brand,price``);
without one the catalog is ids only (``item <id>``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from recsys.datasets._base import (
    Dataset,
    SkipLog,
    csv_rows,
    finish,
    id_catalog,
    iso_to_ms,
    parse_float,
)
from recsys.datasets.jsonl import load_jsonl_catalog
from recsys.events import (
    EVENT_TYPES,
    MAX_TS_MS,
    CatalogItem,
    DecodeError,
    Event,
    catalog_item_from_dict,
    event_from_dict,
)
from recsys.files import plain_name

_COLUMN_KEYS = ("user_id", "item_id", "ts", "type", "session_id", "price", "quantity", "query")
_OPTION_KEYS = ("ts_unit", "default_type", "type_map", "delimiter", "name")
_REQUIRED = ("user_id", "item_id", "ts")
_CATALOG_FIELDS = ("item_id", "title", "description", "category", "brand", "price")


#: A time written as a date (``2024-01-01``, ``2024-01-01T10:00:00Z``, ``2024-01-01 10:00 UTC``).
_LOOKS_ISO = re.compile(r"\d{4}-\d{2}-\d{2}")


def ts_parser(unit: str) -> Callable[[str], int]:
    if unit == "ms":
        return lambda text: int(float(text))
    if unit == "s":
        return lambda text: round(float(text) * 1000)
    if unit == "iso":
        return iso_to_ms
    raise ValueError(f"mapping['ts_unit']: {unit!r} is not one of 'ms', 's', 'iso'")


def _check_mapping(mapping: dict[str, Any] | None) -> dict[str, Any]:
    if not mapping:
        raise ValueError(f"format 'csv' needs a mapping with at least {', '.join(_REQUIRED)} (--map FIELD=COLUMN, e.g. "
                         f"--map user_id=visitor --map item_id=sku --map ts=time)")
    unknown = sorted(set(mapping) - set(_COLUMN_KEYS) - set(_OPTION_KEYS))
    if unknown:
        raise ValueError(f"mapping: unknown key(s) {unknown} (known: {', '.join(_COLUMN_KEYS + _OPTION_KEYS)})")
    missing = [k for k in _REQUIRED if not mapping.get(k)]
    if missing:
        raise ValueError(f"mapping: missing column name(s) for {missing}")
    default_type = mapping.get("default_type", "click")
    if default_type not in EVENT_TYPES:
        raise ValueError(f"mapping['default_type']: {default_type!r} is not one of {', '.join(EVENT_TYPES)}")
    return {**mapping, **csv_options(mapping)}


def csv_options(mapping: dict[str, Any]) -> dict[str, Any]:
    r"""``delimiter`` and ``type_map`` as the reader takes them, from a mapping written in Python
    or on the command line (``--map delimiter=tab``, ``--map 'delimiter=\\t'``,
    ``--map type_map=view:browse,buy:purchase``).

    >>> csv_options({"delimiter": "tab", "type_map": "view:browse, buy:purchase"})
    {'delimiter': '\t', 'type_map': {'view': 'browse', 'buy': 'purchase'}}
    """
    out: dict[str, Any] = {}
    if "delimiter" in mapping:
        delimiter = {"tab": "\t", "\\t": "\t"}.get(mapping["delimiter"], mapping["delimiter"])
        if not isinstance(delimiter, str) or len(delimiter) != 1:
            raise ValueError(f"mapping['delimiter']: {mapping['delimiter']!r} is not one character (a tab: "
                             f"delimiter=tab)")
        out["delimiter"] = delimiter
    if "type_map" in mapping:
        type_map = mapping["type_map"]
        if isinstance(type_map, str):
            pairs = [p.split(":", 1) for p in type_map.split(",") if p.strip()]
            if not pairs or any(len(p) != 2 or not p[0].strip() for p in pairs):
                raise ValueError(f"mapping['type_map']: {type_map!r} is not a list of THEIRS:OURS pairs like "
                                 f"view:browse,buy:purchase")
            type_map = {theirs.strip(): ours.strip() for theirs, ours in pairs}
        if not isinstance(type_map, dict):
            raise ValueError(f"mapping['type_map']: expected pairs like view:browse,buy:purchase, got {type_map!r}")
        wrong = sorted({ours for ours in type_map.values() if ours not in EVENT_TYPES})
        if wrong:
            raise ValueError(f"mapping['type_map']: {', '.join(map(repr, wrong))} is not one of {', '.join(EVENT_TYPES)}")
        out["type_map"] = type_map
    return out


def load_csv(
    events_path: str,
    catalog_path: str | None = None,
    *,
    mapping: dict[str, Any] | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> Dataset:
    """Load a delimited event log described by ``mapping`` (see the module docstring)."""
    mapping = _check_mapping(mapping)
    unit = mapping.get("ts_unit", "ms")
    parse_ts = ts_parser(unit)
    cols = {k: mapping[k] for k in _COLUMN_KEYS if mapping.get(k)}
    default_type = mapping.get("default_type", "click")
    type_map: dict[str, str] = mapping.get("type_map") or {}
    source = plain_name(events_path)
    name = mapping.get("name") or os.path.splitext(source)[0]
    skips = SkipLog()
    events: list[Event] = []
    rows = csv_rows(
        events_path,
        delimiter=mapping.get("delimiter", ","),
        required=tuple(cols.values()),
        skips=skips,
        limit=limit,
        progress=progress,
        desc=source,
    )
    for line, row in rows:
        try:
            ts = parse_ts(row[cols["ts"]].strip())
        except (ValueError, OverflowError):
            raw_ts = row[cols["ts"]].strip()
            hint = " (a date and time: --map ts_unit=iso)" if unit != "iso" and _LOOKS_ISO.match(raw_ts) else ""
            skips.add("bad ts", line, source, repr(row[cols["ts"]]) + hint)
            continue
        if ts > MAX_TS_MS and ts // 1000 <= MAX_TS_MS:  # a unit too small by 1,000: said (until 2026-12-07 not)
            hint = "epoch milliseconds, it seems: drop --map ts_unit=s" if unit == "s" else \
                   "epoch microseconds, it seems: give milliseconds (or --map ts_unit=iso)"
            read_as = "seconds" if unit == "s" else "milliseconds"
            skips.add("bad ts", line, source, f"{row[cols['ts']]!r} is past the year 9999 as epoch {read_as} ({hint})")
            continue
        obj: dict[str, Any] = {
            "event_id": f"{name}:{line}",
            "type": default_type,
            "user_id": row[cols["user_id"]].strip(),
            "item_id": row[cols["item_id"]].strip() or None,
            "ts": ts,
        }
        if "type" in cols:
            raw = row[cols["type"]].strip()
            obj["type"] = type_map.get(raw, raw)
        for key in ("session_id", "query"):
            if key in cols:
                obj[key] = row[cols[key]].strip() or None
        try:
            if "price" in cols:
                obj["price"] = parse_float(row[cols["price"]])
            if "quantity" in cols:
                qty = row[cols["quantity"]].strip()  # "2.0" too: what pandas writes for a column with blanks
                obj["quantity"] = int(qty) if qty.isdigit() else (float(qty) if qty else None)
        except ValueError:
            skips.add("bad number", line, source, f"price/quantity not a number in {row!r}")
            continue
        try:
            events.append(event_from_dict(obj))
        except DecodeError as exc:
            skips.decode_error(exc, line, source)

    if catalog_path is None:
        return finish(name, events, skips, limit, id_catalog)
    catalog = _read_catalog(catalog_path, mapping.get("delimiter", ","), skips)
    return finish(name, events, skips, limit, lambda _kept: catalog)


def _read_catalog(path: str, delimiter: str, skips: SkipLog) -> list[CatalogItem]:
    source = plain_name(path)
    if source.lower().endswith((".jsonl", ".json")):  # compressed too: events.jsonl.gz
        return load_jsonl_catalog(path, skips)
    out: list[CatalogItem] = []
    rows = csv_rows(
        path, delimiter=delimiter, required=("item_id", "title"), skips=skips, limit=None, progress=False, desc=source
    )
    for line, row in rows:
        obj: dict[str, Any] = {k: (row.get(k) or "").strip() or None for k in _CATALOG_FIELDS}
        try:
            obj["price"] = parse_float(obj["price"] or "")
        except ValueError:
            skips.add("bad price", line, source, repr(row.get("price")))
            continue
        try:
            out.append(catalog_item_from_dict(obj))
        except DecodeError as exc:
            skips.decode_error(exc, line, source)
    return out
