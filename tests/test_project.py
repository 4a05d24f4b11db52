"""Project-level rules: the library stays free of Kafka and Bytewax; the README stays true."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import recsys
from recsys.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_recsys_imports_neither_kafka_nor_bytewax():
    modules = sorted(m.name for m in pkgutil.walk_packages(recsys.__path__, "recsys."))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('kafka', 'bytewax'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"recsys pulled in: {out.stdout.strip()}"
    assert len(modules) > 10  # the walk really found the library


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    for command in commands:
        assert (ROOT / command.split()[1]).exists()
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [Settings.env_var(name) for name in Settings.model_fields if Settings.env_var(name) not in readme]
    assert missing == []


def test_readme_metrics_table_names_every_metric_the_code_exports():
    """Every metric family a shard or the model trainer serves has a row in the README's
    "Metrics" table (prometheus-client's own ``recsys_process_*`` are named there as a group;
    the trainer's counters and the served-model gauges had none until 2026-12-07)."""
    from dataflows.metrics import FlowMetrics, TrainerMetrics

    table = (ROOT / "README.md").read_text().split("### Metrics", 1)[1].split("\n#", 1)[0]
    documented = set(re.findall(r"`(recsys_[a-z0-9_]+)", table))
    families = set()
    for registry in (FlowMetrics(Settings(), status=None).registry, TrainerMetrics(Settings()).registry):
        for family in registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            if not name.startswith("recsys_process_") or name == "recsys_process_resident_memory_bytes":
                families.add(name)
    assert len(families) > 30
    assert sorted(families - documented) == []


def test_readme_says_why_each_dependency_is_there():
    """Every package pyproject.toml installs (the test extra too) has a row in the README's
    "Dependencies and why" table (crc32c had none until 2026-12-06)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower() for spec in
             project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]]
    table = (ROOT / "README.md").read_text().split("## Dependencies and why", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].lower() for line in table.splitlines() if line.startswith("| ")]
    missing = [name for name in names if not any(re.search(rf"(^|[\s,]){re.escape(name)}([\s,(]|$)", row) for row in rows)]
    assert len(names) > 20 and missing == []


#: Placeholders the README is drafted with before measured figures replace them.
PLACEHOLDERS = ("DEMO_SUMMARY", "BENCHMARK_FIGURES", "THROUGHPUT_TABLE", "ENGINE_FIGURE", "HEAD_COST",
                "BACKTEST_TABLES", "CJ_SPEED", "CJ_FULL", "SETTINGS_TABLE", "LEFT_FOR_LATER")


def test_readme_has_no_unfilled_placeholders():
    readme = (ROOT / "README.md").read_text()
    assert [p for p in PLACEHOLDERS if p in readme] == []


# --------------------------------------------------------------------------- layout (issue 15)

PACKAGES = ("recsys", "dataflows", "recsys_cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """First-party modules ``path`` imports anywhere (functions too), except under
    ``if TYPE_CHECKING:`` (annotations only: never executed)."""
    import ast

    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return {n for n in names if n.split(".")[0] in PACKAGES}


def _import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    return {m: {n for n in _imports(p) if n in modules and n != m} for m, p in modules.items()}


def test_no_import_circles():
    graph = _import_graph()
    cycles = []
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a package's __init__ importing its own submodule is not a circle worth reporting
    cycles = [c for c in cycles if not all(x.startswith(c[0] + ".") or x == c[0] for x in c[1:])]
    assert cycles == [], "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert len(graph) > 40  # the walk really found the code


def test_only_tests_import_the_test_broker():
    graph = _import_graph()
    users = sorted(m for m, deps in graph.items() if any(d.startswith("dataflows.testing") for d in deps)
                   and not m.startswith("dataflows.testing"))
    assert users == []


def test_library_flows_and_cli_stay_in_their_layers():
    """recsys imports neither the flows nor the CLI; the flows never import the CLI."""
    graph = _import_graph()
    up = sorted((m, d) for m, deps in graph.items() for d in deps
                if (m.startswith("recsys.") and d.split(".")[0] in ("dataflows", "recsys_cli"))
                or (m.startswith("dataflows") and d.startswith("recsys_cli")))
    assert up == []
