"""harmony.model.layers.AddEmbedding and PrependToken: parameters used directly, with exact fast samplers.

AddEmbedding: y[b, n] = x[b, n] + table[index[n]] -> g_i(table) = index_add of Σ_rows G_i[n] into rows index[n].
PrependToken: y[b] = cat(token, x[b]) -> g_i(token) = Σ_rows G_i[0] (the output gradient at the token slot).
"""
from __future__ import annotations

import torch

from harmony.method.grad_sample.base import GradSampler, acc_dtype, dots_from_rows, fold_rows, live
from harmony.method.grad_sample.registry import register_grad_sampler
from harmony.model.layers import AddEmbedding, PrependToken


def _position_grads(module: AddEmbedding, x: torch.Tensor, g: torch.Tensor, B: int, name: str):
    """Output gradient [C, N, ..., n, d] -> per-sample gradient per used position [C, B, n, d] and the table rows
    [n]."""
    rows = module.index[: x.shape[1]]
    G = fold_rows(g, B, 1, name)                                   # [C, B, k, ..., n, d]
    G = G.sum(tuple(range(2, G.dim() - 2)))                       # [C, B, n, d]
    if rows.numel() == 1 and G.shape[2] != 1:                      # one row broadcast over all positions
        G = G.sum(2, keepdim=True)
    return G, rows


@register_grad_sampler(AddEmbedding)
class AddEmbeddingSampler(GradSampler):
    def per_sample(self, module, name, calls, grads, B, names):
        out = None
        for c, g in live(calls, grads):
            G, rows = _position_grads(module, c.args[0], g, B, name)
            dt = acc_dtype(G)
            if out is None:
                out = torch.zeros(G.shape[0], B, *module.table.shape, dtype=dt, device=G.device)
            out.index_add_(2, rows, G.to(dt))
        return {"table": out}

    def dots(self, module, name, calls, grads, B, names, method="auto"):
        pairs = [_position_grads(module, c.args[0], g, B, name) for c, g in live(calls, grads)]
        if len(pairs) == 1 and torch.unique(pairs[0][1]).numel() == pairs[0][1].numel():
            G = pairs[0][0]                  # distinct rows: the per-sample gradient is G itself, no scatter
            return dots_from_rows(G[0].reshape(B, -1), G[1].reshape(B, -1))
        return super().dots(module, name, calls, grads, B, names, method)


@register_grad_sampler(PrependToken)
class PrependTokenSampler(GradSampler):
    def per_sample(self, module, name, calls, grads, B, names):
        out = None
        for c, g in live(calls, grads):
            G = fold_rows(g[:, :, 0], B, 1, name).sum(2)          # [C, B, d]
            G = G.to(acc_dtype(G)).reshape(G.shape[0], B, *module.token.shape)
            out = G if out is None else out + G
        return {"token": out}
