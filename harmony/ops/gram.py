"""gram: per-row dot products of two per-sample gradient buffers (SPEC §6).

For buckets A_k, V_k of shape [B, P_k]: out[i] = (Σ_k A_k[i]·V_k[i], Σ_k |A_k[i]|², Σ_k |V_k[i]|²), fp32.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from harmony.backends import backend_for
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
    if B == 0 or not As:
        return out if out is not None else torch.zeros(B, 3, dtype=torch.float32, device=device)
    name = backend_for("gram", device.type, dtype, backend)
    with op_range(f"gram/{name}"):
        if name == "ref":
            return gram_ref(As, Vs, out=out)
        As = [a.contiguous() for a in As]
        Vs = [v.contiguous() for v in Vs]
        if name == "triton":
            if out is None:
                out = torch.zeros(B, 3, dtype=torch.float32, device=device)
            torch.ops.harmony.gram_triton(As, Vs, out)
            return out
        res = torch.ops.harmony.gram(As, Vs)
        if out is None:
            return res
        out += res
        return out
