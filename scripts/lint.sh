#!/usr/bin/env bash
# Lint and format checks (CI runs this first; it builds nothing): ruff check and ruff format --check
# over the Python code (settings in pyproject.toml), the 80-line limit on Python functions and the
# 400-line limit on the benchmarks' files (scripts/check_lengths.py), clang-format --dry-run
# --Werror over the C++ and CUDA sources in csrc/ and tests/native (settings in .clang-format).
# Exits nonzero when any would change something (clang-format -i FILE shows or applies the changes
# to a file it names); `ruff check --fix . && ruff format . && clang-format -i FILES` applies them
# all.
# Uses the versions pinned in requirements-dev.txt, from .venv: installs those two there when missing
# (CI lints before scripts/setup_env.sh has installed the rest).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/ruff ] || [ ! -x .venv/bin/clang-format ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  mapfile -t tools < <(grep -E '^(ruff|clang-format)==' requirements-dev.txt)
  .venv/bin/python -m pip install -q --disable-pip-version-check "${tools[@]}"
fi
export PATH="$ROOT/.venv/bin:$PATH"
status=0
ruff check . || status=1
ruff format --check . || status=1
# No Python function over 80 lines (the C++ outside the kernels is held to the same by review), no
# benchmark file over 400 (one harness shared by small scripts).
python3 scripts/check_lengths.py --max 80 sa_cuda scripts tests setup.py || status=1
python3 scripts/check_lengths.py --max 80 --max-file 400 benchmarks || status=1
mapfile -t cxx < <(git ls-files --cached --others --exclude-standard -- \
  'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cuh' 'csrc/*.cu' 'tests/native/*.h' 'tests/native/*.cpp' 'tests/native/*.cuh' 'tests/native/*.cu')
for file in "${cxx[@]}"; do
  clang-format --dry-run --Werror "$file" > /dev/null 2>&1 || { echo "Would reformat: $file"; status=1; }
done
[ "$status" = 0 ] && echo "lint: clean" || echo "lint: FAILED (see above)" >&2
exit "$status"
