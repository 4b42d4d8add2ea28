#!/usr/bin/env bash
# Installs, builds and runs the test suite (the README's test command).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m pytest tests -ra -q "$@"
