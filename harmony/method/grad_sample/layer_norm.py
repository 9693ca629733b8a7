"""nn.LayerNorm: g_i(weight) = Σ_t G_i[t] ⊙ x̂_i[t], g_i(bias) = Σ_t G_i[t] (small: materialized [C, B, *shape]).

x̂ is recomputed from the kept input (normalisation over ``normalized_shape``, biased variance, ``eps``).
"""
from __future__ import annotations

import torch
from torch import nn

from harmony.method.grad_sample.base import GradSampler, acc_dtype, fold_rows, live
from harmony.method.grad_sample.registry import register_grad_sampler


def normalized(ln: nn.LayerNorm, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """x̂ = (x − mean) / sqrt(var + eps) over the trailing ``normalized_shape`` dims, in ``dt`` (one fused op)."""
    return torch.native_layer_norm(x.to(dt), list(ln.normalized_shape), None, None, ln.eps)[0]


@register_grad_sampler(nn.LayerNorm)
class LayerNormSampler(GradSampler):
    def per_sample(self, module, name, calls, grads, B, names):
        nshape = tuple(module.normalized_shape)
        res = {}
        for c, g in live(calls, grads):
            dt = acc_dtype(c.args[0], g)
            C = g.shape[0]
            G = fold_rows(g.to(dt), B, 1, name).reshape(C, B, -1, *nshape)       # [C, B, T, *shape]
            part = {}
            if "weight" in names:
                xh = fold_rows(normalized(module, c.args[0], dt), B, 0, name).reshape(B, -1, *nshape)
                part["weight"] = (G * xh).sum(2)
            if "bias" in names:
                part["bias"] = G.sum(2)
            for k, v in part.items():
                res[k] = v if k not in res else res[k] + v
        return res
