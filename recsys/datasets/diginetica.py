"""DIGINETICA (CIKM Cup 2016) item views and purchases.

Input, ``;``-separated, in one directory::

    sample_train-item-views.csv  session_id;user_id;item_id;timeframe;eventdate
    train-purchases.csv          sessionId;userId;timeframe;eventdate;ordernumber;itemId
    product-categories.csv       itemId;categoryId

``timeframe`` is milliseconds since the start of that day's log, so ``ts`` is midnight UTC of
``eventdate`` plus ``timeframe``. ``user_id`` ``NA`` is an anonymous shopper, who becomes
``s<session id>``. Views are ``click`` events, purchases ``purchase`` events (the order number
goes in ``context``). Event ids are ``diginetica:views:<line>`` and
``diginetica:purchases:<line>``. The log has no item text: the catalog is ids only
(``item <id>``) with ``category <id>`` from ``product-categories.csv`` when present.
"""

from __future__ import annotations

import csv
import os

from recsys.datasets._base import (
    Dataset,
    SkipLog,
    csv_rows,
    day_to_ms,
    finish,
    id_catalog,
)
from recsys.events import DecodeError, Event, event_from_dict
from recsys.files import find_file, open_input, plain_name

NAME = "diginetica"
VIEWS_FILES = ("sample_train-item-views.csv", "train-item-views.csv")
PURCHASES_FILE = "train-purchases.csv"
CATEGORIES_FILE = "product-categories.csv"
_ANONYMOUS = {"", "NA"}


def _paths(events_path: str) -> tuple[str, str | None]:
    if os.path.isdir(events_path):
        views = next((found for name in VIEWS_FILES if (found := find_file(events_path, name))), None)
        if views is None:
            raise ValueError(f"{events_path}: no views file (looked for {', '.join(VIEWS_FILES)}, or one of them .gz, "
                             f".bz2 or .xz)")
        directory = events_path
    else:
        views, directory = events_path, os.path.dirname(events_path)
    return views, find_file(directory, PURCHASES_FILE)


def _read_categories(path: str) -> dict[str, str]:
    with open_input(path, text=True, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=";")
        next(reader, None)
        return {row[0].strip(): f"category {row[1].strip()}" for row in reader if len(row) == 2}


def _read(
    path: str,
    tag: str,
    etype: str,
    cols: dict[str, str],
    events: list[Event],
    skips: SkipLog,
    limit: int | None,
    progress: bool,
) -> None:
    """Append one file's events; ``cols`` maps session/user/item/timeframe/eventdate(/order) to headers."""
    source = plain_name(path)
    rows = csv_rows(
        path, delimiter=";", required=tuple(cols.values()), skips=skips, limit=limit, progress=progress, desc=source,
        fixed_format=NAME,
    )
    for line, row in rows:
        session = row[cols["session"]].strip()
        user = row[cols["user"]].strip()
        try:
            ts = day_to_ms(row[cols["eventdate"]]) + int(row[cols["timeframe"]])
        except ValueError:
            skips.add("bad eventdate or timeframe", line, source, f"{row[cols['eventdate']]!r} {row[cols['timeframe']]!r}")
            continue
        obj = {
            "event_id": f"{NAME}:{tag}:{line}",
            "type": etype,
            "user_id": f"s{session}" if user in _ANONYMOUS else user,
            "item_id": row[cols["item"]].strip(),
            "ts": ts,
            "session_id": session or None,
        }
        if "order" in cols:
            obj["context"] = {"order": row[cols["order"]].strip()}
        try:
            events.append(event_from_dict(obj))
        except DecodeError as exc:
            skips.decode_error(exc, line, source)


def load_diginetica(
    events_path: str, catalog_path: str | None = None, *, limit: int | None = None, progress: bool = False
) -> Dataset:
    """Load views (and purchases, when beside them) from the directory or the views file.

    ``catalog_path`` overrides where ``product-categories.csv`` is looked for.
    """
    views, purchases = _paths(events_path)
    skips = SkipLog()
    events: list[Event] = []
    view_cols = {"session": "session_id", "user": "user_id", "item": "item_id", "timeframe": "timeframe", "eventdate": "eventdate"}
    _read(views, "views", "click", view_cols, events, skips, limit, progress)
    if purchases is not None:
        buy_cols = {
            "session": "sessionId",
            "user": "userId",
            "item": "itemId",
            "timeframe": "timeframe",
            "eventdate": "eventdate",
            "order": "ordernumber",
        }
        _read(purchases, "purchases", "purchase", buy_cols, events, skips, limit, progress)
    cat_file = catalog_path or find_file(os.path.dirname(views), CATEGORIES_FILE)
    categories = _read_categories(cat_file) if cat_file and os.path.exists(cat_file) else {}
    return finish(NAME, events, skips, limit, lambda kept: id_catalog(kept, categories))
