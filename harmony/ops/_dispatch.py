"""The dispatch table of harmony's ops: for an op and a backend, the callable that runs it (docs/KERNELS.md).

Every entry has the op's one out= signature, the schemas of csrc/register.cpp:

  gram(A: Tensor[], V: Tensor[], out: Tensor) -> None                           out [B, 3] fp32 += dots
  combine(A: Tensor[], V: Tensor[], ca, cv, out: Tensor[], accumulate) -> None  out_k (+)= Σ_i ca_i A_k[i] + ...
  ghost_dots(X, Ga, Gb, out: Tensor, method: str) -> None                       out [B, 3] fp32 += dots

  backend      entry
  cpu, cuda    torch.ops.harmony.<op>          harmony._C; the dispatcher picks the CPU or CUDA kernel by device
  triton       torch.ops.harmony.<op>_triton   harmony.kernels, registered with triton_op on first use
  ref          <op>_ref                        plain PyTorch, taking the same arguments

harmony.ops.backends.backend_for picks the backend; harmony/ops/_checks.py has validated the arguments before.
Each op module (gram.py, combine.py, ghost_dots.py) adds its row with ``register``.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

_REFS: Dict[str, Callable] = {}
_TRITON_REGISTRARS: Dict[str, Callable[[], None]] = {}
_TRITON_REGISTERED: List[str] = []


def register(op: str, ref: Callable, register_triton: Callable[[], None]) -> None:
    """The op's row: its reference with the op's signature, and the function that registers harmony::<op>_triton
    (called once, on first use, because it imports triton)."""
    _REFS[op] = ref
    _TRITON_REGISTRARS[op] = register_triton


def register_triton_ops() -> None:
    """Registers every harmony::<op>_triton not registered yet. Raises what importing triton or the kernels
    raises (harmony.ops.backends turns that into the reason the triton backend is unusable)."""
    for op, registrar in _TRITON_REGISTRARS.items():
        if op not in _TRITON_REGISTERED:
            registrar()
            _TRITON_REGISTERED.append(op)


def kernel(op: str, backend: str) -> Callable:
    """The callable that runs ``op`` on ``backend``, with the op's out= signature."""
    if backend == "ref":
        return _REFS[op]
    if backend == "triton":
        return getattr(torch.ops.harmony, f"{op}_triton")
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.harmony, op)
    raise ValueError(f"harmony.ops.{op}: unknown backend {backend!r}")


def kernel_layout(backend: str, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """The kernels read rows as contiguous runs: contiguous copies where needed. The reference takes the tensors
    as given (its results are those of plain PyTorch on the caller's layout)."""
    if backend == "ref":
        return list(tensors)
    return [t.contiguous() for t in tensors]
