#!/usr/bin/env bash
# Set everything up, then run the whole pipeline on the embedded default: a local
# Kafka-protocol broker on 127.0.0.1, demo catalog + events, the live dataflow, a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# glibc's heap in transparent huge pages (README, "Operating it": the memory allocator)
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
exec .venv/bin/recsys demo "$@"
