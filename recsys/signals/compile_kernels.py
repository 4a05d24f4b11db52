"""Compile the numba loops (signals, ranking) ahead of time: ``python -m recsys.signals.compile_kernels``.

numba compiles a loop the first time it is called and keeps the machine code in a cache
(``__pycache__`` beside the module, or the user's cache directory when that is not writable).
A process that finds no cache compiles them during its first batch (seconds on a small machine),
so an image runs this once at build time (``Dockerfile``) and every container starts warm.

>>> from recsys.signals.compile_kernels import compile_kernels
>>> compile_kernels()
4
"""

from __future__ import annotations

import time


def compile_kernels() -> int:
    """Run every compiled loop once on a tiny input (compiling, or loading it from the cache);
    returns how many structures were exercised (three signals and the ranker's loops)."""
    import numpy as np

    from recsys.ranking._kernels import closest_rows, group_entries
    from recsys.signals.covisitation import CoVisitation
    from recsys.signals.popularity import Popularity
    from recsys.signals.sessions import SessionNeighbours

    cov = CoVisitation(half_life_h=1.0, max_neighbours=1, window=3)
    history = [("a", "browse", 0), ("b", "browse", 1)]
    cov.update(history, "c", "click", ts=2)  # a-c and b-c: one overflows a list of one
    cov.ranked("c")
    cov.top(["c", "x"], 2)
    cov.export_dirty()
    sessions = SessionNeighbours(k=2, sample_size=2)
    for user, item in [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "c"), ("u3", "a")]:
        sessions.update(user, None, item, ts=0)
    sessions.ranked_votes(["u2", "u3"], 1)
    one = np.zeros(1, dtype=np.int64)
    closest_rows(np.ones((1, 2), np.float32), one, one, one, one + 1, one, one + 1)
    group_entries(one, one, one, one, np.ones(1, np.float32), one, one, np.zeros(1, np.bool_), one,
                  one, np.ones(1, np.bool_), 1, 0, 0)
    popularity = Popularity(half_life_h=1.0)
    popularity.update("a", 1.0, ts=0)
    popularity.scores(["a", "x"], 1)
    return 4


def main() -> None:
    start = time.perf_counter()
    compile_kernels()
    print(f"signals' compiled loops ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
