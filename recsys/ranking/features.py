"""The ranking features in one table: each signal a candidate carries, where its value comes
from, its hand-set prior weight, and the reason it gives when it explains an item.

Every other module takes its column numbers and weights from here: the recommender fills the
columns (:mod:`recsys.ranking.recommender`), the re-ranker learns a correction per column
(:mod:`recsys.ranking.reranker`), and :class:`PriorWeights` is the prior the correction is
added to. A new signal is one new row here plus the code that fills its column.

>>> FEATURES.index("covisit"), COLUMN["seen"]
(1, 3)
>>> PriorWeights().vector().tolist()
[1.0, 1.2000000476837158, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class Feature:
    name: str
    source: str  # where its value comes from (each normalised to [0, 1] per user)
    prior: float  # hand-set weight before the re-ranker has learned anything
    reason: str | None  # the explanation it gives when it contributes most (None: never explains)


#: One row per feature, in column order. Co-visitation is the strongest single signal on session
#: data (OTTO, session-kNN literature); content carries cold items and sparse users; trending
#: starts level with content (grocery logs are popularity-driven; at 0.25 the re-ranker could not
#: lift it fast enough: Complete Journey HR@10 0.026 vs 0.032 at 1.0 on 100k events).
TABLE: tuple[Feature, ...] = (
    Feature("content", "faiss search with the user's query vector (the head's, else the decayed interest)", 1.0,
            "similar to <history item> you viewed / bought / put in your cart (similarity s) / matches your interests"),
    Feature("covisit", "co-visitation neighbours of the user's 3 most recent distinct items", 1.2,
            "bought together with <item> / viewed together with <item>"),
    Feature("trending", "time-decayed popularity", 1.0, "trending"),
    Feature("seen", "the user saw the item recently, graded by how recently", 0.0, None),
    Feature("category", "shares a category with the user's recent items", 0.0, None),
    Feature("head", "never filled (always 0; the head scores through the content query); kept so that "
            "re-ranker snapshots keep their length", 0.0, None),
    Feature("next", "directed transitions: what people engaged with right after the user's last items", 1.0,
            "often chosen right after <item>"),
    Feature("session", "session neighbours (V-SKNN): what sessions like the user's current one went on to", 1.0,
            "chosen in sessions like yours"),
    Feature("again", "buy again: the user's own most-bought items the catalog marks repeat_purchase", 1.0,
            "you buy this often"),
)
#: Signals per candidate, in column order.
FEATURES: tuple[str, ...] = tuple(f.name for f in TABLE)
COLUMN: dict[str, int] = {name: i for i, name in enumerate(FEATURES)}
#: Signals that an item is already familiar to the user (recently seen, bought before).
FAMILIAR = ("seen", "again")

_PRIOR = {f.name: f.prior for f in TABLE}


@dataclass(frozen=True)
class PriorWeights:
    """How much each normalised signal counts before the re-ranker has learned anything (the
    table's ``prior`` column; a field per weighted signal so that a config can override one)."""

    content: float = _PRIOR["content"]
    covisit: float = _PRIOR["covisit"]
    trending: float = _PRIOR["trending"]
    next: float = _PRIOR["next"]
    session: float = _PRIOR["session"]
    again: float = _PRIOR["again"]

    def vector(self) -> np.ndarray:
        """The weights in :data:`FEATURES` order (the table's prior for signals without a field)."""
        own = {f.name: getattr(self, f.name) for f in fields(self)}
        return np.array([own.get(name, _PRIOR[name]) for name in FEATURES], dtype=np.float32)
