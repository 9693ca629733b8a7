"""nn.Embedding: sample i's gradient scatters its output-gradient rows into the rows of its token ids.

Dots without the [B, V, d] per-sample tables: rows of the same (sample, id) are summed first (one
index_add over the unique (sample, id) keys), then dotted — the Gram form with XXᵀ = [id_t == id_s].
Tokens equal to ``padding_idx`` get no gradient (as in nn.Embedding). ``scale_grad_by_freq`` divides by
counts over the whole batch, i.e. mixes samples, and is refused.
"""
from __future__ import annotations

import torch
from torch import nn

from harmony.method.grad_sample.base import GradSampler, PerSampleError, acc_dtype, fold_rows, live
from harmony.method.grad_sample.registry import register_grad_sampler


def _check(module, name):
    if module.scale_grad_by_freq:
        raise PerSampleError(f"module '{name}' (nn.Embedding with scale_grad_by_freq=True) scales gradients by "
                             "token counts over the whole batch, which mixes samples; set scale_grad_by_freq=False")


def sample_rows(module, name, calls, grads, B):
    """Unique (sample, id) keys and their summed gradient rows: sample [U], id [U], rows [C, U, d]."""
    _check(module, name)
    keys, rows = [], []
    V = module.num_embeddings
    for c, g in live(calls, grads):
        idx = fold_rows(c.args[0], B, 0, name).reshape(B, -1)                      # [B, T]
        G = fold_rows(g, B, 1, name).reshape(g.shape[0], B, -1, g.shape[-1])      # [C, B, T, d]
        sample = torch.arange(B, device=idx.device).unsqueeze(1).expand_as(idx)
        key = sample * V + idx
        if module.padding_idx is not None:
            keep = idx != module.padding_idx
            key, G = key[keep], G[:, keep]
        else:
            key, G = key.reshape(-1), G.reshape(G.shape[0], -1, G.shape[-1])
        keys.append(key)
        rows.append(G)
    key = torch.cat(keys)
    G = torch.cat(rows, 1)
    uniq, inv = torch.unique(key, return_inverse=True)
    dt = acc_dtype(G)
    summed = torch.zeros(G.shape[0], uniq.numel(), G.shape[-1], dtype=dt, device=G.device)
    summed.index_add_(1, inv, G.to(dt))
    return uniq // V, uniq % V, summed


@register_grad_sampler(nn.Embedding)
class EmbeddingSampler(GradSampler):
    def dots(self, module, name, calls, grads, B, names, method="auto"):
        sample, _, rows = sample_rows(module, name, calls, grads, B)
        a, b = rows[0], rows[1]
        per_row = torch.stack([(a * b).sum(1), (a * a).sum(1), (b * b).sum(1)], 1)   # [U, 3]
        out = torch.zeros(B, 3, dtype=per_row.dtype, device=per_row.device)
        out.index_add_(0, sample, per_row)
        return out.float()

    def per_sample(self, module, name, calls, grads, B, names):
        sample, ids, rows = sample_rows(module, name, calls, grads, B)
        full = torch.zeros(rows.shape[0], B, module.num_embeddings, rows.shape[-1], dtype=rows.dtype,
                           device=rows.device)
        full[:, sample, ids] = rows
        return {"weight": full}

    def weighted(self, module, name, calls, grads, B, names):
        _check(module, name)
        out = None
        for c, g in live(calls, grads):
            idx = c.args[0].reshape(-1)
            G = g.reshape(-1, g.shape[-1])
            if module.padding_idx is not None:
                keep = idx != module.padding_idx
                idx, G = idx[keep], G[keep]
            dt = acc_dtype(G)
            if out is None:
                out = torch.zeros(module.num_embeddings, G.shape[-1], dtype=dt, device=G.device)
            out.index_add_(0, idx, G.to(dt))
        return {"weight": out}
