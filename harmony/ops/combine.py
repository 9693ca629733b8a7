"""combine: weighted sum of per-sample gradient rows into a flat gradient buffer (SPEC §6).

out_k = Σ_i ca_i·A_k[i] + cv_i·V_k[i] for every bucket k (fp32 accumulation; out fp32 or the param dtype).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

Buffers = Union[torch.Tensor, Sequence[torch.Tensor]]


def combine_ref(A: Buffers, V: Buffers, ca: torch.Tensor, cv: torch.Tensor, out: Buffers,
                accumulate: bool = False, upcast: bool = False) -> Buffers:
    """Pure-PyTorch reference. A, V: [B, P_k]; ca, cv: [B]; out: [P_k] (same structure as A)."""
    single = isinstance(A, torch.Tensor)
    As, Vs = ([A], [V]) if single else (list(A), list(V))
    outs = [out] if single else list(out)
    acc = torch.float64 if upcast else torch.float32
    for a, v, o in zip(As, Vs, outs):
        r = ca.to(acc) @ a.to(acc) + cv.to(acc) @ v.to(acc) if a.shape[0] else torch.zeros(o.shape, dtype=acc, device=o.device)
        if accumulate:
            r = r + o.to(acc)
        o.copy_(r.to(o.dtype))
    return out
