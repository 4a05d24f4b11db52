"""Search informs recommendations (issue 13): a recent query is intent.

While a user's search window is open (:mod:`recsys.search.learned`: the next 5 events within
30 minutes of the search), the top ``slots`` items that search ranked for them (minus items
the recommender must not show them: purchased, not repeat purchases) enter their
recommendations: first (``mode="lead"``) or alternating with the recommender's own list, its
first item first (``"interleave"``); the rest of the list is the recommender's. The answer is the one
emitted for the search (kept in memory per user); after a restart, or for a search answered
on another path, it is ranked again from the current state.

Nothing enters the stored user state: the window is already crash-safe state (``sqw:``), and
the recommendation is the only thing that changes, so user states stay independent of how
the stream was batched and of the search ranking. On by ``RECSYS_SEARCH_IN_HISTORY`` (see the
README's Search section for the measured effect).

The wrapper keeps the :class:`recsys.ranking.recommender.Recommender` interface: ``rank``
returns the same ``(items, shown)`` pairs (``shown``, what the re-ranker learns from, stays
the recommender's own), every other attribute is the wrapped recommender's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from recsys.events import RecommendedItem

if TYPE_CHECKING:
    from recsys.search.service import Search
    from recsys.store.users import UserState

#: Slots of a recommendation list given to the recent search's items.
INTENT_SLOTS = 3
#: ``lead``: the search's items first; ``interleave``: alternate with the recommender's list,
#: the recommender's first item first.
MODES = ("lead", "interleave")


class SearchIntent:
    """A recommender whose lists start with the user's open search's top items."""

    def __init__(self, recommender: Any, search: Search, *, slots: int = INTENT_SLOTS, mode: str = "interleave",
                 max_users: int = 50_000) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._inner = recommender
        self.search = search
        self.slots = slots
        self.mode = mode
        self.max_users = max_users
        #: user -> (query key, search ts, answer item ids): the last emitted answer per user
        self._answers: OrderedDict[str, tuple[str, int, list[str]]] = OrderedDict()
        search.on_answer = self.remember
        search.on_forget = self.forget

    def __getattr__(self, name: str) -> Any:  # everything but rank: the recommender's
        return getattr(self._inner, name)

    def remember(self, user_id: str, key: str, ts: int, item_ids: list[str]) -> None:
        self._answers[user_id] = (key, ts, tuple(item_ids))
        self._answers.move_to_end(user_id)
        if len(self._answers) > self.max_users:
            self._answers.popitem(last=False)

    def forget(self, user_id: str) -> None:
        """The user's search state went (an erasure, a sweep): their last answer goes too."""
        self._answers.pop(user_id, None)

    def intent(self, state: UserState, now_ts: int) -> list[str]:
        """The open search's top items for this user (empty without an open window), less those
        the user saw or bought and those withdrawn since the search was answered."""
        window = self.search.windows.open_window(state.user_id, now_ts)
        if window is None:
            return []
        key, query, ts = window
        cached = self._answers.get(state.user_id)
        if cached is not None and cached[0] == key and cached[1] == ts:
            ids = cached[2]
        else:
            ids = [i.item_id for i in self.search.rank(query, state, now_ts).items]
            self.remember(state.user_id, key, ts, ids)
        excluded, recommendable = self._inner.excluded(state), self._inner.items.recommendable
        return [i for i in ids if i not in excluded and recommendable(i)][: self.slots]

    def rank(self, states: list[UserState], now_ts: int, k: int | None = None, *, explain: bool = True) -> list:
        ranked = self._inner.rank(states, now_ts, k, explain=explain)
        if self.slots <= 0:
            return ranked
        out = []
        for state, (items, shown) in zip(states, ranked):
            first = self.intent(state, now_ts)
            if first:
                n = max(len(items), k or self._inner.config.k)
                query = self.search.windows.last_query(state.user_id) or ""
                why = f"you searched '{query}'" if explain else ""
                top = items[0].score if items else 0.0
                head = [RecommendedItem(i, top, why) for i in first]
                if self.mode == "lead":
                    merged = head + items
                else:  # rec, search, rec, search, ... then the rest of the recommender's list
                    merged = [x for pair in zip(items, head) for x in pair] + items[len(head):] + head[len(items):]
                taken: set[str] = set()
                items = [it for it in merged if not (it.item_id in taken or taken.add(it.item_id))][:n]
            out.append((items, shown))
        return out

