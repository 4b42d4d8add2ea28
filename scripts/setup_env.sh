# Sourced by benchmarks/run.sh and .ci/run: creates .venv (once), installs requirements-dev.txt and
# builds sa_cuda in place (the C++ CPU kernels, and the CUDA kernels when nvcc is found).
# SA_CUDA_REQUIRE_CUDA=1 makes a missing CUDA toolkit a build error instead of a CPU-only build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
python -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-dev.txt"
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e "$ROOT"
python -m sa_cuda
