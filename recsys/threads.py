"""numpy's BLAS on one thread in the engine's processes (issue 12).

numpy's OpenBLAS starts a worker thread per core and splits a large enough product between
them; the ranker's batch-wide products (a feature matrix of ~170k rows by 9 columns times a
weight vector, twice per batch) are large enough. After each call the workers spin, waiting for
the next one, for longer than the engine takes to issue it: on the 2-core target
``perf`` counted 8.6% of all the engine benchmark's samples in OpenBLAS's
``blas_thread_server``, and a second core spinning is taken from what else runs there (the
Kafka client's threads, RocksDB, another shard). With one thread
(``benchmarks/engine_speed.py``, two alternating pairs over 60k events on 2026-12-04): 2,422 /
2,484 -> 3,146 / 3,594 events per CPU-second, the wall-clock rate unchanged or better (3,276 /
3,397 -> 3,201 / 3,664 events/s); every output the same bits (``benchmarks/output_digest.py``:
each product's row is summed by one thread either way).

The limit applies to the BLAS libraries that run threads of their own (``pthreads``: numpy's
OpenBLAS), as the engine already keeps torch (``torch.set_num_threads(1)`` in
:class:`recsys.shard.step.Shard`) and faiss's searches (:func:`recsys.items.catalog._faiss_search`)
on one thread. A BLAS built on OpenMP (faiss's) is left alone: its thread count is the OpenMP
setting faiss shares, and limiting it lowered that for faiss too. Before faiss trained the
inverted file with a fixed count (``recsys.items.catalog.IVF_TRAIN_THREADS``), that changed its
cells and the REES46 replay's recommendations (``output_digest.py``); faiss's thread counts are
chosen where faiss is called, not here.
"""

from __future__ import annotations

from threadpoolctl import ThreadpoolController

__all__ = ["one_blas_thread"]


def one_blas_thread() -> None:
    """Limit every BLAS library loaded so far that runs its own threads (numpy's OpenBLAS) to
    one thread, for the rest of the process.

    >>> from threadpoolctl import threadpool_info
    >>> one_blas_thread()
    >>> {pool["num_threads"] for pool in threadpool_info() if pool.get("threading_layer") == "pthreads"} <= {1}
    True
    """
    ThreadpoolController().select(user_api="blas").select(threading_layer="pthreads").limit(limits=1)
