#!/usr/bin/env bash
# CI's check of sa_cuda as a user installs it, on the oldest supported torch (requirements-oldest.txt,
# in .venv-oldest-torch). Under build/wheel-check:
#  1. sdist: python -m build --sdist --no-isolation, from a copy of the tracked files (src/: the
#     checkout's own build is left alone, and both can run at once); it must hold every file under
#     csrc/ (MANIFEST.in names what setup.py does not).
#  2. wheel: the sdist unpacked (sdist/), pip wheel --no-build-isolation --no-deps against the
#     installed torch (the CPU kernels only, SA_CUDA_NO_CUDA=1: the main job builds the CUDA ones),
#     installed into site/ with pip install --target.
#  3. From elsewhere/, which holds the sdist's tests/ and pytest.ini and nothing else, with site/ as
#     the only way to sa_cuda: its version is the wheel's, py.typed is there, the build is the
#     CPU-only one and one op matches the reference; then the tests of the Python layer (fake kernels,
#     autograd, vmap, modules, torch.compile, convert, opcheck, argument checks) run against the
#     installed wheel. The kernels' values are the main suite's (scripts/test.sh).
#   --build-only: 1 and 2 (.ci/run runs them in the background from its start)
#   --test-only:  3, against what --build-only made
# Without an option: all three.
set -euo pipefail
unset PYTHONDONTWRITEBYTECODE  # bytecode caching, as scripts/setup_env.sh says why
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv-oldest-torch"
PY="$VENV/bin/python"
WORK="$ROOT/build/wheel-check"
MODE="${1:-all}"
case "$MODE" in --build-only | --test-only) shift ;; *) MODE=all ;; esac

# run LOG CMD...: runs CMD with its output in $WORK/LOG, shown only when it fails.
run() {
  local log="$WORK/$1"
  shift
  "$@" > "$log" 2>&1 || { cat "$log"; echo "test_wheel: failed: $*" >&2; exit 1; }
}

if [ "$MODE" != --test-only ]; then
  [ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
  # --no-compile: as in setup_env.sh, Python compiles what it imports, not pip everything.
  "$PY" -m pip install -q --disable-pip-version-check --no-compile -r "$ROOT/requirements-oldest.txt"
  rm -rf "$WORK" && mkdir -p "$WORK/src"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/src")

  run sdist.log "$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" "$WORK/src"
  SDIST="$(echo "$WORK"/dist/sa_cuda-*.tar.gz)"
  [ -f "$SDIST" ] || { echo "test_wheel: no sdist in $WORK/dist" >&2; exit 1; }
  tar -tzf "$SDIST" | sed 's|^[^/]*/||' | sort > "$WORK/sdist-files"
  (cd "$WORK/src" && find csrc -type f | sort) > "$WORK/csrc-files"
  missing="$(comm -23 "$WORK/csrc-files" "$WORK/sdist-files")"
  if [ -n "$missing" ]; then
    echo "test_wheel: the sdist lacks these files under csrc/ (MANIFEST.in):" >&2
    echo "$missing" >&2
    exit 1
  fi
  echo "test_wheel: $(basename "$SDIST") holds all $(wc -l < "$WORK/csrc-files") files under csrc/"

  mkdir -p "$WORK/sdist"
  tar -xzf "$SDIST" -C "$WORK/sdist"
  (cd "$WORK"/sdist/sa_cuda-*/ &&
    SA_CUDA_NO_CUDA=1 SA_CUDA_REQUIRE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
      run wheel.log "$PY" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps -w "$WORK/wheel" .)
  WHEEL="$(echo "$WORK"/wheel/sa_cuda-*.whl)"
  [ -f "$WHEEL" ] || { echo "test_wheel: no wheel in $WORK/wheel" >&2; exit 1; }
  run install.log "$PY" -m pip install --disable-pip-version-check --no-deps --target "$WORK/site" "$WHEEL"
  echo "test_wheel: built $(basename "$WHEEL") from the sdist and installed it into $WORK/site"
fi
[ "$MODE" = --build-only ] && exit 0

rm -rf "$WORK/elsewhere" && mkdir -p "$WORK/elsewhere"
cp -r "$WORK"/sdist/sa_cuda-*/tests "$WORK"/sdist/sa_cuda-*/pytest.ini "$WORK/elsewhere"
cd "$WORK/elsewhere"
export PYTHONPATH="$WORK/site"
"$PY" - "$WORK/site" <<'EOF'
import importlib.metadata
import os
import sys

import torch

import sa_cuda
from sa_cuda import _build_info, reference

site = sys.argv[1]
assert os.path.dirname(os.path.dirname(sa_cuda.__file__)) == site, sa_cuda.__file__
assert os.path.isfile(os.path.join(site, "sa_cuda", "py.typed")), "the wheel lacks sa_cuda/py.typed"
version = importlib.metadata.distribution("sa-cuda").version
assert sa_cuda.__version__ == version, (sa_cuda.__version__, version)
assert _build_info.CUDA_HOME is None and not sa_cuda._C.cuda_built(), "expected the CPU-only build"

torch.manual_seed(0)
groups, m = 4, 8
x = torch.randn(2, 2 * groups * m, 5, 6, dtype=torch.float64)
params = [torch.randn(1, m, 1, 1, dtype=torch.float64) for _ in range(4)]
params += [torch.randn(m, dtype=torch.float64) for _ in range(2)]
assert sa_cuda.fused_available("cpu")
torch.testing.assert_close(sa_cuda.sa_layer(x, groups, *params), reference.sa_layer(x, groups, *params),
                           rtol=1e-10, atol=1e-10)
print(f"test_wheel: sa_cuda {version} from the wheel on torch {torch.__version__}: sa_layer matches the reference")
EOF
"$PY" -m pytest -q -p no:cacheprovider -n auto --dist loadfile \
  tests/ops/test_compile.py tests/ops/test_fake_kernels.py tests/ops/test_opcheck.py \
  tests/ops/test_torch_func.py tests/modules/test_modules.py tests/modules/test_call_paths.py \
  tests/ops/test_errors.py tests/test_convert.py "$@"
