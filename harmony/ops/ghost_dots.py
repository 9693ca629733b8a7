"""ghost_dots: per-sample gradient dots of a linear map straight from activations (SPEC §5–6).

For one layer with input X_i [T, Din] and output gradients Ga_i, Gb_i [T, Dout] of sample i, the
per-sample weight gradients are Ga_iᵀX_i and Gb_iᵀX_i; this returns, without forming them,
(⟨Ga_iᵀX_i, Gb_iᵀX_i⟩, ‖Ga_iᵀX_i‖², ‖Gb_iᵀX_i‖²) per sample as [B, 3] fp32.
Gram form: ⟨GaᵀX, GbᵀX⟩ = Σ_{t,s} (X Xᵀ)_{ts} (Ga Gbᵀ)_{ts}, chosen when 2T² ≤ Din·Dout.
"""
from __future__ import annotations

from typing import Optional

import torch

from harmony.backends import backend_for
from harmony.ops._checks import check_dots_out, check_ghost, op_range

METHODS = ("auto", "gram", "instantiate")


def use_gram_form(T: int, d_in: int, d_out: int) -> bool:
    """The cheaper of the two forms: Gram costs ~T²(Din+Dout), instantiation ~T·Din·Dout."""
    return 2 * T * T <= d_in * d_out


def ghost_dots_ref(X: torch.Tensor, Ga: torch.Tensor, Gb: torch.Tensor, out: Optional[torch.Tensor] = None,
                   upcast: bool = False) -> torch.Tensor:
    """Pure-PyTorch reference. X [B, T, Din], Ga/Gb [B, T, Dout] -> [B, 3] fp32 (float64 with upcast)."""
    acc = torch.float64 if upcast else torch.float32
    X, Ga, Gb = X.to(acc), Ga.to(acc), Gb.to(acc)
    ga = Ga.transpose(1, 2) @ X          # [B, Dout, Din]
    gb = Gb.transpose(1, 2) @ X
    res = torch.stack([(ga * gb).sum((1, 2)), (ga * ga).sum((1, 2)), (gb * gb).sum((1, 2))], 1)
    if out is not None:
        out += res.to(out.dtype)
        return out
    return res


def ghost_dots(X: torch.Tensor, Ga: torch.Tensor, Gb: torch.Tensor, out: Optional[torch.Tensor] = None,
               method: str = "auto", backend: Optional[str] = None) -> torch.Tensor:
    """Per sample (⟨Ga_iᵀX_i, Gb_iᵀX_i⟩_F, ‖Ga_iᵀX_i‖², ‖Gb_iᵀX_i‖²) -> [B, 3] fp32, never writing Ga_iᵀX_i.

    X [B, T, Din], Ga and Gb [B, T, Dout]: one dtype (float32, bfloat16, float16) and device; made contiguous.
    method: "gram" (via X Xᵀ and Ga Gbᵀ, cost ~T²), "instantiate" (Ga_iᵀX_i tile by tile on chip, cost
    ~T·Din·Dout) or "auto" (``use_gram_form``). out: optional [B, 3] fp32, the result is ADDED into it.
    backend: as for ``gram`` (ref always instantiates, in plain PyTorch).
    """
    if method not in METHODS:
        raise ValueError(f"harmony.ops.ghost_dots: method must be one of {METHODS}, got {method!r}")
    check_ghost("ghost_dots", X, Ga, Gb)
    B, T, d_in = X.shape
    d_out = Ga.shape[2]
    check_dots_out("ghost_dots", out, B, X.device)
    if B == 0:
        return out if out is not None else torch.zeros(0, 3, dtype=torch.float32, device=X.device)
    if method == "auto":
        method = "gram" if use_gram_form(T, d_in, d_out) else "instantiate"
    name = backend_for("ghost_dots", X.device.type, X.dtype, backend)
    with op_range(f"ghost_dots/{name}"):
        if name == "ref":
            return ghost_dots_ref(X, Ga, Gb, out=out)
        X, Ga, Gb = X.contiguous(), Ga.contiguous(), Gb.contiguous()
        if name == "triton":
            if out is None:
                out = torch.zeros(B, 3, dtype=torch.float32, device=X.device)
            torch.ops.harmony.ghost_dots_triton(X, Ga, Gb, out, method)
            return out
        res = torch.ops.harmony.ghost_dots(X, Ga, Gb, 0 if method == "gram" else 1)
        if out is None:
            return res
        out += res
        return out
