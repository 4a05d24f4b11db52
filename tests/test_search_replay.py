"""The search backtest: derived queries (Ai et al. 2017) and ``recsys replay --task search``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.events import CatalogItem, Event
from recsys.search import MODES
from recsys.search.replay import category_queries, derive_searches, replay_search
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.synthetic import generate_catalog, generate_events
from recsys_cli.main import main

REES46 = Path(__file__).resolve().parents[2] / "shared" / "data" / "rees46" / "2019-Oct_head17k.csv"


def test_each_kept_purchase_gets_a_search_for_its_category_just_before_it():
    catalog = [CatalogItem("a", "A", category="Home/Kitchen.Knives"), CatalogItem("b", "B")]
    events = [Event("1", "click", "u", "a", 10), Event("2", "purchase", "u", "a", 20), Event("3", "purchase", "u", "b", 30)]
    out, targets = derive_searches(events, category_queries(catalog))
    assert [(e.type, e.ts, e.query) for e in out] == [
        ("click", 10, None), ("search", 19, "home kitchen knives"), ("purchase", 20, None), ("purchase", 30, None)
    ]
    assert targets == {"q:2": "a"}  # b has no category: no search
    half, _ = derive_searches([Event(str(i), "purchase", "u", "a", i) for i in range(2000)], {"a": "x"}, sample=0.5)
    assert 850 < sum(e.type == "search" for e in half) < 1150  # deterministic sample of about half


def test_the_replay_scores_every_derived_search_in_every_mode(tmp_path):
    catalog = generate_catalog(60, seed=5)
    events, targets = derive_searches(generate_events(1500, catalog, n_users=40, seed=6), category_queries(catalog),
                                      types=("purchase", "add_to_cart"))
    engine = Shard.open(Settings(embed_cache_dir=str(tmp_path / "emb"), unknown_items="admit"), in_memory=True, emit=False)
    engine.upsert_catalog(catalog)
    result = replay_search(engine, events, targets, ks=(10,), batch_size=200, progress=False)
    engine.close()
    assert result["scored"] == len(targets) > 20
    assert set(result["models"]) == set(MODES)
    for metrics in result["models"].values():
        assert 0.0 <= metrics["mrr@10"] <= metrics["ndcg@10"] <= metrics["hr@10"] <= 1.0
    # derived queries favour category matching: with a few items per synthetic category, BM25
    # alone puts the target in the top 10 almost always
    assert result["models"]["bm25"]["hr@10"] > 0.9


@pytest.mark.skipif(not REES46.exists(), reason=f"real data not present at {REES46} (../shared/data is optional)")
def test_replay_cli_task_search_writes_the_contract(tmp_path):
    out = tmp_path / "out"
    code = main(["replay", "--task", "search", "--format", "rees46", "--events", str(REES46), "--limit", "3000",
                 "--search-targets", "purchase,add_to_cart", "--embed-cache-dir", str(tmp_path / "emb"), "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "search (derived queries)" and "category matching" in metrics["note"]
    assert set(metrics["models"]) == set(MODES) and metrics["scored"] > 0
    assert "| full |" in (out / "report.md").read_text()


def test_a_real_query_log_with_id_only_items_is_scored_and_learned_from(tmp_path):
    """``--query-log``: no item text at all; what people engaged with after a query is all search
    has, and after a few searches the engaged item is found for it."""
    rows = ["who,what,when,item,at"]
    for n in range(30):
        rows.append(f"u{n},Red Shoes,{1000 + n * 100_000},i{n % 2},{2000 + n * 100_000}")  # 'red shoes' -> i0 / i1
        rows.append(f"v{n},tent,{1500 + n * 100_000},t{n % 3},{2500 + n * 100_000}")
    rows.append("w,tent,99999999,,")  # a search nobody engaged with
    log = tmp_path / "log.csv"
    log.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = main(["replay", "--task", "search", "--query-log", str(log), "--map", "user_id=who", "--map", "query=what",
                 "--map", "query_ts=when", "--map", "item_id=item", "--map", "ts=at",
                 "--embed-cache-dir", str(tmp_path / "emb"), "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "search (query log)" and metrics["scored"] == 60
    # ids only: text retrieval finds nothing, the learned associations find the engaged items
    assert metrics["models"]["bm25"]["hr@10"] == 0.0
    assert metrics["models"]["full"]["hr@10"] > 0.9
    assert "- scored searches: 60" in (out / "report.md").read_text()  # "scored recommendations" until 2026-12-07

    # --k names the cut-offs (until 2026-12-07 it was read by nothing here: always @10)
    code = main(["replay", "--task", "search", "--query-log", str(log), "--map", "user_id=who", "--map", "query=what",
                 "--map", "query_ts=when", "--map", "item_id=item", "--map", "ts=at", "--k", "1,10",
                 "--embed-cache-dir", str(tmp_path / "emb"), "--out", str(tmp_path / "out-k")])
    assert code == 0
    at_k = json.loads((tmp_path / "out-k" / "metrics.json").read_text())
    assert at_k["ks"] == [1, 10] and at_k["models"]["full"]["hr@10"] == metrics["models"]["full"]["hr@10"]
    assert at_k["models"]["full"]["hr@1"] < at_k["models"]["full"]["hr@10"]  # half the queries have two answers


def test_a_query_log_row_the_flow_would_refuse_is_skipped_by_name(tmp_path):
    """A logged search whose user id the flow refuses (an invisible U+200E) was kept by the
    loader, refused by the engine, and vanished: "1 searches with an engaged item", then none
    scored, a report of nothing, exit 0 (a search probe, 2026-12-07). It is now skipped by
    name, as `--format csv` skips it; a skipped engagement says its search is still replayed."""
    from recsys.search.querylog import load_query_log

    log = tmp_path / "log.csv"
    log.write_text("uid,q,qt,item,et,kind\n"
                   "u1\u200e,tent,1700000000000,i1,1700000001000,click\n"
                   "u2,tent,1700000002000,i1,1700000003000,click\n"
                   "u3,tent,1700000004000,i1,1700000005000,buy\n")
    mapping = {"user_id": "uid", "query": "q", "query_ts": "qt", "item_id": "item", "ts": "et", "type": "kind"}
    ds, targets = load_query_log(str(log), mapping)
    assert sorted(e.user_id for e in ds.events) == ["u2", "u2", "u3"] and list(targets.values()) == ["i1"]
    assert ds.skipped == {"invalid field 'user_id'": 1, "unknown engagement type": 1}, ds.skipped
    assert any("U+200E" in e and "line 2" in e for e in ds.examples), ds.examples
    assert any("'buy' (the search is replayed, not scored)" in e for e in ds.examples), ds.examples


def test_a_query_log_row_logged_twice_is_replayed_and_scored_once(tmp_path):
    """An export that wrote a row twice (the same shopper, query, times, item and type) gave two
    searches and two engagements: the item learned from twice and its search scored twice (noted
    2026-12-06, fixed 2026-12-07). The copy is skipped by name, saying which line it repeats; a
    row that differs in any mapped column (here the engagement time) is a search of its own."""
    from recsys.search.querylog import load_query_log

    log = tmp_path / "log.csv"
    log.write_text("uid,q,qt,item,et,note\n"
                   "u1,tent,1700000000000,i1,1700000001000,a\n"
                   "u1,tent,1700000000000,i1,1700000001000,b\n"  # differs only in a column not mapped
                   "u1, tent ,1700000000000,i1,1700000001000,a\n"  # the same once stripped, as it is read
                   "u1,tent,1700000000000,i1,1700000002000,a\n"
                   "u2,tent,1700000003000,,,a\n"
                   "u2,tent,1700000003000,,,a\n")
    mapping = {"user_id": "uid", "query": "q", "query_ts": "qt", "item_id": "item", "ts": "et"}
    ds, targets = load_query_log(str(log), mapping)
    assert len(targets) == 2 and [e.type for e in ds.events].count("search") == 3
    assert ds.skipped == {"duplicate row": 3}, ds.skipped
    assert "duplicate row at line 3 of log.csv: the same as line 2" in ds.examples, ds.examples
    out = tmp_path / "out"
    assert main(["replay", "--task", "search", "--query-log", str(log), *(f"--map={k}={v}" for k, v in mapping.items()),
                 "--embed-cache-dir", str(tmp_path / "emb"), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Rows skipped (3)" in report and "| duplicate row | 3 |" in report, report


def test_a_query_log_whose_engaged_items_its_catalog_lacks_says_how_many(tmp_path, capsys):
    """With ``--catalog``, an engaged item the catalog lacks is admitted only at its engagement,
    after its search: a miss for every model. Until 2026-12-07 (forty-seventh session) nothing
    said how many of the misses were of that kind."""
    log = tmp_path / "log.csv"
    log.write_text("uid,q,qt,item,et\n"
                   "u1,red shoes,1000,i1,2000\nu2,red shoes,3000,i2,4000\nu3,tent,5000,gone,6000\n")
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text('{"item_id": "i1", "title": "Red shoes"}\n{"item_id": "i2", "title": "Red shoes, wide"}\n')
    out = tmp_path / "out"
    code = main(["replay", "--task", "search", "--query-log", str(log), "--map", "user_id=uid", "--map", "query=q",
                 "--map", "query_ts=qt", "--map", "item_id=item", "--map", "ts=et", "--catalog", str(catalog),
                 "--embed-cache-dir", str(tmp_path / "emb"), "--out", str(out)])
    assert code == 0
    said = capsys.readouterr().out
    assert f"1 of 3 scored searches engaged an item --catalog {catalog} lacks" in said, said
    assert json.loads((out / "metrics.json").read_text())["engaged_not_in_catalog"] == 1
    assert "1 of 3 scored searches engaged an item" in (out / "report.md").read_text()  # kept, not only said


def test_flags_a_query_log_replay_does_not_read_are_refused(tmp_path, capsys):
    """`--query-log` holds the searches: `--search-sample`, `--search-targets`, `--events` and
    `--format` were read by nothing, the report as if they had been (a search probe, 2026-12-07)."""
    log = tmp_path / "log.csv"
    log.write_text("uid,q,qt\nu1,tent,1700000000000\n")
    base = ["replay", "--task", "search", "--query-log", str(log), "--out", str(tmp_path / "out")]
    for extra, named in ((["--search-sample", "0.5"], "--search-sample does"),
                         (["--search-targets", "click", "--events", str(log)], "--search-targets, --events do")):
        with pytest.raises(SystemExit) as stop:
            main([*base, *extra])
        assert f"recsys replay: {named} nothing with --query-log" in str(stop.value), stop.value
    assert not (tmp_path / "out").exists()
