#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Safe to run again: it only
# reinstalls when pyproject.toml changed. torch is pinned (2.13.0) and installed first and on
# its own, so pip never resolves another build. Which build pip finds is the machine's: this
# project's machines hold the CPU wheel on local disk (PIP_FIND_LINKS); elsewhere PyPI's Linux
# wheel is the CUDA build (several GB), so set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# for the CPU one, as the Dockerfile does.
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
  .venv/bin/python -m pip install -q --disable-pip-version-check ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
