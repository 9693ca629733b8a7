"""gram: per-row dot products of two per-sample gradient buffers (SPEC §6).

For buckets A_k, V_k of shape [B, P_k]: out[i] = (Σ_k A_k[i]·V_k[i], Σ_k |A_k[i]|², Σ_k |V_k[i]|²), fp32.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

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
