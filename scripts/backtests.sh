#!/usr/bin/env bash
# Re-run every backtest quoted in the README into runs/<name>/ (metrics.json, report.md, plots).
# Needs ../shared/data (the public logs) except for Complete Journey (a PyPI package).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
R=".venv/bin/recsys replay"
D="../shared/data"
for protocol in prequential leave-last-out; do
  $R --format rees46 --events "$D/rees46/2019-Oct_head17k.csv" --protocol $protocol --out runs/rees46-$protocol
  $R --format diginetica --events "$D/diginetica" --protocol $protocol --out runs/diginetica-$protocol
  $R --format yoochoose --events "$D/yoochoose" --protocol $protocol --out runs/yoochoose-$protocol
  # all models on the first 300k of 1.47M lines (the baselines' cost); the full system on all below
  $R --format completejourney --limit 300000 --protocol $protocol --out runs/completejourney-300k-$protocol
done
# speed: the full system alone over all 1,469,307 lines
$R --format completejourney --models full-system --out runs/completejourney-full
# what sharding costs: the full system as two shards (users split like Kafka's partitioner)
$R --format rees46 --events "$D/rees46/2019-Oct_head17k.csv" --models full-system --shards 2 --out runs/rees46-prequential-2shards
$R --format diginetica --events "$D/diginetica" --models full-system --shards 2 --out runs/diginetica-prequential-2shards
$R --format yoochoose --events "$D/yoochoose" --models full-system --shards 2 --out runs/yoochoose-prequential-2shards
$R --format completejourney --limit 300000 --models full-system --shards 2 --out runs/completejourney-300k-prequential-2shards
