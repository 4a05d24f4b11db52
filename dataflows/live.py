"""The live dataflow: Kafka ``events`` + ``catalog`` in, ``recommendations`` + ``dead-letters`` out.

Run it with the CLI (``recsys run``) or directly with Bytewax::

    mkdir -p var/recovery && python -m bytewax.recovery var/recovery 1    # once
    python -m bytewax.run dataflows.live:live_flow -r var/recovery -s 2 -b 0

Settings come from ``RECSYS_*`` environment variables (see ``recsys/settings.py``).
"""

from __future__ import annotations

import gc
import os
import threading
from typing import Any

from bytewax.dataflow import Dataflow

from dataflows.flow import build_flow
from dataflows.kafka_io import KafkaClients, KafkaSink, KafkaSource
from recsys.engine import Engine
from recsys.items import load_jsonl
from recsys.settings import Settings


def engine_factory(settings: Settings, *, evaluate: bool = False, in_memory: bool = False):
    """A zero-argument callable that opens the engine and loads the start-up catalog file."""

    def build() -> Engine:
        engine = Engine.open(settings, evaluate=evaluate, in_memory=in_memory)
        if settings.catalog_file:
            engine.upsert_catalog(load_jsonl(settings.catalog_file), progress=True)
        settle_heap()
        return engine

    return build


def settle_heap() -> None:
    """Hide everything alive now (imported modules, the catalog, loaded state) from Python's
    cyclic garbage collector. Its full passes scan every tracked object: with torch,
    sentence-transformers and a catalog loaded that is ~0.5 s during which the stream stands
    still, the worst of the latency tail. Start-up objects live as long as the process, so
    scanning them again and again finds nothing (``gc.freeze``, Python >= 3.7)."""
    gc.collect()
    gc.freeze()


def live_flow(
    settings: Settings | None = None, clients: Any = None, engine: Engine | None = None, stop: Any = None
) -> Dataflow:
    """The production graph over Kafka (or any object with the same client surface).

    ``engine``: an engine already opened in this process (the CLI opens it first so that the
    model and catalog are loaded before the first message); otherwise it opens on first batch.
    ``settings`` given are used as they are; read from the environment, they are this shard's
    (:meth:`Settings.for_shard`: with ``RECSYS_SHARDS`` > 1, per-shard state directories).
    ``stop``: a ``threading.Event``; once set, both sources end their input and the flow
    stops in order (:class:`dataflows.runner.StopSignals`).
    """
    from dataflows.runner import StopSignals, stoppable

    if settings is None and stop is None and threading.current_thread() is threading.main_thread():
        # built by `python -m bytewax.run dataflows.live:live_flow`: Ctrl-C and SIGTERM stop
        # in order there too, instead of through a Rust panic (dataflows/runner.py)
        stop = StopSignals().running().requested
    settings = settings or Settings.from_env(os.environ).for_shard()
    clients = clients if clients is not None else KafkaClients(settings)

    return build_flow(
        "recsys_live",
        events=stoppable(KafkaSource.from_settings(clients, settings.events_topic, settings, sharded=True), stop),
        catalog=stoppable(KafkaSource.from_settings(clients, settings.catalog_topic, settings), stop),
        recommendations=KafkaSink(clients, settings.recommendations_topic),
        dead_letters=KafkaSink(clients, settings.dead_letters_topic),
        engine_factory=(lambda: engine) if engine is not None else engine_factory(settings),
    )
