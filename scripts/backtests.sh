#!/usr/bin/env bash
# Re-run every backtest quoted in the README into runs/<name>/ (metrics.json, report.md, plots).
# Needs ../shared/data (the public logs) except for Complete Journey (a PyPI package).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
R=".venv/bin/recsys replay"
D="../shared/data"
# every baseline, the full system and its ablations (frozen / no head / no re-ranker), with
# bootstrap intervals; SASRec too (all+sasrec) in leave-last-out and on REES46, not in the
# other prequential runs, where a nightly retraining (7 on YooChoose, 312 on DIGINETICA, 74 on
# Complete Journey) costs from tens of minutes to hours on two cores
for protocol in prequential leave-last-out; do
  $R --format rees46 --events "$D/rees46/2019-Oct_head17k.csv" --protocol $protocol --models all+sasrec --out runs/rees46-$protocol
done
$R --format yoochoose --events "$D/yoochoose" --protocol leave-last-out --models all+sasrec --out runs/yoochoose-leave-last-out
$R --format yoochoose --events "$D/yoochoose" --protocol prequential --models all --out runs/yoochoose-prequential
$R --format diginetica --events "$D/diginetica" --protocol leave-last-out --models all+sasrec --out runs/diginetica-leave-last-out
$R --format diginetica --events "$D/diginetica" --protocol prequential --models all --out runs/diginetica-prequential
# all models on the first 300k of 1.47M lines (the baselines' cost); the full system on all below
$R --format completejourney --limit 300000 --protocol leave-last-out --models all+sasrec --out runs/completejourney-300k-leave-last-out
$R --format completejourney --limit 300000 --protocol prequential --models all --out runs/completejourney-300k-prequential
# speed: the full system alone over all 1,469,307 lines
$R --format completejourney --models full-system --out runs/completejourney-full
# what sharding costs: the full system as two shards (users split like Kafka's partitioner)
$R --format rees46 --events "$D/rees46/2019-Oct_head17k.csv" --models full-system --shards 2 --out runs/rees46-prequential-2shards
$R --format diginetica --events "$D/diginetica" --models full-system --shards 2 --out runs/diginetica-prequential-2shards
$R --format yoochoose --events "$D/yoochoose" --models full-system --shards 2 --out runs/yoochoose-prequential-2shards
$R --format completejourney --limit 300000 --models full-system --shards 2 --out runs/completejourney-300k-prequential-2shards
