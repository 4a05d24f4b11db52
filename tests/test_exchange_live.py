"""Live sharing on the real local broker: two shard processes exchange their signal operations
through the exchange topic and end with identical global signals (issue 11)."""

from __future__ import annotations

import re
import signal
import time

import pytest
from test_operating import READY_TIMEOUT_S, RECSYS, Child, _stream, _totals, _wait_applied, children  # noqa: F401

from dataflows.kafka_io import KafkaClients, consume_all
from recsys.signals.exchange import decode_message


@pytest.mark.slow
def test_two_sharing_shard_processes_end_with_identical_signal_checksums(local_broker, topic_name, tmp_path, children):
    prefix = topic_name("share") + "-"
    n, flags = _stream(local_broker.bootstrap, prefix, tmp_path, n_users=40)
    exchange_topic = prefix + "exchange"
    supervisor = Child([*RECSYS, "run", "--processes", "2", "--share-signals", "--exchange-topic", exchange_topic, *flags])
    children.append(supervisor)
    supervisor.wait_for("ready: 2 shard processes", 2 * READY_TIMEOUT_S)
    _wait_applied(local_broker.bootstrap, prefix + "recommendations")
    clients = KafkaClients.for_bootstrap(local_broker.bootstrap)
    # drained: every event applied, and the exchange log has stopped growing for a while
    deadline, last, still_since = time.monotonic() + 120, -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(consume_all(clients, exchange_topic, timeout_s=5))
        if count != last:
            last, still_since = count, time.monotonic()
        elif count and time.monotonic() - still_since > 4:
            break
        time.sleep(0.5)
    code, _ = supervisor.stop_with(signal.SIGTERM, timeout_s=30)
    assert code == 0, supervisor.output
    assert _totals(supervisor.lines[-1])["applied"] == n, supervisor.output
    sums = re.findall(r"\[shard (\d)\] global signals: sha256=([0-9a-f]{64}) at exchange position (\d+)", supervisor.output)
    assert len(sums) == 2, supervisor.output
    assert sums[0][1:] == sums[1][1:], supervisor.output  # same bytes at the same log position
    log = consume_all(clients, exchange_topic, timeout_s=5)
    origins = {decode_message(env.value).origin for env in log}
    assert origins == {0, 1} and int(sums[0][2]) == len(log) - 1  # both shards published; both applied it all
