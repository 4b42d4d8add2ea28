# Sourced by benchmarks/run.sh and .ci/run: creates .venv (once), installs requirements-dev.txt and
# builds sa_cuda in place (the C++ CPU kernels, and the CUDA kernels when nvcc is found).
# SA_CUDA_REQUIRE_CUDA=1 makes a missing CUDA toolkit a build error instead of a CPU-only build.
#
# Re-runs are cheap: each step is skipped when its inputs are the same as at its last success. The
# inputs' hash is kept in a stamp in .venv, written only after the step succeeded:
#   .venv/sa_cuda-requirements.stamp  requirements-dev.txt, the Python interpreter and the venv
#   .venv/sa_cuda-build.stamp         every file under csrc/, setup.py, pyproject.toml, the
#                                     version, the installed requirements, torch's version, the
#                                     build's environment knobs (setup.py's docstring), the nvcc on
#                                     PATH, and the built sa_cuda/_C*.so (a build by other means
#                                     or a deleted module rebuilds)
# Delete a stamp to force its step.
#   --requirements-only: stop after the requirements (.ci/run builds the test binaries, which need
#                        torch but not sa_cuda, in the background while sa_cuda builds).
set -euo pipefail
# Python caches the bytecode of the modules it imports (__pycache__, ignored by git); pip installs
# with --no-compile below and leaves that to the first import. An environment that sets
# PYTHONDONTWRITEBYTECODE=1 (this project's CI machine does) caches nothing: every process compiled
# torch's modules anew, and `import sa_cuda` took 12-15 s instead of 5 in each test worker and child
# process.
unset PYTHONDONTWRITEBYTECODE
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

requirements_inputs() {
  cat "$ROOT/requirements-dev.txt"
  python -c 'import sys; print(sys.version, sys.prefix)'
}

build_inputs() {
  (cd "$ROOT" && find csrc -type f -print0 | sort -z | xargs -0 sha256sum &&
    sha256sum setup.py pyproject.toml sa_cuda/_version.py)
  python -c 'import importlib.metadata as m; print("torch", m.version("torch"))'
  local knob
  for knob in SA_CUDA_NO_CUDA SA_CUDA_REQUIRE_CUDA SA_CUDA_CPU_ISA TORCH_CUDA_ARCH_LIST CUDA_HOME CUDA_PATH; do
    echo "$knob=${!knob-}"
  done
  echo "nvcc=$(command -v nvcc || true)"
  cat "$VENV/sa_cuda-requirements.stamp"
  (cd "$ROOT" && stat -c '%n %s %Y' sa_cuda/_C*.so 2>/dev/null || true)
}

# up_to_date STAMP INPUTS_FUNCTION: the function's output hashes to what STAMP holds.
up_to_date() {
  [ -f "$1" ] && [ "$("$2" | sha256sum)" = "$(cat "$1")" ]
}

if up_to_date "$VENV/sa_cuda-requirements.stamp" requirements_inputs; then
  echo "setup_env: requirements-dev.txt installed and unchanged: not reinstalled"
else
  # --no-compile: pip would byte-compile every module of torch and the rest, half of the install's
  # two minutes; Python compiles (and caches, see above) the modules it imports instead.
  python -m pip install -q --disable-pip-version-check --no-compile -r "$ROOT/requirements-dev.txt"
  requirements_inputs | sha256sum > "$VENV/sa_cuda-requirements.stamp"
fi
if [ "${1:-}" = "--requirements-only" ]; then
  return 0 2> /dev/null || exit 0
fi

if up_to_date "$VENV/sa_cuda-build.stamp" build_inputs; then
  echo "setup_env: sources, torch and build settings unchanged since the last build: not rebuilt"
else
  rm -f "$VENV/sa_cuda-build.stamp"
  MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e "$ROOT"
  build_inputs | sha256sum > "$VENV/sa_cuda-build.stamp"
fi
python -m sa_cuda
