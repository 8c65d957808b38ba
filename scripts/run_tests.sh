#!/usr/bin/env bash
# The test command: sets up .venv (see setup_env.sh), then runs the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests benchmarks --benchmark-disable "$@"
