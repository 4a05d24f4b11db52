"""Cost of the learned head (recsys.ranking.head): training per event, query vectors per user.

Run: ``.venv/bin/python benchmarks/head_speed.py [--dim 384] [--items 20000] [--threads 1] [--repeat 3]``

Synthetic unit vectors, histories of ``history_len`` (20) items; ``learn`` is called with
batches of ``batch_size`` (256) examples, one optimizer step each (the vector lookup, the
features, forward, backward and Adam all count). ``query_vectors`` is timed for one user
at a time and for batches of 256. Prints the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from recsys.ranking.head import Example, Head, HeadConfig

_T0 = 1_700_000_000_000
_TYPES = ("browse", "click", "add_to_cart", "purchase")


def _examples(rng: np.random.Generator, n: int, n_items: int, history_len: int) -> list[Example]:
    out = []
    for k in range(n):
        ts = _T0 + 60_000 * k
        items = rng.integers(n_items, size=history_len + 1)
        hist = [(f"i{int(i)}", _TYPES[j % 4], ts - 600_000 * (history_len - j)) for j, i in enumerate(items[:-1])]
        out.append(Example(hist, f"i{int(items[-1])}", _TYPES[k % 4], ts))
    return out


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    mat = rng.normal(size=(args.items, args.dim)).astype(np.float32)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    row = {f"i{j}": j for j in range(args.items)}

    lookup_s = [0.0]

    def vectors(ids: list[str]) -> np.ndarray:  # the caller's side (VectorIndex.vectors costs about the same)
        t0 = time.perf_counter()
        out = mat[[row[i] for i in ids]]
        lookup_s[0] += time.perf_counter() - t0
        return out

    cfg = HeadConfig(dim=args.dim)
    batches = [_examples(rng, cfg.batch_size, args.items, cfg.history_len) for _ in range(args.batches)]
    head = Head(cfg, vectors)
    head.learn(batches[0])  # warm-up: allocations, Adam state

    def train() -> None:
        for b in batches:
            head.learn(b)

    lookup_s[0] = 0.0
    t = _best(train, args.repeat)
    n = sum(len(b) for b in batches)
    lookup = lookup_s[0] / args.repeat  # mean over the repeats: a fair share of the best run
    print(f"learn   d={args.dim} L={cfg.history_len} batch={cfg.batch_size} n_neg={cfg.n_neg} "
          f"threads={args.threads}: {1e6 * t / n:8.1f} us/event  ({n / t:,.0f} events/s), "
          f"of which the vectors() lookup ~{1e6 * lookup / n:.1f} us/event")

    histories = [ex.history for ex in batches[0]]
    now = [ex.ts for ex in batches[0]]
    for m in (1, 256):
        def query(m: int = m) -> None:
            for lo in range(0, len(histories), m):
                head.query_vectors(histories[lo : lo + m], now[lo : lo + m])

        t = _best(query, args.repeat)
        print(f"query_vectors, {m:3d} user(s) per call:                      {1e6 * t / len(histories):8.1f} us/user")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
