"""Catalog, item index (real faiss) and item space (real model, real rocksdict cache)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from recsys.events import CatalogItem, DecodeError
from recsys.items.catalog import Catalog, ItemSpace, VectorIndex, read_catalog_file
from recsys.items.embeddings import Embedder

DIM = 32


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture
def random_index(rng: np.random.Generator) -> tuple[VectorIndex, list[str], np.ndarray]:
    ids = [f"item-{i}" for i in range(500)]
    vecs = unit_rows(rng, len(ids))
    index = VectorIndex(DIM)
    index.upsert(ids, vecs)
    return index, ids, vecs


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedder]:
    emb = Embedder("all-MiniLM-L6-v2", cache_dir=str(tmp_path_factory.mktemp("items-embed")))
    yield emb
    emb.close()


CATALOG = [
    CatalogItem("shoe", "Red running shoes", category="Footwear", brand="Fleet"),
    CatalogItem("sneaker", "Crimson jogging sneakers", category="Footwear"),
    CatalogItem("cake", "Chocolate cake", category="Bakery"),
    CatalogItem("tart", "Lemon tart", category="Bakery"),
    CatalogItem("kettle", "Electric kettle 1.7 l", category="Kitchen"),
]


# ----------------------------------------------------------------------------- VectorIndex


def test_search_returns_the_exact_nearest_neighbours(random_index, rng) -> None:
    index, ids, vecs = random_index
    queries = rng.standard_normal((20, DIM)).astype(np.float32)
    results = index.search(queries, k=10)
    brute = queries @ vecs.T
    for q, got in enumerate(results):
        top = np.argsort(-brute[q])[:10]
        assert [item for item, _ in got] == [ids[i] for i in top]
        np.testing.assert_allclose([s for _, s in got], brute[q, top], atol=1e-5)


def test_batched_search_equals_per_query_search(random_index, rng) -> None:
    index, ids, _ = random_index
    queries = rng.standard_normal((16, DIM)).astype(np.float32)
    exclude = [set(rng.choice(ids, size=j, replace=False).tolist()) for j in range(16)]
    batched = index.search(queries, k=8, exclude=exclude)
    singles = [index.search(queries[j : j + 1], k=8, exclude=[exclude[j]])[0] for j in range(16)]
    assert batched == singles


def test_exclusions_are_honoured_and_k_is_still_filled(random_index, rng) -> None:
    index, ids, _ = random_index
    query = rng.standard_normal((1, DIM)).astype(np.float32)
    plain = [i for i, _ in index.search(query, k=30)[0]]
    banned = set(plain[:25]) | {"not-in-index"}
    got = [i for i, _ in index.search(query, k=10, exclude=[banned])[0]]
    assert len(got) == 10
    assert not banned & set(got)
    assert got[:5] == plain[25:30]


def test_upsert_replaces_an_existing_vector(random_index) -> None:
    index, ids, vecs = random_index
    target = vecs[3]
    index.upsert(["item-0"], target[None, :] * 5.0)  # stored normalised
    assert len(index) == len(ids)
    np.testing.assert_allclose(index.vector("item-0"), target, atol=1e-6)
    top2 = {i for i, _ in index.search(target[None, :], k=2)[0]}
    assert top2 == {"item-0", "item-3"}


def test_remove_drops_items_from_search_and_lookup(random_index) -> None:
    index, ids, vecs = random_index
    assert index.remove(["item-1", "item-2", "unknown"]) == 2
    assert "item-1" not in index and len(index) == len(ids) - 2
    assert index.vector("item-1") is None
    hits = {i for i, _ in index.search(vecs[1:3], k=5)[0] + index.search(vecs[1:3], k=5)[1]}
    assert not {"item-1", "item-2"} & hits
    np.testing.assert_allclose(index.vectors(["item-3", "item-0"]), vecs[[3, 0]], atol=1e-6)


def test_vectors_of_an_unknown_id_raises_key_error(random_index) -> None:
    index, _, _ = random_index
    with pytest.raises(KeyError, match="nope"):
        index.vectors(["item-0", "nope"])


def test_zero_norm_queries_return_nothing_but_others_still_answer(random_index, rng) -> None:
    index, _, _ = random_index
    queries = np.vstack([np.zeros(DIM, np.float32), rng.standard_normal(DIM).astype(np.float32)])
    zero, other = index.search(queries, k=3)
    assert zero == [] and len(other) == 3


def test_search_never_returns_more_than_the_index_holds() -> None:
    index = VectorIndex(2)
    index.upsert(["a", "b"], np.array([[1, 0], [0, 1]], np.float32))
    assert [i for i, _ in index.search(np.array([[1, 0.5]], np.float32), k=10)[0]] == ["a", "b"]
    assert VectorIndex(2).search(np.array([[1, 0]], np.float32), k=3) == [[]]


def test_last_vector_wins_for_an_id_repeated_in_one_upsert() -> None:
    index = VectorIndex(2)
    index.upsert(["a", "a"], np.array([[1, 0], [0, 1]], np.float32))
    assert len(index) == 1
    np.testing.assert_allclose(index.vector("a"), [0, 1])


def test_wrong_dimension_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        VectorIndex(4).upsert(["a"], np.ones((1, 3), np.float32))


# ----------------------------------------------------------------------------- Catalog


def test_catalog_reports_only_new_or_text_changed_items() -> None:
    cat = Catalog()
    assert [i.item_id for i in cat.upsert(CATALOG)] == [i.item_id for i in CATALOG]
    changed = cat.upsert(
        [
            CatalogItem("shoe", "Red running shoes", category="Footwear", brand="Fleet", price=50.0),
            CatalogItem("cake", "Chocolate fudge cake", category="Bakery"),
        ]
    )
    assert [i.item_id for i in changed] == ["cake"]
    assert cat.get("shoe").price == 50.0 and len(cat) == len(CATALOG)


def test_catalog_unavailable_item_is_known_but_not_recommendable() -> None:
    cat = Catalog()
    cat.upsert([CatalogItem("x", "Thing", available=False)])
    assert "x" in cat and not cat.is_recommendable("x")
    assert not cat.is_recommendable("never-seen")


# ----------------------------------------------------------------------------- ItemSpace


def test_item_space_finds_semantic_neighbours(embedder: Embedder) -> None:
    space = ItemSpace(embedder)
    assert space.upsert(CATALOG) == len(CATALOG)
    got = space.search(space.vectors(["shoe"]), k=2, exclude=[{"shoe"}])[0]
    assert got[0][0] == "sneaker"


def test_item_space_re_embeds_only_the_changed_item(embedder: Embedder) -> None:
    space = ItemSpace(embedder)
    space.upsert(CATALOG)
    before = dict(embedder.stats)
    old = space.vector("cake")
    n = space.upsert(
        [CatalogItem("cake", "Carrot cake", category="Bakery"), CatalogItem("tart", "Lemon tart", category="Bakery", price=3.0)]
    )
    assert n == 1
    assert embedder.stats["misses"] - before["misses"] == 1
    assert embedder.stats["hits"] == before["hits"]
    assert float(old @ space.vector("cake")) < 0.99


def test_unavailable_item_is_never_a_candidate_until_available_again(embedder: Embedder) -> None:
    space = ItemSpace(embedder)
    space.upsert(CATALOG)
    sneaker = space.vectors(["sneaker"])
    space.upsert([CatalogItem("sneaker", "Crimson jogging sneakers", category="Footwear", available=False)])
    assert "sneaker" in space and not space.recommendable("sneaker")
    assert space.vector("sneaker") is None
    results = space.search(np.vstack([sneaker] * 3), k=len(CATALOG))
    assert all("sneaker" not in {i for i, _ in r} for r in results)
    assert all(len(r) == len(CATALOG) - 1 for r in results)
    misses = embedder.stats["misses"]
    assert space.upsert([CatalogItem("sneaker", "Crimson jogging sneakers", category="Footwear")]) == 1
    assert embedder.stats["misses"] == misses  # back from the cache, not the model
    assert space.recommendable("sneaker")
    assert space.search(sneaker, k=1)[0][0][0] == "sneaker"


def test_load_jsonl_reads_items_and_names_the_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "catalog.jsonl"
    good.write_text('{"item_id": "a", "title": "A"}\n\n{"item_id": "b", "title": "B", "available": false}\n')
    assert [(i.item_id, i.available) for i in read_catalog_file(good)] == [("a", True), ("b", False)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": "a", "title": "A"}\n{"item_id": "b"}\n')
    with pytest.raises(DecodeError, match=r"line 2: field 'title': missing"):
        read_catalog_file(bad)


def test_a_catalog_file_refusal_names_several_bad_lines_and_counts_them_all(tmp_path: Path) -> None:
    """A catalog probe: ``--catalog-file`` stopped at the first bad line, so each fix cost another
    start and model load. The refusal names the first five and says how many there are."""
    bad = tmp_path / "bad.jsonl"
    lines = ['{"item_id": "ok", "title": "A"}'] + [f'{{"item_id": "b{n}"}}' for n in range(7)] + ['{"item_id": "ok2", "title": "B"}', "[1]"]
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DecodeError) as refused:
        read_catalog_file(bad)
    said = str(refused.value)
    assert said.startswith(f"{bad}, line 2: field 'title': missing; line 3: ")
    assert said.count("; line ") == 4 and "line 6: " in said and "line 7: " not in said
    assert said.endswith("(8 bad lines in all)")


def test_large_index_switches_to_ivf_and_keeps_upsert_remove_and_quality():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(20, 32)).astype(np.float32)
    vecs = centres[rng.integers(20, size=3000)] + 0.1 * rng.normal(size=(3000, 32)).astype(np.float32)
    ids = [f"v{i}" for i in range(3000)]
    index = VectorIndex(32, ivf_threshold=2000, nprobe=8)
    index.upsert(ids, vecs)
    assert index.approximate and len(index) == 3000
    normed = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = normed[:50]
    exact = np.argsort(-(queries @ normed.T), axis=1)[:, :10]
    got = index.search(queries, 10)
    overlap = np.mean([len({ids[j] for j in exact[r]} & {i for i, _ in got[r]}) / 10 for r in range(50)])
    assert overlap >= 0.8  # approximate, but close on clustered data
    index.remove(["v0"])
    assert "v0" not in index and all(i != "v0" for i, _ in index.search(queries[:1], 10)[0])
    index.upsert(["v1"], -vecs[1:2])  # replaced: now points the other way
    np.testing.assert_allclose(index.vector("v1"), -normed[1], atol=1e-6)
    assert all(i != "v1" for i, _ in index.search(queries[1:2], 5)[0])


def test_the_inverted_file_has_the_same_cells_whatever_the_machines_thread_count():
    """faiss's k-means gives other centroids with another OpenMP thread count (4 threads differ
    from 1 on these vectors), so a backtest or a shard answered differently on a machine with
    another number of cores; the index trains with a fixed count (``IVF_TRAIN_THREADS``)."""
    import faiss

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((60, 384)).astype(np.float32)
    vecs = centres[rng.integers(0, 60, 6500)] + 0.3 * rng.standard_normal((6500, 384)).astype(np.float32)
    ids = [f"i{i}" for i in range(6500)]
    before = faiss.omp_get_max_threads()
    cells = []
    try:
        for threads in (1, 4):
            faiss.omp_set_num_threads(threads)  # as on a machine with that many cores
            index = VectorIndex(384)
            index.upsert(ids, vecs)
            assert index.approximate
            quantizer = index._index.quantizer
            cells.append(quantizer.reconstruct_n(0, quantizer.ntotal))
    finally:
        faiss.omp_set_num_threads(before)
    np.testing.assert_array_equal(cells[0], cells[1])


def test_the_switch_to_the_inverted_file_prints_nothing_on_stderr(capfd):
    """At 5,000 items (the switch) faiss's k-means has ~35 points a cell, under the 39 it asks
    for, and printed ``WARNING clustering 5000 points to 141 centroids`` on the process's stderr
    at every start of a flow with such a catalog: noise for an operator, since it changes no
    cell (the test above pins the cells)."""
    rng = np.random.default_rng(1)
    index = VectorIndex(16)
    index.upsert([f"i{i}" for i in range(5_000)], rng.standard_normal((5_000, 16)).astype(np.float32))
    assert index.approximate
    assert "WARNING" not in capfd.readouterr().err


def test_the_index_names_what_changed_since_a_version_and_forgets_across_its_switch_to_ivf(rng) -> None:
    """Search catches a cached answer up through ``changed_since``: every id upserted or removed
    after a version, and None where the journal cannot tell (before the switch to the inverted
    file, whose answers all differ, or further back than it keeps)."""
    index = VectorIndex(DIM, ivf_threshold=300, nprobe=4)
    index.upsert([f"a{i}" for i in range(100)], unit_rows(rng, 100))
    v = index.version
    assert index.changed_since(v) == set()
    index.upsert(["a1", "b1"], unit_rows(rng, 2))  # a1 replaced (removed and added), b1 new
    index.remove(["a2", "unknown"])
    index.remove(["unknown"])  # nothing removed: no new version
    assert index.changed_since(v) == {"a1", "b1", "a2"}
    assert index.changed_since(index.version) == set() and index.changed_since(index.version + 1) is None
    before_switch = index.version
    index.upsert([f"c{i}" for i in range(250)], unit_rows(rng, 250))
    assert index.approximate
    assert index.changed_since(before_switch) is None and index.changed_since(v) is None
    after = index.version
    index.upsert(["c1"], unit_rows(rng, 1))
    assert index.changed_since(after) == {"c1"}
    from recsys.items.catalog import JOURNAL_VERSIONS
    for i in range(2 * JOURNAL_VERSIONS + 1):
        index.remove([f"c{i % 250}"]) or index.upsert([f"c{i % 250}"], unit_rows(rng, 1))
    assert index.changed_since(after) is None
    assert index.changed_since(index.version - JOURNAL_VERSIONS) is not None


def test_the_catalog_names_the_items_changed_since_a_version() -> None:
    catalog = Catalog()
    catalog.upsert([CatalogItem("a", "Red shoe"), CatalogItem("b", "Cake", price=3.0)])
    v = catalog.version
    catalog.upsert([CatalogItem("a", "Red shoe")])  # sent again unchanged: not a change
    assert catalog.changed_since(v) == set() and catalog.version == v
    catalog.upsert([CatalogItem("b", "Cake", price=3.5), CatalogItem("c", "Tea")])  # a price, a new item
    catalog.upsert([CatalogItem("a", "Red shoe", available=False)])
    assert catalog.changed_since(v) == {"a", "b", "c"} and catalog.changed_since(catalog.version - 1) == {"a"}
    assert catalog.changed_since(-1) is None and catalog.changed_since(catalog.version + 1) is None


def test_the_cells_each_vector_search_reads_are_a_setting(tmp_path, embedder) -> None:
    """``RECSYS_IVF_NPROBE`` (issue 12: quality for speed, 16 by default) reaches a shard's
    inverted file. Every cell read gives exact search's answer; fewer cells find less of it; 0
    is refused, naming the variable."""
    from recsys.settings import Settings, SettingsError
    from recsys.shard.step import Shard
    from recsys.store.kv import MemoryKV

    with pytest.raises(SettingsError, match="RECSYS_IVF_NPROBE: must be > 0, got 0"):
        Settings.from_env({"RECSYS_IVF_NPROBE": "0"})
    settings = Settings.from_env({"RECSYS_IVF_NPROBE": "3"}, state_dir=str(tmp_path / "state"))
    shard = Shard(settings, MemoryKV(), embedder)
    try:
        assert shard.items.index.nprobe == 3
    finally:
        shard.close()

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(30, 32)).astype(np.float32)
    vecs = centres[rng.integers(30, size=3000)] + 0.3 * rng.normal(size=(3000, 32)).astype(np.float32)
    ids = [f"v{i}" for i in range(3000)]
    normed = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = normed[:200] + 0.2 * rng.normal(size=(200, 32)).astype(np.float32)
    exact = np.argsort(-(queries @ normed.T), axis=1)[:, :10]
    recall = {}
    for nprobe in (1, 4, 10_000):  # 10,000: more than the 109 cells, so every one
        index = VectorIndex(32, ivf_threshold=2000, nprobe=nprobe)
        index.upsert(ids, vecs)
        assert index.approximate and index._index.nprobe == nprobe
        got = index.search(queries, 10)
        recall[nprobe] = np.mean([len({ids[j] for j in exact[r]} & {i for i, _ in got[r]}) / 10 for r in range(200)])
    assert recall[10_000] == 1.0
    assert recall[1] < recall[4] < 1.0
    with pytest.raises(ValueError, match="nprobe must be > 0, got 0"):
        VectorIndex(32, nprobe=0)
