#!/usr/bin/env bash
# Quick CI check that every csrc/cuda/*.cu compiles for sm_90 (no GPU, no linking): nvcc -c each file against
# the headers of the torch that `python` imports (the CPU wheel ships the CUDA headers too).
# Usage: csrc/check_cuda_compile.sh [ARCH]   (ARCH default sm_90; NVCC and PYTHON may be overridden)
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH="${1:-sm_90}"
NVCC="${NVCC:-nvcc}"
PYTHON="${PYTHON:-python}"
INCLUDES=$("$PYTHON" - <<'EOF'
import os, sysconfig
import torch
root = os.path.join(os.path.dirname(torch.__file__), "include")
print(" ".join("-I" + p for p in (root, os.path.join(root, "torch/csrc/api/include"),
                                  sysconfig.get_paths()["include"])))
EOF
)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# A CPU torch wheel ships c10/cuda headers but not the one CMake generates for CUDA builds; for a compile-only
# check, supply its content (a shared-library build) from a scratch include folder searched after torch's own.
TORCH_INC="${INCLUDES%% *}"; TORCH_INC="${TORCH_INC#-I}"
if [ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$OUT/inc/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$OUT/inc/c10/cuda/impl/cuda_cmake_macros.h"
  INCLUDES="$INCLUDES -Xcompiler -idirafter -Xcompiler $OUT/inc"
fi
status=0
for f in csrc/cuda/*.cu; do
  start=$(date +%s)
  # The same half/bfloat16 macros as torch's extension builds, so the check sees what setup.py compiles.
  if "$NVCC" -arch="$ARCH" -std=c++20 -O3 -c "$f" -o "$OUT/$(basename "$f").o" $INCLUDES -Icsrc \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -DTORCH_EXTENSION_NAME=_C; then
    echo "ok    $f ($(( $(date +%s) - start )) s)"
  else
    echo "FAIL  $f"
    status=1
  fi
done
exit $status
