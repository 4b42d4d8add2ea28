#!/usr/bin/env bash
# Benchmarks: sets up .venv and builds sa_cuda (scripts/setup_env.sh), then runs
# python -m benchmarks.bench with the given flags, e.g.
#   benchmarks/run.sh --quick                      # CI smoke test (seconds)
#   benchmarks/run.sh --device cpu --shapes r50-l2-b8 --dtypes fp32
#   benchmarks/run.sh                              # everything (CUDA when available)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../scripts/setup_env.sh
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m benchmarks.bench "$@"
