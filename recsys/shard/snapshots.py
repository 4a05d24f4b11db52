"""Versioned snapshots of a shard's learned models (the head and the re-ranker) on disk."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from recsys.ranking.reranker import PairwiseReranker

if TYPE_CHECKING:
    from recsys.shard.step import Shard

_log = logging.getLogger(__name__)


class ModelSnapshotError(RuntimeError):
    """A model snapshot under ``state_dir/models`` that cannot be loaded safely; names the file."""


class ModelSnapshots:
    """Versioned snapshots of the learned models (head with its optimizer, re-ranker) on disk.

    Written after a batch's atomic write, at most every ``interval_s`` (and on close, unless a
    batch failed before its write), as ``models-<head version>.pt``
    (atomic: temp file, then rename); the newest is loaded at start-up, so learning continues
    where it stopped. The events between the last snapshot and a crash are in RocksDB state but
    not in the restored head: they are not learned again (never twice), only lost to learning.

    A snapshot holds plain data only, so loading one cannot run code (whoever can write to
    ``state_dir/models`` must not own the flow): the head's tensors, numbers and strings,
    read with ``torch.load(weights_only=True)``, and the re-ranker as JSON text
    (:func:`reranker_to_json`). A file that needs anything else (a pickled object, as a crafted
    file would) is refused with :class:`ModelSnapshotError` naming it; move it away to start
    without it. A snapshot of the old format (the re-ranker pickled) restores its head only.
    """

    KEEP = 3
    #: 1 (before): the re-ranker pickled; its head is still restored, its re-ranker never unpickled
    FORMAT = 2

    def __init__(self, directory: Path | None, interval_s: float, clock: Callable[[], float]):
        self.directory = directory
        self.interval_s = interval_s
        self.clock = clock
        self._last = clock()

    def restore(self, engine: "Shard") -> str | None:
        if self.directory is None:
            return None
        snapshots = sorted(self.directory.glob("models-*.pt"), key=lambda p: p.stat().st_mtime)
        if not snapshots:
            return None
        import torch

        path = snapshots[-1]
        try:
            state = torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
            raise ModelSnapshotError(
                f"model snapshot {path} holds more than plain tensors and numbers (or is damaged), so it "
                f"is not loaded: loading it could run code. Move it out of {self.directory} to start "
                f"from the previous snapshot (or none). ({type(exc).__name__}: {str(exc)[:300]})"
            ) from exc
        fmt = state.get("format", 1) if isinstance(state, dict) else None
        if fmt not in (1, self.FORMAT):
            raise ModelSnapshotError(
                f"model snapshot {path} is not of a known format (1 or {self.FORMAT}); move it out of "
                f"{self.directory} to start without it"
            )
        if engine.head is not None and state.get("head") is not None:
            engine.head.load_state_dict(state["head"])
        if fmt == 1:  # its re-ranker is a pickle: never unpickled, the re-ranker starts afresh
            _log.warning("model snapshot %s: old format, the head is restored, the re-ranker is not", path)
        elif state.get("blend") is not None:
            reranker_from_json(engine.reranker, state["blend"])
        return path.name

    def save(self, engine: "Shard", *, force: bool = False) -> Path | None:
        now = self.clock()
        if self.directory is None or (not force and now - self._last < self.interval_s):
            return None
        self._last = now
        import torch

        self.directory.mkdir(parents=True, exist_ok=True)
        version = engine.head.version if engine.head is not None else "nohead"
        path = self.directory / f"models-{version}.pt"
        tmp = path.with_suffix(".tmp")
        state = {"format": self.FORMAT, "head": engine.head.state_dict() if engine.head else None, "blend": reranker_to_json(engine.reranker)}
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in sorted(self.directory.glob("models-*.pt"), key=lambda p: p.stat().st_mtime)[: -self.KEEP]:
            old.unlink(missing_ok=True)
        return path


def reranker_to_json(reranker: PairwiseReranker) -> str:
    """The re-ranker's whole state as JSON text: numbers, arrays (as lists with their dtype) and
    its random generator's state. Raises ``TypeError`` for an attribute of any other type, so
    a field added to :class:`recsys.ranking.reranker.PairwiseReranker` is noticed here rather than silently dropped.

    >>> b = PairwiseReranker(seed=1); c = PairwiseReranker(seed=2)
    >>> reranker_from_json(c, reranker_to_json(b)); reranker_to_json(c) == reranker_to_json(b)
    True
    """
    import json

    import numpy as np

    out: dict[str, object] = {}
    for name, value in vars(reranker).items():
        if isinstance(value, np.ndarray):
            out[name] = {"ndarray": value.tolist(), "dtype": str(value.dtype)}
        elif isinstance(value, np.random.Generator):
            out[name] = {"generator": value.bit_generator.state}
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            raise TypeError(f"reranker_to_json: PairwiseReranker.{name} is a {type(value).__name__}; teach the snapshot format about it")
    return json.dumps(out)  # stdlib json: the generator state holds 128-bit integers


def reranker_from_json(reranker: PairwiseReranker, text: str) -> None:
    """Restore :func:`reranker_to_json` output into ``reranker``: only attributes it already has, and
    only numeric arrays (the file is data from disk, whoever wrote it)."""
    import json

    import numpy as np

    for name, value in json.loads(text).items():
        if name not in vars(reranker):
            raise ModelSnapshotError(f"re-ranker snapshot: unknown attribute {name!r}")
        if isinstance(value, dict) and "ndarray" in value:
            dtype = np.dtype(value["dtype"])
            if dtype.kind not in "fiub":
                raise ModelSnapshotError(f"re-ranker snapshot: {name} has dtype {dtype}, expected a numeric one")
            value = np.asarray(value["ndarray"], dtype=dtype)
        elif isinstance(value, dict) and "generator" in value:
            rng = np.random.default_rng()
            if value["generator"].get("bit_generator") != type(rng.bit_generator).__name__:
                raise ModelSnapshotError(f"re-ranker snapshot: unknown generator {value['generator'].get('bit_generator')!r}")
            rng.bit_generator.state = value["generator"]
            value = rng
        setattr(reranker, name, value)
