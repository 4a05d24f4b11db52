"""What an exchange snapshot costs (issue 11, bootstrapping a shard): size, the pause of the
stream while its records are read, the background write, and a blank shard's load.

    .venv/bin/python benchmarks/exchange_snapshot.py [--items 3000] [--users 50000] [--events 200000]

Synthetic data (load only). One sharing shard on RocksDB learns the global signals from the
events (its own messages applied back, as the log would), then a snapshot of its shared
records is read, written and loaded into a blank RocksDB; the loaded state's signal checksum
is checked against the source's. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter

from recsys.events import Envelope, encode
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.signals.exchange import signal_checksum
from recsys.signals.snapshot import bootstrap, read_shared, write_file
from recsys.store.kv import RocksKV
from recsys.synthetic import generate_catalog, generate_events


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--embed-cache-dir", default="var/embeddings")
    args = p.parse_args()
    print(f"load average: {os.getloadavg()}")
    catalog = generate_catalog(args.items, seed=0)
    events = generate_events(args.events, catalog, n_users=args.users, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(state_dir=f"{tmp}/src", embed_cache_dir=args.embed_cache_dir, head_enabled=False,
                            rerank_enabled=False, share_signals=True)
        engine = Shard.open(settings, emit=False)
        engine.upsert_catalog(catalog)
        started, position = time.perf_counter(), 0
        for at in range(0, len(events), args.batch):
            chunk = events[at:at + args.batch]
            envs = [Envelope("events", 0, at + i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(chunk)]
            for message in engine.process(envs).exchange:
                engine.apply_exchange([(position, message)])
                position += 1
        print(f"state built: {len(events):,} events in {time.perf_counter() - started:.0f}s, exchange position {position - 1}")
        source_sum = engine.signal_checksum()

        started = time.perf_counter()
        pos, applied, records = read_shared(engine.kv)
        read_s = time.perf_counter() - started
        by_prefix = Counter(key.split(b":", 1)[0].decode() + ":" for key, _ in records)
        raw = sum(len(k) + len(v) + 8 for k, v in records)
        print(f"records: {len(records):,} ({', '.join(f'{p} {n:,}' for p, n in sorted(by_prefix.items()))}), "
              f"{raw / 2**20:.1f} MiB raw")
        print(f"stream paused to read them: {read_s:.2f}s")
        started = time.perf_counter()
        info = write_file(f"{tmp}/snaps", "signal-exchange", pos, applied, records)
        print(f"file written (background thread): {time.perf_counter() - started:.2f}s, "
              f"{info.file_bytes / 2**20:.1f} MiB ({raw / max(info.file_bytes, 1):.1f}x smaller)")
        engine.close()

        blank = RocksKV(f"{tmp}/blank/rocks")
        started = time.perf_counter()
        loaded = bootstrap(blank, f"{tmp}/snaps", "signal-exchange", origin=1)
        load_s = time.perf_counter() - started
        same = signal_checksum(blank) == source_sum
        blank.close()
        print(f"blank shard loaded it: {load_s:.2f}s at position {loaded.position}; signal checksum equal: {same}")


if __name__ == "__main__":
    main()
