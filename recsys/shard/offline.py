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
    holds_items: bool  # catalog items, which the engine indexes again when it opens


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
    from recsys.shard.step import _ITEM_PREFIX, _LAYOUT_KEY  # the keys Shard.open reads them by

    kv = RocksKV(str(path / "rocks"))
    try:
        layout, shared = kv.get(_LAYOUT_KEY), kv.get(SEQ_KEY) is not None
        holds_items = next(iter(kv.iter_prefix(_ITEM_PREFIX)), None) is not None
    finally:
        kv.close()
    shard, _, shards = (layout or b"0/1").decode().partition("/")
    return StoredShard(path, int(shard), int(shards), shared, holds_items)


def forget_offline(settings: Settings, user_ids: list[str]) -> list[tuple[StoredShard, int]]:
    """Erase ``user_ids`` from every shard state under ``settings.state_dir`` (the flow must be
    stopped); returns each shard with the number of those users it held. Raises
    FileNotFoundError when there is no flow state there, or when the state holds catalog items and
    there is no embedding cache at ``settings.embed_cache_dir``: the engine indexes its items again
    when it opens, from their cached vectors, and without them it would embed the whole catalog
    with the model, into a new cache wherever the command ran (until 2026-12-07 it did: minutes
    and a ``./var/embeddings`` of the catalog's size, for an erasure that reads no vector)."""
    from recsys.shard.step import Shard

    found = state_dirs(settings.state_dir)
    if not found:
        raise FileNotFoundError(
            f"no flow state under {settings.state_dir} (neither {settings.state_dir}/rocks nor "
            f"{settings.state_dir}/shard-<i>/rocks): give the --state-dir the flow ran with")
    shards = [stored_shard(path) for path in found]
    if any(stored.holds_items for stored in shards) and not Path(settings.embed_cache_dir).is_dir():
        raise FileNotFoundError(
            f"no embedding cache at {settings.embed_cache_dir}, and the state under {settings.state_dir} holds "
            f"catalog items, which opening it indexes again from their cached vectors: give the "
            f"--embed-cache-dir (RECSYS_EMBED_CACHE_DIR) the flow ran with (an empty directory there "
            f"embeds the whole catalog again, with the model)")
    out = []
    for path, stored in zip(found, shards):
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
