"""Cut an event-time-ordered stream into batches in which each user acts at one moment only.

Backtests score "what we would have shown right before this event", and the engine computes
that once per user per batch. If a user had two events at different times in one batch, the
second would be scored against a recommendation that had not yet seen the first. Cutting the
stream so that each user appears at most once per batch (a basket — several events of one
user with the same timestamp — stays together) makes every batching give the same metrics as
event-by-event processing, while batches stay large enough to vectorise the scoring.

A user's events at one timestamp are never split between chunks, wherever other users' events of
that timestamp lie between them in the stream (the stream's order is kept: a replay resumes by
position): until 2026-12-07 a chunk could close between two of them when it was full, so the
second was scored after the first had been learned at one batch size and with it at another (a
user's repeated row: recently-seen HR@10 0.525 at batch size 1 against 0.299 at 500; an
operator's probe).

>>> from recsys.events import Event
>>> evs = [Event(str(i), "click", u, "x", t) for i, (u, t) in enumerate([("a", 1), ("b", 1), ("a", 1), ("a", 2), ("b", 3)])]
>>> [[e.event_id for e in chunk] for chunk in user_disjoint_chunks(evs, max_size=10)]
[['0', '1', '2'], ['3', '4']]
>>> [[e.event_id for e in chunk] for chunk in user_disjoint_chunks(evs, max_size=1)]  # a's basket whole
[['0', '1', '2'], ['3'], ['4']]
"""

from __future__ import annotations

from typing import Iterable, Iterator

from recsys.events import Event


def user_disjoint_chunks(events: Iterable[Event], max_size: int = 1000) -> Iterator[list[Event]]:
    """Yield consecutive chunks; within one, every user's events share one timestamp, and a
    user's events at one timestamp are never split between chunks (a chunk may pass
    ``max_size`` by the events that keep a basket whole)."""
    chunk: list[Event] = []
    user_ts: dict[str, int] = {}
    for piece in _pieces(events):
        clash = False
        for e in piece:
            seen = user_ts.get(e.user_id)
            clash = clash or (seen is not None and seen != e.ts)
        if chunk and (clash or (len(chunk) >= max_size and piece[0].user_id not in user_ts)):
            yield chunk
            chunk, user_ts = [], {}
        chunk += piece
        for e in piece:
            user_ts[e.user_id] = e.ts
    if chunk:
        yield chunk


def _pieces(events: Iterable[Event]) -> Iterator[list[Event]]:
    """The stream in its order, as the shortest runs of one timestamp that no user's events of
    that timestamp cross (where a chunk may close)."""
    run: list[Event] = []
    for event in events:
        if run and event.ts != run[0].ts:
            yield from _split_run(run)
            run = []
        run.append(event)
    if run:
        yield from _split_run(run)


def _split_run(run: list[Event]) -> Iterator[list[Event]]:
    last = {e.user_id: i for i, e in enumerate(run)}
    if len(last) == len(run):  # no user twice (most runs): every event a piece
        for e in run:
            yield [e]
        return
    start = reach = 0
    for i, e in enumerate(run):
        reach = max(reach, last[e.user_id])
        if i == reach:
            yield run[start : i + 1]
            start = i + 1
