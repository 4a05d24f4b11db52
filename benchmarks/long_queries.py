"""What one search costs by the length and kind of its query (no Kafka): a shopper, or anyone
who can write to the events topic, may send queries up to the decoder's 1,000 characters.

    .venv/bin/python benchmarks/long_queries.py [--items 10000] [--repeats 5] [--vocabulary 200000]

Synthetic catalog (load test only). For each kind of query (catalog words; nonsense words, each
several of the query model's word pieces and each tried by typo repair; one word repeated, so
the query cache answers after the first) and each length, ``--repeats`` distinct queries are
ranked by ``Search.rank`` for a shopper without history; prints the median and the largest CPU
milliseconds (all threads of the process, ``time.process_time``). The first query of a run also
pays for warming up what it touches first.

Then typo repair alone (``Vocabulary``, no model) against a vocabulary of ``--vocabulary``
random words, as a large catalog's descriptions give: CPU-ms for a query of 16 words none of
which is in it, and for adding one word (a catalog upsert) and repairing one word after it.
"""

from __future__ import annotations

import argparse
import os
import random
import string
import tempfile
import time

from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.synthetic import generate_catalog

LENGTHS = (20, 100, 300, 1000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--embed-cache-dir", default=os.environ.get("RECSYS_EMBED_CACHE_DIR", "var/embeddings"))
    p.add_argument("--vocabulary", type=int, default=200_000, help="words of the vocabulary typo repair is timed against")
    args = p.parse_args()
    print(f"load average: {os.getloadavg()}")
    catalog = generate_catalog(args.items, seed=0)
    words = sorted({w for c in catalog for w in c.text.lower().split()})
    rng = random.Random(0)

    def query(kind: str, n: int) -> str:
        out: list[str] = []
        while len(" ".join(out)) < n:
            if kind == "catalog words":
                out.append(rng.choice(words))
            elif kind == "nonsense words":
                out.append("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))))
            else:
                out.append("tent")
        return " ".join(out)[:n]

    with tempfile.TemporaryDirectory() as tmp:
        engine = Shard.open(Settings(state_dir=tmp, embed_cache_dir=args.embed_cache_dir))
        engine.upsert_catalog(catalog, progress=True)
        search = engine.search
        search.warm_up()
        search.rank("warm up", None, 0)
        print(f"{'query':<15}{'chars':>6}{'median CPU-ms':>15}{'max CPU-ms':>12}")
        for kind in ("catalog words", "nonsense words", "one word"):
            for n in LENGTHS:
                spent = []
                for _ in range(args.repeats):
                    text = query(kind, n)
                    start = time.process_time()
                    search.rank(text, None, 0)
                    spent.append((time.process_time() - start) * 1000)
                spent.sort()
                print(f"{kind:<15}{n:>6}{spent[len(spent) // 2]:>15.1f}{spent[-1]:>12.1f}", flush=True)
        engine.close()
    typo_repair(args.vocabulary, args.repeats)
    print(f"load average: {os.getloadavg()}")


def typo_repair(n_words: int, repeats: int) -> None:
    from recsys.search.text import Vocabulary

    rng = random.Random(1)
    vocab = Vocabulary("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 10)))
                       for _ in range(n_words))
    vocab.repair(["warmup"])

    def timed(fn) -> float:
        start = time.process_time()
        fn()
        return (time.process_time() - start) * 1000

    queries, upserts = [], []
    for r in range(repeats):
        words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 9))) for _ in range(16)]
        queries.append(timed(lambda: vocab.repair(words)))
        upserts.append(timed(lambda: (vocab.add([f"upsert{r}word"]), vocab.repair(words[:1]))))
    print(f"typo repair, vocabulary of {len(vocab.words):,} words: 16 unknown words {sorted(queries)[len(queries) // 2]:.1f} "
          f"median CPU-ms; one new word added, then one word repaired {sorted(upserts)[len(upserts) // 2]:.1f}", flush=True)


if __name__ == "__main__":
    main()
