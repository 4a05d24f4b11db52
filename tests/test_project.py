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


#: Placeholders the README is drafted with before measured figures replace them.
PLACEHOLDERS = ("DEMO_SUMMARY", "BENCHMARK_FIGURES", "THROUGHPUT_TABLE", "ENGINE_FIGURE", "HEAD_COST",
                "BACKTEST_TABLES", "CJ_SPEED", "CJ_FULL", "SETTINGS_TABLE", "LEFT_FOR_LATER")


def test_readme_has_no_unfilled_placeholders():
    readme = (ROOT / "README.md").read_text()
    assert [p for p in PLACEHOLDERS if p in readme] == []
