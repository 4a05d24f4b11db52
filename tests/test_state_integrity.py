"""Storage integrity: damaged RocksDB files and model snapshots are refused loudly, never used.

Real rocksdict in ``tmp_path``; the damage is done to the bytes on disk, as a bad disk, a
partial copy or an attacker would do it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recsys.store.kv import RocksKV, StoreCorruptionError


def _fill(path: Path) -> None:
    kv = RocksKV(path)
    # enough data for a multi-block SST file; random values so blocks do not compress away
    kv.write({b"ses:%06d" % i: os.urandom(64) for i in range(20_000)})
    kv.write({b"u:%06d" % i: b"x" * 100 for i in range(2_000)})
    kv.write({b"wm:events:0": b"21999"})
    kv.close()  # flushes the memtable into an .sst file


def _damage_sst(path: Path) -> Path:
    ssts = sorted(path.glob("*.sst"), key=lambda p: p.stat().st_size)
    assert ssts, f"no .sst file in {path}"
    sst = ssts[-1]
    with sst.open("r+b") as fh:  # 4 KB of garbage a third of the way in: one or two data blocks
        fh.seek(sst.stat().st_size // 3)
        fh.write(os.urandom(4096))
    return sst


def test_a_damaged_sst_file_stops_the_open_with_its_name(tmp_path: Path) -> None:
    _fill(tmp_path / "db")
    sst = _damage_sst(tmp_path / "db")
    with pytest.raises(StoreCorruptionError) as info:
        RocksKV(tmp_path / "db")
    assert sst.name in str(info.value) and "corrupt" in str(info.value).lower()


def test_a_scan_over_a_damaged_block_raises_instead_of_stopping_short(tmp_path: Path) -> None:
    _fill(tmp_path / "db")
    sst = _damage_sst(tmp_path / "db")
    kv = RocksKV(tmp_path / "db", verify=False)  # skip the open-time check: the scan must catch it too
    try:
        with pytest.raises(StoreCorruptionError, match=sst.name):
            for _ in kv.iter_prefix(b"ses:"):
                pass
    finally:
        kv.close()


def test_an_intact_store_opens_and_scans_everything(tmp_path: Path) -> None:
    _fill(tmp_path / "db")
    kv = RocksKV(tmp_path / "db")
    try:
        assert sum(1 for _ in kv.iter_prefix(b"ses:")) == 20_000
        assert kv.verify() == 22_001
    finally:
        kv.close()


# ------------------------------------------------------------------ model snapshots

DIM = 8


class _Models:
    """What :class:`ModelSnapshots` reads and writes on an engine: its head and its re-ranker."""

    def __init__(self, seed: int) -> None:
        import numpy as np

        from recsys.ranking.features import FEATURES
        from recsys.ranking.head import Head, HeadConfig
        from recsys.ranking.reranker import PairwiseReranker

        rng = np.random.default_rng(seed)
        vecs = {f"i{j}": rng.normal(size=DIM).astype(np.float32) for j in range(30)}
        lookup = lambda ids: np.stack([vecs[i] for i in ids]) if ids else np.zeros((0, DIM), np.float32)  # noqa: E731
        # the head's seed is part of its config, which a snapshot must match: only the blend's differs
        self.head = Head(HeadConfig(dim=DIM, history_len=5, batch_size=16, n_neg=8, seed=0), lookup)
        self.reranker = PairwiseReranker(np.linspace(0.1, 1.0, len(FEATURES)), seed=seed, min_examples=1)


def _trained(seed: int = 0) -> _Models:
    import numpy as np

    from recsys.ranking.head import Example

    m = _Models(seed)
    rng = np.random.default_rng(seed)
    examples, history = [], []
    for n in range(64):
        item = f"i{int(rng.integers(30))}"
        examples.append(Example(list(history[-5:]), item, "click", 1_700_000_000_000 + n * 60_000))
        history.append((item, "click", 1_700_000_000_000 + n * 60_000))
    m.head.learn(examples)
    for _ in range(20):
        m.reranker.learn(rng.normal(size=(10, m.reranker.prior.shape[0])), int(rng.integers(10)))
    return m


def test_a_model_snapshot_round_trips_head_and_re_ranker(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from recsys.shard.snapshots import ModelSnapshots, reranker_to_json

    src = _trained(seed=1)
    assert src.head.n_updates > 0 and src.reranker.examples > 0
    store = ModelSnapshots(tmp_path / "models", 30.0, clock=lambda: 0.0)
    path = store.save(src, force=True)
    dst = _Models(seed=2)  # untrained, another re-ranker seed: everything must come from the file
    assert store.restore(dst) == path.name
    a, b = src.head.state_dict(), dst.head.state_dict()
    assert a["config"] == b["config"] and a["n_updates"] == b["n_updates"] and a["pop_ids"] == b["pop_ids"]
    assert a["rng"] == b["rng"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["pop_counts"], b["pop_counts"])
    assert reranker_to_json(src.reranker) == reranker_to_json(dst.reranker)
    # and they go on identically: same random draws, same weights after the same update
    x = np.random.default_rng(5).normal(size=(10, src.reranker.prior.shape[0]))
    src.reranker.learn(x, 3), dst.reranker.learn(x, 3)
    assert np.array_equal(src.reranker.w, dst.reranker.w)


def test_a_model_snapshot_crafted_to_run_code_is_refused_unrun(tmp_path: Path) -> None:
    import pickle

    from recsys.shard.snapshots import ModelSnapshotError, ModelSnapshots

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    models = tmp_path / "models"
    models.mkdir()
    # what the old loader (torch.load(weights_only=False) + pickle.loads) would have run
    import torch

    torch.save({"head": None, "blend": pickle.dumps(Exploit())}, models / "models-head-1.pt")
    (models / "models-head-2.pt").write_bytes(pickle.dumps({"head": Exploit()}))
    os.utime(models / "models-head-1.pt", (1_000, 1_000))  # head-2 is the newest: loaded first
    store = ModelSnapshots(models, 30.0, clock=lambda: 0.0)
    with pytest.raises(ModelSnapshotError, match="models-head-2.pt"):
        store.restore(_Models(seed=0))
    assert not marker.exists()
    # the older file of the old layout: its pickled re-ranker is never unpickled
    (models / "models-head-2.pt").unlink()
    target = _Models(seed=0)
    before = target.reranker.w.copy()
    assert store.restore(target) == "models-head-1.pt"
    assert not marker.exists() and (target.reranker.w == before).all()
