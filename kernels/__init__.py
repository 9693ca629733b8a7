"""harmony.kernels: the Triton kernels of harmony's ops (docs/KERNELS.md), one module per op, each with its raw
@triton.jit kernels and a launcher:

  harmony.kernels.gram.gram(A, V, out)                           out [B, 3] fp32 += per-row (A·V, A·A, V·V)
  harmony.kernels.combine.combine(A, V, ca, cv, out, accumulate) out_k (+)= Σ_i ca_i A_k[i] + cv_i V_k[i]
  harmony.kernels.ghost_dots.ghost_dots(X, Ga, Gb, out, method)  out [B, 3] fp32 += per-sample dots of GaᵀX, GbᵀX

This folder (kernels/ in the repository) is installed as the package ``harmony.kernels`` (setup.py maps it; in a
checkout, harmony/kernels is a link to it), never as a top-level ``kernels``, which is another project's name on
PyPI. Its modules import each other relatively, so they work under that one name. The launchers are registered as
torch ops (harmony::<op>_triton, with ``torch.library.triton_op``) in harmony/ops/<op>.py, which is the way to call
them: harmony.ops validates the arguments, the launchers do not.

Launchers write into caller-provided outputs and return None; they compile for CUDA tensors, or run on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported). Importing this package does not
import triton; `usable(device)` says whether the launchers can run on a device, and why not.
"""
from __future__ import annotations

import os

import torch


def usable(device: torch.device | str) -> tuple[bool, str]:
    """(True, how) when the Triton launchers can run on ``device``, else (False, why not)."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except Exception as exc:  # not installed, or a broken install
        return False, f"triton is not importable ({exc.__class__.__name__}: {exc})"
    from ._common import interpreting
    if interpreting():
        if device.type == "cpu":
            return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1) on CPU tensors"
        return False, "TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only"
    if device.type != "cuda":
        hint = "" if os.environ.get("TRITON_INTERPRET") else " (set TRITON_INTERPRET=1 before importing triton)"
        return False, f"compiled Triton kernels need a CUDA device, not {device.type}{hint}"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    return True, f"triton {triton.__version__} compiled for {torch.cuda.get_device_name(device)}"


__all__ = ["usable"]
