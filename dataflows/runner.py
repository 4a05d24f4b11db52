"""Run a dataflow in this process with Bytewax recovery switched on.

Bytewax keeps source offsets (and its own state) in SQLite recovery partitions; after a crash
the same command resumes from the last snapshot. One worker per process: the engine and
kafka-python hold the GIL, so scale out with processes, not threads (ARCHITECTURE.md). The
processes are independent shards (``recsys run --processes N``, or ``--shards N --shard i``
each; :mod:`dataflows.shards`), each one such single-worker flow, not one Bytewax cluster
(``-i/-a``): a cluster's workers would share one state directory and only one of them would
read the catalog.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main


def recovery_config(recovery_dir: str | None) -> RecoveryConfig | None:
    """Initialise the recovery directory on first use; None switches recovery off."""
    if not recovery_dir:
        return None
    path = Path(recovery_dir)
    if not path.exists() or not any(path.iterdir()):
        path.mkdir(parents=True, exist_ok=True)
        init_db_dir(path, 1)
    return RecoveryConfig(path)


def run(flow: Dataflow, *, recovery_dir: str | None, snapshot_interval_s: float) -> None:
    """Block until the flow ends (sources exhausted) or the process is stopped."""
    run_main(
        flow,
        epoch_interval=timedelta(seconds=snapshot_interval_s),
        recovery_config=recovery_config(recovery_dir),
    )
