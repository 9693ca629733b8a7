"""combine: weighted sum of per-sample gradient rows into a flat gradient buffer (docs/KERNELS.md).

out_k = Σ_i ca_i·A_k[i] + cv_i·V_k[i] for every bucket k (fp32 accumulation; out fp32 or the param dtype).

The op in one place: its reference ``combine_ref``, the fake shared by its registered ops, the registration of its
Triton launcher (kernels/combine.py) as ``torch.ops.harmony.combine_triton`` and the public ``combine``. The C++ op
``torch.ops.harmony.combine`` (csrc/cpu/combine.cpp, csrc/cuda/combine.cu) has the same schema:
``combine(Tensor[] A, Tensor[] V, Tensor ca, Tensor cv, Tensor(a!)[] out, bool accumulate) -> ()``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from harmony.ops import _ext
from harmony.ops.backends import backend_for
from harmony.ops import _dispatch
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
        if a.shape[0]:
            r = ca.to(acc) @ a.to(acc) + cv.to(acc) @ v.to(acc)
        else:
            r = torch.zeros(o.shape, dtype=acc, device=o.device)
        if accumulate:
            r = r + o.to(acc)
        o.copy_(r.to(o.dtype))
    return out


def _combine_fake(A: List[Tensor], V: List[Tensor], ca: Tensor, cv: Tensor, out: List[Tensor],
                  accumulate: bool) -> None:
    """Shapes only, for torch.compile and opcheck: out is updated in place, nothing is returned."""
    return None


if _ext.C is not None:
    torch.library.register_fake("harmony::combine")(_combine_fake)


def _register_triton() -> None:
    from harmony.kernels.combine import combine as launch
    from harmony.ops._triton import triton_op

    def combine_triton(A: List[Tensor], V: List[Tensor], ca: Tensor, cv: Tensor, out: List[Tensor],
                       accumulate: bool) -> None:
        launch(A, V, ca, cv, out, accumulate)

    triton_op("harmony::combine_triton", combine_triton, mutates_args={"out"}, fake=_combine_fake)


_dispatch.register("combine", combine_ref, _register_triton)


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
    if any(o.dtype == torch.float64 for o in outs):
        name = "ref"  # the kernels write float32, bfloat16 or float16
    with op_range(f"combine/{name}"):
        run = _dispatch.kernel("combine", name)
        As, Vs = _dispatch.kernel_layout(name, As), _dispatch.kernel_layout(name, Vs)
        ca32 = ca.to(torch.float32).contiguous()
        cv32 = cv.to(torch.float32).contiguous()
        targets = [o if o.is_contiguous() else o.contiguous() for o in outs]
        # The C++ kernels take one out dtype per call; mixed out dtypes (rare) become one call per dtype.
        groups: Dict[torch.dtype, List[int]] = {}
        for k, o in enumerate(targets):
            groups.setdefault(o.dtype, []).append(k)
        for members in groups.values():
            run([As[k] for k in members], [Vs[k] for k in members], ca32, cv32, [targets[k] for k in members],
                accumulate)
        for o, t in zip(outs, targets):
            if t is not o:
                o.copy_(t)
    return out
