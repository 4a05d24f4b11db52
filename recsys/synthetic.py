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
    by_category = _by_category(items)
    favourite = rng.integers(len(by_category), size=n_users)
    users = rng.integers(n_users, size=n_events)
    own, types, ts = _event_columns(rng, n_events, start_ts, mean_gap_ms)
    events = []
    for n in range(n_events):
        u = int(users[n])
        item = _pick_item(rng, by_category, int(favourite[u]), bool(own[n]))
        events.append(Event(f"e{n}", _TYPES[int(types[n])], f"u{u}", item, int(ts[n]), session_id=f"s{u}"))
    return events


def _event_columns(rng: np.random.Generator, n_events: int, start_ts: int,
                   mean_gap_ms: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per event: whether it is in the shopper's favourite category (80%), its type (index into
    ``_TYPES``), and its timestamp (exponential gaps of mean ``mean_gap_ms``, at least 1 ms)."""
    own = rng.random(n_events) < 0.8
    types = rng.choice(len(_TYPES), size=n_events, p=_TYPE_P)
    gaps = rng.exponential(mean_gap_ms, size=n_events).astype(np.int64) + 1
    return own, types, start_ts + np.cumsum(gaps)


def _by_category(items: list[CatalogItem]) -> list[list[str]]:
    """The items' ids per category, categories in sorted order."""
    pools: dict[str, list[str]] = {}
    for item in items:
        pools.setdefault(item.category or "", []).append(item.item_id)
    return [pools[c] for c in sorted(pools)]


def _pick_item(rng: np.random.Generator, by_category: list[list[str]], favourite: int, own: bool) -> str:
    """An item of the shopper's favourite category (``own``), else of a category at random."""
    pool = by_category[favourite if own else int(rng.integers(len(by_category)))]
    return pool[int(rng.integers(len(pool)))]


def with_searches(events: list[Event], items: list[CatalogItem], share: float, *, seed: int = 0,
                  distinct_queries: int | None = None, zipf_s: float = 1.0) -> list[Event]:
    """The stream with about ``share`` of its events turned into searches: the same user at the
    same time searching two words of the item's title (brand or adjective, and category), as a
    shopper types before clicking. For the mixed-workload latency benchmark (issue 13).

    Those queries are few (on :func:`generate_catalog`'s catalogs 8 categories x 18 words: 144),
    so any per-query cache serves nearly all of them. ``distinct_queries=N``: each search's
    query is drawn instead from :func:`query_pool`'s ``N`` queries by a Zipf law of exponent
    ``zipf_s`` over their rank (a few head queries, a long tail seen once or never), as shop
    query logs are shaped; the searches are the same events either way.

    >>> items = generate_catalog(20, seed=1)
    >>> mixed = with_searches(generate_events(200, items, n_users=5, seed=1), items, 0.2, seed=1)
    >>> n = sum(e.type == "search" for e in mixed); 20 < n < 60, all(e.query for e in mixed if e.type == "search")
    (True, True)
    >>> many = with_searches(generate_events(2000, items, n_users=5, seed=1), items, 0.5, seed=1, distinct_queries=500)
    >>> [e.event_id for e in many if e.type == "search"][:3] == [e.event_id for e in with_searches(
    ...     generate_events(2000, items, n_users=5, seed=1), items, 0.5, seed=1) if e.type == "search"][:3]
    True
    >>> 150 < len({e.query for e in many if e.type == "search"}) <= 500
    True
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be within [0, 1], got {share}")
    titles = {item.item_id: item for item in items}
    rng = np.random.default_rng(seed)
    pick = rng.random(len(events)) < share
    pool: list[str] = []
    if distinct_queries is not None:
        pool = query_pool(items, distinct_queries, seed=seed)
        weights = 1.0 / np.arange(1, len(pool) + 1, dtype=np.float64) ** zipf_s
        drawn = iter(np.random.default_rng(seed + 1).choice(len(pool), size=int(pick.sum()), p=weights / weights.sum()).tolist())
    out = []
    for ev, search in zip(events, pick.tolist()):
        item = titles.get(ev.item_id or "")
        if search and item is not None:
            # the default stream's draws stay as they were whatever the queries
            first = item.brand if rng.random() < 0.5 and item.brand else item.title.split()[0]
            query = pool[next(drawn)] if pool else f"{first} {item.category or ''}".strip()
            out.append(Event(f"{ev.event_id}-q", "search", ev.user_id, None, ev.ts, session_id=ev.session_id, query=query))
        else:
            out.append(ev)
    return out


def query_pool(items: list[CatalogItem], n: int, *, seed: int = 0) -> list[str]:
    """``n`` distinct queries made from the catalog's words, most popular first (for
    :func:`with_searches`' Zipf law): an item's category with one or two of its other words
    (adjective, brand, its number), in either order, a fifth of them with one typo (two
    neighbouring letters swapped, as typed in a hurry). Fewer than ``n`` only when the
    catalog's words cannot make so many.

    >>> pool = query_pool(generate_catalog(50, seed=0), 100, seed=0)
    >>> len(pool), len(set(pool)), all(1 <= len(q.split()) <= 4 for q in pool)
    (100, 100, True)
    """
    rng = np.random.default_rng(seed)
    seen: dict[str, None] = {}
    for _ in range(50 * n):
        if len(seen) >= n or not items:
            break
        item = items[int(rng.integers(len(items)))]
        words = [w for w in item.title.split() if w not in (item.category or "").split()]
        extra = [*words, *([item.brand] if item.brand else [])]
        chosen = [extra[j] for j in sorted(rng.choice(len(extra), size=min(len(extra), int(rng.integers(1, 3))),
                                                      replace=False).tolist())] if extra else []
        parts = [*chosen, item.category or ""] if rng.random() < 0.7 else [item.category or "", *chosen]
        query = " ".join(p for p in parts if p)
        if rng.random() < 0.2 and len(query) > 4:  # one typo: two neighbouring letters swapped
            j = int(rng.integers(len(query) - 1))
            if query[j] != " " and query[j + 1] != " ":
                query = query[:j] + query[j + 1] + query[j] + query[j + 2:]
        seen.setdefault(query, None)
    return list(seen)


def generate_visits(
    n_events: int,
    items: list[CatalogItem],
    *,
    active_users: int = 2000,
    mean_visit: float = 10.0,
    seed: int = 0,
    start_ts: int = 1_700_000_000_000,
    mean_gap_ms: float = 50.0,
) -> list[Event]:
    """A shop's stream as visits: ``active_users`` shoppers are on the site at any moment, each
    visit lasts a geometric number of events (mean ``mean_visit``), and a shopper who leaves is
    replaced by a new one. For load only (issue 12): unlike :func:`generate_events`, where every
    one of ``n_users`` shoppers comes back all through the stream so histories and sessions grow
    from the first event to the last, here the length of the history an event finds is
    stationary after the first ``active_users * mean_visit`` events or so, while the global
    state (users stored, co-visitation, session postings) keeps growing: a run's windows then
    differ by what the state holds, not by how much each shopper has done. Each event is the
    shopper's favourite category 80% of the time, as in :func:`generate_events`.

    >>> items = generate_catalog(50, seed=1)
    >>> ev = generate_visits(4000, items, active_users=40, mean_visit=10, seed=1)
    >>> len(ev), len({e.user_id for e in ev}) > 300, all(e.session_id == "s" + e.user_id[1:] for e in ev)
    (4000, True, True)
    >>> ev == generate_visits(4000, items, active_users=40, mean_visit=10, seed=1)
    True
    """
    if active_users <= 0 or mean_visit < 1:
        raise ValueError("active_users must be > 0 and mean_visit >= 1")
    rng = np.random.default_rng(seed)
    by_category = _by_category(items)
    slot_user = np.arange(active_users)  # the shopper on each slot of the site
    left = rng.geometric(1.0 / mean_visit, size=active_users)  # events left in each slot's visit
    favourite = {u: int(rng.integers(len(by_category))) for u in range(active_users)}
    next_user = active_users
    slots = rng.integers(active_users, size=n_events)
    own, types, ts = _event_columns(rng, n_events, start_ts, mean_gap_ms)
    events = []
    for n in range(n_events):
        s = int(slots[n])
        u = int(slot_user[s])
        item = _pick_item(rng, by_category, favourite[u], bool(own[n]))
        events.append(Event(f"e{n}", _TYPES[int(types[n])], f"u{u}", item, int(ts[n]), session_id=f"s{u}"))
        left[s] -= 1
        if left[s] == 0:  # the shopper leaves; a new one takes the slot
            slot_user[s] = next_user
            favourite[next_user] = int(rng.integers(len(by_category)))
            next_user += 1
            left[s] = rng.geometric(1.0 / mean_visit)
    return events
