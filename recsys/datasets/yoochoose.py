"""YooChoose (RecSys Challenge 2015) clicks, in the prepared tab-separated form::

    SessionId	ItemId	Time
    1	214536502	1396860669.277

``Time`` is unix seconds with a millisecond fraction. Sessions are anonymous, so the user is
the session (``user_id == session_id``). Every row is a ``click``. ``events_path`` is a file, or a
directory whose ``*train_full*`` then ``*test*`` files are concatenated (falling back to every
``.txt`` file, sorted). Event ids are ``yoochoose:<file stem>:<line>``. Catalog: ids only.
"""

from __future__ import annotations

import glob
import os

from recsys.datasets._base import Dataset, SkipLog, csv_rows, finish, id_catalog
from recsys.events import DecodeError, Event, event_from_dict
from recsys.files import plain_name

NAME = "yoochoose"
_COLUMNS = ("SessionId", "ItemId", "Time")


def _files(events_path: str) -> list[str]:
    if not os.path.isdir(events_path):
        return [events_path]
    train = sorted(glob.glob(os.path.join(events_path, "*train_full*")))
    test = sorted(glob.glob(os.path.join(events_path, "*test*")))
    files = train + test or sorted(glob.glob(os.path.join(events_path, "*.txt")))
    if not files:
        raise ValueError(f"{events_path}: no YooChoose files (*train_full*, *test* or *.txt)")
    return files


def load_yoochoose(events_path: str, *, limit: int | None = None, progress: bool = False) -> Dataset:
    """Load YooChoose clicks from a prepared file or directory."""
    skips = SkipLog()
    events: list[Event] = []
    for path in _files(events_path):
        source = plain_name(path)
        stem = os.path.splitext(source)[0]
        rows = csv_rows(
            path, delimiter="\t", required=_COLUMNS, skips=skips, limit=limit, progress=progress, desc=source,
            fixed_format=NAME,
        )
        for line, row in rows:
            session = row["SessionId"].strip()
            try:
                ts = round(float(row["Time"]) * 1000)
            except (ValueError, OverflowError):  # malformed, nan or inf
                skips.add("bad Time", line, source, repr(row["Time"]))
                continue
            obj = {
                "event_id": f"{NAME}:{stem}:{line}",
                "type": "click",
                "user_id": session,
                "item_id": row["ItemId"].strip(),
                "ts": ts,
                "session_id": session or None,
            }
            try:
                events.append(event_from_dict(obj))
            except DecodeError as exc:
                skips.decode_error(exc, line, source)
    return finish(NAME, events, skips, limit, id_catalog)
