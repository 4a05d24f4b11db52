"""The project's own JSONL format: one :class:`~recsys.events.Event` JSON per line (exactly
what producers put on the ``events`` topic), and one :class:`~recsys.events.CatalogItem`
JSON per line for the catalog. Any adapter's output can be written here and read back equal.

>>> import os, tempfile
>>> from recsys.events import CatalogItem, Event
>>> d = tempfile.mkdtemp()
>>> ds = Dataset("x", [Event("x:2", "click", "u1", "i1", 5, price=2.5)], [CatalogItem("i1", "a cup")])
>>> write_jsonl(ds, os.path.join(d, "ev.jsonl"), os.path.join(d, "cat.jsonl"))
(1, 1)
>>> back = load_jsonl(os.path.join(d, "ev.jsonl"), os.path.join(d, "cat.jsonl"))
>>> back.events == ds.events and back.catalog == ds.catalog
True
"""

from __future__ import annotations

import os

from tqdm import tqdm

from recsys.datasets._base import Dataset, SkipLog, finish
from recsys.events import (
    DEFAULT_MAX_MESSAGE_BYTES,
    CatalogItem,
    DecodeError,
    Event,
    decode_catalog_item,
    decode_event,
    encode,
)
from recsys.files import open_input, plain_name

_CHUNK = 10_000  # records encoded per write: big enough to amortise the call, small in memory


def load_jsonl(
    events_path: str,
    catalog_path: str | None = None,
    *,
    limit: int | None = None,
    progress: bool = False,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Dataset:
    """Read events (and optionally a catalog) written in the project's JSONL format.

    Lines the codec refuses are skipped under ``invalid field '<name>'`` (or
    ``invalid payload``); blank lines are ignored. ``limit`` caps the event lines read.
    """
    skips = SkipLog()
    source = plain_name(events_path)
    events: list[Event] = []
    read = 0
    with open_input(events_path) as fh:
        for line_no, raw in enumerate(tqdm(fh, desc=source, unit=" rows", disable=not progress), start=1):
            raw = raw.strip()
            if not raw:
                continue
            if limit is not None and read >= limit:
                break
            read += 1
            try:
                events.append(decode_event(raw, max_bytes))
            except DecodeError as exc:
                skips.decode_error(exc, line_no, source)
    catalog = load_jsonl_catalog(catalog_path, skips, max_bytes) if catalog_path is not None else []
    name = os.path.splitext(source)[0]
    return finish(name, events, skips, limit, lambda _events: catalog)


def load_jsonl_catalog(path: str, skips: SkipLog, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[CatalogItem]:
    """Catalog items from a JSONL file, one per line; refused lines go to ``skips``."""
    source = plain_name(path)
    catalog: list[CatalogItem] = []
    with open_input(path) as fh:
        for line_no, raw in enumerate(fh, start=1):
            raw = raw.strip()
            if not raw:
                continue
            try:
                catalog.append(decode_catalog_item(raw, max_bytes))
            except DecodeError as exc:
                skips.decode_error(exc, line_no, source)
    return catalog


def write_jsonl(dataset: Dataset, events_out: str, catalog_out: str | None = None) -> tuple[int, int]:
    """Write a dataset's events (and catalog) as JSONL; returns ``(events, catalog items)`` written."""
    _write(dataset.events, events_out)
    if catalog_out is not None:
        _write(dataset.catalog, catalog_out)
    return len(dataset.events), (len(dataset.catalog) if catalog_out is not None else 0)


def _write(records: list[Event] | list[CatalogItem], path: str) -> None:
    with open(path, "wb") as fh:
        for start in range(0, len(records), _CHUNK):
            chunk = records[start : start + _CHUNK]
            fh.write(b"\n".join(encode(r) for r in chunk))
            fh.write(b"\n")
