"""What one event says about a shopper's interest, and how fast that fades: the one home of
the event-type weights and of event-time decay, shared by user state, the global signals, the
head, search and the baselines.

>>> EVENT_WEIGHTS["purchase"] > EVENT_WEIGHTS["add_to_cart"] > EVENT_WEIGHTS["click"] > EVENT_WEIGHTS["browse"]
True
>>> decay_factor(2 * MS_PER_HOUR, MS_PER_HOUR), decay_factor(-5, MS_PER_HOUR)
(0.25, 1.0)
"""

from __future__ import annotations

import math

#: How much one event says about a shopper's interest in its item (OTTO-style weights).
#: Search carries no item, so it weighs nothing.
EVENT_WEIGHTS: dict[str, float] = {"browse": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "search": 0.0}

MS_PER_HOUR = 3_600_000
MS_PER_DAY = 24 * MS_PER_HOUR


def decay_factor(dt_ms: float, half_life_ms: float) -> float:
    """``0.5 ** (dt / half_life)`` with ``dt`` clamped at 0 (time never runs backwards).

    >>> decay_factor(7_200_000, 3_600_000), decay_factor(-5, 3_600_000)
    (0.25, 1.0)
    """
    if dt_ms <= 0:
        return 1.0
    return 0.5 ** (dt_ms / half_life_ms)


def half_life_ms(half_life_h: float) -> float:
    """A half-life in hours as milliseconds; refuses what cannot be one.

    >>> half_life_ms(0.5)
    1800000.0
    """
    if not (half_life_h > 0 and math.isfinite(half_life_h)):
        raise ValueError(f"half_life_h must be a positive finite number of hours, got {half_life_h!r}")
    return half_life_h * MS_PER_HOUR
