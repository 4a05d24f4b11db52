"""Compile the numba loops (signals, ranking) ahead of time: ``python -m recsys.signals.compile_kernels``.

numba compiles a loop the first time it is called and keeps the machine code in a cache
(``__pycache__`` beside the module, or the user's cache directory when that is not writable).
A process that finds no cache compiles them during its first batch (seconds on a small machine),
so an image runs this once at build time (``Dockerfile``), and ``recsys run`` and ``recsys
replay`` run it before their first batch (milliseconds when the cache holds them).

numba compiles one machine-code version per argument types, read-only arrays included: each
loop is called here with the types the engine passes it (``tests/test_speed_equivalence.py``
checks that a run with searches compiles nothing more).

>>> from recsys.signals.compile_kernels import compile_kernels, compiled_signatures
>>> compile_kernels()
6
>>> len(compiled_signatures()["recsys.search._kernels.price_closeness"])
1
"""

from __future__ import annotations

import importlib
import threading
import time
from typing import Callable

#: the modules of compiled loops (numba), each exercised by :func:`compile_kernels`
KERNEL_MODULES = (
    "recsys.items._kernels",
    "recsys.ranking._kernels",
    "recsys.search._kernels",
    "recsys.signals._covisit_kernels",
    "recsys.signals._popularity_kernels",
    "recsys.signals._session_kernels",
)


def compiled_signatures() -> dict[str, set[str]]:
    """``module.function`` -> the argument types compiled (or loaded from the cache) so far in
    this process, for every compiled loop that is not inlined into another. A loop called only
    from other compiled loops can show none: loaded from the cache, it is inside its callers."""
    from numba.core.registry import CPUDispatcher

    found = {}
    for name in KERNEL_MODULES:
        for attr, value in vars(importlib.import_module(name)).items():
            if isinstance(value, CPUDispatcher) and value.targetoptions.get("inline") != "always":
                found[f"{name}.{attr}"] = {str(sig) for sig in value.signatures}
    return found


def compile_kernels() -> int:
    """Run every compiled loop once on a tiny input, with the argument types the engine passes
    (compiling, or loading it from the cache); returns how many structures were exercised (three
    signals, the ranker's loops, search's and the inverted file's)."""
    import numpy as np

    from recsys.items._kernels import push_products
    from recsys.ranking._kernels import closest_rows, group_entries
    from recsys.search._kernels import price_closeness
    from recsys.signals.covisitation import CoVisitation
    from recsys.signals.popularity import Popularity
    from recsys.signals.sessions import SessionNeighbours

    cov = CoVisitation(half_life_h=1.0, max_neighbours=1, window=3)
    history = [("a", "browse", 0), ("b", "browse", 1)]
    cov.update(history, "c", "click", ts=2)  # a-c and b-c: one overflows a list of one
    cov.ranked("c")
    cov.top(["c", "x"], 2)
    cov.export_dirty()
    # postings keep each item's sample_size latest sessions: u2's query (a, b) meets u1's and
    # u3's sessions, one more than its sample, so the sample is cut too
    sessions = SessionNeighbours(k=2, sample_size=1)
    for user, item in [("u2", "a"), ("u2", "b"), ("u1", "a"), ("u1", "c"), ("u3", "b")]:
        sessions.update(user, None, item, ts=0)
    sessions.ranked_votes(["u2", "u3"], 1)
    one = np.zeros(1, dtype=np.int64)
    vectors = np.ones((1, 2), np.float32)
    closest_rows(vectors, one, one, one, one + 1, one, one + 1)
    vectors.flags.writeable = False  # the index's vector table is a read-only view
    closest_rows(vectors, one, one, one, one + 1, one, one + 1)
    group_entries(one, one, one, one, np.ones(1, np.float32), one, one, np.zeros(1, np.bool_), one, one,
                  one, np.ones(1, np.bool_), 1, 0, 0)
    popularity = Popularity(half_life_h=1.0)
    popularity.update("a", 1.0, ts=0)
    popularity.scores(["a", "x"], 1)
    price_closeness(np.ones(1, np.float64), 1.0)
    heap_s, heap_i = np.full((1, 2), -np.inf, np.float32), np.full((1, 2), -1, np.int64)
    push_products(np.ones((1, 1), np.float32), one, one, heap_s, heap_i)
    return 6


def compile_kernels_announced(say: Callable[[str], object] = print, after_s: float = 1.0) -> float:
    """:func:`compile_kernels`, saying what it does when it takes longer than ``after_s`` (a
    machine whose cache lacks them: ~20 s on 2 cores) rather than leaving the first batch to
    stall on it; returns the seconds it took."""
    timer = threading.Timer(after_s, say, [
        "compiling the engine's loops for this machine (once: ~20 s on 2 cores; numba keeps them in its cache) ..."
    ])
    timer.daemon = True
    start = time.perf_counter()
    timer.start()
    try:
        compile_kernels()
    finally:
        timer.cancel()
    took = time.perf_counter() - start
    if took > after_s:
        say(f"compiled the engine's loops in {took:.1f} s")
    return took


def main() -> None:
    start = time.perf_counter()
    compile_kernels()
    print(f"signals' compiled loops ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
