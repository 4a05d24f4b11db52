#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Safe to run again: it only
# reinstalls when pyproject.toml changed. torch is pinned (2.13.0, CPU build) and installed
# first and on its own, so pip never resolves a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
"$PY" -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13), f"Python 3.11 or 3.12 needed, found {sys.version.split()[0]}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing dependencies into .venv (first run takes a few minutes) ..."
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
