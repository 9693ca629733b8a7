"""``python -m harmony.ops.info``: versions, what harmony._C was built with, and which kernel backends are usable
here and why the others are not."""
from __future__ import annotations

import platform
import sys
from typing import List


def _versions() -> List[str]:
    import torch
    lines = [f"python     {platform.python_version()} ({sys.executable})",
             f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    try:
        import triton
        lines.append(f"triton     {triton.__version__}")
    except Exception as e:
        lines.append(f"triton     not importable ({type(e).__name__}: {e})")
    import harmony.kernels  # the Triton kernels' package (kernels/ in the repository); imports no triton
    lines.append(f"kernels    harmony.kernels at {', '.join(harmony.kernels.__path__)}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"CUDA       available: {torch.cuda.device_count()} GPU(s): {names}")
    else:
        lines.append("CUDA       no GPU available")
    lines.append(f"CPU        {platform.machine()}, torch threads: {torch.get_num_threads()}")
    return lines


def _build() -> List[str]:
    from harmony.ops import _ext
    if _ext.C is None:
        return [f"harmony._C {_ext.ERROR}"]
    info = _ext.build_info()
    lines = [f"harmony._C {_ext.C.__file__}",
             f"  built for torch {info['torch']} with g++ {info['compiler']}; OpenMP: {info['openmp']}; "
             f"SIMD: {info['simd']}",
             f"  C++ flags: {info['cxx_flags']}"]
    if info["with_cuda"]:
        lines.append(f"  CUDA kernels: yes, CUDA {info['cuda_version']}, archs {info['cuda_archs']}; "
                     f"nvcc flags: {info['nvcc_flags']}")
    else:
        lines.append(f"  CUDA kernels: no ({info['reason']})")
    return lines


def report() -> str:
    """The whole report as text."""
    from harmony.ops import backends
    lines = _versions() + _build() + ["", "backend  usable  why / for what"]
    for name, (ok, why) in backends.explain().items():
        lines.append(f"{name:<8} {'yes' if ok else 'no':<7} {why}")
    picks = ", ".join(f"{dev} tensors -> {b}" for dev, b in backends.picks().items())
    lines.append(f"automatic choice (float32): {picks}; force one with HARMONY_BACKEND=cuda|triton|cpu|ref")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
