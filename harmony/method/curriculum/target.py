"""The target: how a sample's weights become the update's per-sample coefficients (the whole triplet, only its
video–text loss, or each pair by its own weight)."""
from __future__ import annotations


import torch
from torch import Tensor



def update_coefficients(alpha: Tensor, beta: Tensor, weights: Tensor, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Combine coefficients of G = Σ_i (ca_i·g^va_i + cv_i·g^vt_i). alpha, beta, weights [B] -> ca, cv [B] fp32.

    ca = w·α / norm, cv = w·β / norm with norm = Σ_i w_i / B over the whole batch (samples without a
    cosine included: they carry w = 1 and their one valid loss), so w ≡ 1 gives norm = 1 and plain
    training's L_va + λ·L_vt. norm = 1 when not renormalising, when Σw = 0 or when B = 0.
    """
    w = weights.double()
    if renormalize and w.numel() > 0:
        total = w.sum()
        norm = torch.where(total > 0, total / w.numel(), torch.ones_like(total))
    else:
        norm = torch.ones((), dtype=torch.float64, device=w.device)
    return (w * alpha.double() / norm).float(), (w * beta.double() / norm).float()
