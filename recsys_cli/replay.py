"""``recsys replay``: backtest the full system and the baselines on an event log, side by side.

Prequential (default): the full system runs through the live Bytewax graph with a file source
(:func:`dataflows.replay.replay_full_system`); the baselines run through the plain-Python loop
(:func:`recsys.backtest.protocols.prequential`); both cut the stream the same way and score with the
same :class:`recsys.backtest.protocols.PrequentialScorer`. Leave-last-out: every model, the full system
included (its ``learn`` is the dataflow's own ``Shard.process`` step), through
:func:`recsys.backtest.protocols.leave_last_out`.

Writes ``DIR/metrics.json``, ``DIR/report.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

from recsys_cli.argtypes import fail, non_negative_int, positive_float, require_writable, settings_or_fail, share

BASELINES = ("popularity", "recent_popularity", "recently_seen", "most_bought", "covisitation", "session_knn",
             "itemknn", "transitions", "content", "river_biased_mf", "bpr_mf", "sasrec")
#: the full system without parts of itself (issue 14): rows that say what each part adds
ABLATIONS = ("full-system/frozen", "full-system/no-head", "full-system/no-reranker")
ALL_MODELS = BASELINES + ("full-system",) + ABLATIONS
#: left out of ``--models all`` (too slow for CI); scripts/backtests.sh names it
NOT_IN_ALL = ("sasrec",)
FORMATS = ("jsonl", "rees46", "diginetica", "yoochoose", "completejourney", "csv")
#: Formats whose --events may be a directory (of the dataset's files).
DIRECTORY_FORMATS = ("diginetica", "yoochoose", "completejourney")
#: Flags (by their ``dest``) that only ``--task recommend`` reads: ``--task search`` scores
#: every search mode side by side, over the whole log, one engine, nothing emitted.
RECOMMEND_ONLY = ("models", "protocol", "target", "retrain_every", "warmup_share", "include_history", "seed",
                  "shards", "share", "exchange_lag", "trainer", "trainer_publish_messages", "trainer_publish_lag", "emit")
#: And those only ``--task search`` reads.
SEARCH_ONLY = ("search_sample", "search_targets", "query_log", "search_features")


def add_parser(sub) -> None:
    p = sub.add_parser("replay", help="backtest on an event file: full system and baselines side by side")
    p.add_argument("--events", default=None, help="event file or folder (optional for completejourney)")
    p.add_argument("--format", default="jsonl", choices=FORMATS, help="the event log's format (csv: with --map)")
    p.add_argument("--catalog", default=None, help="catalog file (JSONL items; format-specific otherwise)")
    p.add_argument("--protocol", default="prequential", choices=("prequential", "leave-last-out"),
                   help="prequential: each event predicted before it is learned; leave-last-out: each user's last "
                        "event held out")
    p.add_argument("--k", default=None, help="cut-offs, e.g. 10 or 10,20 (default 10,20; leave-last-out 10,50; --task search 10)")
    p.add_argument("--models", default="all",
                   help=f"all (every model but {', '.join(NOT_IN_ALL)}; most_bought only where the catalog has "
                        f"repeat-purchase items), all+sasrec, or a comma list of: {', '.join(ALL_MODELS)}")
    p.add_argument("--retrain-every", type=positive_float, default=24.0, metavar="HOURS",
                   help="prequential: batch-trained baselines (bpr_mf, sasrec) retrain from everything seen "
                        "so far every HOURS of event time (default 24: the nightly job)")
    p.add_argument("--warmup-share", type=share, default=0.5,
                   help="full-system/frozen: share of the (training) stream learned before all learning stops")
    p.add_argument("--include-history", action="store_true", help="leave-last-out: rank the whole catalog")
    p.add_argument("--target", default="next", choices=("next", "next_purchase"), help="prequential target")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the baselines that draw at random and of the margins' bootstrap")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N rows of the log as it is written (then in time order: a log written newest "
                        "first keeps its newest N)")
    p.add_argument("--batch-size", type=int, default=500, help="events per replay batch")
    p.add_argument("--shards", type=int, default=1,
                   help="prequential: replay the full system as N shards (users split as Kafka would split "
                        "them over N partitions, each shard its own engine), to measure what sharding costs")
    p.add_argument("--share", action=argparse.BooleanOptionalAction, default=None,
                   help="with --shards N: the shards share the global signals through one exchange log, "
                        "interleaved in event time (recsys/backtest/shards.py; default: on when N > 1); "
                        "--no-share: each shard learns from its own users only, one shard after the other")
    p.add_argument("--exchange-lag", type=int, default=1, metavar="ROUNDS",
                   help="with sharing: rounds (each shard one batch) before every shard has applied a "
                        "round's signal updates (default 1: the next batch sees them, as a live exchange "
                        "consumer polling between two event batches does)")
    p.add_argument("--trainer", action=argparse.BooleanOptionalAction, default=None,
                   help="with sharing: the train/serve split (recsys/signals/trainer.py): one trainer trains "
                        "the shared head and re-ranker from the log and publishes snapshots the shards load; "
                        "default: RECSYS_MODEL_TRAINER (off: every shard trains them itself)")
    p.add_argument("--trainer-publish-messages", type=int, default=None, metavar="K",
                   help="with --trainer: the trainer publishes after every K messages learned "
                        "(default: RECSYS_TRAINER_PUBLISH_MESSAGES)")
    p.add_argument("--trainer-publish-lag", type=int, default=1, metavar="ROUNDS",
                   help="with --trainer: rounds after the one a snapshot was published in before the shards "
                        "serve it (default 1; 0: their next batch)")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN", help="csv: column mapping (repeat)")
    p.add_argument("--emit", default=None, metavar="FILE",
                   help="also compute the live output recommendations and write them to FILE (JSONL); slower")
    p.add_argument("--state-dir", default=None, help="keep replay state in RocksDB here, each engine in a directory of its own under it (default: in "
                        "memory); a new or empty directory: a backtest starts from nothing")
    p.add_argument("--embed-cache-dir", default=None, help="embedding cache (default: RECSYS_EMBED_CACHE_DIR or var/embeddings)")
    p.add_argument("--out", required=True, help="output directory")
    # issue 13: the search backtest on derived queries (recsys/search/replay.py)
    p.add_argument("--task", default="recommend", choices=("recommend", "search"), help="what to backtest")
    from recsys.search.replay import add_arguments as add_search_arguments

    add_search_arguments(p)
    # what each task leaves unread, with its default: given otherwise, it is refused (_check_args)
    p.set_defaults(func=run_replay, unused_by_task={
        "search": {dest: p.get_default(dest) for dest in RECOMMEND_ONLY},
        "recommend": {dest: p.get_default(dest) for dest in SEARCH_ONLY}})


def _parse_ks(text: str | None, protocol: str, task: str = "recommend") -> tuple[int, ...]:
    if text is None:
        return (10,) if task == "search" else (10, 50) if protocol == "leave-last-out" else (10, 20)
    try:
        ks = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        fail("replay", f"--k expects whole numbers like 10 or 10,20, got {text!r}", 2)
    if not ks or ks[0] < 1:
        fail("replay", f"--k must be positive, got {text!r}", 2)
    return ks


def _parse_models(text: str) -> list[str]:
    if text in ("all", "all+sasrec"):
        return [n for n in ALL_MODELS if n not in NOT_IN_ALL or text == "all+sasrec"]
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))  # each once, in order
    unknown = [n for n in names if n not in ALL_MODELS]
    if unknown or not names:
        what = f"unknown model(s) {unknown}" if unknown else f"no model named in --models {text!r}"
        fail("replay", f"{what}; choose from {', '.join(ALL_MODELS)}", 2)
    return names


def build_baselines(names: list[str], engine, repeat_items: set[str], seed: int, n_items: int, *,
                    retrain_every_h: float | None = None, cache_key: str | None = None) -> list:
    """Baseline models by name; the content baseline reads the engine's frozen item vectors.
    ``retrain_every_h``: prequential period of the batch-trained baselines (None: train once
    when first asked to rank, as leave-last-out does); ``cache_key`` names a trained SASRec."""
    from recsys.backtest.baselines import (
        ContentBaseline,
        CoVisitationBaseline,
        PopularityBaseline,
        RecentPopularityBaseline,
        RiverBiasedMFBaseline,
        SessionKNNBaseline,
    )
    from recsys.backtest.history_baselines import (
        ItemKNNBaseline,
        MostBoughtBaseline,
        RecentlySeenBaseline,
        TransitionBaseline,
    )
    from recsys.backtest.trained_baselines import BPRMFBaseline

    def vectors(item_ids: list[str]):
        # a zero row for an item the catalog lacks (admitted without text): content leaves it out
        return engine.items.index.vectors_or_zero(item_ids)

    factories = {
        "popularity": lambda: PopularityBaseline(repeat_items=repeat_items),
        "recent_popularity": lambda: RecentPopularityBaseline(repeat_items=repeat_items),
        "covisitation": lambda: CoVisitationBaseline(repeat_items=repeat_items),
        "session_knn": lambda: SessionKNNBaseline(repeat_items=repeat_items),
        # exact search up to 20k items; HNSW beyond (exact costs catalog x 384 flops per query)
        "content": lambda: ContentBaseline(vectors, repeat_items=repeat_items, hnsw_m=32 if n_items > 20_000 else None),
        "river_biased_mf": lambda: RiverBiasedMFBaseline(repeat_items=repeat_items, seed=seed),
        "recently_seen": lambda: RecentlySeenBaseline(repeat_items=repeat_items),
        "most_bought": lambda: MostBoughtBaseline(repeat_items=repeat_items),
        "itemknn": lambda: ItemKNNBaseline(repeat_items=repeat_items),
        "transitions": lambda: TransitionBaseline(repeat_items=repeat_items),
        "bpr_mf": lambda: BPRMFBaseline(repeat_items=repeat_items, seed=seed, retrain_every_h=retrain_every_h),
        "sasrec": lambda: _sasrec(repeat_items, seed, retrain_every_h, cache_key),
    }
    return [factories[n]() for n in names if not n.startswith("full-system")]


def _sasrec(repeat_items: set[str], seed: int, retrain_every_h: float | None, cache_key: str | None):
    from recsys.backtest.sasrec import SASRecBaseline

    return SASRecBaseline(repeat_items=repeat_items, seed=seed, retrain_every_h=retrain_every_h,
                       cache_dir="var/sasrec" if cache_key else None, cache_key=cache_key)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse wrong arguments in one line, before anything heavy is imported or read."""
    if args.limit is not None and args.limit < 1:
        fail("replay", f"--limit must be a whole number >= 1, got {args.limit}", 2)
    if args.batch_size < 1:
        fail("replay", f"--batch-size must be a whole number >= 1, got {args.batch_size}", 2)
    if args.shards < 1 or (args.shards > 1 and args.protocol != "prequential"):
        raise SystemExit("recsys replay: --shards N needs N >= 1, and N > 1 only with --protocol prequential")
    if args.exchange_lag < 1:
        fail("replay", f"--exchange-lag must be a whole number >= 1, got {args.exchange_lag}", 2)
    if args.share and (args.protocol != "prequential" or args.emit):
        raise SystemExit("recsys replay: --share runs only with --protocol prequential and without --emit")
    if args.trainer and (args.share is False or args.shards < 1 or args.protocol != "prequential"):
        raise SystemExit("recsys replay: --trainer needs sharing (--shards N, --protocol prequential)")
    if args.trainer_publish_messages is not None and args.trainer_publish_messages < 1:
        fail("replay", f"--trainer-publish-messages must be >= 1, got {args.trainer_publish_messages}", 2)
    if args.trainer_publish_lag < 0:
        fail("replay", f"--trainer-publish-lag must be >= 0, got {args.trainer_publish_lag}", 2)
    if getattr(args, "task", "recommend") == "search":
        from recsys.events import EVENT_TYPES

        if not 0 < args.search_sample <= 1:
            fail("replay", f"--search-sample must be a fraction above 0, at most 1, got {args.search_sample:g}", 2)
        targets = [t.strip() for t in args.search_targets.split(",") if t.strip()]
        if not targets or (wrong := [t for t in targets if t not in EVENT_TYPES or t == "search"]):
            fail("replay", f"--search-targets {args.search_targets!r}: expected a comma list of event "
                           f"types out of {', '.join(t for t in EVENT_TYPES if t != 'search')}"
                           + (f" ({', '.join(map(repr, wrong))} is not one)" if targets else ""), 2)
    task = getattr(args, "task", "recommend")
    given = getattr(args, "given", None)  # the options on the command line (None: called without main)

    def set_(dest: str, default: object) -> bool:  # given, even at its default (until 2026-12-07: a value not the default)
        return dest in given if given is not None else getattr(args, dest) != default

    unused = [dest for dest, default in getattr(args, "unused_by_task", {}).get(task, {}).items() if set_(dest, default)]
    if unused:  # until 2026-12-07 such a flag was read by nothing, and the report looked as if it had been
        flags = ", ".join("--" + dest.replace("_", "-") for dest in unused)
        raise SystemExit(f"recsys replay: {flags} {'does' if len(unused) == 1 else 'do'} nothing with --task {task}"
                         + (" (it scores every search mode side by side at the --k cut-offs; default 10)"
                            if task == "search" else " (a --task search flag)") + "; leave it out"
                         + (" or add --task search" if task == "recommend" else ""))
    if task == "search" and getattr(args, "query_log", None):  # the log is the searches: nothing is derived
        derived = {dest: default for dest, default in args.unused_by_task.get("recommend", {}).items()
                   if dest != "query_log"}
        ignored = [f"--{dest.replace('_', '-')}" for dest, default in derived.items() if set_(dest, default)]
        ignored += [flag for flag, dest, default in (("--events", "events", None), ("--format", "format", "jsonl"))
                    if set_(dest, default)]
        if ignored:  # read by nothing until 2026-12-07
            raise SystemExit(f"recsys replay: {', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} nothing with "
                             f"--query-log (the log holds the searches and what was engaged after each, CSV); leave "
                             f"{'it' if len(ignored) == 1 else 'them'} out")
    bad_maps = [m for m in args.map if "=" not in m]
    if bad_maps:
        fail("replay", f"--map expects FIELD=COLUMN, got {bad_maps[0]!r}", 2)
    query_log = getattr(args, "task", "recommend") == "search" and getattr(args, "query_log", None)
    if args.format != "completejourney" and not args.events and not query_log:  # a query log is its own input
        raise SystemExit(f"recsys replay: --events PATH is required for --format {args.format}")
    for flag, path in (("--events", args.events), ("--catalog", args.catalog), ("--query-log", query_log or None)):
        if path is None or (flag == "--events" and args.format == "completejourney" and path == "-"):
            continue
        if not os.path.exists(path):
            raise SystemExit(f"recsys replay: {flag} {path}: no such file or directory; check the path")
        if os.path.isdir(path) and flag == "--query-log":
            raise SystemExit(f"recsys replay: {flag} {path} is a directory; it reads one CSV file")
        if os.path.isdir(path) and (flag == "--catalog" or args.format not in DIRECTORY_FORMATS):
            raise SystemExit(f"recsys replay: {flag} {path} is a directory; --format {args.format} reads a file here")
    # the report is written after the whole backtest, the state and embeddings from its start:
    # a directory that cannot be written is refused now, not by a traceback at the end
    embed_cache_dir = args.embed_cache_dir or settings_or_fail("replay").embed_cache_dir
    if args.state_dir and os.path.isdir(args.state_dir) and os.listdir(args.state_dir):
        # not deleted here: a slip of the path (a live flow's state) would lose that state
        raise SystemExit(f"recsys replay: --state-dir {args.state_dir} already holds files (an earlier replay's "
                         f"state, or a live flow's): a backtest starts from empty state, or it would score what it has "
                         f"already learned; give a new or empty directory")
    if args.emit and os.path.isdir(args.emit):
        raise SystemExit(f"recsys replay: --emit {args.emit} is a directory; give a file for the recommendations")
    for flag, path in (("--events", args.events), ("--catalog", args.catalog), ("--query-log", query_log or None)):
        if args.emit and path and os.path.isfile(path) and os.path.exists(args.emit) and os.path.samefile(args.emit, path):
            raise SystemExit(f"recsys replay: --emit {args.emit} is the {flag} file: writing the recommendations there "
                             f"would overwrite it; give another file")
    emit_dir = os.path.dirname(os.path.abspath(args.emit)) if args.emit else None  # opened once the engine has loaded
    require_writable("replay", {"--out": args.out, "--state-dir": args.state_dir, "--embed-cache-dir": embed_cache_dir,
                                f"--emit {args.emit}: its directory": emit_dir})


#: Epoch milliseconds of 1973-03-03: a log whose every time is earlier was most likely written
#: in epoch seconds (1e11 seconds is the year 5138).
SECONDS_LOOK_LIKE_MS = 100_000_000_000


def _refuse_nothing_to_replay(what: str, flag: str, path: str, ds, check: str) -> NoReturn:
    """A file with no ``what`` left to replay (empty, or every row refused: the reasons are
    printed above) is refused in one line: a report of zeros would read as if each model had
    been measured."""
    skipped = sum(ds.skipped.values())
    held = f"{skipped} row(s) skipped, above" if skipped else "it holds no rows"
    raise SystemExit(f"recsys replay: no {what} to replay in {flag} {path} ({held}); {check}")


def _note(args: argparse.Namespace, text: str) -> None:
    """A caveat about the input: on stdout now, and in the report (``input_notes``)."""
    print(f"  note: {text}", flush=True)
    args.input_notes.append(text)


def run_replay(args: argparse.Namespace) -> int:
    ks = _parse_ks(args.k, args.protocol, args.task)
    if args.task == "search" and ks[-1] > 1_000:  # the engine answers a search with RECSYS_SEARCH_K items, at most 1,000
        raise SystemExit(f"recsys replay: --k {args.k}: a search is answered with at most 1000 items; give cut-offs up to 1000")
    names = _parse_models(args.models)
    _check_args(args)
    if args.shards > 1 and not any(n.startswith("full-system") for n in names):
        raise SystemExit(f"recsys replay: --shards {args.shards} splits the full system's replay, and --models "
                         f"{args.models!r} names no full-system model; leave --shards out or add full-system")

    from recsys.datasets import load_dataset

    mapping = dict(m.split("=", 1) for m in args.map) if args.map else None
    if args.task == "search" and args.query_log:  # issue 13: a real search log, not an event log
        from recsys.search import replay as search_replay
        from recsys.search.querylog import load_query_log

        try:
            ds, targets = load_query_log(args.query_log, mapping, args.catalog, limit=args.limit, progress=True)
        except (ValueError, OSError) as exc:  # a wrong file, header or mapping: the loader names it
            raise SystemExit(f"recsys replay: cannot read --query-log {args.query_log}: {exc}") from None
        for reason, n in sorted(ds.skipped.items()):
            print(f"  skipped {n} row(s): {reason}", flush=True)
        for example in ds.examples[:5]:  # which rows, as for an event log
            print(f"    e.g. {example}", flush=True)
        print(f"query log: {len(ds.events)} events, {len(targets)} searches with an engaged item, "
              f"{len(ds.catalog)} items", flush=True)
        args.input_notes = []
        if args.catalog and (absent := search_replay.engaged_not_in_catalog(ds, targets)):
            # until 2026-12-07 these were misses like any other, unsaid (then, until later that day, said here only)
            _note(args, f"{absent} of {len(targets)} scored searches engaged an item --catalog {args.catalog} lacks: it "
                        f"is admitted at its engagement, after the search, so no model can rank it (a miss for each)")
        if not ds.events:
            _refuse_nothing_to_replay("search", "--query-log", args.query_log, ds, "check the file and its --map FIELD=COLUMN")
        if not targets:
            raise SystemExit(f"recsys replay: no search in --query-log {args.query_log} has an engaged item to score "
                             f"({len(ds.events)} searches); map the item and its time with --map item_id=COLUMN "
                             f"--map ts=COLUMN")
        search_replay.run_query_log(args, ds, targets, settings_or_fail("replay").replace(
            unknown_items="admit", state_ttl_days=36_500.0, state_dir=args.state_dir or "var/replay-state", recovery_dir=None,
            **({"embed_cache_dir": args.embed_cache_dir} if args.embed_cache_dir else {})),
            "recsys replay " + " ".join(shlex.quote(a) for a in sys.argv[2:]), ks)
        return 0
    command = "recsys replay " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else "recsys replay"

    t0 = time.perf_counter()
    try:
        ds = load_dataset(args.format, args.events, args.catalog, mapping=mapping, limit=args.limit, progress=True)
    except (ValueError, OSError) as exc:  # a wrong file, header or mapping: the adapters name it
        raise SystemExit(f"recsys replay: cannot read --events {args.events} as --format {args.format}: {exc}") from None
    stats = ds.stats()
    print(f"loaded {ds.name}: {stats['events']} events, {stats['users']} users, {stats['items']} items, "
          f"{len(ds.catalog)} catalog items in {time.perf_counter() - t0:.1f}s", flush=True)
    for reason, n in sorted(ds.skipped.items()):
        print(f"  skipped {n} row(s): {reason}", flush=True)
    for example in ds.examples[:5]:
        print(f"    e.g. {example}", flush=True)
    if not ds.events:
        _refuse_nothing_to_replay("event", "--events", args.events, ds, f"check the file, --format {args.format}"
                                  + (" and --map" if args.format == "csv" else "") + (" and --limit" if args.limit else ""))
    if args.catalog and not ds.catalog:  # every line refused: a wrong file, or a wrong --format for it
        _refuse_nothing_to_replay("catalog item", "--catalog", args.catalog, ds,
                                  "it should hold JSONL items with item_id and title (or, with --format csv, a CSV with "
                                  "those columns)")
    # said on stdout and in report.md and metrics.json ("input_notes"; until 2026-12-07 on stdout only)
    args.input_notes = []
    if (latest := max(e.ts for e in ds.events)) < SECONDS_LOOK_LIKE_MS:
        _note(args, f"every event time is before 1973-03-03 (the latest, {latest}, read as epoch milliseconds); if "
                    f"the log's times are epoch seconds, every decay and time window runs 1,000 times too slow: "
                    + ("--map ts_unit=s" if args.format == "csv" else "give milliseconds"))
    repeats, pair = ds.repeated_events()
    if repeats and pair:  # until 2026-12-07 replayed and scored twice without a word (the query log skips its repeats)
        _note(args, f"{repeats} event(s) repeat an earlier one exactly (shopper, item, type, time and every other "
                    f"field; e.g. {pair[0]} repeats {pair[1]}): each is replayed and scored as it comes, as a log's "
                    f"genuine repeats should be (two of one item in an order, a double view in one second); if an "
                    f"export wrote rows twice, drop them from the file")
    if lacking := ds.items_not_in_catalog():
        _note(args, f"{len(lacking)} item(s) the events name are not in the catalog (e.g. {lacking[0]!r}): the full "
                    f"system admits them as it meets them, titled by their id, as RECSYS_UNKNOWN_ITEMS=admit does "
                    f"live; the content baseline has no vector for them")

    # heavy imports (torch via the engine) only once the arguments and the data are good
    from dataflows.live import settle_heap
    from dataflows.replay import replay_full_system
    from recsys.backtest.protocols import PrequentialScorer, leave_last_out, prequential
    from recsys.backtest.report import write_report
    from recsys.backtest.system import FullSystem
    from recsys.shard.step import Shard
    from recsys.signals.compile_kernels import compile_kernels_announced

    settings = settings_or_fail("replay").replace(
        unknown_items="admit",
        # top_k stays the live list length: the system ranks, shows and learns at that depth
        # whatever depth the backtest scores (deeper lists are padded, never re-ranked)
        # a backtest compares with baselines that never forget; the live TTL (a memory bound)
        # would reset users idle for months in logs that span months, and skew the comparison
        state_ttl_days=36_500.0,
        state_dir=args.state_dir or "var/replay-state",
        recovery_dir=None,
        **({"embed_cache_dir": args.embed_cache_dir} if args.embed_cache_dir else {}),
    )
    repeat_items = {c.item_id for c in ds.catalog if c.repeat_purchase}
    compile_kernels_announced()  # on a machine whose cache lacks them, not inside the measured replay
    if args.task == "search":  # issue 13
        from recsys.search import replay as search_replay

        try:
            search_replay.run(args, ds, settings, command, ks)
        except search_replay.NothingToScore as exc:
            raise SystemExit(f"recsys replay: {exc}; no report written") from None
        return 0
    if args.models in ("all", "all+sasrec") and not repeat_items:
        names = [n for n in names if n != "most_bought"]  # nothing can be bought again here

    if args.shards < 1 or (args.shards > 1 and args.protocol != "prequential"):
        raise SystemExit("recsys replay: --shards N needs N >= 1, and N > 1 only with --protocol prequential")

    share = args.share if args.share is not None else (args.shards > 1 and args.protocol == "prequential" and not args.emit)

    trainer = share and (args.trainer if args.trainer is not None else settings.model_trainer)

    def open_engine(evaluate: bool, shard: int = 0, variant: str = "full-system", role: str = "shard") -> Shard:
        # on disk, each engine its own directory: an ablation and a trainer run beside the full system
        own = os.path.join(settings.state_dir, variant.replace("/", "-") + ("-trainer" if role == "trainer" else ""))
        shard_settings = settings.replace(shards=args.shards, shard=shard, state_dir=own).for_shard()
        if share and variant == "full-system":  # the trainer's engine trains the shared models itself
            shard_settings = shard_settings.replace(share_signals=True, model_trainer=trainer and role == "shard")
        if variant == "full-system/no-head":
            shard_settings = shard_settings.replace(head_enabled=False)
        elif variant == "full-system/no-reranker":
            shard_settings = shard_settings.replace(rerank_enabled=False)
        engine = Shard.open(shard_settings, evaluate=evaluate, in_memory=args.state_dir is None, emit=bool(args.emit))
        engine.eval_k = max(ks)
        engine.upsert_catalog(ds.catalog, progress=True)
        return engine

    # evaluate mode in both protocols: leave-last-out training then ranks before each batch
    # as the live flow does, so the re-ranker learns (its scores are simply not used there)
    engine = open_engine(evaluate=True)
    settle_heap()
    baselines = build_baselines(
        names, engine, repeat_items, args.seed, len(ds.catalog),
        retrain_every_h=args.retrain_every if args.protocol == "prequential" else None,
        cache_key=f"{ds.name}-{args.protocol}-{args.limit or 'all'}-{len(ds.events)}-seed{args.seed}",
    )
    # coverage's denominator: every item the replay can show, a partial --catalog's and the events'
    # (each once: a catalog file may name an item twice)
    catalog_size = len({c.item_id for c in ds.catalog} | {e.item_id for e in ds.events if e.item_id is not None}) or None
    freeze_after = int(args.warmup_share * len(ds.events))

    def ablation(variant: str) -> dict:
        """One ablation row, on an engine of its own (same scoring code as the full system)."""
        variant_engine = open_engine(evaluate=args.protocol != "prequential", variant=variant)
        model = FullSystem(variant_engine, batch_size=args.batch_size, name=variant,
                            freeze_after=freeze_after if variant == "full-system/frozen" else None)
        try:
            if args.protocol == "prequential":
                # the plain loop over FullSystem scores exactly as the Bytewax replay does
                # (tests/test_replay.py), one engine step per batch
                return prequential([model], ds.events, ks=ks, target=args.target, batch_size=args.batch_size,
                                   catalog_size=catalog_size, dataset=ds.name)
            return leave_last_out([model], ds.events, ks=ks, exclude_history=not args.include_history,
                                  catalog_size=catalog_size, dataset=ds.name)
        finally:
            variant_engine.close()

    if args.protocol == "prequential":
        result = prequential(baselines, ds.events, ks=ks, target=args.target, batch_size=args.batch_size,
                             catalog_size=catalog_size, dataset=ds.name) if baselines else None
        if "full-system" in names:
            scorer = PrequentialScorer(["full-system"], ks, target=args.target, n_events_hint=ds.events)
            start = time.perf_counter()
            emitted = open(args.emit, "wb") if args.emit else None
            try:
                counts: dict[str, Any] = {}
                phases: Counter = Counter()  # the engines' seconds per phase, summed
                if share:
                    counts = _replay_shared(ds.events, args, engine, open_engine, scorer, trainer=trainer)
                    phases = counts.pop("phases")
                for shard, (shard_engine, events) in enumerate(() if share else _shards(ds.events, args.shards, engine, open_engine)):
                    if args.shards > 1:
                        print(f"shard {shard} of {args.shards}: {len(events)} events", flush=True)
                    done = replay_full_system(
                        shard_engine, events, scorer, batch_size=args.batch_size,
                        on_recommendations=(lambda items: emitted.writelines(v + b"\n" for _, v in items)) if emitted else None,
                        stop_on_signals=True,  # Ctrl-C: "interrupted" in one line, not Bytewax's panic
                    )
                    counts = {k: counts.get(k, 0) + v for k, v in done.items()}
                    phases.update(shard_engine.phase_totals)
                    if shard_engine is not engine:
                        shard_engine.close()
            finally:
                if emitted is not None:
                    emitted.close()
            seconds = time.perf_counter() - start

            class _Named:
                name = "full-system"

            full = scorer.result([_Named()], {"full-system": {"replay_s": seconds}}, n_events=len(ds.events),
                                 catalog_size=catalog_size, seconds=seconds, batch_size=args.batch_size, dataset=ds.name)
            full["full_system"] = {"events_per_s": len(ds.events) / seconds, "seconds": seconds, "shards": args.shards,
                                   "share": share, **counts}
            if phases:  # where the replay's time went: the engine's phases, the scoring, the rest
                spent = {phase: s for phase, s in phases.items() if s > 0}
                if "scoring_s" in counts:  # the shared replay scores inside its loop: in "other"
                    spent["scoring (metrics)"] = counts["scoring_s"]
                spent["other (source, dataflow)"] = max(seconds - sum(spent.values()), 0.0)
                full["full_system"]["phases_s"] = spent
            result = _merge(result, full)
    else:
        models = baselines + ([FullSystem(engine)] if "full-system" in names else [])
        result = leave_last_out(models, ds.events, ks=ks, exclude_history=not args.include_history,
                                catalog_size=catalog_size, dataset=ds.name) if models else None
    for variant in (n for n in names if n in ABLATIONS):
        result = _merge(result, ablation(variant))
    if result is None:
        raise SystemExit("recsys replay: no model to run")
    result["ablation"] = {"warmup_share": args.warmup_share, "freeze_after_events": freeze_after,
                          "frozen": "head, re-ranker, co-visitation, transitions and popularity stop learning "
                                    "after the warm-up; user state and session memory go on"}
    from recsys.backtest.bootstrap import margin_ci, margins

    primary = [f"{m}@{k}" for k in ks for m in (("hr", "ndcg") if args.protocol == "prequential" else ("recall", "ndcg"))]
    result["margins"] = margins(result, primary, n_boot=1000, seed=args.seed)
    # what each part adds: the full system over each of its ablations, same intervals
    result["ablation_margins"] = {
        variant: {metric: margin_ci(result["_per_user"], "full-system", variant, metric, n_boot=1000, seed=args.seed)
                  for metric in primary}
        for variant in ABLATIONS if variant in names and "full-system" in names
    }
    result["dataset"] = ds.name
    result["dataset_stats"] = {k: v for k, v in stats.items() if k not in ("examples",)}
    result["_skip_examples"] = stats["examples"]  # for report.md, beside dataset_stats' counts
    result["input_notes"] = args.input_notes
    result["seed"] = args.seed
    result["protocol"] = args.protocol
    engine.close()
    if not result.get("scored"):  # a report of zeros would read as if every model had been measured and failed
        if args.protocol == "leave-last-out":
            why = "no user has an event before their last one, which leave-last-out holds out"
        elif args.target == "next_purchase":
            why = ("no add-to-cart or purchase event to score with --target next_purchase"
                   + (" (every row took the default type: map the type column, --map type=COLUMN)"
                      if args.format == "csv" and not (mapping or {}).get("type") else ""))
        else:
            why = "no user has an event after their first one"
        raise SystemExit(f"recsys replay: nothing to score in --events {args.events}: {why}; no report written")
    paths = write_report(result, args.out, title=f"Backtest: {ds.name} ({args.protocol})", command=command, dataset=ds.name)
    print(Path(args.out, "report.md").read_text(), flush=True)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0


def _shards(events: list, n: int, engine, open_engine):
    """``(engine, events)`` per shard: one shard is everything on ``engine``; with ``n`` > 1,
    users go where Kafka's default partitioner would put their key among ``n`` partitions
    (the live split), each shard on a fresh engine of its own. All shards feed one scorer, one
    shard after the other: hit rates and NDCG are per event, so the totals are exact; the
    new-item / new-user slices and the time series are not comparable with a one-shard run."""
    if n == 1:
        yield engine, events
        return
    from dataflows.kafka_io import partition_for_key

    owner = {u: partition_for_key(u.encode(), n) for u in {e.user_id for e in events}}
    for shard in range(n):
        yield (engine if shard == 0 else open_engine(True, shard)), [e for e in events if owner[e.user_id] == shard]


def _replay_shared(events: list, args, engine, open_engine, scorer, *, trainer: bool = False) -> dict:
    """The full system as ``--shards`` shards sharing the global signals
    (:func:`recsys.backtest.shards.replay_shared_shards`); prints the exchange's cost figures
    and each shard's signal checksum (all equal: every shard applied the same log). With
    ``trainer``, one more engine is the model trainer (the train/serve split)."""
    from dataflows.kafka_io import partition_for_key
    from recsys.backtest.shards import replay_shared_shards
    from tqdm.auto import tqdm

    n = args.shards
    shards = [engine] + [open_engine(True, s) for s in range(1, n)]
    trainer_engine = open_engine(True, 0, role="trainer") if trainer else None
    publish_every = args.trainer_publish_messages or engine.settings.trainer_publish_messages
    bar = tqdm(total=len(events), desc=f"replay ({n} shards, shared{', trainer' if trainer else ''})", unit="ev",
               mininterval=1.0)
    try:
        stats = replay_shared_shards(shards, events, lambda u: partition_for_key(u.encode(), n), scorer,
                                     batch_size=args.batch_size, lag=args.exchange_lag, on_round=bar.update,
                                     trainer=trainer_engine, publish_every=publish_every,
                                     publish_lag=args.trainer_publish_lag)
        bar.close()
        sums = [shard.signal_checksum() for shard in shards]
        stats["phases"] = Counter()
        for shard in shards:
            stats["phases"].update(shard.phase_totals)
    finally:
        for shard in shards[1:]:
            shard.close()
        if trainer_engine is not None:
            trainer_engine.close()
    if trainer:
        stats.update({"trainer_publish_messages": publish_every, "trainer_publish_lag_rounds": args.trainer_publish_lag})
        print(f"trainer: {stats['model_publications']} snapshots published (every {publish_every} messages, served "
              f"{args.trainer_publish_lag} round(s) later), {stats['trainer_learn_cpu_s']:.1f} s CPU learning; "
              f"shards loaded {stats.get('model_loads', 0)} in {stats.get('model_load_cpu_s', 0.0):.1f} s CPU; "
              f"shards serve {stats['model_versions']}, trainer at {stats['trainer_version']}", flush=True)
    remote_ops = stats["applied_ops"] * (n - 1) / n if n else 0
    stats.update({
        "exchange_lag_rounds": args.exchange_lag,
        "exchange_bytes_per_event": stats["exchange_bytes"] / max(len(events), 1),
        # every shard applies every op (its own too): the same code and cost per op
        "apply_us_per_op": 1e6 * stats["apply_cpu_s"] / max(stats["applied_ops"], 1),
        "remote_ops": remote_ops,
        "signal_checksums": sums,
    })
    print(f"exchange: {stats['exchange_messages']} messages, {stats['exchange_bytes_per_event']:.1f} bytes/event, "
          f"{stats['apply_us_per_op']:.1f} us CPU per applied op, lag {args.exchange_lag} round(s)", flush=True)
    for s, digest in enumerate(sums):
        print(f"shard {s}: global signals sha256 {digest}", flush=True)
    if len(set(sums)) != 1:
        raise SystemExit("recsys replay: the shards' global signals differ after applying the same log (a bug)")
    return stats


def _merge(base: dict | None, extra: dict) -> dict:
    """Add the full system's prequential result to the baselines' (same keys, per model)."""
    if base is None:
        return extra
    for key in ("models", "per_type", "slices", "series", "timing", "fallback", "_per_user"):
        base.setdefault(key, {}).update(extra.get(key, {}))
    if "full_system" in extra:
        base["full_system"] = extra["full_system"]
    base["seconds"] = base.get("seconds", 0.0) + extra["seconds"]
    return base
