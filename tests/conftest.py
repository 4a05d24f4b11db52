"""Shared fixtures: the in-memory broker, one real local broker per session, unique topic names.

Any test that uses ``local_broker`` is marked ``broker`` automatically (select or deselect
with ``-m broker``); such tests run in CI and are not skipped.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from dataflows.kafka_io import KafkaClients
from dataflows.testing.memory_broker import InMemoryBroker
from recsys.store.kv import MemoryKV, RocksKV
from recsys_cli.local_broker import LocalBroker

_topic_counter = itertools.count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "local_broker" in getattr(item, "fixturenames", ()) or "kafka_clients" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker)


@pytest.fixture(params=["memory", "rocks"])
def kv(request, tmp_path):
    """Each KV backend in turn, so one contract suite covers both (real rocksdict on disk)."""
    store = MemoryKV() if request.param == "memory" else RocksKV(tmp_path / "db")
    yield store
    store.close()


@pytest.fixture
def memory_broker() -> InMemoryBroker:
    """A fresh in-memory Kafka (no topics) for one test."""
    return InMemoryBroker()


@pytest.fixture(scope="session")
def local_broker() -> Iterator[LocalBroker]:
    """One real Tansu broker on 127.0.0.1 for the whole session; tests use unique topics."""
    with LocalBroker() as broker:
        yield broker


@pytest.fixture
def kafka_clients(local_broker: LocalBroker) -> KafkaClients:
    """Real kafka-python clients for the session broker."""
    return KafkaClients.for_bootstrap(local_broker.bootstrap)


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``topic_name("events")`` -> a name unique to this test and call, e.g. ``events-test_x-7``."""
    test = re.sub(r"[^A-Za-z0-9._-]+", "_", request.node.name)[:100]

    def make(prefix: str = "t") -> str:
        return f"{prefix}-{test}-{next(_topic_counter)}"

    return make


@pytest.fixture
def outputs_under_hash_seeds() -> Callable[[str], set[str]]:
    """``run(code)`` -> the distinct stdouts of ``python -c code`` under two PYTHONHASHSEEDs;
    one element means the output does not depend on string hashing (set/dict order)."""

    def run(code: str) -> set[str]:
        outs = set()
        for seed in ("1", "2"):
            env = dict(os.environ, PYTHONHASHSEED=seed)
            outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
        return outs

    return run


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory):
    """One sentence-transformer for every shard of a test module (loading it is most of a
    shard's start). Modules that test the embedder itself define their own."""
    from recsys.items.embeddings import Embedder
    from recsys.settings import Settings

    model = Embedder(Settings().model_name, str(tmp_path_factory.mktemp("emb")))
    yield model
    model.close()
