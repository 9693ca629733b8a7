"""combine: weighted sum of per-sample gradient rows into a flat gradient buffer (SPEC §6).

out_k = Σ_i ca_i·A_k[i] + cv_i·V_k[i] for every bucket k (fp32 accumulation; out fp32 or the param dtype).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

from harmony.backends import backend_for
from harmony.ops._checks import as_list, check_buckets, check_coeffs, check_combine_out, op_range

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


def combine(A: Buffers, V: Buffers, ca: torch.Tensor, cv: torch.Tensor, out: Buffers, accumulate: bool = False,
            backend: Optional[str] = None) -> Buffers:
    """out_k = Σ_i ca_i·A_k[i] + cv_i·V_k[i] (+ the old out_k when ``accumulate``); returns ``out``.

    A, V: one [B, P] tensor or equal-length lists of buckets [B, P_k] (float32, bfloat16 or float16, one dtype
    and device). ca, cv: [B], any float dtype, used as fp32. out: a [P] tensor (when A is one tensor) or a list
    of [P_k], float32 / bfloat16 / float16 (may differ from A's). fp32 accumulation, one rounding at the end.
    B = 0 gives zeros (out unchanged with ``accumulate``). Non-contiguous A, V are copied to contiguous ones; a
    non-contiguous out is computed into a contiguous copy and copied back. backend: as for ``gram``.
    """
    single = isinstance(A, torch.Tensor)
    if single != isinstance(out, torch.Tensor):
        raise ValueError("harmony.ops.combine: out must be one tensor when A is one tensor, a list when A is a list")
    As, Vs, outs = as_list(A), as_list(V), as_list(out)
    B, device, dtype = check_buckets("combine", As, Vs)
    check_coeffs("combine", ca, cv, B, device)
    check_combine_out("combine", As, outs, device)
    if not As:
        return out
    name = backend_for("combine", device.type, dtype, backend)
    with op_range(f"combine/{name}"):
        if name == "ref" or any(o.dtype == torch.float64 for o in outs):
            combine_ref(As, Vs, ca, cv, outs, accumulate=accumulate)
            return out
        As = [a.contiguous() for a in As]
        Vs = [v.contiguous() for v in Vs]
        ca32 = ca.to(torch.float32).contiguous()
        cv32 = cv.to(torch.float32).contiguous()
        targets = [o if o.is_contiguous() else o.contiguous() for o in outs]
        # The kernels take one out dtype per call; mixed out dtypes (rare) become one call per dtype.
        groups: Dict[torch.dtype, List[int]] = {}
        for k, o in enumerate(targets):
            groups.setdefault(o.dtype, []).append(k)
        run = torch.ops.harmony.combine_triton if name == "triton" else torch.ops.harmony.combine
        for members in groups.values():
            run([As[k] for k in members], [Vs[k] for k in members], ca32, cv32, [targets[k] for k in members],
                accumulate)
        for o, t in zip(outs, targets):
            if t is not o:
                o.copy_(t)
    return out
