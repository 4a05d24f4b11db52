"""End-to-end throughput and latency of the live dataflow on the local broker; prints figures, asserts nothing.

    .venv/bin/python benchmarks/throughput.py [--mode both|max|latency|longrun|sharing] [--events 100000]
        [--latency-events 30000] [--rate 1000] [--new-items 20] [--catalog-items 10000] [--partitions 2]
        [--users 20000] [--out results.json] [--profile DIR] [--flow-args "--poll-max-records 500"]
        [--search-share 0.2 [--distinct-queries N [--zipf-s 1.0]]]

Everything runs on this machine: the real Kafka-protocol broker (Tansu, :class:`LocalBroker`),
the real flow as a child process (``python -m recsys_cli run``), synthetic data
(:mod:`recsys.synthetic`: ``generate_catalog`` / ``generate_events``, never a quality claim).

0. setup: a ``--catalog-items`` catalog written as JSONL; its texts are embedded here, in the
   benchmark process, so the flow finds every vector in the cache and never loads the model
   (the time of that first embedding, and whether the cache was cold, is printed).
1. ``max`` (sustained throughput): ``--events`` events are produced into ``events`` FIRST,
   then ``recsys run --stop-at-end`` starts; events/s = events / (flow prints "ready" ->
   flow process exits). The recommendations topic is counted afterwards.
2. ``latency``: the flow starts first (running forever), a small warm-up stream is sent and
   awaited, then ``--latency-events`` events are offered at ``--rate`` events/s; once
   recommendations stop arriving the flow gets SIGINT. Latency = broker append timestamp of
   the trigger event (the producer's CreateTime, set at ``send``) -> the recommendation's
   ``emitted_at``, as :func:`recsys_cli.demo.summarize` computes it. Also reported: the
   per-event latency (every event -> the first recommendation of its user emitted after it
   was applied), which also counts the events that a coalesced recommendation answers; the
   seconds of the run with the longest latencies (a tail spread over the run is the batches'
   usual cost, one bad second is a stall; ``latency_ms_by_second`` in the JSON); and this
   process's own garbage-collector pauses while it offered the stream (:class:`OwnPauses`:
   its heap is frozen out of the collector's view and the collector is off meanwhile, since a
   240 ms collection of this process's heap once held its producer back and was counted as the
   flow's latency).
   Searches (issue 13): with ``--search-share`` that share of the offered events are searches,
   timed from their append to their search result's ``emitted_at`` as well; their queries are
   the default stream's (two title words: 144 distinct, so nearly every query is cached after
   the first second), or with ``--distinct-queries N`` drawn from N queries by a Zipf law of
   exponent ``--zipf-s`` (a shop's long tail, where many searches are a query's first and the
   query model runs in the batch's path); the share of first queries is printed.
   New items: during the latency run ``--new-items`` (20) brand-new catalog items are
   published to ``catalog``, each a near-twin of a known item; a shopper never seen before
   clicks the known twin right after (and again 0.1, 0.25, 0.5 s later: the two topics are
   read independently, so a click can overtake the catalog record). Reported: the time from
   the new item's catalog append to the first recommendation (anyone's) listing it. And from
   the flow's metrics endpoint: how often the events partitions went more than 100 / 500 ms
   without a poll while the stream was offered (time the flow did not read them).
3. ``longrun`` (the state bound, issue 9): ``--longrun-events`` (1M) events over
   ``--longrun-users`` (500k) users, stream time advancing ``--longrun-gap-ms`` per event, with
   a short ``--longrun-ttl-h`` (1 h of stream time), fed in batches of ``--longrun-batch`` to the
   very ``Shard.process`` step the flow runs, in this process, on RocksDB (no broker: Kafka
   holds no state of ours, and producing 1M events would only make the run longer). Every
   ``--report-every`` (100k) events it prints the users and outboxes in state, the on-disk size
   of the state directory and this process's RSS; both must level off once the sweep keeps pace.
   Events are generated chunk by chunk, so the RSS is the engine's, not the input's.
3b. ``sharing`` (issue 11): ``--rounds`` pairs of max-like runs with ``--share-signals`` off and
   on (order swapped every round; ``--sharing-trainer``: a third, on with ``--model-trainer``), each until drained instead of ``--stop-at-end`` (a sharing
   shard would stop its exchange log at the end it saw at start); events/s from "ready" to the
   last output, events per CPU-second of the flow, and the shards' checksums (see
   :func:`run_drained`).
4. peak RSS of the flow process: ``VmHWM`` (the kernel's high-water mark of resident memory)
   sampled from ``/proc/<pid>/status`` every 50 ms until the process exits; with
   ``--flow-args "--processes N"``, the sum of the peaks of the supervisor and its shards. (``ru_maxrss`` from
   ``wait4`` is not used: Linux carries the parent's peak across fork+exec into it, so it
   reports this benchmark process, which loaded the model, not the flow.)

The load average (``os.getloadavg``) is printed before and after each mode: the figures mean
little on a busy machine. JSON of all figures with ``--out``.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import gc
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

# this tree's code, whatever an editable install in the environment points at (a git worktree
# sharing another checkout's .venv would otherwise import and measure that checkout's code)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import orjson  # noqa: E402
from kafka.structs import TopicPartition  # noqa: E402

from dataflows.kafka_io import (
    KafkaClients,
    consume_all,
    default_topic_configs,
    default_topics,
    ensure_topics,
    produce_records,
)
from recsys.events import CatalogItem, Envelope, Event, encode
from recsys.items.embeddings import Embedder
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.store.kv import RocksKV
from recsys.synthetic import generate_catalog, generate_events, with_searches
from recsys_cli.demo import summarize
from recsys_cli.local_broker import LocalBroker

#: Seconds without a new recommendation after which the latency run counts as drained.
QUIET_S = 3.0
#: Warm-up events sent (and awaited) before the measured latency stream: the flow builds its
#: Kafka consumers only after "ready", and that one-off start-up is not per-event latency.
WARMUP_EVENTS = 200
#: When a new-item probe's shopper clicks, in seconds after the new item's catalog append.
PROBE_CLICKS_S = (0.0, 0.1, 0.25, 0.5)
#: How often /proc/<pid>/status is sampled for VmHWM / VmRSS.
RSS_SAMPLE_S = 0.05
#: Upper bound on reading a whole topic back at the end (100k records on a 2-core box: ~10 s).
CONSUME_TIMEOUT_S = 300.0


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- the flow process


class FlowProcess:
    """``python -m recsys_cli run`` as a child: its output, "ready" time, exit time, peak RSS.

    One waiter thread reaps the child (so the exit time is precise) and one samples its VmHWM;
    nothing else may wait on it.
    """

    def __init__(self, cmd: list[str], *, echo: bool = False) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}  # the flow runs this tree's code
        self.cmd = cmd
        self.echo = echo
        self.start_t = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        self.pid = self.proc.pid
        self.lines: deque[str] = deque(maxlen=200)
        self.ready_t: float | None = None
        self.ready_wall: float | None = None  # time.time() of the same moment: compared with emitted_at
        self.ready_line = ""
        self.stopped_line = ""
        self.exit_t: float | None = None
        self.returncode: int | None = None
        self.vm_hwm_kib = 0
        self.vm_rss_kib = 0
        self.cpu_ticks: dict[int, int] = {}  # pid -> utime + stime (clock ticks), last sampled
        self.trainer_pids: set[int] = set()
        self._ready = threading.Event()
        self._exited = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._wait, daemon=True).start()
        threading.Thread(target=self._sample, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self.echo:
                log("    flow: " + line)
            if self.ready_t is None and line.startswith("ready"):
                self.ready_t = time.perf_counter()
                self.ready_wall = time.time()
                self.ready_line = line
                self._ready.set()
            elif line.startswith("stopped:"):
                self.stopped_line = line

    def _wait(self) -> None:
        _, status = os.waitpid(self.pid, 0)
        self.exit_t = time.perf_counter()
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # so Popen never waits on a reaped pid
        self._exited.set()
        self._ready.set()  # wake a waiter for "ready" if it died first

    def _sample(self) -> None:
        # the flow process and, with --processes N, its shard processes: their peaks are summed
        peaks: dict[int, int] = {}
        while not self._exited.is_set():
            rss = 0
            for pid in [self.pid, *_children(self.pid)]:
                try:
                    # issue 11: the model trainer's CPU is also reported apart (looked at every sample: a
                    # child seen between fork and exec still shows the supervisor's command line)
                    if pid not in self.trainer_pids and b"dataflows.trainer" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        self.trainer_pids.add(pid)
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    self.cpu_ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
                    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if row.startswith("VmHWM:"):
                            peaks[pid] = max(peaks.get(pid, 0), int(row.split()[1]))
                        elif row.startswith("VmRSS:"):
                            rss += int(row.split()[1])
                except (OSError, ValueError, IndexError):  # gone, or a zombie without memory lines
                    pass
            self.vm_hwm_kib = max(self.vm_hwm_kib, sum(peaks.values()))
            self.vm_rss_kib = rss
            self._exited.wait(RSS_SAMPLE_S)

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        if not self._ready.wait(timeout_s):
            self.kill()
            raise SystemExit(f"the flow did not print 'ready' within {timeout_s:.0f} s; its output ends:\n{self.tail()}")
        if self.ready_t is None:
            raise SystemExit(f"the flow exited (status {self.returncode}) before 'ready'; its output ends:\n{self.tail()}")

    def wait_exit(self, timeout_s: float) -> bool:
        return self._exited.wait(timeout_s)

    def interrupt(self, timeout_s: float = 60.0) -> None:
        """SIGINT (Bytewax finishes the epoch and exits), then SIGKILL if it hangs; our child only."""
        if self.running:
            os.kill(self.pid, signal.SIGINT)
            if not self.wait_exit(timeout_s):
                self.kill()

    def kill(self) -> None:
        if self.running:
            os.kill(self.pid, signal.SIGKILL)
            self.wait_exit(10.0)

    def tail(self, n: int = 20) -> str:
        return "\n".join(list(self.lines)[-n:]) or "(no output)"

    def cpu_s(self, *, trainer: bool | None = None) -> float:
        """CPU seconds (user + system) of the flow and its shard processes, as last sampled
        (every ``RSS_SAMPLE_S``; a process's last 50 ms before it exits may be missed).
        ``trainer``: True, the model trainer's alone; False, everything but it; None: all."""
        ticks = [t for pid, t in self.cpu_ticks.items() if trainer is None or (pid in self.trainer_pids) == trainer]
        return sum(ticks) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        return round(self.vm_hwm_kib / 1024, 1)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def flow_command(bootstrap: str, workdir: Path, catalog_path: Path, cache_dir: str, *, stop_at_end: bool,
                 profile_to: Path | None, extra: list[str]) -> list[str]:
    py = [sys.executable]
    if profile_to is not None:
        py += ["-m", "cProfile", "-o", str(profile_to)]
    cmd = py + [
        "-m", "recsys_cli", "run",
        "--bootstrap-servers", bootstrap,
        "--state-dir", str(workdir / "state"),
        "--recovery-dir", str(workdir / "recovery"),
        "--catalog-file", str(catalog_path),
        "--embed-cache-dir", cache_dir,
    ]
    if stop_at_end:
        cmd.append("--stop-at-end")
    return cmd + extra


# --------------------------------------------------------------------------- setup


def write_catalog(items: list[CatalogItem], path: Path) -> None:
    with path.open("wb") as fh:
        for item in items:
            fh.write(encode(item) + b"\n")


def prewarm_embeddings(items: list[CatalogItem], cache_dir: str, settings: Settings) -> dict:
    """Embed every catalog text here so the flow only reads the cache; returns timing + cache stats."""
    embedder = Embedder(settings.model_name, cache_dir, batch_size=settings.embed_batch_size)
    t0 = time.perf_counter()
    embedder.embed([item.text for item in items], progress=True)
    took = time.perf_counter() - t0
    stats = dict(embedder.stats)
    embedder.close()
    return {"seconds": round(took, 2), "texts": len(items), "cache_dir": cache_dir, **stats,
            "cold_cache": stats["misses"] > 0}


def keyed(events: list[Event]):
    for ev in events:
        yield ev.user_id.encode(), encode(ev)


def start_broker(partitions: int, settings: Settings) -> tuple[LocalBroker, KafkaClients, Settings]:
    broker = LocalBroker().start()
    s = settings.replace(bootstrap_servers=broker.bootstrap)
    clients = KafkaClients(s)
    ensure_topics(clients, default_topics(s, partitions), configs=default_topic_configs(s))
    return broker, clients, s


# --------------------------------------------------------------------------- mode max


def run_max(args, items, catalog_path: Path, cache_dir: str, base: Settings, workroot: Path) -> dict:
    events = generate_events(args.events, items, n_users=args.users, seed=args.seed)
    load_before = loadavg()
    log(f"\n[max] {len(events)} events, {len(items)} items, {args.users} users, {args.partitions} partitions; "
        f"load average {load_before}")
    broker, clients, s = start_broker(args.partitions, base)
    try:
        t0 = time.perf_counter()
        n = produce_records(clients, s.events_topic, keyed(events))
        produce_s = time.perf_counter() - t0
        log(f"[max] produced {n} events in {produce_s:.1f} s ({n / produce_s:.0f}/s) before starting the flow")
        workdir = workroot / "max"
        profile_to = Path(args.profile) / "max.prof" if args.profile else None
        flow = FlowProcess(flow_command(broker.bootstrap, workdir, catalog_path, cache_dir, stop_at_end=True,
                                        profile_to=profile_to, extra=args.flow_args), echo=args.verbose)
        flow.wait_ready()
        startup_s = flow.ready_t - flow.start_t
        cpu_ready_s = flow.cpu_s()
        log(f"[max] flow ready after {startup_s:.1f} s: {flow.ready_line}")
        if not flow.wait_exit(args.max_wait_s):
            flow.interrupt()
            raise SystemExit(f"the flow did not finish {n} events within {args.max_wait_s:.0f} s; output:\n{flow.tail()}")
        run_s = flow.exit_t - flow.ready_t
        if flow.returncode != 0:
            raise SystemExit(f"the flow exited with status {flow.returncode}; its output ends:\n{flow.tail()}")
        cpu_s = flow.cpu_s() - cpu_ready_s  # ready -> exit (the last sample's ~50 ms may be missed)
        log(f"[max] flow exited after {run_s:.2f} s: {flow.stopped_line}")
        recs = consume_all(clients, s.recommendations_topic, timeout_s=CONSUME_TIMEOUT_S)
        dead = consume_all(clients, s.dead_letters_topic, timeout_s=CONSUME_TIMEOUT_S)
    finally:
        broker.stop()
    emitted = [orjson.loads(r.value)["emitted_at"] for r in recs]
    result = {
        "events": n,
        "catalog_items": len(items),
        "users": args.users,
        "partitions": args.partitions,
        "produce_s": round(produce_s, 2),
        "flow_startup_s": round(startup_s, 2),
        "ready_to_exit_s": round(run_s, 3),
        "events_per_s": round(n / run_s, 1),
        "flow_cpu_s": round(cpu_s, 1),  # ready -> exit, every thread of the flow process
        "events_per_cpu_s": round(n / max(cpu_s, 1e-9), 1),
        "recommendations": len(recs),
        "dead_letters": len(dead),
        "first_to_last_recommendation_s": round((max(emitted) - min(emitted)) / 1000, 3) if emitted else None,
        "flow_totals": flow.stopped_line,
        "peak_rss_mib": flow.peak_rss_mib(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    if profile_to is not None:
        result["profile"] = str(profile_to)
    log(f"[max] {result['events_per_s']:.0f} events/s ({n} events in {run_s:.2f} s, ready -> exit; "
        f"flow CPU {cpu_s:.1f} s, {result['events_per_cpu_s']:.0f} events per CPU-second); "
        f"{len(recs)} recommendations, {len(dead)} dead letters; peak RSS {result['peak_rss_mib']} MiB; "
        f"load average {result['loadavg_after']}")
    return result


# --------------------------------------------------------------------------- mode sharing (issue 11)

#: The checksum line each sharing shard prints at stop (``recsys run``).
_CHECKSUM_LINE = re.compile(r"\[shard (\d+)\] global signals: sha256=([0-9a-f]{64}) at exchange position (-?\d+)")


def _log_end(clients: KafkaClients, topic: str, partitions: int) -> int:
    """The sum of ``topic``'s log-end offsets (cheap: no record is read)."""
    consumer = clients.consumer()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return sum(consumer.end_offsets(tps).values())
    finally:
        consumer.close()


def run_drained(args, items, catalog_path: Path, cache_dir: str, base: Settings, workroot: Path, *,
                share: bool, tag: str, trainer: bool = False) -> dict:
    """Like ``max`` (the events produced first, then the flow), but the flow runs until stopped
    and the clock stops at the last output it wrote: with sharing on, a shard's ``--stop-at-end``
    would end its exchange log at the end it saw at start (empty), so the shards would not apply
    each other's operations at all. Both settings are measured this same way. Drained: every
    user's last event answered (the recommendations are read as they come) and, with sharing,
    the exchange log unchanged for ``QUIET_S``; then SIGINT. events/s = events / (flow
    "ready" -> the last recommendation's ``emitted_at`` or, with sharing, the last exchange
    record's append, whichever is later). With sharing the shards' checksums are compared.
    ``trainer``: sharing with the train/serve split (``--model-trainer``): the trainer process
    runs beside the shards and its CPU counts in the flow's; its publication lag does not
    (the clock stops at the shards' last output)."""
    events = generate_events(args.events, items, n_users=args.users, seed=args.seed)
    load_before = loadavg()
    what = ("sharing ON + trainer" if trainer else "sharing ON") if share else "sharing off"
    log(f"\n[{tag}] {what}: {len(events)} events, {len(items)} items, {args.users} users, {args.partitions} partitions; "
        f"load average {load_before}")
    broker, clients, s = start_broker(args.partitions, base)
    exchange_topic = s.exchange_topic
    extra = [*args.flow_args, *(["--share-signals", "--exchange-topic", exchange_topic] if share else []),
             *(["--model-trainer", "--exchange-snapshot-dir", str(workroot / tag / "exchange-snapshots")] if trainer else [])]
    try:
        if share:
            ensure_topics(clients, {exchange_topic: 1})
        n = produce_records(clients, s.events_topic, keyed(events))
        workdir = workroot / tag
        flow = FlowProcess(flow_command(broker.bootstrap, workdir, catalog_path, cache_dir, stop_at_end=False,
                                        profile_to=None, extra=extra), echo=args.verbose)
        try:
            flow.wait_ready()
            startup_s = flow.ready_t - flow.start_t
            time.sleep(2 * RSS_SAMPLE_S)
            cpu_ready_s, trainer_ready_s = flow.cpu_s(), flow.cpu_s(trainer=True)
            log(f"[{tag}] flow ready after {startup_s:.1f} s: {flow.ready_line}")
            deadline = time.perf_counter() + args.max_wait_s
            waiting = {(e.user_id, e.event_id) for e in {e.user_id: e for e in events}.values()}
            recs_seen = clients.consumer()
            recs_seen.assign([TopicPartition(s.recommendations_topic, p) for p in range(args.partitions)])
            recs_seen.seek_to_beginning()
            last, still_since = None, time.perf_counter()
            try:
                while True:
                    if not flow.running:
                        raise SystemExit(f"the flow exited (status {flow.returncode}); its output ends:\n{flow.tail()}")
                    if time.perf_counter() > deadline:
                        raise SystemExit(f"not drained within {args.max_wait_s:.0f} s ({len(waiting)} users' last "
                                         f"events unanswered); output:\n{flow.tail()}")
                    for records in recs_seen.poll(timeout_ms=200).values():
                        for r in records:
                            rec = orjson.loads(r.value)
                            waiting.discard((rec["user_id"], rec["trigger_event_id"]))
                    if waiting:
                        continue
                    now = _log_end(clients, exchange_topic, 1) if share else 0
                    if now != last:
                        last, still_since = now, time.perf_counter()
                    elif time.perf_counter() - still_since > QUIET_S:
                        break
                    time.sleep(0.2)
            finally:
                recs_seen.close()
            cpu_s = flow.cpu_s() - cpu_ready_s  # ready -> drained: the work's CPU, not start-up's or the stop's
            trainer_cpu_s = flow.cpu_s(trainer=True) - trainer_ready_s  # (its start-up may overlap the window)
        finally:
            flow.interrupt()
        log(f"[{tag}] {flow.stopped_line}")
        recs = consume_all(clients, s.recommendations_topic, timeout_s=CONSUME_TIMEOUT_S)
        exchange = consume_all(clients, exchange_topic, timeout_s=CONSUME_TIMEOUT_S) if share else []
        dead = consume_all(clients, s.dead_letters_topic, timeout_s=CONSUME_TIMEOUT_S)
    finally:
        broker.stop()
    triggers = set()
    last_emitted = 0
    for r in recs:
        rec = orjson.loads(r.value)
        triggers.add((rec["user_id"], rec["trigger_event_id"]))
        last_emitted = max(last_emitted, rec["emitted_at"])
    unanswered = len({(e.user_id, e.event_id) for e in {e.user_id: e for e in events}.values()} - triggers)
    end_ms = max([last_emitted, *(env.timestamp_ms for env in exchange)])
    run_s = end_ms / 1000 - flow.ready_wall
    sums = sorted((int(a), b, int(c)) for a, b, c in _CHECKSUM_LINE.findall("\n".join(flow.lines)))
    result = {
        "share_signals": share,
        "model_trainer": trainer,
        "events": n,
        "flow_startup_s": round(startup_s, 2),
        "ready_to_drained_s": round(run_s, 3),
        "events_per_s": round(n / run_s, 1),
        "flow_cpu_s": round(cpu_s, 1),  # the supervisor and its shards, ready -> drained
        "events_per_cpu_s": round(n / cpu_s, 1),
        "trainer_cpu_s": round(trainer_cpu_s, 1),  # included in flow_cpu_s
        "events_per_cpu_s_without_trainer": round(n / max(cpu_s - trainer_cpu_s, 1e-9), 1),
        "recommendations": len(recs),
        "users_last_event_unanswered": unanswered,
        "dead_letters": len(dead),
        "exchange_records": len(exchange),
        "exchange_bytes_per_event": round(sum(len(env.value) for env in exchange) / max(n, 1), 1),
        "checksums": [{"shard": a, "sha256": b, "position": c} for a, b, c in sums],
        "checksums_equal": bool(sums) and len({(b, c) for _, b, c in sums}) == 1 and sums[0][2] == len(exchange) - 1,
        "flow_totals": flow.stopped_line,
        "peak_rss_mib": flow.peak_rss_mib(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    if unanswered:
        raise SystemExit(f"[{tag}] {unanswered} users' last events were not answered: not drained; {result}")
    line = (f"[{tag}] {what}: {result['events_per_s']:.0f} events/s ({n} events in {run_s:.2f} s, ready -> drained); "
            f"flow CPU {cpu_s:.1f} s ({n / cpu_s:.0f} events per CPU-second"
            f"{f'; the trainer {trainer_cpu_s:.1f} s of it' if trainer else ''}); "
            f"{len(recs)} recommendations, {len(dead)} dead letters; peak RSS {result['peak_rss_mib']} MiB")
    if share:
        line += (f"; exchange {len(exchange)} records, {result['exchange_bytes_per_event']} bytes/event; shards' "
                 f"checksums {'EQUAL' if result['checksums_equal'] else 'DIFFER'} {[(a, b[:12], c) for a, b, c in sums]}")
    log(line + f"; load average {result['loadavg_after']}")
    return result


def run_sharing(args, items, catalog_path: Path, cache_dir: str, base: Settings, workroot: Path) -> dict:
    """``--rounds`` pairs of :func:`run_drained`, sharing off and on, the order swapped every
    round (so a load that rises or falls over the runs weighs on both alike)."""
    keys = ["off", "on", *(["trainer"] if args.sharing_trainer else [])]
    runs: dict[str, list[dict]] = {key: [] for key in keys}
    for r in range(args.rounds):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            runs[key].append(run_drained(args, items, catalog_path, cache_dir, base, workroot, share=key != "off",
                                         trainer=key == "trainer", tag=f"sharing-{key}-{r + 1}"))
    med = {key: float(np.median([x["events_per_s"] for x in runs[key]])) for key in keys}
    cpu = {key: float(np.median([x["events_per_cpu_s"] for x in runs[key]])) for key in keys}
    out = {"off": runs["off"], "on": runs["on"], "median_events_per_s_off": med["off"], "median_events_per_s_on": med["on"],
           "on_over_off": round(med["on"] / med["off"], 3), "median_events_per_cpu_s_off": cpu["off"],
           "median_events_per_cpu_s_on": cpu["on"],
           "checksums_equal": all(x["checksums_equal"] for key in keys[1:] for x in runs[key])}
    if args.sharing_trainer:  # issue 11's train/serve split beside them
        out.update({"trainer": runs["trainer"], "median_events_per_s_trainer": med["trainer"],
                    "trainer_over_off": round(med["trainer"] / med["off"], 3),
                    "trainer_over_on": round(med["trainer"] / med["on"], 3),
                    "median_events_per_cpu_s_trainer": cpu["trainer"],
                    "median_events_per_cpu_s_trainer_shards_only": float(np.median(
                        [x["events_per_cpu_s_without_trainer"] for x in runs["trainer"]]))})
    return out


# --------------------------------------------------------------------------- mode latency


#: Words no synthetic item uses, so a probe pair is each other's nearest neighbour.
_PROBE_WORDS = ("zephyr", "quartz", "lantern", "origami", "walnut", "saffron", "glacier", "mosaic", "cobalt",
                "harbor", "meadow", "velvet", "ember", "prism", "tundra", "juniper", "falcon", "marble")


def probe_pairs(n: int) -> list[tuple[CatalogItem, CatalogItem]]:
    """``n`` pairs (known item, new item) of near-identical, unusual texts. The known items go
    into the start-up catalog; the new ones are published during the latency run, their texts
    made unique to this run so the embedding cache never has them."""
    run = f"r{time.time_ns() % 10**9}"
    pairs = []
    for j in range(n):
        w = [_PROBE_WORDS[(j * 7 + k * 5) % len(_PROBE_WORDS)] for k in range(3)]
        stem = f"{w[0]} {w[1]} {w[2]} set {j}"
        pairs.append((CatalogItem(item_id=f"probe-known-{j}", title=stem, category="probe"),
                      CatalogItem(item_id=f"probe-new-{j}", title=f"{stem} deluxe {run}", category="probe")))
    return pairs


def new_item_probes(pairs: list[tuple[CatalogItem, CatalogItem]], seed: int) -> list[tuple[CatalogItem, Event]]:
    """For each pair: the new item, and a shopper never seen before who clicks the known item
    right after the new item's catalog event, so the content source should offer the new one.
    What is timed is the whole path: the catalog record is consumed, its (new) text embedded
    by the loaded model, the index updated, the shopper's event ranked, the result emitted."""
    return [
        (new, Event(event_id=f"probe-trigger-{seed}-{j}", type="click", user_id=f"newcomer-{seed}-{j}",
                    item_id=known.item_id, ts=int(time.time() * 1000)))
        for j, (known, new) in enumerate(pairs)
    ]


def send_probes(clients: KafkaClients, s: Settings, probes, duration_s: float) -> threading.Thread:
    """Send the probes evenly over ``duration_s`` from a thread (alongside the offered stream)."""

    def run() -> None:
        producer = clients.producer()
        try:
            for j, (item, trigger) in enumerate(probes):
                time.sleep(duration_s / (len(probes) + 1))
                producer.send(s.catalog_topic, value=encode(item), key=item.item_id.encode())
                producer.flush()  # the catalog record is appended before the events that need it
                appended = time.monotonic()
                # Catalog and events are separate topics, so the flow may read the click before
                # the catalog record; the shopper clicks again a little later, as shoppers do.
                for k, delay in enumerate(PROBE_CLICKS_S):
                    time.sleep(max(0.0, appended + delay - time.monotonic()))
                    click = dataclasses.replace(trigger, event_id=f"{trigger.event_id}-{k}", ts=int(time.time() * 1000))
                    producer.send(s.events_topic, value=encode(click), key=click.user_id.encode())
                    producer.flush()
        finally:
            producer.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def import_items(n: int) -> list[CatalogItem]:
    """``n`` brand-new items for a bulk catalog import (``--import-items``): texts unique to this
    run, so each is embedded by the flow's model, as a shop's new range would be."""
    run = f"r{time.time_ns() % 10**9}"
    words = _PROBE_WORDS
    return [CatalogItem(item_id=f"import-{run}-{j}", category="import",
                        title=f"{words[j % len(words)]} {words[(j // len(words)) % len(words)]} import {j} {run}")
            for j in range(n)]


def send_import(clients: KafkaClients, s: Settings, items: list[CatalogItem], after_s: float,
                sent: dict) -> threading.Thread:
    """Publish ``items`` to ``catalog`` all at once, ``after_s`` into the offered stream (from a
    thread); ``sent["at"]``: the wall-clock time (ms) the first was sent."""

    def run() -> None:
        time.sleep(after_s)
        producer = clients.producer()
        try:
            sent["at"] = time.time() * 1000
            for item in items:
                producer.send(s.catalog_topic, value=encode(item), key=item.item_id.encode())
            producer.flush()
            sent["flushed_at"] = time.time() * 1000
        finally:
            producer.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def new_item_times(catalog_envs, rec_envs, probes) -> dict:
    """ms from each new item's catalog append to the first recommendation (anyone's) listing it."""
    appended = {}
    for env in catalog_envs:
        item_id = orjson.loads(env.value)["item_id"]
        appended.setdefault(item_id, env.timestamp_ms)
    first: dict[str, int] = {}
    for env in rec_envs:
        rec = orjson.loads(env.value)
        for it in rec["items"]:
            if it["item_id"] in appended:
                first[it["item_id"]] = min(first.get(it["item_id"], rec["emitted_at"]), rec["emitted_at"])
    times = [first[i.item_id] - appended[i.item_id] for i, _ in probes if i.item_id in first and i.item_id in appended]
    within_s = sum(t <= 1000 for t in times)
    return {"new_items": len(probes), "recommended": len(times), "within_1s": within_s,
            **_pcts(np.asarray(times, dtype=np.float64))}



def _wait_for_recommendations(clients: KafkaClients, topic: str, at_least: int, flow: FlowProcess,
                              quiet_s: float, timeout_s: float) -> int:
    """Poll ``topic`` with one consumer until ``at_least`` records are there and none came for
    ``quiet_s``; returns the count. A persistent consumer: cheap, unlike re-reading the topic."""
    from kafka.structs import TopicPartition

    consumer = clients.consumer()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        count, last_new = 0, time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = sum(len(v) for v in consumer.poll(timeout_ms=200).values())
            if got:
                count += got
                last_new = time.monotonic()
            elif count >= at_least and time.monotonic() - last_new >= quiet_s:
                return count
            if not flow.running:
                raise SystemExit(f"the flow stopped unexpectedly (status {flow.returncode}):\n{flow.tail()}")
        return count
    finally:
        consumer.close()


def per_event_latencies(events, recs) -> np.ndarray:
    """ms from each event's append to the first recommendation of its user whose trigger is at or
    after the event in the partition (the first answer that had seen it)."""
    ev_pos = {}  # event_id -> (partition, offset)
    for env in events:
        ev_pos[orjson.loads(env.value)["event_id"]] = (env.partition, env.offset)
    answers: dict[str, list[tuple[tuple[int, int], int]]] = {}  # user -> [((partition, offset), emitted_at)]
    for env in recs:
        rec = orjson.loads(env.value)
        pos = ev_pos.get(rec["trigger_event_id"])
        if pos is not None:
            answers.setdefault(rec["user_id"], []).append((pos, rec["emitted_at"]))
    for rows in answers.values():
        rows.sort()
    out = []
    for env in events:
        ev = orjson.loads(env.value)
        rows = answers.get(ev["user_id"])
        if not rows:
            continue
        i = bisect.bisect_left(rows, ((env.partition, env.offset), -1))
        if i < len(rows) and rows[i][0][0] == env.partition:
            out.append(rows[i][1] - env.timestamp_ms)
    return np.asarray(out, dtype=np.float64)


def _pcts(a: np.ndarray) -> dict[str, float]:
    if not len(a):
        return {}
    return {p: round(float(np.percentile(a, q)), 1) for p, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))}


def run_latency(args, items, catalog_path: Path, cache_dir: str, base: Settings, workroot: Path) -> dict:
    # The stream's clock must be the wall clock: the new-item probes are stamped now, and a
    # stream dated years earlier would then look idle past the state TTL to the expiry sweep,
    # which would delete every user it reaches (and time that, not the system).
    n_latency = args.latency_events + WARMUP_EVENTS
    start_ts = int(time.time() * 1000) - n_latency * 50  # generate_events: 50 ms apart on average
    all_events = generate_events(n_latency, items, n_users=args.users, seed=args.seed + 1, start_ts=start_ts)
    warmup, events = all_events[:WARMUP_EVENTS], all_events[WARMUP_EVENTS:]
    if args.search_share:  # issue 13: the mixed workload, searches answered by the same step
        events = with_searches(events, items, args.search_share, seed=args.seed + 2,
                               distinct_queries=args.distinct_queries, zipf_s=args.zipf_s)
        queries = [ev.query for ev in events if ev.type == "search"]
        firsts = len(dict.fromkeys(queries))
        log(f"[latency] searches: {len(queries)}, {firsts} distinct queries ("
            f"{'the default stream' if args.distinct_queries is None else f'Zipf s={args.zipf_s} over {args.distinct_queries}'}"
            f"); {firsts / max(len(queries), 1):.0%} of the searches are a query's first")
    load_before = loadavg()
    log(f"\n[latency] {len(events)} events offered at {args.rate:.0f}/s, {len(items)} items, {args.users} users, "
        f"{args.partitions} partitions; load average {load_before}")
    broker, clients, s = start_broker(args.partitions, base)
    try:
        workdir = workroot / "latency"
        profile_to = Path(args.profile) / "latency.prof" if args.profile else None
        extra = list(args.flow_args)
        if "--metrics-port" not in extra:  # the flow's poll intervals are read from its endpoint
            extra += ["--metrics-port", str(_free_port())]
        metrics_port = int(extra[extra.index("--metrics-port") + 1])
        flow = FlowProcess(flow_command(broker.bootstrap, workdir, catalog_path, cache_dir, stop_at_end=False,
                                        profile_to=profile_to, extra=extra), echo=args.verbose)
        try:
            flow.wait_ready()
            log(f"[latency] flow ready after {flow.ready_t - flow.start_t:.1f} s: {flow.ready_line}")
            produce_records(clients, s.events_topic, keyed(warmup), rate=args.rate)
            n_warm = _wait_for_recommendations(clients, s.recommendations_topic, 1, flow, 1.0, 120.0)
            log(f"[latency] warm-up: {len(warmup)} events -> {n_warm} recommendations")
            probes = new_item_probes(probe_pairs(args.new_items), args.seed)
            prober = send_probes(clients, s, probes, len(events) / args.rate) if probes else None
            imported, import_sent = import_items(args.import_items), {}
            importer = (send_import(clients, s, imported, len(events) / args.rate / 3, import_sent)
                        if imported else None)
            polls_before = scrape_polls(metrics_port, s.events_topic)
            own = OwnPauses().start()
            try:
                t0 = time.perf_counter()
                cpu_at_start = flow.cpu_s()
                n = produce_records(clients, s.events_topic, keyed(events), rate=args.rate)
                produce_s = time.perf_counter() - t0  # the offered stream only (the probes' thread ends later)
                if prober is not None:
                    prober.join()
                if importer is not None:
                    importer.join()
            finally:
                own_pauses = own.stop()
            log(f"[latency] this benchmark's own garbage collector while offering: {own_pauses['collections']} "
                f"collections, longest {own_pauses['longest_ms']:.1f} ms ({own_pauses['over_10ms']} over 10 ms)")
            log(f"[latency] offered {n} events in {produce_s:.1f} s ({n / produce_s:.0f}/s achieved)")
            n_recs = _wait_for_recommendations(clients, s.recommendations_topic, n_warm + 1, flow, args.quiet_s,
                                               args.max_wait_s)
            log(f"[latency] {n_recs} recommendations, none new for {args.quiet_s:g} s: stopping the flow (SIGINT)")
            hwm_before_stop = flow.vm_hwm_kib
            cpu_offered = flow.cpu_s() - cpu_at_start  # the flow's CPU while the stream was offered and drained
            wall_offered = time.perf_counter() - t0
            polls = poll_gaps(polls_before, scrape_polls(metrics_port, s.events_topic))
        finally:
            flow.interrupt()
        log(f"[latency] {flow.stopped_line}")
        event_envs = consume_all(clients, s.events_topic, timeout_s=CONSUME_TIMEOUT_S)
        rec_envs = consume_all(clients, s.recommendations_topic, timeout_s=CONSUME_TIMEOUT_S)
        dead = consume_all(clients, s.dead_letters_topic, timeout_s=CONSUME_TIMEOUT_S)
        catalog_envs = consume_all(clients, s.catalog_topic, timeout_s=CONSUME_TIMEOUT_S)
        search_envs = consume_all(clients, s.search_results_topic, timeout_s=CONSUME_TIMEOUT_S) if args.search_share else []
    finally:
        broker.stop()
    new_items = new_item_times(catalog_envs, rec_envs, probes)
    measured_ids = {ev.event_id for ev in events}
    measured = [e for e in event_envs if orjson.loads(e.value)["event_id"] in measured_ids]
    measured_recs = [r for r in rec_envs if orjson.loads(r.value)["trigger_event_id"] in measured_ids]
    summary = summarize(measured, measured_recs, dead)
    every = per_event_latencies(measured, measured_recs)
    trigger_at, trigger_ms = _trigger_latencies(measured, measured_recs)  # read once, for both figures
    result = {
        "events": n,
        "offered_rate": args.rate,
        "achieved_produce_rate": round(n / produce_s, 1),
        "catalog_items": len(items),
        "users": args.users,
        "partitions": args.partitions,
        "warmup_events": len(warmup),
        "recommendations": len(measured_recs),
        "dead_letters": len(dead),
        "summary": summary,  # recsys_cli.demo.summarize over the measured events
        "latency_ms_trigger": _pcts(trigger_ms),
        "latency_ms_every_event": _pcts(every),
        "latency_ms_by_second": latency_by_second(trigger_at, trigger_ms),
        "events_answered": int(len(every)),
        "flow_totals": flow.stopped_line,
        "new_item_to_recommended_ms": new_items,
        "search_share": args.search_share,
        "distinct_queries": args.distinct_queries,
        "zipf_s": args.zipf_s,
        "searches": sum(1 for ev in events if ev.type == "search"),
        "search_results": len(search_envs),
        "latency_ms_search": _trigger_pcts(measured, search_envs) if search_envs else {},
        "events_polls": polls,
        "import_items": len(imported),
        "import": import_latency(import_sent, trigger_at, trigger_ms) if imported else {},
        "benchmark_gc_while_offering": own_pauses,
        "flow_cpu_s": round(cpu_offered, 2),
        "flow_cpu_share": round(cpu_offered / wall_offered, 3),
        "peak_rss_mib": flow.peak_rss_mib(),
        "peak_rss_mib_before_sigint": round(hwm_before_stop / 1024, 1),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    if profile_to is not None:
        result["profile"] = str(profile_to)
    lat = result["latency_ms_trigger"]
    log(f"[latency] trigger event append -> emitted_at: p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, "
        f"p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms over {len(measured_recs)} recommendations")
    worst = tail_seconds(result["latency_ms_by_second"], lat["p95"])
    if worst:
        log(f"[latency] the seconds (of append time) with the longest latencies: {worst}")
    ev = result["latency_ms_every_event"]
    if ev:
        log(f"[latency] every event -> first recommendation after it: p50 {ev['p50']:.0f} ms, p95 {ev['p95']:.0f} ms, "
            f"p99 {ev['p99']:.0f} ms over {len(every)} events")
    if search_envs:
        sl = result["latency_ms_search"]
        log(f"[latency] search append -> search result emitted_at: p50 {sl['p50']:.0f} ms, p95 {sl['p95']:.0f} ms, "
            f"p99 {sl['p99']:.0f} ms over {len(search_envs)} of {result['searches']} searches")
    if imported:
        im = result["import"]
        log(f"[latency] bulk import of {len(imported)} new catalog items {im['sent_s']:.1f} s into the stream: the events "
            f"appended in the {IMPORT_WINDOW_S:.0f} s after it: p50 {im['p50']:.0f} ms, p99 {im['p99']:.0f} ms, max "
            f"{im['max']:.0f} ms over {im['n']} recommendations (before it: p99 {im['p99_before']:.0f} ms, max "
            f"{im['max_before']:.0f} ms)")
    if new_items.get("recommended"):
        log(f"[latency] new item: catalog append -> first recommendation listing it: p50 {new_items['p50']:.0f} ms, "
            f"max {new_items['max']:.0f} ms ({new_items['recommended']} of {new_items['new_items']} new items recommended, "
            f"{new_items['within_1s']} within 1 s)")
    elif probes:
        log(f"[latency] new item: none of {len(probes)} new items was recommended")
    log(f"[latency] the flow used {cpu_offered:.1f} CPU-seconds from the first offered event to the last output "
        f"({result['flow_cpu_share']:.0%} of one core over {wall_offered:.1f} s)")
    log(f"[latency] the events partitions were polled {polls['polls']} times while the stream was offered: "
        f"{polls['over_100ms']} more than 100 ms after the previous poll, {polls['over_500ms']} more than 500 ms; "
        f"longest since the flow started {polls['longest_since_start_ms']} ms")
    if polls["batches"]:
        per_phase = ", ".join(f"{name} {ms:.2f}" for name, ms in sorted(polls["phase_ms_per_batch"].items(), key=lambda kv: -kv[1]))
        log(f"[latency] the engine ran {polls['batches']} batches meanwhile ({n / polls['batches']:.1f} offered events "
            f"a batch), {polls['batch_seconds'] / polls['batches'] * 1000:.2f} ms a batch; by phase (ms a batch): {per_phase}")
    log(f"[latency] peak RSS {result['peak_rss_mib']} MiB; load average {result['loadavg_after']}")
    return result


#: The window after a bulk import's first record whose events' latencies are reported apart.
IMPORT_WINDOW_S = 10.0


def import_latency(sent: dict, trigger_at: np.ndarray, trigger_ms: np.ndarray) -> dict:
    """Latencies of the recommendations triggered by events appended within
    :data:`IMPORT_WINDOW_S` after the import's first record, and of those before it."""
    at = sent.get("at")
    if at is None:
        return {}
    during = (trigger_at >= at) & (trigger_at < at + IMPORT_WINDOW_S * 1000)
    before = trigger_at < at
    out = {"sent_s": round((at - trigger_at.min()) / 1000, 1) if len(trigger_at) else 0.0,
           "send_ms": round(sent.get("flushed_at", at) - at, 1), "n": int(during.sum())}
    for name, mask in (("", during), ("_before", before)):
        lat = trigger_ms[mask]
        out.update({f"p50{name}": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
                    f"p99{name}": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
                    f"max{name}": float(lat.max()) if len(lat) else float("nan")})
    return out


class OwnPauses:
    """This benchmark process's own garbage-collector pauses while it offers the stream.

    Its producer's I/O thread cannot send while the main thread collects (the GIL), so a long
    collection here holds back records that already carry their CreateTime, and the flow is
    blamed for the wait (a 240 ms one did, once per run). ``start`` moves everything built so
    far (catalog, events, the model) out of the collector's view (``gc.freeze``; that alone
    still left one 27-33 ms collection of the send futures per run) and switches the collector
    off until ``stop``; every collection that runs anyway is timed and reported."""

    def __init__(self) -> None:
        self.pauses_ms: list[float] = []
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses_ms.append((time.perf_counter() - self._t0) * 1000)

    def start(self) -> "OwnPauses":
        gc.collect()
        gc.freeze()
        gc.disable()
        gc.callbacks.append(self._callback)
        return self

    def stop(self) -> dict:
        gc.callbacks.remove(self._callback)
        gc.enable()
        gc.unfreeze()
        p = self.pauses_ms
        return {"collections": len(p), "longest_ms": round(max(p), 1) if p else 0.0,
                "over_10ms": sum(1 for x in p if x > 10)}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape_polls(port: int, topic: str, shards: int = 8) -> dict:
    """The flows' ``recsys_input_poll_interval_seconds`` buckets for ``topic`` summed over the
    shards' endpoints (``port + shard``), and the longest interval any of them saw since start."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    longest = 0.0
    batches = {"count": 0.0, "seconds": 0.0}
    phases: dict[str, float] = {}
    for shard in range(shards):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port + shard}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            break  # no shard on that port
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "recsys_batch_processing_seconds_count":
                    batches["count"] += sample.value
                elif sample.name == "recsys_batch_processing_seconds_sum":
                    batches["seconds"] += sample.value
                elif sample.name == "recsys_batch_phase_seconds_total":
                    phases[sample.labels["phase"]] = phases.get(sample.labels["phase"], 0.0) + sample.value
                if sample.labels.get("topic") != topic:
                    continue
                if sample.name == "recsys_input_poll_interval_seconds_bucket":
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
                elif sample.name == "recsys_input_poll_interval_max_seconds":
                    longest = max(longest, sample.value)
    return {"buckets": buckets, "longest_s": longest, "batches": batches, "phases": phases}


def poll_gaps(before: dict, after: dict) -> dict:
    """Polls of a topic's partitions more than 0.1 / 0.5 s after the previous one, between two
    :func:`scrape_polls` (the offered stream), and the longest since the flow started."""
    delta = {le: n - before["buckets"].get(le, 0.0) for le, n in after["buckets"].items()}
    total = delta.get(float("inf"), 0.0)
    batches = {key: after["batches"][key] - before["batches"][key] for key in after["batches"]}
    phases = {name: after["phases"][name] - before["phases"].get(name, 0.0) for name in after["phases"]}
    return {"polls": int(total), "over_100ms": int(total - delta.get(0.1, 0.0)),
            "over_500ms": int(total - delta.get(0.5, 0.0)), "longest_since_start_ms": round(after["longest_s"] * 1000),
            "batches": int(batches["count"]), "batch_seconds": batches["seconds"],
            "phase_ms_per_batch": {name: round(sec / max(batches["count"], 1) * 1000, 2) for name, sec in phases.items() if sec > 0}}


def _trigger_latencies(events, recs) -> tuple[np.ndarray, np.ndarray]:
    """(append time, append -> emitted_at) in ms for every recommendation with a measured trigger."""
    append_ts = {orjson.loads(e.value)["event_id"]: e.timestamp_ms for e in events}
    at, lat = [], []
    for r in recs:
        rec = orjson.loads(r.value)
        if rec["trigger_event_id"] in append_ts:
            at.append(append_ts[rec["trigger_event_id"]])
            lat.append(rec["emitted_at"] - append_ts[rec["trigger_event_id"]])
    return np.asarray(at, dtype=np.float64), np.asarray(lat, dtype=np.float64)


def _trigger_pcts(events, recs) -> dict[str, float]:
    return _pcts(_trigger_latencies(events, recs)[1])


def latency_by_second(at: np.ndarray, lat: np.ndarray) -> list[dict]:
    """Per second of append time (``_trigger_latencies``): recommendations, p50, p99 and max
    latency (ms). Shows whether the tail is spread over the run (the batches' usual cost) or a
    few stalls (one slow moment)."""
    if not len(at):
        return []
    second = ((at - at.min()) // 1000).astype(np.int64)
    rows = []
    for s in np.unique(second):
        x = lat[second == s]
        rows.append({"second": int(s), "n": int(len(x)), "p50": round(float(np.percentile(x, 50)), 1),
                     "p99": round(float(np.percentile(x, 99)), 1), "max": round(float(x.max()), 1)})
    return rows


def tail_seconds(rows: list[dict], threshold_ms: float) -> str:
    """A line: how the recommendations over ``threshold_ms`` spread over the run's seconds."""
    return ", ".join(f"s{r['second']}: max {r['max']:.0f} ms" for r in sorted(rows, key=lambda r: -r["max"])[:6]
                     if r["max"] > threshold_ms)


# --------------------------------------------------------------------------- main


def dir_size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def own_rss_mib() -> float:
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    return float("nan")


def run_longrun(args, items, cache_dir: str, base: Settings, workroot: Path) -> dict:
    """The long run of the state bound: see the module docstring, step 3."""
    import dataclasses as dc

    settings = base.replace(
        state_dir=str(workroot / "longrun-state"), embed_cache_dir=cache_dir, state_ttl_days=args.longrun_ttl_h / 24,
        head_snapshot_interval_s=3600.0,
    )
    engine = Shard.open(settings)
    engine.upsert_catalog(items)
    log(f"longrun: {args.longrun_events} events over {args.longrun_users} users, {args.longrun_gap_ms} ms of stream time "
        f"per event, TTL {args.longrun_ttl_h} h, batches of {args.longrun_batch}, sweep >= {settings.sweep_keys_per_batch} keys/batch")
    rows, offset, start_ts, t0 = [], 0, 1_700_000_000_000, time.perf_counter()
    chunk = args.report_every
    for c in range(0, args.longrun_events, chunk):
        n = min(chunk, args.longrun_events - c)
        events = generate_events(n, items, n_users=args.longrun_users, seed=args.seed + 1 + c // chunk,
                                 start_ts=start_ts, mean_gap_ms=args.longrun_gap_ms)
        start_ts = events[-1].ts
        swept = 0
        for b in range(0, n, args.longrun_batch):
            envs = [Envelope("events", 0, offset + i, e.user_id.encode(), encode(dc.replace(e, event_id=f"c{c}-{e.event_id}")), e.ts)
                    for i, e in enumerate(events[b : b + args.longrun_batch])]
            offset += len(envs)
            swept += engine.process(envs).counts["swept_users"]
        del events
        row = {
            "events": c + n,
            "stream_hours": round((start_ts - 1_700_000_000_000) / 3_600_000, 2),
            "users_in_state": sum(1 for _ in engine.kv.iter_prefix(b"u:")),
            "outboxes": sum(1 for _ in engine.kv.iter_prefix(b"o:")),
            "swept": swept,
            "disk_mib": round(dir_size_mib(Path(settings.state_dir)), 1),
            **_rocks_sizes(engine.kv),
            "rss_mib": round(own_rss_mib(), 1),
            "events_per_s": round((c + n) / (time.perf_counter() - t0)),
        }
        rows.append(row)
        log("longrun: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    compacted = None
    if isinstance(engine.kv, RocksKV):
        # What the state holds once RocksDB has reclaimed obsolete versions and tombstones.
        engine.kv.compact()
        compacted = {"disk_mib": round(dir_size_mib(Path(settings.state_dir)), 1), **_rocks_sizes(engine.kv)}
        log("longrun: after a full compaction: " + ", ".join(f"{k} {v}" for k, v in compacted.items()))
    engine.close()
    return {"events": args.longrun_events, "users": args.longrun_users, "ttl_h": args.longrun_ttl_h,
            "gap_ms": args.longrun_gap_ms, "batch": args.longrun_batch, "rows": rows, "after_full_compaction": compacted}


def _rocks_sizes(kv) -> dict:  # noqa: ANN001 - a KVStore
    """RocksDB's live-data estimate and table-file total, MiB (empty for other stores)."""
    if not isinstance(kv, RocksKV):
        return {}
    sizes = kv.size_report()
    return {"live_mib": round(sizes["live_data"] / 2**20, 1), "sst_mib": round(sizes["sst_files"] / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("both", "max", "latency", "longrun", "sharing"), default="both")
    p.add_argument("--events", type=int, default=100_000, help="events for the sustained-throughput run")
    p.add_argument("--latency-events", type=int, default=30_000, help="events offered in the latency run")
    p.add_argument("--rate", type=float, default=1000.0, help="events/s offered in the latency run")
    p.add_argument("--search-share", type=float, default=0.0,
                   help="latency run: share of the offered events that are searches (issue 13's mixed workload: 0.2)")
    p.add_argument("--distinct-queries", type=int, default=None,
                   help="with --search-share: draw the queries from this many distinct ones by a Zipf law "
                        "(--zipf-s) instead of the default stream's 144, as a shop's long tail of queries")
    p.add_argument("--zipf-s", type=float, default=1.0, help="with --distinct-queries: the Zipf exponent over query rank")
    p.add_argument("--new-items", type=int, default=20,
                   help="latency run: new catalog items published during the stream, timed to their first recommendation")
    p.add_argument("--import-items", type=int, default=0,
                   help="latency run: brand-new catalog items published all at once a third into the stream "
                        "(a shop's bulk import); the latency of the events offered meanwhile is reported apart")
    p.add_argument("--catalog-items", type=int, default=10_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--partitions", type=int, default=2, help="partitions of the events and recommendations topics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed-cache-dir", default=None, help="embedding cache (default: the settings' var/embeddings)")
    p.add_argument("--flow-args", type=shlex.split, default=[], help="extra flags for `recsys run`, one quoted string")
    p.add_argument("--profile", default=None, metavar="DIR", help="run the flow under cProfile; .prof files go here")
    p.add_argument("--max-wait-s", type=float, default=900.0, help="give up on a run after this long")
    p.add_argument("--quiet-s", type=float, default=QUIET_S,
                   help="latency: the stream counts as drained after this long without a new recommendation (default %(default)s)")
    p.add_argument("--out", default=None, help="write all figures as JSON here")
    p.add_argument("--longrun-events", type=int, default=1_000_000, help="longrun: events in all")
    p.add_argument("--longrun-users", type=int, default=500_000, help="longrun: distinct users")
    p.add_argument("--longrun-ttl-h", type=float, default=1.0, help="longrun: the state TTL, hours of stream time")
    p.add_argument("--longrun-gap-ms", type=float, default=20.0, help="longrun: mean stream time between events")
    p.add_argument("--longrun-batch", type=int, default=1000, help="longrun: events per Shard.process batch")
    p.add_argument("--report-every", type=int, default=100_000, help="longrun: print disk and RSS every this many events")
    p.add_argument("--rounds", type=int, default=2,
                   help="sharing: pairs of runs, sharing off and on (order swapped every round)")
    p.add_argument("--sharing-trainer", action="store_true",
                   help="sharing: a third run per round, sharing on with the model trainer (--model-trainer)")
    p.add_argument("--verbose", "-v", action="store_true", help="echo the flow's output")
    args = p.parse_args(argv)
    if args.distinct_queries is not None and (args.distinct_queries < 1 or not args.search_share):
        p.error(f"--distinct-queries {args.distinct_queries}: give a positive number, with --search-share")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    base = Settings.from_env(os.environ)
    cache_dir = args.embed_cache_dir or base.embed_cache_dir
    results: dict = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else argv,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_start": loadavg(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
    }
    log(f"machine: {os.cpu_count()} CPUs, load average {results['machine']['loadavg_start']} (1, 5, 15 min); "
        f"GLIBC_TUNABLES={results['machine']['glibc_tunables'] or '(unset)'} (README, Operating it: the memory allocator)")
    log(f"code: {ROOT} (the flow's too)")
    with tempfile.TemporaryDirectory(prefix="recsys-bench-") as tmp:
        workroot = Path(tmp)
        items = generate_catalog(args.catalog_items, seed=args.seed)
        known = [k for k, _ in probe_pairs(args.new_items)]  # anchors for the new-item probes (no events)
        catalog_path = workroot / "catalog.jsonl"
        write_catalog(items + known, catalog_path)
        log(f"setup: {len(items)} catalog items (+{len(known)} probe anchors) -> {catalog_path}; "
            f"embedding their texts into {cache_dir} ...")
        emb = prewarm_embeddings(items + known, cache_dir, base)
        results["embedding"] = emb
        what = "cold cache: embedded with the model" if emb["cold_cache"] else "warm cache: read from the cache"
        log(f"setup: first embedding of {emb['texts']} texts took {emb['seconds']:.1f} s ({what}; "
            f"{emb['hits']} hits, {emb['misses']} misses, {emb['model_loads']} model loads)")
        if args.mode in ("both", "max"):
            results["max"] = run_max(args, items, catalog_path, cache_dir, base, workroot)
        if args.mode in ("both", "latency"):
            results["latency"] = run_latency(args, items, catalog_path, cache_dir, base, workroot)
        if args.mode == "longrun":
            results["longrun"] = run_longrun(args, items, cache_dir, base, workroot)
        if args.mode == "sharing":
            results["sharing"] = run_sharing(args, items, catalog_path, cache_dir, base, workroot)
    results["machine"]["loadavg_end"] = loadavg()

    log("\n==== results ====")
    log(f"load average (1/5/15 min): start {results['machine']['loadavg_start']}, end {results['machine']['loadavg_end']} "
        f"on {os.cpu_count()} CPUs")
    if "max" in results:
        m = results["max"]
        log(f"events/s (sustained, {m['events']} events, {m['catalog_items']} items, {m['partitions']} partitions): "
            f"{m['events_per_s']:.0f}; peak RSS {m['peak_rss_mib']} MiB")
    if "latency" in results:
        lt = results["latency"]
        lat, ev = lt["latency_ms_trigger"], lt["latency_ms_every_event"]
        log(f"latency at {lt['offered_rate']:.0f}/s offered ({lt['events']} events): p50 {lat['p50']:.0f} ms, "
            f"p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms (trigger append -> emitted_at); "
            f"every event: p99 {ev.get('p99', float('nan')):.0f} ms; peak RSS {lt['peak_rss_mib']} MiB")
        ni = lt["new_item_to_recommended_ms"]
        if ni.get("recommended"):
            log(f"new item, catalog append -> first recommendation listing it: p50 {ni['p50']:.0f} ms, "
                f"max {ni['max']:.0f} ms ({ni['recommended']} of {ni['new_items']} recommended, {ni['within_1s']} within 1 s)")
    if "sharing" in results:
        sh = results["sharing"]
        log(f"sharing (issue 11), {args.flow_args or 'one process'}, {args.events} events, ready -> drained, median of "
            f"{args.rounds}: off {sh['median_events_per_s_off']:.0f} events/s "
            f"{[x['events_per_s'] for x in sh['off']]}, on {sh['median_events_per_s_on']:.0f} events/s "
            f"{[x['events_per_s'] for x in sh['on']]}: {100 * sh['on_over_off']:.1f}% of off; events per CPU-second "
            f"off {sh['median_events_per_cpu_s_off']:.0f}, on {sh['median_events_per_cpu_s_on']:.0f} "
            f"({100 * sh['median_events_per_cpu_s_on'] / sh['median_events_per_cpu_s_off']:.1f}%); shards' checksums "
            f"{'equal in every run' if sh['checksums_equal'] else 'NOT equal'}")
        if "trainer" in sh:
            log(f"sharing with the model trainer: {sh['median_events_per_s_trainer']:.0f} events/s "
                f"{[x['events_per_s'] for x in sh['trainer']]}: {100 * sh['trainer_over_off']:.1f}% of off, "
                f"{100 * sh['trainer_over_on']:.1f}% of on (models trained on every shard); events per CPU-second "
                f"{sh['median_events_per_cpu_s_trainer']:.0f} (the trainer's CPU included), "
                f"{sh['median_events_per_cpu_s_trainer_shards_only']:.0f} (the shards' and the supervisor's alone)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        log(f"figures -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
