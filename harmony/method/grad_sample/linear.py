"""nn.Linear: g_i(W) = G_iᵀ X_i, g_i(b) = Σ_t G_i[t] over sample i's tokens of all calls (docs/METHOD.md "Which gradient
is sample i's").

Ghost dots go through ``harmony.ops.ghost_dots`` on [B, T, ·] (extra dims and the k rows per sample
flattened into T); weight and bias are different parameters, so their dot contributions just add.
"""
from __future__ import annotations

import torch
from torch import nn

from harmony import ops
from harmony.method.grad_sample.base import GradSampler, acc_dtype, dots_from_rows, fold_rows, live
from harmony.method.grad_sample.registry import register_grad_sampler


def tokens(X: torch.Tensor, G: torch.Tensor, B: int, name: str):
    """X [N, ..., Din], G [C, N, ..., Dout] -> X [B, T, Din], G [C, B, T, Dout] (T = k·prod(...) per sample)."""
    X = fold_rows(X, B, 0, name).reshape(B, -1, X.shape[-1]).contiguous()
    G = fold_rows(G, B, 1, name).reshape(G.shape[0], B, -1, G.shape[-1]).contiguous()
    if X.dtype != G.dtype:  # autocast: the layer's input and output dtypes can differ
        dt = acc_dtype(X, G)
        X, G = X.to(dt), G.to(dt)
    return X, G


def pick_method(method: str, T: int, d_in: int, d_out: int) -> str:
    """'auto' -> the cheaper form by multiply-adds per sample: Gram T²·(Din + 3·Dout) (X Xᵀ and the three
    G Gᵀ products) against instantiation 2·T·Din·Dout (GaᵀX and GbᵀX). Measured on the CPU kernels this
    tracks the faster form; the op's own 'auto' (2T² ≤ Din·Dout) ignores the three G products."""
    if method != "auto":
        return method
    return "gram" if T * (d_in + 3 * d_out) < 2 * d_in * d_out else "instantiate"


def gather_tokens(calls, grads, B: int, name: str):
    """All calls' tokens concatenated along T: X [B, ΣT, Din], G [C, B, ΣT, Dout]."""
    pairs = [tokens(c.args[0], g, B, name) for c, g in live(calls, grads)]
    if len(pairs) == 1:
        return pairs[0]
    return torch.cat([p[0] for p in pairs], 1), torch.cat([p[1] for p in pairs], 2)


@register_grad_sampler(nn.Linear)
class LinearSampler(GradSampler):
    def dots(self, module, name, calls, grads, B, names, method="auto"):
        X, G = gather_tokens(calls, grads, B, name)
        out = torch.zeros(B, 3, device=X.device)
        if "weight" in names:
            out = ops.ghost_dots(X, G[0], G[1], out=out, method=pick_method(method, X.shape[1], X.shape[2], G.shape[3]))
        if "bias" in names:
            s = G.sum(2)                       # [C, B, Dout]: per-sample bias gradients
            out += dots_from_rows(s[0], s[1])
        return out

    def per_sample(self, module, name, calls, grads, B, names):
        X, G = gather_tokens(calls, grads, B, name)
        dt = acc_dtype(X, G)
        res = {}
        if "weight" in names:
            res["weight"] = torch.matmul(G.to(dt).transpose(2, 3), X.to(dt).unsqueeze(0))   # [C, B, Dout, Din]
        if "bias" in names:
            res["bias"] = G.to(dt).sum(2)
        return res

    def weighted(self, module, name, calls, grads, B, names):
        res = {}
        for c, g in live(calls, grads):
            X = c.args[0].reshape(-1, c.args[0].shape[-1])
            g2 = g.reshape(-1, g.shape[-1])
            dt = acc_dtype(X, g2)
            part = {}
            if "weight" in names:
                part["weight"] = g2.to(dt).t() @ X.to(dt)
            if "bias" in names:
                part["bias"] = g2.to(dt).sum(0)
            for k, v in part.items():
                res[k] = v if k not in res else res[k] + v
        return res
