#!/usr/bin/env bash
# The one-command GPU check of sa_cuda (benchmarks/README.md, "GPU check"):
#   bash benchmarks/gpu_check.sh [--cpu] [--budget S] [--steps a,b,...] OUTDIR
# GPU mode: builds the CUDA kernels in place for the local card, then checks every launch path
# against the CPU op in float64, runs compute-sanitizer, the CUDA tests, the timings (NCHW, both
# variants' channels_last kernels against the NCHW ones, the bottleneck tail) and ncu; each
# step in its own time box, the whole run capped at --budget seconds (default 480): a step that no
# longer fits is skipped and says so. CPU mode (--cpu, or SA_GPU_CHECK_CPU=1): everything that needs
# no GPU (the launch-path check on the emulated kernels, the timing code on tiny CPU shapes, the ncu
# CSV parser on a fixture, the summary), against the package already built in place; it builds
# nothing. Logs, JSON and PNG go to OUTDIR; the summary table is printed last.
# Exit code: 0 when every step that ran passed, 1 otherwise, 2 for bad arguments.
#
# The steps' commands are single-quoted `bash -c` scripts on purpose: the child shell expands the
# exported PY, HELPERS, OUT and STEP_BOX.
# shellcheck disable=SC2016
set -u -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HELPERS=$HERE/gpu_check
STEPS_GPU="env build resources check tests timing channels_last residual residual_check memcheck racecheck ncu synccheck initcheck"

usage() {
  cat <<EOF
usage: bash benchmarks/gpu_check.sh [--cpu] [--budget SECONDS] [--steps STEP,...] OUTDIR

  --cpu             CPU mode (also SA_GPU_CHECK_CPU=1): no GPU, no build
  --budget SECONDS  cap of the whole run (default 480)
  --steps LIST      run only these steps (default all): ${STEPS_GPU// /,}
  PYTHON=...        the interpreter (default python3, else python)
EOF
}

fail_usage() { echo "gpu_check.sh: $1" >&2; usage >&2; exit 2; }

MODE=gpu
[ "${SA_GPU_CHECK_CPU:-0}" = 1 ] && MODE=cpu
BUDGET=480
ONLY=""
OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) MODE=cpu ;;
    --budget) [ $# -ge 2 ] || fail_usage "--budget needs a value"; BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    --steps) [ $# -ge 2 ] || fail_usage "--steps needs a value"; ONLY=$2; shift ;;
    --steps=*) ONLY=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    -*) fail_usage "unknown option $1" ;;
    *) [ -z "$OUT" ] || fail_usage "one OUTDIR only (got '$OUT' and '$1')"; OUT=$1 ;;
  esac
  shift
done
[ -n "$OUT" ] || fail_usage "OUTDIR is required"
[[ $BUDGET =~ ^[0-9]+$ ]] && [ "$BUDGET" -ge 60 ] || fail_usage "--budget must be an integer >= 60, got '$BUDGET'"
for s in ${ONLY//,/ }; do
  [[ " $STEPS_GPU " == *" $s "* ]] || fail_usage "unknown step '$s'"
done

PY=${PYTHON:-$(command -v python3 || command -v python)}
[ -n "$PY" ] || { echo "gpu_check.sh: no python3/python on PATH" >&2; exit 2; }
mkdir -p "$OUT/logs" "$OUT/sanitizers" "$OUT/ncu" || exit 2
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
: > "$OUT/steps.tsv"
cd "$ROOT" || exit 2
export PY HELPERS OUT PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

T0=$(date +%s)
SUMMARY_RESERVE=15                      # seconds kept for the summary
DEADLINE=$((T0 + BUDGET - SUMMARY_RESERVE))
BUILD_OK=0
[ "$MODE" = cpu ] && BUILD_OK=1         # the CPU mode runs against the package built in place

record() {  # record NAME STATUS RC SECONDS BOX NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$OUT/steps.tsv"
}

selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

skip() {  # skip NAME BOX NOTE
  record "$1" skipped - 0 "$2" "$3"
  echo "[$(($(date +%s) - T0))s] SKIP $1: $3"
}

# run_step NAME BOX MIN_SECONDS SIGNAL NEEDS_BUILD CMD...: runs CMD under `timeout` (SIGNAL first,
# KILL 15 s later) with a time box of min(BOX, time left), unless fewer than MIN_SECONDS are left.
# The command sees its box as $STEP_BOX. Output goes to $LOGS/NAME.log.
run_step() {
  local name=$1 box=$2 min=$3 sig=$4 needs_build=$5
  shift 5
  local left=$((DEADLINE - $(date +%s)))
  if ! selected "$name"; then skip "$name" "$box" "not selected (--steps)"; return; fi
  if [ "$needs_build" = 1 ] && [ "$BUILD_OK" != 1 ]; then skip "$name" "$box" "no CUDA build"; return; fi
  if [ "$left" -lt "$min" ]; then skip "$name" "$box" "time: ${left}s left, needs ${min}s"; return; fi
  [ "$box" -gt "$left" ] && box=$left
  export STEP_BOX=$box
  echo "[$(($(date +%s) - T0))s] $name (time box ${box}s) -> $LOGS/$name.log"
  local start rc secs note=""
  start=$(date +%s)
  timeout --signal="$sig" --kill-after=15 "$box" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  secs=$(($(date +%s) - start))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note="timed out after ${box}s"; fi
  record "$name" ran "$rc" "$secs" "$box" "$note"
  echo "    rc=$rc in ${secs}s${note:+ ($note)}"
  LAST_RC=$rc
}

gpu_only() {  # gpu_only NAME BOX: the CPU mode lists the GPU-only steps as skipped
  skip "$1" "$2" "cpu mode (needs a GPU)"
}

LAUNCH_PATHS="$HELPERS/launch_paths.py"

# ---- env: what the machine is
run_step env 30 5 TERM 0 bash -c '
  date; uname -a; nvidia-smi || true; nvcc --version || true
  "$PY" -c "import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())"
  compute-sanitizer --version || true; ncu --version || true'

# ---- build: in place, for this card's architecture, against the installed torch, no network
if [ "$MODE" = gpu ]; then
  LAST_RC=1
  run_step build 240 60 TERM 0 bash -c '
    ARCH=$("$PY" -c "import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())") || exit 1
    echo "TORCH_CUDA_ARCH_LIST=$ARCH"
    TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-16} SA_CUDA_REQUIRE_CUDA=1 \
      "$PY" setup.py build_ext --inplace || exit 1
    "$PY" -c "import sa_cuda, torch; assert sa_cuda.fused_available(\"cuda\"), \"CUDA kernels not registered\"; print(\"built: CUDA kernels registered for sm_$ARCH,\", torch.cuda.get_device_name())"'
  if selected build; then [ "$LAST_RC" = 0 ] && BUILD_OK=1; else BUILD_OK=1; fi  # --steps without build: use the existing build
  run_step resources 20 5 TERM 1 bash -c 'cuobjdump -res-usage sa_cuda/_C*.so'
else
  skip build 240 "cpu mode (builds nothing; uses the package built in place)"
  gpu_only resources 20
fi

# ---- check: every launch path x dtype x variant vs the CPU op in float64
CPU_CASES=(--set small --dtypes fp32,bf16 --offsets 0,1 --cases "${SA_GPU_CHECK_CPU_CASES:-warp N=63|group m=8}")
if [ "$MODE" = gpu ]; then
  run_step check 90 20 TERM 1 "$PY" "$LAUNCH_PATHS" --backend cuda --epilogues plain \
    --json "$OUT/check.json"
else
  run_step check 120 20 TERM 1 "$PY" "$LAUNCH_PATHS" --backend emulated --epilogues plain \
    "${CPU_CASES[@]}" --json "$OUT/check.json"
fi

# ---- the CUDA tests (skips visible); without what the visit cannot afford and what cannot import.
# Right after the check: correctness before timing (visit4b and visit5 ran out of budget before a
# later tests step)
if [ "$MODE" = gpu ]; then
  PYTEST_ARGS=(-k "cuda and not more_than_2_31 and not resnet50_compile")
  "$PY" -c "import xdist" 2> /dev/null && PYTEST_ARGS+=(-n 8)
  while IFS= read -r f; do PYTEST_ARGS+=("--ignore=$f"); done < <(grep -rlE "load_emulation\(\)|EMULATED\.ops" tests --include="test_*.py")  # builds the emulator
  if ! "$PY" -c "import expecttest" 2> /dev/null; then
    while IFS= read -r f; do PYTEST_ARGS+=("--ignore=$f"); done < <(grep -rlE "^\s*(import|from) expecttest" tests --include="*.py")
  fi
  run_step tests 100 40 INT 1 "$PY" -m pytest tests -rs -q -p no:cacheprovider \
    --continue-on-collection-errors --durations=10 "${PYTEST_ARGS[@]}"
else
  gpu_only tests 100
fi

# ---- timing: eager / torch.compile / fused vs a copy of the same bytes
if [ "$MODE" = gpu ]; then
  run_step timing 200 40 TERM 1 bash -c '"$PY" "$HELPERS/timing.py" --device cuda \
    --budget $((STEP_BOX - 25)) --json "$OUT/timing.json" --png "$OUT/timing.png"'
else
  run_step timing 90 20 TERM 1 bash -c '"$PY" "$HELPERS/timing.py" --device cpu --tiny --batches 1 \
    --dtypes fp32 --compile-batches 1 --compile-backend aot_eager --compile-reserve 10 \
    --budget $((STEP_BOX - 15)) \
    --json "$OUT/timing.json" --png "$OUT/timing.png"'
fi

# ---- channels_last: the NHWC kernels, eager and fused on channels_last x and grad_out, timed as
# the timing step times NCHW (graph replay; cl / NCHW = these fused rows over the timing step's)
if [ "$MODE" = gpu ]; then
  run_step channels_last 90 30 TERM 1 bash -c '"$PY" "$HELPERS/timing.py" --device cuda \
    --channels-last --impls eager,fused --budget $((STEP_BOX - 20)) \
    --json "$OUT/timing-channels_last.json" --png "$OUT/timing-channels_last.png"'
else
  run_step channels_last 60 20 TERM 1 bash -c '"$PY" "$HELPERS/timing.py" --device cpu --tiny \
    --batches 1 --dtypes fp32 --channels-last --impls eager,fused --budget $((STEP_BOX - 15)) \
    --json "$OUT/timing-channels_last.json" --png "$OUT/timing-channels_last.png"'
fi

# ---- residual: the bottleneck tail relu(SA(x) + identity), the fused epilogue (forward and
# backward in one op each) against eager and torch.compile of the layer followed by add and relu
if [ "$MODE" = gpu ]; then
  run_step residual 90 30 TERM 1 bash -c '"$PY" "$HELPERS/timing.py" --device cuda --residual \
    --batches 8 --budget $((STEP_BOX - 20)) \
    --json "$OUT/timing-residual.json" --png "$OUT/timing-residual.png"'
else
  run_step residual 60 20 TERM 1 bash -c '"$PY" "$HELPERS/timing.py" --device cpu --tiny \
    --batches 1 --dtypes fp32 --residual --impls eager,fused --budget $((STEP_BOX - 15)) \
    --json "$OUT/timing-residual.json" --png "$OUT/timing-residual.png"'
fi

# ---- residual_check: the launch paths with the residual epilogue (the forward against the float64
# residual op, the backward bit for bit against the plain backward of relu's masked gradient),
# fp32 and bf16 at every offset: half the check step's runs (1072 took 63 s there on the H200),
# in a box of their own so that the plain check keeps its
if [ "$MODE" = gpu ]; then
  run_step residual_check 60 20 TERM 1 "$PY" "$LAUNCH_PATHS" --backend cuda --epilogues residual \
    --dtypes fp32,bf16 --json "$OUT/check-residual.json"
else
  run_step residual_check 60 20 TERM 1 "$PY" "$LAUNCH_PATHS" --backend emulated \
    --epilogues residual "${CPU_CASES[@]}" --json "$OUT/check-residual.json"
fi

# ---- compute-sanitizer on the small launch-path set (no caching allocator for memcheck/initcheck)
# The residual epilogue's kernels differ from the plain ones in their global reads and writes
# (out, grad_identity), not in shared memory or barriers: memcheck and initcheck take both
# epilogues' cases, racecheck and synccheck the plain ones.
sanitize() {  # sanitize TOOL BOX MIN EPILOGUES [compute-sanitizer options...]
  local tool=$1 box=$2 min=$3 epilogues=$4
  shift 4
  if [ "$MODE" = cpu ]; then gpu_only "$tool" "$box"; return; fi
  local env=(env)
  [ "$tool" = memcheck ] || [ "$tool" = initcheck ] && env=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  run_step "$tool" "$box" "$min" TERM 1 "${env[@]}" compute-sanitizer --tool "$tool" --error-exitcode 1 \
    --print-limit 30 "$@" "$PY" "$LAUNCH_PATHS" --backend cuda --set small --epilogues "$epilogues" \
    --json "$OUT/sanitizers/$tool.json"
}
sanitize memcheck 60 30 plain,residual
sanitize racecheck 120 30 plain --racecheck-report all

# ---- ncu on the forward and backward kernels, NCHW and NHWC (CPU mode: the parser on a fixture CSV)
if [ "$MODE" = gpu ]; then
  run_step ncu 100 40 TERM 1 bash -c '
    METRICS=$("$PY" "$HELPERS/ncu_report.py" --print-metrics) || exit 1
    ncu --clock-control none --target-processes all -k "regex:sa_layer_|shuffle_attention_|nhwc_" --metrics "$METRICS" \
      -f -o "$OUT/ncu/report" "$PY" "$HELPERS/ncu_workload.py" --manifest "$OUT/ncu/manifest.json" || exit 1
    ncu --import "$OUT/ncu/report.ncu-rep" --csv --page raw --print-units base > "$OUT/ncu/raw.csv" || exit 1
    "$PY" "$HELPERS/ncu_report.py" "$OUT/ncu/raw.csv" --manifest "$OUT/ncu/manifest.json" --json "$OUT/ncu/ncu.json"'
else
  run_step ncu 30 10 TERM 1 bash -c '
    "$PY" "$HELPERS/ncu_workload.py" --dry-run --dtypes fp32 --layouts nchw --manifest "$OUT/ncu/manifest.json" || exit 1
    echo "cpu mode: parsing the fixture $HELPERS/fixtures/ncu_raw_page.csv"
    "$PY" "$HELPERS/ncu_report.py" "$HELPERS/fixtures/ncu_raw_page.csv" --manifest "$OUT/ncu/manifest.json" \
      --json "$OUT/ncu/ncu.json"'
fi

sanitize synccheck 40 25 plain
sanitize initcheck 40 25 plain,residual

# ---- the summary, last
TOTAL=$(($(date +%s) - T0))
echo
timeout 60 "$PY" "$HELPERS/summary.py" "$OUT" --mode "$MODE" --budget "$BUDGET" --total "$TOTAL"
exit $?
