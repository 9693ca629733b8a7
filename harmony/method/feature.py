"""Feature mode: per-sample dots at a shared representation instead of over parameters (the representation tier).

The model computes one representation f [B, ...] per sample (VATT: the pooled video feature) that both
losses read, through their own heads. Sample i's row f_i is used only by sample i's own computation, so
under the path decomposition its per-sample gradient at the representation is row i of the batch
gradient: u^k_i = (∂L_k/∂f)_i. The three dots are then row dot products of two [B, D] matrices:

    dots_i = (⟨u^va_i, u^vt_i⟩, ‖u^va_i‖², ‖u^vt_i‖²)

This is the proxy MGDA-UB uses in multi-task learning (the gradient at the shared representation stands
for the gradient of the parameters below it: g^k_i(θ) = J_iᵀ u^k_i with the same J_i = ∂f_i/∂θ for both
losses, so the cosine differs only by the metric J_i J_iᵀ). It costs two backward passes through the heads
only, from the loss inputs down to f; no hook on the backbone, no extra backward through it. The update
with the chosen per-sample coefficients is exact: one ordinary backward with per-row scaled upstream
gradients (``ghost.weighted_backward``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from harmony.method.ghost import _pairs


def feature_grads(va_inputs: Sequence[torch.Tensor], u_va: Sequence[torch.Tensor], vt_inputs: Sequence[torch.Tensor],
                  u_vt: Sequence[torch.Tensor], feature: torch.Tensor) -> torch.Tensor:
    """[2, *f.shape]: the upstream gradients u_va (at the L_va inputs) and u_vt (at the L_vt inputs) pulled back
    to the representation ``feature`` (zeros where a loss does not reach it). Computes no parameter gradient."""
    out = []
    for col in (0, 1):
        sel = [(z, u) for z, u, c in _pairs(va_inputs, u_va, vt_inputs, u_vt) if c == col]
        g = None
        if sel and feature.requires_grad:
            g = torch.autograd.grad([z for z, _ in sel], feature, [u for _, u in sel], retain_graph=True,
                                    allow_unused=True)[0]
        out.append(torch.zeros_like(feature) if g is None else g)
    return torch.stack(out)


def feature_dots(grads: torch.Tensor, B: int) -> torch.Tensor:
    """grads [2, B·k, ...] (rows sample-major) -> [B, 3] fp32 per-sample (⟨u^va, u^vt⟩, ‖u^va‖², ‖u^vt‖²)."""
    if grads.shape[1] % max(B, 1):
        raise ValueError(f"the feature must have the batch in dim 0 (B or k·B rows): got {tuple(grads.shape[1:])} "
                         f"for B={B}")
    a = grads[0].reshape(B, -1).float()
    v = grads[1].reshape(B, -1).float()
    return torch.stack([(a * v).sum(1), (a * a).sum(1), (v * v).sum(1)], 1)
