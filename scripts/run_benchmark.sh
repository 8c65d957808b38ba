#!/usr/bin/env bash
# The main job: sets up .venv, then compares as_shipped with optimized on sglang 0.5.5's
# real server (TP=2, CPU, streamed chat requests with images under named regimes; see
# the README for its run time). Results land in benchmarks/results/server-<timestamp>.*.
# Arguments go to benchmarks.server_comparison (--help).
#   bash scripts/run_benchmark.sh --harness [args]   the multi-rank harness instead
#                                                    (benchmarks.compare_schemes, TP=4)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ "${1:-}" = "--harness" ]; then
  shift
  exec .venv/bin/python -m benchmarks.compare_schemes "$@"
fi
exec .venv/bin/python -m benchmarks.server_comparison "$@"
