"""nn.Conv1d/2d/3d: unfold (im2col) the input into patches, then the Linear form per group.

Patches of a call: [N, L, C_in·K] (L output positions, K kernel volume) in the weight's flatten order
[C_in/groups, *kernel]; the output gradient [C, N, C_out, *O] becomes [C, N, L, C_out]. Groups are
folded into the batch of ``ghost_dots`` (B·groups rows, summed back per sample).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from harmony import ops
from harmony.method.grad_sample.base import GradSampler, acc_dtype, dots_from_rows, fold_rows, live
from harmony.method.grad_sample.linear import pick_method
from harmony.method.grad_sample.registry import register_grad_sampler


def unfold_patches(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """x [N, C_in, *S] -> patches [N, L, C_in, K] exactly as ``conv`` reads them (padding, stride, dilation)."""
    nd = len(conv.kernel_size)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    pad = list(conv._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    for d in range(nd):
        k, s, dil = conv.kernel_size[d], conv.stride[d], conv.dilation[d]
        x = x.unfold(2 + d, (k - 1) * dil + 1, s)          # appends a window axis
        if dil > 1:
            x = x[..., ::dil]
    # x: [N, C, O_1..O_nd, K_1..K_nd] -> [N, O_1..O_nd, C, K_1..K_nd]
    N, C = x.shape[:2]
    perm = [0] + list(range(2, 2 + nd)) + [1] + list(range(2 + nd, 2 + 2 * nd))
    x = x.permute(perm)
    return x.reshape(N, -1, C, _kvol(conv))


def _kvol(conv) -> int:
    v = 1
    for k in conv.kernel_size:
        v *= k
    return v


def conv_tokens(conv, name: str, calls, grads, B: int):
    """Per group: X [B·g, ΣT, C_in/g·K], G [C, B·g, ΣT, C_out/g] over all calls (tokens = positions)."""
    g = conv.groups
    Xs: List[torch.Tensor] = []
    Gs: List[torch.Tensor] = []
    for c, gr in live(calls, grads):
        P = unfold_patches(conv, c.args[0])                                   # [N, L, C_in, K]
        N, L = P.shape[:2]
        P = P.reshape(N, L, g, -1)                                    # [N, L, g, C_in/g·K]
        Gc = gr.reshape(gr.shape[0], N, conv.out_channels, L).transpose(2, 3)   # [C, N, L, C_out]
        Gc = Gc.reshape(gr.shape[0], N, L, g, -1)                     # [C, N, L, g, C_out/g]
        P = fold_rows(P, B, 0, name).permute(0, 3, 1, 2, 4).reshape(B * g, -1, P.shape[-1])
        Gc = fold_rows(Gc, B, 1, name).permute(0, 1, 4, 2, 3, 5).reshape(Gc.shape[0], B * g, -1, Gc.shape[-1])
        Xs.append(P)
        Gs.append(Gc)
    X = Xs[0] if len(Xs) == 1 else torch.cat(Xs, 1)
    G = Gs[0] if len(Gs) == 1 else torch.cat(Gs, 2)
    dt = acc_dtype(X, G) if X.dtype != G.dtype else X.dtype
    return X.to(dt).contiguous(), G.to(dt).contiguous()


@register_grad_sampler(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvSampler(GradSampler):
    def dots(self, module, name, calls, grads, B, names, method="auto"):
        X, G = conv_tokens(module, name, calls, grads, B)
        g = module.groups
        out = torch.zeros(B, 3, device=X.device)
        if "weight" in names:
            m = pick_method(method, X.shape[1], X.shape[2], G.shape[3])
            out += ops.ghost_dots(X, G[0], G[1], method=m).view(B, g, 3).sum(1)
        if "bias" in names:
            s = G.sum(2).view(G.shape[0], B, -1)                     # [C, B, C_out]
            out += dots_from_rows(s[0], s[1])
        return out

    def per_sample(self, module, name, calls, grads, B, names):
        X, G = conv_tokens(module, name, calls, grads, B)
        dt = acc_dtype(X, G)
        C = G.shape[0]
        res = {}
        if "weight" in names:
            w = torch.matmul(G.to(dt).transpose(2, 3), X.to(dt).unsqueeze(0))    # [C, B·g, C_out/g, C_in/g·K]
            res["weight"] = w.reshape(C, B, *module.weight.shape)
        if "bias" in names:
            res["bias"] = G.to(dt).sum(2).reshape(C, B, -1)
        return res

    def weighted(self, module, name, calls, grads, B, names):
        X, G = conv_tokens(module, name, calls, [None if g is None else g.unsqueeze(0) for g in grads], B)
        dt = acc_dtype(X, G)
        g = module.groups
        X = X.to(dt).view(B, g, X.shape[1], -1)
        G = G[0].to(dt).view(B, g, G.shape[2], -1)
        res = {}
        if "weight" in names:
            res["weight"] = torch.einsum("bgto,bgti->goi", G, X).reshape(module.weight.shape)
        if "bias" in names:
            res["bias"] = G.sum((0, 2)).reshape(-1)
        return res
