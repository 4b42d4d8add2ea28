#!/usr/bin/env bash
# CI's packaging check: the sdist holds everything a wheel is built from, and that wheel works
# outside the source tree.
#  1. python -m build --sdist --no-isolation; the sdist must hold every file under csrc/.
#  2. In a temp dir: unpack it, build a wheel from it with pip wheel --no-build-isolation --no-deps
#     against the installed torch (CPU kernels only, SA_CUDA_NO_CUDA=1: the CUDA build is checked by
#     the main suite, and this keeps CI fast).
#  3. Install the wheel into a temp target dir and, from a directory outside the tree, import
#     sa_cuda from there: its version must be the wheel's, its build info the CPU-only build, and one
#     op must match the reference.
# Runs with .venv's python, which scripts/setup_env.sh sets up (with `build`).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sa_cuda-package.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# run LOG CMD...: runs CMD with its output in $WORK/LOG, shown only when it fails.
run() {
  local log="$WORK/$1"
  shift
  "$@" > "$log" 2>&1 || { cat "$log"; echo "check_package: failed: $*" >&2; exit 1; }
}

run sdist.log "$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" "$ROOT"
SDIST="$(echo "$WORK"/dist/sa_cuda-*.tar.gz)"
[ -f "$SDIST" ] || { echo "check_package: no sdist in $WORK/dist" >&2; exit 1; }
tar -tzf "$SDIST" | sed 's|^[^/]*/||' | sort > "$WORK/sdist-files"
(cd "$ROOT" && git ls-files --cached --others --exclude-standard csrc | sort) > "$WORK/csrc-files"
missing="$(comm -23 "$WORK/csrc-files" "$WORK/sdist-files")"
if [ -n "$missing" ]; then
  echo "check_package: the sdist lacks these files under csrc/ (MANIFEST.in):" >&2
  echo "$missing" >&2
  exit 1
fi
echo "check_package: $(basename "$SDIST") holds all $(wc -l < "$WORK/csrc-files") files under csrc/"

tar -xzf "$SDIST" -C "$WORK"
(cd "$WORK"/sa_cuda-*/ &&
  SA_CUDA_NO_CUDA=1 SA_CUDA_REQUIRE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
    run wheel.log "$PY" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps -w "$WORK/wheel" .)
WHEEL="$(echo "$WORK"/wheel/sa_cuda-*.whl)"
[ -f "$WHEEL" ] || { echo "check_package: no wheel in $WORK/wheel" >&2; exit 1; }
run install.log "$PY" -m pip install --disable-pip-version-check --no-deps --target "$WORK/site" "$WHEEL"
echo "check_package: built and installed $(basename "$WHEEL")"

mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
PYTHONPATH="$WORK/site" "$PY" - "$WORK/site" <<'EOF'
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
print(f"check_package: sa_cuda {version} from the wheel ({site}): sa_layer matches the reference")
EOF
