"""The one validation point of harmony's ops (docs/KERNELS.md "Validation"): the public functions call these checks
once per call, before any backend runs, so every backend sees the same well-formed inputs; a failure is one
ValueError naming the public op and the offending shapes. The Triton launchers do not check again; the C++ ops
keep binding checks of their own because torch.ops.harmony.* can be called without harmony.ops in front."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple, Union

import torch

from harmony.nvtx import nvtx_range

Buffers = Union[torch.Tensor, Sequence[torch.Tensor]]
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def as_list(x: Buffers) -> List[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def check_buckets(op: str, As: List[torch.Tensor], Vs: List[torch.Tensor],
                  out: Optional[torch.Tensor] = None) -> Tuple[int, torch.device, torch.dtype]:
    """A_k, V_k [B, P_k]: same shape per k, one B, dtype and device for all. Returns (B, device, dtype);
    with no buckets, B and device come from ``out`` (else 0 and cpu)."""
    if len(As) != len(Vs):
        raise ValueError(f"harmony.ops.{op}: A has {len(As)} buckets but V has {len(Vs)}")
    if not As:
        if out is not None:
            return out.shape[0], out.device, torch.float32
        return 0, torch.device("cpu"), torch.float32
    a0 = As[0]
    if a0.dim() != 2:
        raise ValueError(f"harmony.ops.{op}: buckets must be [B, P]; A[0] has shape {tuple(a0.shape)}")
    B = a0.shape[0]
    for k, (a, v) in enumerate(zip(As, Vs)):
        if a.dim() != 2 or a.shape != v.shape:
            raise ValueError(f"harmony.ops.{op}: A[{k}] has shape {tuple(a.shape)} but V[{k}] has {tuple(v.shape)}; "
                             "both must be the same [B, P]")
        if a.shape[0] != B:
            raise ValueError(f"harmony.ops.{op}: A[{k}] has B={a.shape[0]} rows (shape {tuple(a.shape)}) but A[0] "
                             f"has B={B} (shape {tuple(a0.shape)})")
        _same_dtype_device(op, ((f"A[{k}]", a), (f"V[{k}]", v)), "A[0]", a0)
    return B, a0.device, a0.dtype


def check_dots_out(op: str, out: Optional[torch.Tensor], B: int, device: torch.device) -> None:
    """``out`` of gram / ghost_dots: [B, 3] float32 on the inputs' device."""
    if out is None:
        return
    if out.shape != (B, 3) or out.dtype != torch.float32:
        raise ValueError(f"harmony.ops.{op}: out must be [B, 3] = [{B}, 3] float32, got {tuple(out.shape)} "
                         f"{out.dtype}")
    if out.device != device:
        raise ValueError(f"harmony.ops.{op}: out is on {out.device} but the inputs are on {device}")


def check_coeffs(op: str, ca: torch.Tensor, cv: torch.Tensor, B: int, device: torch.device) -> None:
    for name, c in (("ca", ca), ("cv", cv)):
        if not isinstance(c, torch.Tensor) or c.dim() != 1 or c.shape[0] != B:
            shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"harmony.ops.{op}: {name} must be [B] = [{B}], got {shape}")
        if not c.is_floating_point():
            raise ValueError(f"harmony.ops.{op}: {name} must be a float tensor, got {c.dtype}")
        if c.device != device:
            raise ValueError(f"harmony.ops.{op}: {name} is on {c.device} but A is on {device}")


def check_combine_out(op: str, As: List[torch.Tensor], outs: List[torch.Tensor], device: torch.device) -> None:
    if len(outs) != len(As):
        raise ValueError(f"harmony.ops.{op}: out has {len(outs)} buckets but A has {len(As)}")
    for k, (a, o) in enumerate(zip(As, outs)):
        if o.dim() != 1 or o.shape[0] != a.shape[1]:
            raise ValueError(f"harmony.ops.{op}: out[{k}] must be [P] = [{a.shape[1]}] to match A[{k}] of shape "
                             f"{tuple(a.shape)}, got {tuple(o.shape)}")
        if o.dtype not in FLOAT_DTYPES:
            raise ValueError(f"harmony.ops.{op}: out[{k}] dtype {o.dtype} is not supported "
                             "(float32, bfloat16, float16)")
        if o.device != device:
            raise ValueError(f"harmony.ops.{op}: out[{k}] is on {o.device} but A is on {device}")


def check_ghost(op: str, X: torch.Tensor, Ga: torch.Tensor, Gb: torch.Tensor) -> None:
    if X.dim() != 3 or Ga.dim() != 3 or Gb.dim() != 3:
        raise ValueError(f"harmony.ops.{op}: X must be [B, T, Din] and Ga, Gb [B, T, Dout]; got shapes "
                         f"{tuple(X.shape)}, {tuple(Ga.shape)}, {tuple(Gb.shape)}")
    if Ga.shape != Gb.shape or Ga.shape[:2] != X.shape[:2]:
        raise ValueError(f"harmony.ops.{op}: X {tuple(X.shape)}, Ga {tuple(Ga.shape)}, Gb {tuple(Gb.shape)}: "
                         "B and T must match, and Ga and Gb must have one shape")
    _same_dtype_device(op, (("Ga", Ga), ("Gb", Gb)), "X", X)


def op_range(name: str):
    """An NVTX range around an op's launch; none while torch.compile traces (it cannot trace NVTX calls)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return nvtx_range(name)


def _same_dtype_device(op: str, named, ref_name: str, ref: torch.Tensor) -> None:
    """Every (name, tensor) has ref's dtype and device, and that dtype is a supported float type."""
    for name, t in named:
        if t.dtype != ref.dtype:
            raise ValueError(f"harmony.ops.{op}: {name} is {t.dtype} but {ref_name} is {ref.dtype}; one dtype for all")
        if t.device != ref.device:
            raise ValueError(f"harmony.ops.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if ref.dtype not in FLOAT_DTYPES:
        raise ValueError(f"harmony.ops.{op}: dtype {ref.dtype} is not supported (float32, bfloat16, float16)")
