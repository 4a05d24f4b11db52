"""Erasure from a stopped flow's state (``recsys forget --offline``).

A flow keeps its state in ``<state_dir>/rocks`` when it runs as one process, and in
``<state_dir>/shard-<i>/rocks`` when ``recsys run --processes N`` runs N shards. An offline
erasure must reach every one of them, with the identity each was written under (shard ``i`` of
``N``, signals shared or not: with sharing, the erasure of a user's sessions goes through the
exchange log as an op sealed by that shard, as the live control topic does), and must never
create an empty state where none was (an erasure that "succeeds" on nothing).

>>> import tempfile
>>> state_dirs(tempfile.mkdtemp())
[]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from recsys.settings import Settings
from recsys.signals.exchange import SEQ_KEY
from recsys.store.kv import RocksKV
from recsys.store.users import user_key

_SHARD_DIR = re.compile(r"shard-(\d+)")


@dataclass(frozen=True)
class StoredShard:
    """What a state directory was written as: shard ``shard`` of ``shards``; ``shared``: its
    global signals went through the exchange log (``--share-signals``)."""

    state_dir: Path
    shard: int
    shards: int
    shared: bool


def state_dirs(state_dir: str | Path) -> list[Path]:
    """The directories under ``state_dir`` that hold a flow's RocksDB: ``state_dir`` itself and
    its ``shard-<i>`` subdirectories, in shard order. A ``rocks`` directory without RocksDB's
    ``CURRENT`` file holds no database (an empty one would be created by opening it)."""
    base = Path(state_dir)

    def holds(d: Path) -> bool:
        return (d / "rocks" / "CURRENT").is_file()

    found = [base] if holds(base) else []
    if base.is_dir():
        shards = [(int(m.group(1)), d) for d in base.iterdir() if (m := _SHARD_DIR.fullmatch(d.name)) and holds(d)]
        found += [d for _, d in sorted(shards)]
    return found


def stored_shard(path: Path) -> StoredShard:
    """Read a state directory's layout and whether it shares signals, without opening the engine."""
    from recsys.shard.step import _LAYOUT_KEY  # the key Shard.open checks the layout by

    kv = RocksKV(str(path / "rocks"))
    try:
        layout, shared = kv.get(_LAYOUT_KEY), kv.get(SEQ_KEY) is not None
    finally:
        kv.close()
    shard, _, shards = (layout or b"0/1").decode().partition("/")
    return StoredShard(path, int(shard), int(shards), shared)


def forget_offline(settings: Settings, user_ids: list[str]) -> list[tuple[StoredShard, int]]:
    """Erase ``user_ids`` from every shard state under ``settings.state_dir`` (the flow must be
    stopped); returns each shard with the number of those users it held. Raises
    FileNotFoundError when there is no flow state there."""
    from recsys.shard.step import Shard

    found = state_dirs(settings.state_dir)
    if not found:
        raise FileNotFoundError(
            f"no flow state under {settings.state_dir} (neither {settings.state_dir}/rocks nor "
            f"{settings.state_dir}/shard-<i>/rocks): give the --state-dir the flow ran with")
    out = []
    for path in found:
        stored = stored_shard(path)
        # the shard's own identity: its exchange origin and sequence, and the layout check
        shard_settings = settings.replace(state_dir=str(path), shard=stored.shard, shards=stored.shards,
                                          share_signals=stored.shared or settings.share_signals)
        engine = Shard.open(shard_settings)
        try:
            held = sum(engine.kv.get(user_key(u)) is not None for u in dict.fromkeys(user_ids))
            engine.forget(user_ids, source="cli")  # tombstones for all: their later events start new users
            out.append((stored, held))
        finally:
            engine.close()
    return out
