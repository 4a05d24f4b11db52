"""Write a backtest result as metrics.json, report.md and PNG plots.

``write_report(result, out_dir, title=, command=)`` takes the dict returned by
:func:`recsys.backtest.protocols.prequential` or :func:`recsys.backtest.protocols.leave_last_out` and writes:

- ``metrics.json``: ``{"protocol", "dataset", "exclude_history", "events", "seconds",
  "models": {name: {metric: float}}}`` plus every other key of the result, the title and
  the command;
- ``report.md``: a models x metrics table (best per column in bold), per-event-type and
  per-slice tables, the protocol, the exclusion rule and the command that produced it;
- ``series_<metric>.png`` (metric over time per model) and ``per_type.png`` /
  ``slices.png`` (bars per event type / slice).

Plots use matplotlib's object API (``Figure``, Agg canvas), never ``pyplot`` global state.

>>> import tempfile, json, pathlib
>>> result = {"protocol": "prequential", "events": 2, "seconds": 0.1, "exclude_history": False,
...           "models": {"pop": {"hr@10": 0.5, "ndcg@10": 0.25}}}
>>> with tempfile.TemporaryDirectory() as d:
...     paths = write_report(result, d, title="demo", command="recsys backtest")
...     sorted(p.name for p in paths), json.loads(pathlib.Path(d, "metrics.json").read_text())["models"]
(['metrics.json', 'report.md'], {'pop': {'hr@10': 0.5, 'ndcg@10': 0.25}})
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

__all__ = ["write_report", "metric_columns"]

_METRIC_ORDER = ("hr", "recall", "ndcg", "mrr", "coverage", "novelty")
_CONTRACT_KEYS = ("protocol", "dataset", "exclude_history", "events", "seconds", "models")


def metric_columns(models: dict[str, dict[str, float]]) -> list[str]:
    """Metric names across models, grouped by metric family then cutoff.

    >>> metric_columns({"a": {"ndcg@20": 0, "hr@10": 0, "ndcg@10": 0, "custom": 1}})
    ['hr@10', 'ndcg@10', 'ndcg@20', 'custom']
    """
    names = {name for metrics in models.values() for name in metrics}

    def key(name: str) -> tuple[int, int, str]:
        family, _, cutoff = name.partition("@")
        rank = _METRIC_ORDER.index(family) if family in _METRIC_ORDER else len(_METRIC_ORDER)
        return (rank, int(cutoff) if cutoff.isdigit() else 0, name)

    return sorted(names, key=key)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(rows: dict[str, dict[str, Any]], columns: list[str], *, first: str, bold_best: bool) -> list[str]:
    best: dict[str, float] = {}
    if bold_best:
        for c in columns:
            values = [r[c] for r in rows.values() if isinstance(r.get(c), (int, float))]
            if values:
                best[c] = max(values)
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, r in rows.items():
        cells = []
        for c in columns:
            v = r.get(c)
            cell = "" if v is None else _fmt(v)
            if bold_best and c in best and v == best[c] and len(rows) > 1:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _primary_metric(result: dict[str, Any]) -> str | None:
    ks = result.get("ks") or []
    columns = metric_columns(result.get("models", {}))
    for cand in ([f"ndcg@{min(ks)}"] if ks else []) + [c for c in columns if c.startswith("ndcg@")] + columns:
        if cand in columns:
            return cand
    return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _new_figure(width: float = 8.0, height: float = 4.5) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot_series(series: dict[str, list[dict[str, Any]]], metric: str, path: Path, title: str) -> bool:
    fig = _new_figure()
    ax = fig.add_subplot()
    drawn = False
    for name, points in series.items():
        pts = [p for p in points if metric in p]
        if not pts:
            continue
        if all(p.get("end_ts") is not None for p in pts):
            xs: list[Any] = [datetime.fromtimestamp(p["end_ts"] / 1000, tz=timezone.utc) for p in pts]
            ax.set_xlabel("event time (UTC)")
        else:
            xs = list(range(1, len(pts) + 1))
            ax.set_xlabel("bucket")
        ax.plot(xs, [p[metric] for p in pts], marker=".", label=name)
        drawn = True
    if not drawn:
        return False
    ax.set_ylabel(metric)
    ax.set_title(f"{title}: {metric} over time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.autofmt_xdate()
    fig.savefig(path)
    return True


def _plot_bars(groups: dict[str, dict[str, dict[str, Any]]], metric: str, path: Path, title: str, what: str) -> bool:
    import numpy as np

    models = [m for m, g in groups.items() if g]
    cats = sorted({c for m in models for c in groups[m]})
    if not models or not cats:
        return False
    fig = _new_figure()
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    x = np.arange(len(cats))
    for j, m in enumerate(models):
        ax.bar(x + j * width, [groups[m].get(c, {}).get(metric, 0.0) for c in cats], width, label=m)
    ax.set_xticks(x + width * (len(models) - 1) / 2, cats)
    ax.set_ylabel(metric)
    ax.set_title(f"{title}: {metric} per {what}")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return True


def _plot_phases(phases: dict[str, float], n_events: int | None, path: Path, title: str) -> bool:
    """Where the full system's replay time went, one bar per phase (µs an event when the event
    count is known, else seconds)."""
    shown = {name: s for name, s in phases.items() if s > 0}
    if not shown:
        return False
    scale, unit = (1e6 / n_events, "µs an event") if n_events else (1.0, "seconds")
    fig = _new_figure()
    ax = fig.add_subplot()
    names = list(shown)[::-1]  # the first phase on top
    ax.barh(names, [shown[n] * scale for n in names])
    ax.set_xlabel(unit)
    ax.set_title(f"{title}\nwhere the full system's replay time went", fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path)
    return True


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.1f}%"


def _margin_section(margins: dict[str, dict[str, Any]]) -> list[str]:
    """The full system against the best baseline per metric, with 95% bootstrap intervals."""
    if not margins:
        return []
    lines = ["", "## Full system vs the best baseline (95% bootstrap interval over users)", "",
             "| metric | best baseline | full system | baseline | margin | 95% interval | verdict |",
             "|---|---|---:|---:|---:|---:|---|"]
    for metric, m in margins.items():
        ci = m.get("ci95")
        interval = f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "n/a"
        lines.append(f"| {metric} | {m['baseline']} | {m['full_value']:.4f} | {m['baseline_value']:.4f} | "
                     f"{_pct(m.get('margin'))} | {interval} | {m['verdict']} |")
    n_boot = next(iter(margins.values())).get("n_boot")
    lines += ["", f"A margin counts as a win only when its interval excludes zero ({n_boot} resamples of users)."]
    return lines


def _ablation_section(ablations: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """What each part of the full system adds: its margin over each ablation, with intervals."""
    if not ablations:
        return []
    lines = ["", "## What each part adds: full system vs its ablations (95% bootstrap interval over users)", "",
             "| ablation | metric | ablation | full system | full system's margin | 95% interval | verdict |",
             "|---|---|---:|---:|---:|---:|---|"]
    for variant, per_metric in ablations.items():
        for metric, m in per_metric.items():
            ci = m.get("ci95")
            interval = f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "n/a"
            lines.append(f"| {variant} | {metric} | {m['baseline_value']:.4f} | {m['full_value']:.4f} | "
                         f"{_pct(m.get('margin'))} | {interval} | {m['verdict']} |")
    return lines


def _skipped_section(counts: dict[str, int], examples: list[str]) -> list[str]:
    """The rows of the input files (events, catalog, query log) the replay skipped, by reason, with
    the first examples the loader kept (each names its line and file)."""
    lines = ["", f"## Rows skipped ({sum(counts.values())})", "", "| reason | rows |", "|---|---:|"]
    lines += [f"| {reason} | {n} |" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    if examples:
        lines += ["", "Examples (the first few of each reason):", ""] + [f"- {example}" for example in examples]
    return lines


def _fallback_section(fallback: dict[str, dict[str, Any]]) -> list[str]:
    """How often each baseline had nothing of its own for a user it knew (popularity filled)."""
    if not fallback:
        return []
    lines = ["", "## Fallback: lists the model's own evidence did not contribute to", "",
             "| model | lists (known users) | fell back | share of lists | share of users (at least once) |",
             "|---|---:|---:|---:|---:|"]
    for name, f in fallback.items():
        lines.append(f"| {name} | {f['lists']} | {f['fell_back']} | {f['share']:.1%} | {f['user_share']:.1%} |")
    lines += ["", "A fallen-back list is popularity (or, for the neighbourhood models, the user's own items "
              "only): the model found no neighbour or no evidence for that user."]
    return lines


def _phases_section(phases: dict[str, float]) -> list[str]:
    """Where the full system's replay time went: the engine's phases (``recsys.shard.step.PHASES``),
    the scoring, and the rest (the replay's source and the dataflow around the engine)."""
    total = sum(phases.values())
    if not phases or total <= 0:
        return []
    lines = ["", "## Where the full system's replay time went", "",
             "| phase | seconds | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {s:.2f} | {s / total:.1%} |" for name, s in phases.items()]
    lines += ["", "Engine phases as `recsys.shard.step.PHASES` names them (score: the list ranked before each "
              "batch, which is what is scored; rank: the lists emitted after it, only with `--emit`)."]
    return lines


def write_report(
    result: dict[str, Any],
    out_dir: str | Path,
    *,
    title: str,
    command: str,
    dataset: str | None = None,
) -> list[Path]:
    """Write metrics.json, report.md and plots for ``result`` into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {key: result.get(key) for key in _CONTRACT_KEYS}
    data["dataset"] = dataset if dataset is not None else result.get("dataset")
    data["models"] = {name: {k: float(v) for k, v in m.items()} for name, m in (result.get("models") or {}).items()}
    for key, value in result.items():
        if key not in data and not key.startswith("_"):  # "_" keys: in-memory only (per-user sums)
            data[key] = value
    data["title"] = title
    data["command"] = command
    written = [out / "metrics.json"]
    written[0].write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS))

    for stale in [*out.glob("series_*.png"), out / "phases.png", out / "per_type.png", out / "slices.png"]:
        stale.unlink(missing_ok=True)  # an earlier report's plots, in a directory used again, would pass for this one's
    plots: list[Path] = []
    primary = _primary_metric(result)
    ks = sorted(result.get("ks") or [])
    series = result.get("series") or {}
    if series:
        for family in ("hr", "ndcg"):
            metric = f"{family}@{ks[0]}" if ks else (primary or "")
            path = out / f"series_{_safe(metric)}.png"
            if metric and _plot_series(series, metric, path, title):
                plots.append(path)
    phases = (result.get("full_system") or {}).get("phases_s") or {}
    if phases and _plot_phases(phases, result.get("events"), out / "phases.png", title):
        plots.append(out / "phases.png")
    if primary:
        for key, what, fname in (("per_type", "event type", "per_type.png"), ("slices", "slice", "slices.png")):
            groups = result.get(key) or {}
            if groups and _plot_bars(groups, primary, out / fname, title, what):
                plots.append(out / fname)

    md = [f"# {title}", ""]
    protocol = result.get("protocol", "?")
    facts = [f"- protocol: **{protocol}**"]
    if result.get("target"):
        facts.append(f"- target: {result['target']}")
    if data["dataset"]:
        facts.append(f"- dataset: {data['dataset']}")
    facts.append(f"- exclude_history: {result.get('exclude_history')}")
    if result.get("exclusion"):
        facts.append(f"- exclusion: {result['exclusion']}")
    scored = "scored searches" if str(result.get("protocol", "")).startswith("search") else "scored recommendations"
    for key, label in (("events", "events"), ("scored", scored), ("catalog_size", "catalog size"),
                       ("batch_size", "batch size"), ("held_out_users", "held-out users")):
        if result.get(key) is not None:
            facts.append(f"- {label}: {result[key]}")
    # the rows the loader refused (until 2026-12-07 in metrics.json only): "skipped" (search
    # replays) or the dataset's stats (recommendation replays); absent when the caller gave neither
    skipped = result["skipped"] if "skipped" in result else (result.get("dataset_stats") or {}).get("skipped_by_reason")
    if skipped is not None and not skipped:
        facts.append("- rows skipped: none")
    if result.get("seconds") is not None:
        rate = result.get("events_per_s")
        facts.append(f"- wall time: {result['seconds']:.2f} s" + (f" ({rate:,.0f} events/s)" if rate else ""))
    md += facts
    if result.get("input_notes"):  # caveats the loader found (until 2026-12-07 on stdout only)
        md += ["", "## Notes on the input", ""] + [f"- {note}" for note in result["input_notes"]]
    md += ["", "## Metrics (best per column in bold)", ""]
    models = data["models"]
    md += _table(models, metric_columns(models), first="model", bold_best=True)
    md += _margin_section(result.get("margins") or {})
    md += _ablation_section(result.get("ablation_margins") or {})
    md += _fallback_section(result.get("fallback") or {})
    if skipped:
        md += _skipped_section(skipped, result.get("_skip_examples") or [])
    timing = result.get("timing") or {}
    if timing:
        md += ["", "## Time per model (s)", ""]
        md += _table(timing, sorted({c for t in timing.values() for c in t}), first="model", bold_best=False)
    md += _phases_section((result.get("full_system") or {}).get("phases_s") or {})
    if primary:
        for key, heading in (("per_type", "per event type"), ("slices", "per slice")):
            groups = result.get(key) or {}
            cats = sorted({c for g in groups.values() for c in g})
            if not cats:
                continue
            rows = {m: {c: g[c][primary] for c in cats if c in g} for m, g in groups.items()}
            md += ["", f"## {primary} {heading}", ""]
            md += _table(rows, cats, first="model", bold_best=True)
            counts = {c: next((g[c].get("n") for g in groups.values() if c in g), None) for c in cats}
            md += ["", "Scored per group: " + ", ".join(f"{c} {n}" for c, n in counts.items())]
    if plots:
        md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    md += ["", "## Command", "", "```", command, "```", ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    written.append(out / "report.md")
    return written + plots
