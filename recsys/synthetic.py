"""Synthetic catalogs and event streams for load and crash tests. Never for quality claims.

Users have a favourite category and mostly browse it; a fraction of views turn into clicks,
carts and purchases, so every event type and every code path is exercised. Deterministic for
a seed.

>>> items = generate_catalog(20, seed=1)
>>> events = generate_events(100, items, n_users=5, seed=1)
>>> len(items), len(events), events[0].ts <= events[-1].ts
(20, 100, True)
"""

from __future__ import annotations

import numpy as np

from recsys.events import CatalogItem, Event

CATEGORIES = ["running shoes", "coffee", "headphones", "kitchen knives", "yoga mats", "board games", "tea", "backpacks"]
ADJECTIVES = ["red", "lightweight", "organic", "wireless", "stainless", "classic", "compact", "premium", "eco", "pro"]
BRANDS = ["acme", "northwind", "globex", "initech", "umbrella", "hooli", "stark", "wayne"]
_TYPES = ("browse", "click", "add_to_cart", "purchase")
_TYPE_P = (0.70, 0.20, 0.07, 0.03)


def generate_catalog(n_items: int, *, seed: int = 0) -> list[CatalogItem]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n_items):
        category = CATEGORIES[i % len(CATEGORIES)]
        adjective = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
        brand = BRANDS[int(rng.integers(len(BRANDS)))]
        items.append(
            CatalogItem(
                item_id=f"i{i}",
                title=f"{adjective} {category} {i}",
                category=category,
                brand=brand,
                price=round(float(rng.uniform(2, 200)), 2),
                attributes={"repeat_purchase": category in ("coffee", "tea")},
            )
        )
    return items


def generate_events(
    n_events: int,
    items: list[CatalogItem],
    *,
    n_users: int = 1000,
    seed: int = 0,
    start_ts: int = 1_700_000_000_000,
    mean_gap_ms: float = 50.0,
) -> list[Event]:
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[str]] = {}
    for item in items:
        by_category.setdefault(item.category or "", []).append(item.item_id)
    categories = sorted(by_category)
    favourite = rng.integers(len(categories), size=n_users)
    users = rng.integers(n_users, size=n_events)
    own = rng.random(n_events) < 0.8
    types = rng.choice(len(_TYPES), size=n_events, p=_TYPE_P)
    gaps = rng.exponential(mean_gap_ms, size=n_events).astype(np.int64) + 1
    ts = start_ts + np.cumsum(gaps)
    events = []
    for n in range(n_events):
        u = int(users[n])
        cat = categories[int(favourite[u])] if own[n] else categories[int(rng.integers(len(categories)))]
        pool = by_category[cat]
        item = pool[int(rng.integers(len(pool)))]
        events.append(Event(f"e{n}", _TYPES[int(types[n])], f"u{u}", item, int(ts[n]), session_id=f"s{u}"))
    return events


def with_searches(events: list[Event], items: list[CatalogItem], share: float, *, seed: int = 0) -> list[Event]:
    """The stream with about ``share`` of its events turned into searches: the same user at the
    same time searching two words of the item's title (brand or adjective, and category), as a
    shopper types before clicking. For the mixed-workload latency benchmark (issue 13).

    >>> items = generate_catalog(20, seed=1)
    >>> mixed = with_searches(generate_events(200, items, n_users=5, seed=1), items, 0.2, seed=1)
    >>> n = sum(e.type == "search" for e in mixed); 20 < n < 60, all(e.query for e in mixed if e.type == "search")
    (True, True)
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be within [0, 1], got {share}")
    titles = {item.item_id: item for item in items}
    rng = np.random.default_rng(seed)
    pick = rng.random(len(events)) < share
    out = []
    for ev, search in zip(events, pick.tolist()):
        item = titles.get(ev.item_id or "")
        if search and item is not None:
            first = item.brand if rng.random() < 0.5 and item.brand else item.title.split()[0]
            out.append(Event(f"{ev.event_id}-q", "search", ev.user_id, None, ev.ts, session_id=ev.session_id,
                             query=f"{first} {item.category or ''}".strip()))
        else:
            out.append(ev)
    return out
