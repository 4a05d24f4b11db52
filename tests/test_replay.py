"""Backtests: the Bytewax replay and the plain-Python loop agree; the CLI keeps its contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataflows.replay import replay_full_system
from recsys.backtest.protocols import PrequentialScorer, prequential
from recsys.backtest.system import FullSystem
from recsys.events import encode
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.synthetic import generate_catalog, generate_events
from recsys_cli.main import main

REES46 = Path(__file__).resolve().parents[2] / "shared" / "data" / "rees46" / "2019-Oct_head17k.csv"


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    catalog = generate_catalog(80, seed=11)
    events = generate_events(1500, catalog, n_users=60, seed=12)
    return catalog, events, str(tmp_path_factory.mktemp("emb"))


def _engine(cache: str, catalog, *, evaluate: bool) -> Shard:
    engine = Shard.open(Settings(embed_cache_dir=cache, unknown_items="admit", top_k=20), evaluate=evaluate, in_memory=True)
    engine.upsert_catalog(catalog)
    return engine


def test_bytewax_replay_and_plain_loop_give_identical_metrics(stream):
    catalog, events, cache = stream
    ks = (10, 20)

    engine = _engine(cache, catalog, evaluate=True)
    scorer = PrequentialScorer(["full-system"], ks, n_events_hint=events)
    replay_full_system(engine, events, scorer, batch_size=100, progress=False)
    engine.close()

    class _Named:
        name = "full-system"

    flow_result = scorer.result([_Named()], {}, n_events=len(events), catalog_size=len(catalog), seconds=1.0, batch_size=100, dataset="t")

    engine = _engine(cache, catalog, evaluate=False)
    loop_result = prequential([FullSystem(engine)], events, ks=ks, batch_size=100, progress=False, catalog_size=len(catalog))
    engine.close()

    assert flow_result["scored"] == loop_result["scored"] == len(events)
    assert flow_result["models"] == loop_result["models"]
    assert flow_result["per_type"] == loop_result["per_type"]
    assert flow_result["models"]["full-system"]["hr@10"] > 0.05  # it learned something


def test_engine_replay_learns_beyond_popularity(stream):
    """On a stream whose users stick to a favourite category, the full system beats popularity."""
    from recsys.backtest.baselines import PopularityBaseline

    catalog, events, cache = stream
    engine = _engine(cache, catalog, evaluate=False)
    result = prequential([FullSystem(engine), PopularityBaseline()], events, ks=(10,), batch_size=100, progress=False)
    engine.close()
    assert result["models"]["full-system"]["hr@10"] > result["models"]["popularity"]["hr@10"]


@pytest.mark.skipif(not REES46.exists(), reason=f"real data not present at {REES46} (../shared/data is optional)")
def test_replay_cli_on_rees46_writes_the_contract(tmp_path, stream):
    out = tmp_path / "out"
    code = main([
        "replay", "--format", "rees46", "--events", str(REES46), "--limit", "3000",
        "--models", "popularity,covisitation,full-system", "--embed-cache-dir", stream[2], "--out", str(out),
    ])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("protocol", "dataset", "exclude_history", "events", "seconds", "models"):
        assert key in metrics
    assert metrics["protocol"] == "prequential" and metrics["events"] == 3000
    assert set(metrics["models"]) == {"popularity", "covisitation", "full-system"}
    for name in metrics["models"]:
        for metric in ("hr@10", "recall@10", "ndcg@10", "mrr@10", "coverage@10"):
            assert 0.0 <= metrics["models"][name][metric] <= 1.0
    assert (out / "report.md").read_text().count("| full-system |") >= 1
    assert any(p.suffix == ".png" for p in out.iterdir())


@pytest.mark.skipif(not REES46.exists(), reason=f"real data not present at {REES46} (../shared/data is optional)")
def test_replay_cli_leave_last_out_states_the_exclusion(tmp_path, stream):
    out = tmp_path / "loo"
    code = main([
        "replay", "--format", "rees46", "--events", str(REES46), "--limit", "3000", "--protocol", "leave-last-out",
        "--models", "popularity,full-system", "--embed-cache-dir", stream[2], "--out", str(out),
    ])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["exclude_history"] is True
    assert "recall@50" in metrics["models"]["full-system"]


def test_replay_cli_shards_split_the_users_and_still_score_every_event(tmp_path, stream):
    catalog, events, cache = stream
    events_file, catalog_file = tmp_path / "events.jsonl", tmp_path / "catalog.jsonl"
    events_file.write_bytes(b"\n".join(encode(e) for e in events) + b"\n")
    catalog_file.write_bytes(b"\n".join(encode(c) for c in catalog) + b"\n")
    args = ["replay", "--format", "jsonl", "--events", str(events_file), "--catalog", str(catalog_file),
            "--models", "full-system", "--embed-cache-dir", cache]
    runs = {}
    for n in (1, 2):
        assert main(args + ["--shards", str(n), "--out", str(tmp_path / f"s{n}")]) == 0
        runs[n] = json.loads((tmp_path / f"s{n}" / "metrics.json").read_text())
    assert [runs[n]["full_system"]["shards"] for n in (1, 2)] == [1, 2]
    assert runs[1]["scored"] == runs[2]["scored"] == len(events)
    assert runs[1]["models"]["full-system"] != runs[2]["models"]["full-system"]  # two engines learned apart
    # where the time went: every shard engine's phases, the scoring and the rest add up to the replay
    for n in (1, 2):
        phases, seconds = runs[n]["full_system"]["phases_s"], runs[n]["full_system"]["seconds"]
        assert phases["score"] > 0 and phases["apply"] > 0
        assert phases.get("rank", 0.0) < phases["score"] / 10  # nothing is emitted without --emit
        assert sum(phases.values()) == pytest.approx(seconds)
    assert runs[1]["full_system"]["phases_s"]["scoring (metrics)"] > 0  # the shared replay scores in its loop
    assert "## Where the full system's replay time went" in (tmp_path / "s2" / "report.md").read_text()
    assert (tmp_path / "s1" / "phases.png").stat().st_size > 0 and "![phases](phases.png)" in (tmp_path / "s1" / "report.md").read_text()
    with pytest.raises(SystemExit, match="only with --protocol prequential"):
        main(args + ["--shards", "2", "--protocol", "leave-last-out", "--out", str(tmp_path / "loo")])


def test_replay_of_events_naming_items_the_catalog_lacks_says_so_and_scores_every_model(tmp_path, stream, capsys):
    """A shop's catalog export rarely holds every item its event log names. The full system
    admits such items without text (`RECSYS_UNKNOWN_ITEMS=admit`, as replays always do); until
    2026-12-06 (forty-fourth session) the content baseline asked the item index for their vectors
    and the replay stopped in a KeyError traceback after the load, in both protocols."""
    catalog, events, cache = stream
    touched = sorted({e.item_id for e in events if e.item_id is not None})
    lacking = set(touched[:3])
    events_file, catalog_file = tmp_path / "events.jsonl", tmp_path / "catalog.jsonl"
    events_file.write_bytes(b"\n".join(encode(e) for e in events) + b"\n")
    catalog_file.write_bytes(b"\n".join(encode(c) for c in catalog if c.item_id not in lacking) + b"\n")
    for protocol in ("prequential", "leave-last-out"):
        out = tmp_path / protocol
        assert main(["replay", "--format", "jsonl", "--events", str(events_file), "--catalog", str(catalog_file),
                     "--protocol", protocol, "--models", "popularity,content,full-system",
                     "--embed-cache-dir", cache, "--out", str(out)]) == 0
        said = capsys.readouterr().out
        assert "3 item(s) the events name are not in the catalog" in said, said
        assert repr(touched[0]) in said  # an example, by name
        metrics = json.loads((out / "metrics.json").read_text())
        assert set(metrics["models"]) >= {"popularity", "content", "full-system"}
        # and in what is kept (until 2026-12-07 on stdout only: an operator's probe)
        assert any("3 item(s) the events name" in note for note in metrics["input_notes"]), metrics["input_notes"]
        assert "## Notes on the input" in (report := (out / "report.md").read_text()) and "3 item(s)" in report


def test_a_replay_says_how_many_events_repeat_an_earlier_one_exactly(tmp_path, stream, capsys):
    """An event CSV whose export wrote rows twice was replayed and scored twice without a word (an
    operator's probe, 2026-12-07), where the query-log reader skips such rows. A log may hold
    genuine repeats (REES46's same-second views), so they are replayed as before, and counted under
    "Notes on the input", with an example by line."""
    catalog, events, cache = stream
    rows = ["user,item,kind,ts"] + [f"{e.user_id},{e.item_id},{e.type},{e.ts}" for e in events if e.item_id]
    rows[5:5] = [rows[3], rows[4]]  # lines 6 and 7 repeat lines 4 and 5
    log = tmp_path / "log.csv"
    log.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["replay", "--format", "csv", "--events", str(log), "--map", "user_id=user", "--map", "item_id=item",
                 "--map", "type=kind", "--map", "ts=ts", "--models", "popularity", "--embed-cache-dir", cache,
                 "--out", str(out)]) == 0
    said = capsys.readouterr().out
    note = ("2 event(s) repeat an earlier one exactly (shopper, item, type, time and every other field; e.g. log:6 "
            "repeats log:4): each is replayed and scored as it comes")
    assert note in said, said
    assert any(note in n for n in json.loads((out / "metrics.json").read_text())["input_notes"])
    assert note in (out / "report.md").read_text()
    # a log without repeats has no such note
    clean = tmp_path / "clean.csv"
    clean.write_text("\n".join(rows[:5] + rows[7:]) + "\n")
    assert main(["replay", "--format", "csv", "--events", str(clean), "--map", "user_id=user", "--map", "item_id=item",
                 "--map", "type=kind", "--map", "ts=ts", "--models", "popularity", "--embed-cache-dir", cache,
                 "--out", str(tmp_path / "clean")]) == 0
    assert "repeat an earlier one exactly" not in capsys.readouterr().out


def test_the_report_says_which_rows_of_the_events_and_the_catalog_were_skipped(tmp_path, stream):
    """report.md is what people read and keep; until 2026-12-07 the rows a replay skipped (a bad
    event, a catalog line refused) were printed while it ran and counted in metrics.json's
    dataset_stats, but report.md said nothing of them: a report of 1,500 events read the same
    whether 3 or 3,000 rows had been refused."""
    catalog, events, cache = stream
    events_file, catalog_file = tmp_path / "events.jsonl", tmp_path / "catalog.jsonl"
    events_file.write_bytes(b"\n".join(encode(e) for e in events) + b"\nnot json\n")
    catalog_file.write_bytes(b"\n".join(encode(c) for c in catalog) + b'\n{"item_id": "", "title": "no id"}\n')
    out = tmp_path / "out"
    assert main(["replay", "--format", "jsonl", "--events", str(events_file), "--catalog", str(catalog_file),
                 "--models", "popularity", "--embed-cache-dir", cache, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Rows skipped (2)" in report, report
    assert "| invalid payload | 1 |" in report and "| invalid field 'item_id' | 1 |" in report
    assert f"line {len(events) + 1} of events.jsonl" in report and f"line {len(catalog) + 1} of catalog.jsonl" in report
    assert json.loads((out / "metrics.json").read_text())["dataset_stats"]["skipped"] == 2
    # a replay that skipped nothing says so in one line
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b"\n".join(encode(e) for e in events) + b"\n")
    assert main(["replay", "--format", "jsonl", "--events", str(clean), "--models", "popularity",
                 "--embed-cache-dir", cache, "--out", str(tmp_path / "clean")]) == 0
    assert "- rows skipped: none" in (tmp_path / "clean" / "report.md").read_text()


def test_a_replay_on_disk_scores_as_in_memory_and_refuses_a_state_directory_that_holds_state(tmp_path, stream, capsys):
    """`--state-dir DIR` keeps a replay's state in RocksDB instead of memory (for logs larger
    than memory). Until 2026-12-06 (forty-fourth session): every engine of the replay opened DIR
    itself, so an ablation row beside the full system stopped in RocksDB's "lock hold by current
    process"; and a second replay on the same DIR started from the first one's state, which
    already held every event it was about to score (HR@10 0.98 against 0.02 on the operator run's
    file), silently."""
    args = _write_fixture(tmp_path, stream) + ["--models", "popularity,full-system,full-system/no-head"]
    runs = {}
    for name, extra in (("memory", []), ("disk", ["--state-dir", str(tmp_path / "state")])):
        assert main(args + extra + ["--out", str(tmp_path / name)]) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())["models"]
    assert runs["disk"] == runs["memory"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(args + ["--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "again")])
    assert "--state-dir" in str(refused.value) and "already holds" in str(refused.value), refused.value
    assert not (tmp_path / "again" / "metrics.json").exists()


# ---- issue 14: scoring depth is a property of the measurement, not of the model


def _write_fixture(tmp_path, stream):
    catalog, events, cache = stream
    events_file, catalog_file = tmp_path / "events.jsonl", tmp_path / "catalog.jsonl"
    events_file.write_bytes(b"\n".join(encode(e) for e in events) + b"\n")
    catalog_file.write_bytes(b"\n".join(encode(c) for c in catalog) + b"\n")
    return ["replay", "--format", "jsonl", "--events", str(events_file), "--catalog", str(catalog_file),
            "--embed-cache-dir", cache]


@pytest.mark.parametrize("protocol,deeper", [("leave-last-out", "10,50"), ("prequential", "10,50")])
def test_asking_for_a_deeper_cutoff_does_not_change_the_full_systems_metrics_at_10(tmp_path, stream, protocol, deeper):
    args = _write_fixture(tmp_path, stream) + ["--protocol", protocol, "--models", "full-system"]
    runs = {}
    for ks in ("10", deeper):
        out = tmp_path / f"k{ks.replace(',', '_')}"
        assert main(args + ["--k", ks, "--out", str(out)]) == 0
        runs[ks] = json.loads((out / "metrics.json").read_text())["models"]["full-system"]
    at10 = {m: v for m, v in runs["10"].items() if m.endswith("@10")}
    assert at10 and at10 == {m: runs[deeper][m] for m in at10}
    assert runs[deeper]["recall@50"] >= runs[deeper]["recall@10"]


def test_ablation_rows_run_beside_the_full_system_and_margins_carry_bootstrap_intervals(tmp_path, stream):
    args = _write_fixture(tmp_path, stream)
    out = tmp_path / "abl"
    models = "popularity,recently_seen,full-system,full-system/frozen,full-system/no-head,full-system/no-reranker"
    assert main(args + ["--k", "10", "--models", models, "--warmup-share", "0.3", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["models"]
    assert set(rows) == set(models.split(","))
    assert metrics["scored"] == len(stream[1])
    # each ablation is a different system: none of them scores exactly as the full system
    for variant in ("full-system/frozen", "full-system/no-head", "full-system/no-reranker"):
        assert rows[variant] != rows["full-system"], variant
    assert metrics["ablation"]["freeze_after_events"] == int(0.3 * len(stream[1]))
    margin = metrics["margins"]["ndcg@10"]
    assert margin["baseline"] in ("popularity", "recently_seen")  # never an ablation
    lo, hi = margin["ci95"]
    assert lo <= margin["margin"] <= hi
    assert margin["verdict"] == ("win" if lo > 0 else "loss" if hi < 0 else "not significant")
    assert "_per_user" not in metrics  # in-memory only
    frozen = metrics["ablation_margins"]["full-system/frozen"]["ndcg@10"]
    assert frozen["full_value"] == pytest.approx(rows["full-system"]["ndcg@10"])  # per-user sums, re-added
    assert frozen["baseline_value"] == pytest.approx(rows["full-system/frozen"]["ndcg@10"])
    report = (out / "report.md").read_text()
    assert "95% bootstrap interval" in report and "| full-system/frozen |" in report
    assert "What each part adds" in report
    assert "## Fallback" in report and "| recently_seen |" in report


@pytest.mark.parametrize("args", [["--k", "abc"], ["--k", "0"], ["--limit", "0"], ["--batch-size", "0"],
                                  ["--exchange-lag", "0"], ["--models", "nope"], ["--trainer-publish-messages", "0"],
                                  ["--trainer-publish-lag", "-1"], ["--map", "nocolumn"],
                                  ["--search-sample", "0", "--task", "search"],
                                  ["--search-targets", "x", "--task", "search"]], ids=" ".join)
def test_one_refused_argument_exits_2_as_the_parsers_refusals_do(args, capsys):
    """The README's exit statuses: 2 for an argument refused on its own (until 2026-12-07 these
    five exited 1, like the checks of what several arguments ask for together)."""
    with pytest.raises(SystemExit) as exited:
        main(["replay", *args, "--out", "never-written"])
    said = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(said) == 1 and said[0].startswith("recsys replay: "), said
    assert args[0] in said[0] or "unknown model" in said[0], said
    assert not Path("never-written").exists()
