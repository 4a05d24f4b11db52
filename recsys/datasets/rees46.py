"""REES46 multi-category store log (Kaggle "eCommerce behavior data from multi category store").

Input, one CSV row per event::

    event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session
    2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde-...

Output: ``view`` -> ``browse``, ``cart`` -> ``add_to_cart``, ``purchase`` -> ``purchase``;
``remove_from_cart`` has no counterpart in our event types and is skipped with its reason.
Event ids are ``rees46:<line number>`` (the header is line 1). The catalog is built from the
same rows: one item per product, titled by ``category_code`` (dots to spaces) and ``brand``,
with the price of its latest row.
"""

from __future__ import annotations

from recsys.datasets._base import (
    Dataset,
    SkipLog,
    csv_rows,
    finish,
    iso_to_ms,
    parse_float,
)
from recsys.events import CatalogItem, DecodeError, Event, event_from_dict
from recsys.files import plain_name

NAME = "rees46"
EVENT_TYPES = {"view": "browse", "cart": "add_to_cart", "purchase": "purchase"}
_COLUMNS = ("event_time", "event_type", "product_id", "category_code", "brand", "price", "user_id", "user_session")


def catalog_title(item_id: str, category_code: str, brand: str) -> str:
    """The text a shopper would read for a product that has no name in the log.

    >>> catalog_title("1", "electronics.smartphone", "samsung"), catalog_title("7", "", "")
    ('electronics smartphone samsung', 'item 7')
    """
    parts = [category_code.replace(".", " ").strip(), brand.strip()]
    return " ".join(p for p in parts if p) or f"item {item_id}"


def load_rees46(events_path: str, *, limit: int | None = None, progress: bool = False) -> Dataset:
    """Load a REES46 CSV file (``events_path``) into events and a catalog."""
    skips = SkipLog()
    source = plain_name(events_path)
    events: list[Event] = []
    # product -> (ts, line, category_id, category_code, brand, price) of its latest row
    products: dict[str, tuple[int, int, str, str, str, float | None]] = {}
    rows = csv_rows(
        events_path, delimiter=",", required=_COLUMNS, skips=skips, limit=limit, progress=progress, desc=NAME,
        fixed_format=NAME,
    )
    for line, row in rows:
        raw_type = row["event_type"]
        etype = EVENT_TYPES.get(raw_type)
        if etype is None:
            skips.add(f"unsupported event_type {raw_type!r}", line, source)
            continue
        try:
            ts = iso_to_ms(row["event_time"])
        except ValueError:
            skips.add("bad event_time", line, source, repr(row["event_time"]))
            continue
        try:
            price = parse_float(row["price"])
        except ValueError:
            skips.add("bad price", line, source, repr(row["price"]))
            continue
        item = row["product_id"].strip()
        obj = {
            "event_id": f"{NAME}:{line}",
            "type": etype,
            "user_id": row["user_id"].strip(),
            "item_id": item,
            "ts": ts,
            "session_id": row["user_session"].strip() or None,
            "price": price,
        }
        try:
            event = event_from_dict(obj)
        except DecodeError as exc:
            skips.decode_error(exc, line, source)
            continue
        events.append(event)
        seen = products.get(item)
        if seen is None or (ts, line) >= (seen[0], seen[1]):
            products[item] = (ts, line, row.get("category_id", ""), row["category_code"], row["brand"], price)

    def catalog(kept: list[Event]) -> list[CatalogItem]:
        out = []
        for item in dict.fromkeys(e.item_id for e in kept if e.item_id is not None):
            _ts, _line, category_id, code, brand, price = products[item]
            out.append(
                CatalogItem(
                    item,
                    catalog_title(item, code, brand),
                    category=code.strip() or None,
                    brand=brand.strip() or None,
                    price=price,
                    attributes={"category_id": category_id} if category_id else None,
                )
            )
        return out

    return finish(NAME, events, skips, limit, catalog)
