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
# SASRec's prequential rows, each a run of its own: retrained on everything seen every day of event
# time (the nightly job), DIGINETICA weekly (312 daily trainings: ~4 hours here), Complete Journey
# both ways
$R --format yoochoose --events "$D/yoochoose" --protocol prequential --models sasrec --out runs/yoochoose-prequential-sasrec
$R --format diginetica --events "$D/diginetica" --protocol prequential --models sasrec --retrain-every 168 --out runs/diginetica-prequential-sasrec
$R --format completejourney --limit 300000 --protocol prequential --models sasrec --out runs/completejourney-300k-prequential-sasrec-daily
$R --format completejourney --limit 300000 --protocol prequential --models sasrec --retrain-every 168 --out runs/completejourney-300k-prequential-sasrec-weekly
# the README's Complete Journey leave-last-out ablations came from one run per ablation (in parallel on the
# shared cores); and the same split with each basket's items in a seeded random order instead of the
# log's product-id order (why transitions leads there: README, Complete Journey)
for v in frozen no-head no-reranker; do
  $R --format completejourney --limit 300000 --protocol leave-last-out --models full-system/$v --out runs/completejourney-300k-leave-last-out-$v
done
.venv/bin/python scripts/basket_order_experiment.py replay --format completejourney --limit 300000 --protocol leave-last-out \
  --models popularity,recent_popularity,recently_seen,most_bought,covisitation,session_knn,itemknn,transitions,content,river_biased_mf,bpr_mf,full-system \
  --out runs/completejourney-300k-leave-last-out-shuffled
# speed: the full system alone over all 1,469,307 lines
$R --format completejourney --models full-system --out runs/completejourney-full
# what sharding costs: the full system as two shards (users split like Kafka's partitioner), each
# learning from its own users only (--no-share; sharing is the default with --shards N > 1)
$R --format rees46 --events "$D/rees46/2019-Oct_head17k.csv" --models full-system --shards 2 --no-share --out runs/rees46-prequential-2shards
$R --format diginetica --events "$D/diginetica" --models full-system --shards 2 --no-share --out runs/diginetica-prequential-2shards
$R --format yoochoose --events "$D/yoochoose" --models full-system --shards 2 --no-share --out runs/yoochoose-prequential-2shards
$R --format completejourney --limit 300000 --models full-system --shards 2 --no-share --out runs/completejourney-300k-prequential-2shards
# issue 11: the shards share the global signals (one exchange log, interleaved in event time,
# lag 1 round); --no-share: each shard learns from its own users only, as before
for n in 2 4 8; do
  $R --format rees46 --events "$D/rees46/2019-Oct_head17k.csv" --models full-system --shards $n --out runs/rees46-prequential-${n}shards-shared
  $R --format diginetica --events "$D/diginetica" --models full-system --shards $n --out runs/diginetica-prequential-${n}shards-shared
  $R --format yoochoose --events "$D/yoochoose" --models full-system --shards $n --out runs/yoochoose-prequential-${n}shards-shared
  $R --format completejourney --limit 300000 --models full-system --shards $n --out runs/completejourney-300k-prequential-${n}shards-shared
done
for n in 4 8; do
  $R --format rees46 --events "$D/rees46/2019-Oct_head17k.csv" --models full-system --shards $n --no-share --out runs/rees46-prequential-${n}shards
  $R --format diginetica --events "$D/diginetica" --models full-system --shards $n --no-share --out runs/diginetica-prequential-${n}shards
  $R --format yoochoose --events "$D/yoochoose" --models full-system --shards $n --no-share --out runs/yoochoose-prequential-${n}shards
  $R --format completejourney --limit 300000 --models full-system --shards $n --no-share --out runs/completejourney-300k-prequential-${n}shards
done
# the ceiling of replicating every op to every shard, backed by replays at 16 and 64 shards
# (DIGINETICA: the fastest log), shared and alone
for n in 16 64; do
  $R --format diginetica --events "$D/diginetica" --models full-system --shards $n --out runs/diginetica-prequential-${n}shards-shared
  $R --format diginetica --events "$D/diginetica" --models full-system --shards $n --no-share --out runs/diginetica-prequential-${n}shards
done
# what is left of the gap at 4 shards is the head and the re-ranker (learned per shard): both off
RECSYS_HEAD_ENABLED=false RECSYS_RERANK_ENABLED=false $R --format diginetica --events "$D/diginetica" --models full-system --out runs/diginetica-prequential-nomodels
RECSYS_HEAD_ENABLED=false RECSYS_RERANK_ENABLED=false $R --format diginetica --events "$D/diginetica" --models full-system --shards 4 --out runs/diginetica-prequential-4shards-shared-nomodels
# DIGINETICA's last percent at 4 and 8 shards: the exchange path at one shard (scores exactly one
# process), the head off alone and at 4 shards, and seeds 1-9 at 1, 2, 4 and 8 shards (seed 0 is above)
$R --format diginetica --events "$D/diginetica" --models full-system --shards 1 --share --out runs/diginetica-prequential-1shard-shared
RECSYS_HEAD_ENABLED=false $R --format diginetica --events "$D/diginetica" --models full-system --out runs/diginetica-prequential-nohead
RECSYS_HEAD_ENABLED=false $R --format diginetica --events "$D/diginetica" --models full-system --shards 4 --out runs/diginetica-prequential-4shards-shared-nohead
for seed in 1 2 3 4 5 6 7 8 9; do
  RECSYS_SEED=$seed $R --format diginetica --events "$D/diginetica" --models full-system --out runs/diginetica-prequential-seed$seed
  for n in 2 4 8; do
    RECSYS_SEED=$seed $R --format diginetica --events "$D/diginetica" --models full-system --shards $n --out runs/diginetica-prequential-${n}shards-shared-seed$seed
  done
done
