#!/usr/bin/env bash
# GPU check: build the CUDA extension, report the build, run the op tests on CUDA (CUDA kernels and compiled
# Triton) and the kernel benchmark at GPU sizes; logs and the CSV go to OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Made for the H100/H200 machine (python3 with a CUDA torch, triton, nvcc; no network: nothing is installed from
# a registry). Without a GPU it runs as a dry check: CPU build, CPU tests (Triton under its interpreter) and a
# tiny CPU benchmark. A failing stage is logged and the next one runs; the exit status is non-zero if any stage
# failed. OUTDIR receives at most 8 files: nvidia-smi.log, build.log, info.log, tests.log, bench.log, bench_step.log,
# results.csv, summary.txt. Estimated at 4-5 minutes on an H100 (not yet timed there); each stage has a time limit
# (build 240 s, tests 150 s, each benchmark 90 s; BUILD_LIMIT, TEST_LIMIT, BENCH_LIMIT, STEP_LIMIT) so a hang
# cannot eat the machine time.
# Environment: PYTHON (default python3), HARMONY_CUDA_ARCHS (default 9.0), MAX_JOBS (default: all cores).
set -uo pipefail

OUT="${1:?usage: benchmarks/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export HARMONY_CUDA_ARCHS="${HARMONY_CUDA_ARCHS:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

# stage NAME LOG TIMEOUT_S CMD...: runs CMD with a time limit, appends its output to LOG, records the outcome.
stage() {
  local name="$1" log="$2" limit="$3"
  shift 3
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local line="$name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc$([ $rc -eq 124 ] && echo ", timed out after ${limit}s"))") in $((SECONDS - start)) s"
  echo "$line" | tee -a "$SUMMARY"
  [ $rc -eq 0 ] || FAILED=1
  return 0
}

if command -v nvidia-smi > /dev/null && nvidia-smi > /dev/null 2>&1 && \
   "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  GPU=1
else
  GPU=0
fi
echo "gpu_check: $( [ $GPU -eq 1 ] && echo "GPU run" || echo "dry run (no GPU: CPU parts only)" ), python: $PY, OUTDIR: $OUT" | tee -a "$SUMMARY"

if [ $GPU -eq 1 ]; then
  stage "nvidia-smi" "$OUT/nvidia-smi.log" 30 nvidia-smi
else
  echo "nvidia-smi: skipped (no GPU)" | tee -a "$SUMMARY"
fi

# In place, so the tests and benchmark below import this build; prints which kernels it builds and why.
stage "build" "$OUT/build.log" "${BUILD_LIMIT:-240}" "$PY" setup.py build_ext --inplace

stage "harmony.ops.info" "$OUT/info.log" 60 "$PY" -m harmony.ops.info
if [ $GPU -eq 1 ]; then
  # The CUDA backend must be usable here, not silently fall back: fail the stage if it is not.
  stage "cuda backend usable" "$OUT/info.log" 60 "$PY" -c \
    "from harmony import backends; ok, why = backends.explain()['cuda']; print('cuda:', ok, why); raise SystemExit(0 if ok else 1)"
fi

if [ $GPU -eq 1 ]; then
  # pytest-xdist spreads the many small op tests over the host cores when it is installed.
  XDIST=$("$PY" -c "import xdist" 2> /dev/null && echo "-n 8" || true)
  # test_ops.py: every backend through harmony.ops, and torch.compile with inductor (cuda and triton);
  # test_triton_kernels.py: the compiled Triton launchers alone (harmony.kernels).
  stage "tests (CUDA, compiled Triton)" "$OUT/tests.log" "${TEST_LIMIT:-150}" "$PY" -m pytest -q -rs $XDIST \
    tests/test_ops.py tests/test_triton_kernels.py
  stage "kernel benchmark (GPU sizes)" "$OUT/bench.log" "${BENCH_LIMIT:-90}" "$PY" benchmarks/bench_kernels.py \
    --device cuda --sizes "${BENCH_SIZES:-16M,64M}" --repeats 10 --csv "$OUT/results.csv"
  stage "step benchmark (VATT-small, every tier)" "$OUT/bench_step.log" "${STEP_LIMIT:-90}" "$PY" \
    benchmarks/bench_step.py --device cuda --size small --batch 64 --repeats 5 --warmup 2 \
    --modes ghost,materialize,sketch,feature --scopes shared,last_block --func-scopes "" --second-backward "" \
    --csv "$OUT/results.csv"
  stage "step benchmark (VATT-small, 512 video tokens: exact against sketch)" "$OUT/bench_step.log" \
    "${STEP_LIMIT:-90}" "$PY" benchmarks/bench_step.py --device cuda --size small --batch 16 --frames 16 \
    --image-size 64 --repeats 5 --warmup 2 --modes ghost,sketch --scopes shared --func-scopes "" \
    --second-backward "" --csv "$OUT/results.csv"
else
  stage "tests (CPU, Triton interpreter)" "$OUT/tests.log" 300 env TRITON_INTERPRET=1 "$PY" -m pytest -q -rs \
    tests/test_ops.py tests/test_ops_triton.py
  stage "kernel benchmark (tiny CPU sizes)" "$OUT/bench.log" 120 "$PY" benchmarks/bench_kernels.py --device cpu \
    --sizes 64K --dtypes fp32 --ops gram,combine --no-buckets --repeats 3 --csv "$OUT/results.csv"
fi

echo "gpu_check: $([ $FAILED -eq 0 ] && echo "all stages passed" || echo "SOME STAGES FAILED")" | tee -a "$SUMMARY"
exit $FAILED
