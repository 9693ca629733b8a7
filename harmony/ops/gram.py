"""gram: per-row dot products of two per-sample gradient buffers (docs/KERNELS.md).

For buckets A_k, V_k of shape [B, P_k]: out[i] += (Σ_k A_k[i]·V_k[i], Σ_k |A_k[i]|², Σ_k |V_k[i]|²), fp32.

The op in one place: its reference ``gram_ref``, the fake shared by its registered ops, the registration of its
Triton launcher (kernels/gram.py) as ``torch.ops.harmony.gram_triton`` and the public ``gram``. The C++ op
``torch.ops.harmony.gram`` (csrc/cpu/gram.cpp, csrc/cuda/gram.cu) has the same schema:
``gram(Tensor[] A, Tensor[] V, Tensor(a!) out) -> ()``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from harmony.ops import _ext
from harmony.ops.backends import backend_for
from harmony.ops import _dispatch
from harmony.ops._checks import as_list, check_buckets, check_dots_out, op_range

Buffers = Union[torch.Tensor, Sequence[torch.Tensor]]


def gram_ref(A: Buffers, V: Buffers, out: Optional[torch.Tensor] = None, upcast: bool = False) -> torch.Tensor:
    """Pure-PyTorch reference. A, V: [B, P] or lists of [B, P_k] -> [B, 3] fp32 (float64 with upcast).

    With ``out`` given ([B, 3]), the result is added into it and ``out`` is returned.
    """
    As = [A] if isinstance(A, torch.Tensor) else list(A)
    Vs = [V] if isinstance(V, torch.Tensor) else list(V)
    acc_dtype = torch.float64 if upcast else torch.float32
    B = As[0].shape[0] if As else (0 if out is None else out.shape[0])
    dev = As[0].device if As else (out.device if out is not None else torch.device("cpu"))
    res = torch.zeros(B, 3, dtype=acc_dtype, device=dev)
    for a, v in zip(As, Vs):
        a, v = a.to(acc_dtype), v.to(acc_dtype)
        res[:, 0] += (a * v).sum(1)
        res[:, 1] += (a * a).sum(1)
        res[:, 2] += (v * v).sum(1)
    if out is not None:
        out += res.to(out.dtype)
        return out
    return res


def _gram_fake(A: List[Tensor], V: List[Tensor], out: Tensor) -> None:
    """Shapes only, for torch.compile and opcheck: out is updated in place, nothing is returned."""
    return None


if _ext.C is not None:
    torch.library.register_fake("harmony::gram")(_gram_fake)


def _register_triton() -> None:
    from harmony.kernels.gram import gram as launch
    from harmony.ops._triton import triton_op

    def gram_triton(A: List[Tensor], V: List[Tensor], out: Tensor) -> None:
        launch(A, V, out)

    triton_op("harmony::gram_triton", gram_triton, mutates_args={"out"}, fake=_gram_fake)


_dispatch.register("gram", lambda A, V, out: gram_ref(A, V, out=out), _register_triton)


def gram(A: Buffers, V: Buffers, out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Per-row (Σ_k A_k[i]·V_k[i], Σ_k |A_k[i]|², Σ_k |V_k[i]|²) -> [B, 3] fp32, fp32 accumulation.

    A, V: one [B, P] tensor or equal-length lists of buckets [B, P_k]; one B, dtype (float32, bfloat16, float16)
    and device for all; A_k and V_k of one shape. Non-contiguous buckets are copied to contiguous ones (the
    kernels read rows as contiguous runs). out: optional [B, 3] fp32; the result is ADDED into it and it is
    returned. backend: force "cuda" | "triton" | "cpu" | "ref" (else HARMONY_BACKEND, else the fastest usable).
    Deterministic: the kernels reduce in a fixed order (no float atomics).
    """
    As, Vs = as_list(A), as_list(V)
    B, device, dtype = check_buckets("gram", As, Vs, out)
    check_dots_out("gram", out, B, device)
    if out is None:
        out = torch.zeros(B, 3, dtype=torch.float32, device=device)
    if B == 0 or not As:
        return out
    name = backend_for("gram", device.type, dtype, backend)
    with op_range(f"gram/{name}"):
        _dispatch.kernel("gram", name)(_dispatch.kernel_layout(name, As), _dispatch.kernel_layout(name, Vs), out)
    return out
