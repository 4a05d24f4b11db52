"""Cut an event-time-ordered stream into batches in which each user acts at one moment only.

Backtests score "what we would have shown right before this event", and the engine computes
that once per user per batch. If a user had two events at different times in one batch, the
second would be scored against a recommendation that had not yet seen the first. Cutting the
stream so that each user appears at most once per batch (a basket — several events of one
user with the same timestamp — stays together) makes every batching give the same metrics as
event-by-event processing, while batches stay large enough to vectorise the scoring.

>>> from recsys.events import Event
>>> evs = [Event(str(i), "click", u, "x", t) for i, (u, t) in enumerate([("a", 1), ("b", 1), ("a", 1), ("a", 2), ("b", 3)])]
>>> [[e.event_id for e in chunk] for chunk in user_disjoint_chunks(evs, max_size=10)]
[['0', '1', '2'], ['3', '4']]
"""

from __future__ import annotations

from typing import Iterable, Iterator

from recsys.events import Event


def user_disjoint_chunks(events: Iterable[Event], max_size: int = 1000) -> Iterator[list[Event]]:
    """Yield consecutive chunks; within one, every user's events share one timestamp."""
    chunk: list[Event] = []
    user_ts: dict[str, int] = {}
    for event in events:
        seen = user_ts.get(event.user_id)
        if (seen is not None and seen != event.ts) or (len(chunk) >= max_size and seen is None):
            yield chunk
            chunk, user_ts = [], {}
        chunk.append(event)
        user_ts[event.user_id] = event.ts
    if chunk:
        yield chunk
