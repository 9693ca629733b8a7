"""Sketch mode: unbiased estimates of the per-sample dots at a cost linear in the tokens (the sketched tier).

For a Linear layer with sample i's input tokens X_i [T, Din] and output gradients G^a_i, G^b_i [T, Dout],
the per-sample weight gradients are g^a_i = G^a_iᵀX_i and g^b_i = G^b_iᵀX_i. Sketch mode never forms
them: with random R [Dout, k] and S [Din, k] (independent entries of mean 0 and variance 1/k: Gaussian
or ±1/√k signs), both sides are projected,

    s^a_i = (G^a_i R)ᵀ (X_i S) = Rᵀ g^a_i S  ∈ ℝ^{k×k},        likewise s^b_i,

and ⟨s^a_i, s^b_i⟩ estimates ⟨g^a_i, g^b_i⟩ without bias: E_R[R Rᵀ] = I and E_S[S Sᵀ] = I with R and S
independent give E⟨Rᵀ A S, Rᵀ B S⟩ = tr(Aᵀ B). Its standard deviation falls as 1/√k. Cost per layer and
sample: T·k·(Din + 2·Dout) + 2·T·k² multiply-adds, against 2·T·Din·Dout for the exact instantiation and
T²·(Din + 3·Dout) for the Gram form. (The same two-sided projection of per-example gradients of linear
layers is what LoGra and LoRIF use for training-data attribution.)

R and S are drawn per step and per layer from (harmony.sketch_seed, step, layer), the same on every rank,
so a run is reproducible and a resumed run draws what the uninterrupted one would have. Biases and the
layers that are not Linear (LayerNorm, embeddings, ...) keep their exact per-sample dots: they are small.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from harmony.method.grad_sample import Call, find_sampler
from harmony.method.grad_sample.base import dots_from_rows, live
from harmony.method.grad_sample.linear import tokens

KINDS = ("gaussian", "sign")


def projections(d_in: int, d_out: int, k: int, seed: int, kind: str = "gaussian", device=None,
                dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(R [d_out, k], S [d_in, k]) with independent entries of mean 0 and variance 1/k, drawn from ``seed``."""
    if kind not in KINDS:
        raise ValueError(f"sketch projections: kind must be one of {KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        R, S = torch.randn(d_out, k, generator=g), torch.randn(d_in, k, generator=g)
    else:
        R = torch.randint(0, 2, (d_out, k), generator=g).float() * 2 - 1
        S = torch.randint(0, 2, (d_in, k), generator=g).float() * 2 - 1
    scale = k ** -0.5
    return (R * scale).to(device=device, dtype=dtype), (S * scale).to(device=device, dtype=dtype)


def sketch_dots_ref(X: torch.Tensor, Ga: torch.Tensor, Gb: torch.Tensor, R: torch.Tensor,
                    S: torch.Tensor) -> torch.Tensor:
    """X [B, T, Din], Ga/Gb [B, T, Dout], R [Dout, k], S [Din, k] -> [B, 3] fp32 (⟨s^a, s^b⟩, ‖s^a‖², ‖s^b‖²)."""
    acc = torch.promote_types(X.dtype, torch.float32)
    XS = X.to(acc) @ S.to(acc)                                  # [B, T, k]
    G = torch.stack([Ga, Gb]).to(acc) @ R.to(acc)               # [2, B, T, k]
    s = G.transpose(-1, -2) @ XS.unsqueeze(0)                   # [2, B, k, k]
    sa, sb = s[0].flatten(1), s[1].flatten(1)
    return torch.stack([(sa * sb).sum(1), (sa * sa).sum(1), (sb * sb).sum(1)], 1).float()


def layer_seed(seed: int, step: int, layer: int) -> int:
    """One 63-bit seed per (run seed, step, layer), the same on every rank."""
    h = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + layer * 0x94D049BB133111EB) & ((1 << 63) - 1)
    return h


def layer_dots(modules: Dict[str, nn.Module], records: Dict[str, List[Call]],
               grads: Dict[str, List[Optional[torch.Tensor]]], scoped: Dict[str, Sequence[str]], B: int, k: int,
               seed: int, step: int, kind: str, method: str, device) -> torch.Tensor:
    """[B, 3] fp32: Σ over the scoped layers of the per-sample dots, sketched for Linear weights, exact elsewhere."""
    total = torch.zeros(B, 3, dtype=torch.float32, device=device)
    for index, name in enumerate(sorted(scoped)):
        names = scoped[name]
        gs = grads.get(name)
        if not gs or all(g is None for g in gs):
            continue
        module = modules[name]
        if not (isinstance(module, nn.Linear) and "weight" in names):
            total += find_sampler(module, name).dots(module, name, records[name], gs, B, names, method).to(device)
            continue
        total += _linear_sketch_dots(module, name, records[name], gs, B, names, k,
                                     layer_seed(seed, step, index), kind).to(device)
    return total


def _linear_sketch_dots(module: nn.Linear, name: str, calls, grads, B: int, names, k: int, seed: int,
                        kind: str) -> torch.Tensor:
    """[B, 3]: sketched weight dots plus exact bias dots of one Linear over all its calls. The sketch of the
    calls' concatenated tokens is the sum of the per-call sketches, so no token tensor is concatenated."""
    sk, bias = None, None
    R = S = None
    for call, G in live(calls, grads):
        X, G = tokens(call.args[0], G, B, name)                  # [B, T, Din], [2, B, T, Dout]
        if R is None:
            R, S = projections(X.shape[2], G.shape[3], k, seed, kind, X.device, X.dtype)
        part = (G @ R).transpose(-1, -2) @ (X @ S)                # [2, B, k, k]
        sk = part if sk is None else sk + part
        if "bias" in names:
            b = G.sum(2)                                          # [2, B, Dout]
            bias = b if bias is None else bias + b
    acc = torch.promote_types(sk.dtype, torch.float32)
    flat = sk.to(acc).flatten(2)
    out = torch.stack([(flat[0] * flat[1]).sum(1), (flat[0] ** 2).sum(1), (flat[1] ** 2).sum(1)], 1).float()
    if bias is not None:
        out += dots_from_rows(bias[0], bias[1])
    return out
