"""ghost_dots: per-sample gradient dots of a linear map straight from activations (SPEC §5–6).

For one layer with input X_i [T, Din] and output gradients Ga_i, Gb_i [T, Dout] of sample i, the
per-sample weight gradients are Ga_iᵀX_i and Gb_iᵀX_i; this returns, without forming them,
(⟨Ga_iᵀX_i, Gb_iᵀX_i⟩, ‖Ga_iᵀX_i‖², ‖Gb_iᵀX_i‖²) per sample as [B, 3] fp32.
Gram form: ⟨GaᵀX, GbᵀX⟩ = Σ_{t,s} (X Xᵀ)_{ts} (Ga Gbᵀ)_{ts}, chosen when 2T² ≤ Din·Dout.
"""
from __future__ import annotations

from typing import Optional

import torch


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
