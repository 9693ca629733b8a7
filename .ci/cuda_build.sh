#!/usr/bin/env bash
# CUDA build check without a GPU: the full CUDA extension (CUDAExtension: the .cu kernels + register.cpp,
# compiled and linked) in a second environment with a CUDA build of torch, in a scratch copy of the sources.
# (csrc/check_cuda_compile.sh is the quicker nvcc -c check of each .cu alone.) Running the kernels needs a
# GPU: benchmarks/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

echo "--- full CUDA extension build (torch==2.14.1, CUDA 13.0 build, TORCH_CUDA_ARCH_LIST=9.0)"
VENV="$ROOT/.venv-cuda"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.14.1 numpy ninja pybind11 setuptools wheel
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
git ls-files -z | xargs -0 -I{} cp -P --parents {} "$SCRATCH"  # -P: harmony/kernels is a link
cd "$SCRATCH"
[ -d /usr/local/cuda ] && : "${CUDA_HOME:=/usr/local/cuda}"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}"
TORCH_CUDA_ARCH_LIST="9.0" HARMONY_CUDA_ARCHS="9.0" MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py build_ext --inplace > "$SCRATCH/build.log" 2>&1 \
  || { tail -n 40 "$SCRATCH/build.log"; echo "CUDA extension build failed"; exit 1; }
grep "^harmony:" "$SCRATCH/build.log"
so=$(ls harmony/_C*.so)
# The CUDA symbols must be in the library we built (the kernels were compiled and linked, not skipped).
# cuobjdump: the toolkit's, else the one Triton's package carries.
CUOBJDUMP=$(command -v "$CUDA_HOME/bin/cuobjdump" cuobjdump | head -n 1 || true)
# (the CUDA torch venv has triton as a dependency; else a project venv's)
[ -n "$CUOBJDUMP" ] || CUOBJDUMP=$("$VENV/bin/python" -c \
  'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' \
  2> /dev/null || true)
[ -x "$CUOBJDUMP" ] || \
  CUOBJDUMP=$(ls "$ROOT"/.venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump | head -n 1)
"$CUOBJDUMP" --list-elf "$so" | tee "$SCRATCH/elf.txt"
for op in gram combine ghost_dots; do
  grep -q "$op.sm_90.cubin" "$SCRATCH/elf.txt" || { echo "$so holds no sm_90 code of $op"; exit 1; }
done
ls -la "$so"
# Loading needs the CUDA driver library; on a machine without it, stop at the link check above.
"$VENV/bin/python" -c "import torch, harmony._C; print('harmony._C loads:', torch.ops.harmony.gram)" \
  || echo "(loading skipped: no CUDA driver here; compile and link succeeded)"
echo "CUDA build check passed"
