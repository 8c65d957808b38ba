#!/usr/bin/env bash
# The main job: sets up .venv, then compares every scheme with the embedded defaults
# (TP=4, CPU, about 10 minutes on 2 cores). Results land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m benchmarks.compare_schemes "$@"
