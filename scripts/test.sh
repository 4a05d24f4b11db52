#!/usr/bin/env bash
# Set everything up, then run the whole test suite (in-memory broker and a real local
# Kafka-protocol broker started by the test session on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
