#!/usr/bin/env bash
# Installs, builds and runs the test suite (the README's test command).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# -n auto: one pytest-xdist worker per core; --dist loadfile runs each test file on one worker, so
# that what a file builds or sets up once (the sanitizer builds, module-scoped fixtures) is made
# once. -n 0 runs in this process.
python -m pytest tests -ra -q -n auto --dist loadfile "$@"
