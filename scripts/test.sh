#!/usr/bin/env bash
# Set everything up, then run the whole test suite (in-memory broker and a real local
# Kafka-protocol broker started by the test session on 127.0.0.1).
#
# Two passes, each with the arguments given: first every test not marked `serial`, spread over
# the machine's cores (pytest-xdist, at most 4 workers, each with its own local broker), those
# that start flows, brokers or workers (`processes`) among them; then the `serial` ones (they time
# what they do, or use the demo's var/demo) one at a time, as their time limits assume. With -m
# or -n among the arguments, one pass, as given.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# numba's loops compiled once, into their cache, before any test runs (as the image does at build):
# on a fresh clone every process that started before the first wrote it compiled them all again
# (~26 s of CPU each), several at once in the first minute of the first pass
.venv/bin/python -m recsys.signals.compile_kernels
pytest=(.venv/bin/python -m pytest)
for arg in "$@"; do
  case "$arg" in
    -m|-m*|-n|-n*|--numprocesses*) exec "${pytest[@]}" "$@" ;;
  esac
done
first=0 second=0
"${pytest[@]}" -n auto --maxprocesses 4 -m "not serial" "$@" || first=$?
echo "---- the serial tests, one at a time"
"${pytest[@]}" -m serial "$@" || second=$?
# 5: no test selected in that pass (a run of some files only)
if [ "$first" -eq 5 ] && [ "$second" -eq 5 ]; then exit 5; fi
for rc in "$first" "$second"; do
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
done
exit 0
