"""SHA-256 of everything the engine emits, to prove a speed-up changed nothing.

    .venv/bin/python benchmarks/output_digest.py [--no-rees46] [--only small|bench|rees46]

Prints one digest per run; a change to the ranking code is output-identical when every digest
is unchanged. Runs (synthetic data is for load only; here it only has to exercise every path):

- ``small``: 600 items, 1,500 users, 40k events in batches of varying size (1..700), head on:
  neighbour lists overflow, postings reach hundreds of sessions per item (both session-scoring
  paths), sessions hit their 50-item bound, users buy again.
- ``bench``: the engine_speed workload (10k items, 20k users), first 30k events, batches of 1,000.
- ``rees46``: ``recsys replay --format rees46 ... --models full-system --emit`` over the shared
  REES46 head (skipped when /work/shared/data or ../shared/data is absent): the emitted
  recommendations and metrics.json's model metrics (backtest mode: ``explain=False``).

For the synthetic runs the digest covers each payload with ``emitted_at`` removed (items,
scores, reasons, trigger, model version) and, separately, the feature rows the re-ranker sees
(``Shown``) as raw float32 bytes, and of the engine's state at the end (every key and value it
would persist, less the outboxes, whose payloads hold ``emitted_at``): user records, co-visitation
and transition lists, sessions, popularity, so a faster signal structure must also store the same
bytes (co-visitation and transition records are decoded to the lists they hold, in order, since
their record format changed on 2026-12-03; the state digests before that date hashed their bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# this tree's code, whatever an editable install in the environment points at (a git worktree
# sharing another checkout's .venv would otherwise import and measure that checkout's code)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys.events import Envelope, encode  # noqa: E402
from recsys.items.embeddings import Embedder  # noqa: E402
from recsys.settings import Settings  # noqa: E402
from recsys.shard.step import Shard  # noqa: E402
from recsys.synthetic import generate_catalog, generate_events  # noqa: E402

from covisit_speed import decode_list  # noqa: E402  (beside this script: the record formats of every tree)

DATA_DIRS = [Path("/work/shared/data"), Path("../shared/data")]


def _strip(payload: bytes) -> bytes:
    rec = json.loads(payload)
    rec.pop("emitted_at", None)
    return json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()


def synthetic(name: str, n_items: int, n_users: int, n_events: int, batches, cache: str) -> tuple[str, str, int, str]:
    catalog = generate_catalog(n_items, seed=0)
    Embedder("all-MiniLM-L6-v2", cache).embed([c.text for c in catalog])
    events = generate_events(n_events, catalog, n_users=n_users, seed=1)
    envs = [Envelope("events", 0, i, e.user_id.encode(), encode(e), e.ts) for i, e in enumerate(events)]
    out, shown = hashlib.sha256(), hashlib.sha256()
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        engine = Shard.open(Settings(state_dir=tmp, embed_cache_dir=cache), in_memory=True)
        engine.upsert_catalog(catalog)
        i = 0
        for size in batches():
            if i >= len(envs):
                break
            result = engine.process(envs[i : i + size])
            i += size
            for user_id, payload in result.recommendations:
                out.update(_strip(payload) + b"\n")
                s = engine.shown.get(user_id)
                shown.update(repr((s.items, s.candidates)).encode() + s.features.tobytes())
                count += 1
        # everything the engine would persist, less the outboxes (their payloads hold emitted_at)
        state = hashlib.sha256()
        for key, value in sorted(engine.kv.iter_prefix(b"")):
            if key.startswith((b"cov:", b"nxt:")):  # the lists held, whichever record format stored them
                value = repr(decode_list(value)).encode()
            if not key.startswith(b"o:"):
                state.update(b"%d:%s%d:%s" % (len(key), key, len(value), value))
        engine.close()
    return out.hexdigest(), shown.hexdigest(), count, state.hexdigest()


def rees46(data: Path, cache: str) -> tuple[str, str, int] | None:
    events = data / "rees46" / "2019-Oct_head17k.csv"
    if not events.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        emit = Path(tmp) / "emit.jsonl"
        cmd = [sys.executable, "-m", "recsys_cli", "replay", "--format", "rees46", "--events", str(events),
               "--models", "full-system", "--out", str(Path(tmp) / "out"), "--emit", str(emit),
               "--embed-cache-dir", cache]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
        out = hashlib.sha256()
        n = 0
        if emit.exists():
            for line in emit.read_bytes().splitlines():
                if line.strip():
                    out.update(_strip(line) + b"\n")
                    n += 1
        metrics = json.loads((Path(tmp) / "out" / "metrics.json").read_text())["models"]
        return out.hexdigest(), hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest(), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("small", "bench", "rees46"), action="append")
    p.add_argument("--no-rees46", action="store_true")
    p.add_argument("--embed-cache-dir", default="var/embeddings")
    args = p.parse_args()
    runs = args.only or ["small", "bench"] + ([] if args.no_rees46 else ["rees46"])
    cache = args.embed_cache_dir

    def varying():
        size = 1
        while True:
            yield size
            size = size * 7 % 701 or 1  # 1, 7, 49, 343, 298, ... : small and large batches

    def thousands():
        while True:
            yield 1000

    for run in runs:
        start = time.process_time()
        if run == "small":
            digests = synthetic(run, 600, 1500, 40_000, varying, cache)
        elif run == "bench":
            digests = synthetic(run, 10_000, 20_000, 30_000, thousands, cache)
        else:
            data = next((d for d in DATA_DIRS if d.exists()), None)
            digests = rees46(data, cache) if data else None
            if digests is None:
                print("rees46: skipped (no shared data)")
                continue
        took = time.process_time() - start
        state = f"  state {digests[3]}" if len(digests) > 3 else ""
        print(f"{run}: payloads {digests[0]}  {'shown' if run != 'rees46' else 'metrics'} {digests[1]}{state}  "
              f"({digests[2]} recommendations, {took:.1f} CPU-s)", flush=True)


if __name__ == "__main__":
    main()
