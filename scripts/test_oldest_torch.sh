#!/usr/bin/env bash
# CI's check of the oldest supported torch (requirements-oldest.txt, 2.11): builds the CPU kernels
# against it in a copy of the tracked sources (build/oldest-torch/src: the in-place build of .venv's
# torch stays untouched), then runs the tests of the Python layer there (fake kernels, autograd,
# vmap, modules, torch.compile, convert, opcheck). The emulated-kernel tests do not depend on
# torch's Python APIs and run once, in the main suite.
#   --build-only: install requirements-oldest.txt into .venv-oldest-torch and build, no test
#   --test-only:  the tests, against what --build-only made
# (.ci/run builds in the background while the main job builds and tests, then tests.)
set -euo pipefail
unset PYTHONDONTWRITEBYTECODE  # bytecode caching, as scripts/setup_env.sh says why
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv-oldest-torch"
SRC="$ROOT/build/oldest-torch/src"
MODE="${1:-all}"
case "$MODE" in --build-only | --test-only) shift ;; *) MODE=all ;; esac

if [ "$MODE" != --test-only ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  # --no-compile: as in setup_env.sh, Python compiles what it imports, not pip everything.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile -r "$ROOT/requirements-oldest.txt"
  rm -rf "$SRC" && mkdir -p "$SRC"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard -- csrc sa_cuda tests setup.py pyproject.toml README.md pytest.ini |
    xargs -0 cp --parents -t "$SRC")
  (cd "$SRC" && SA_CUDA_REQUIRE_CUDA=0 SA_CUDA_NO_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" \
    "$VENV/bin/python" setup.py -q build_ext --inplace > build.log 2>&1) || { cat "$SRC/build.log"; exit 1; }
fi
[ "$MODE" = --build-only ] && exit 0
cd "$SRC"
"$VENV/bin/python" -c "import torch, sa_cuda; print('sa_cuda on torch', torch.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -n auto --dist loadfile \
  tests/ops/test_compile.py tests/ops/test_fake_kernels.py tests/ops/test_opcheck.py \
  tests/ops/test_torch_func.py tests/modules/test_modules.py tests/ops/test_errors.py tests/test_convert.py "$@"
