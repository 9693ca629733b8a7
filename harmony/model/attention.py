"""Scaled dot-product attention whose backward also runs batched (``is_grads_batched``).

The harmonizer's measurement is one activation-gradient backward with two columns of upstream gradients
(``torch.autograd.grad(..., is_grads_batched=True)``, i.e. vmap over the backward). PyTorch has no
batching rule for the CPU flash-attention backward, so under vmap it falls back to a slow per-column loop
("There is a performance drop because we have not yet implemented the batching rule for ...").

``attention`` keeps the fused CPU kernels for the forward and for an ordinary backward, and gives the
batched backward an explicit form built from matrix products, which batch: with the row log-sum-exp
``lse`` kept by the forward,

    P = exp(q kᵀ·s + mask − lse),  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP − rowsum(dO ⊙ O)),
    dQ = dS k·s,  dK = dSᵀ q·s                                          (s = 1/√d_head)

— the recomputation the flash backward does, written out (same multiply-adds). Other devices, and
attention dropout, use ``F.scaled_dot_product_attention`` as is.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch._C._functorch import is_batchedtensor, is_legacy_batchedtensor


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """bool key mask (True = attend), broadcastable to [B, H, Nq, Nk] -> additive float mask (0 / -inf)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


class _CPUAttention(torch.autograd.Function):
    """q, k, v [B, H, N, d], additive mask or None -> [B, H, N, d] (CPU flash kernel forward)."""

    generate_vmap_rule = True       # torch.func transforms (and is_grads_batched) vmap through forward/backward

    @staticmethod
    def forward(q, k, v, mask):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, mask)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if not (is_legacy_batchedtensor(d_out) or is_batchedtensor(d_out)):   # an ordinary backward: fused kernel
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                d_out.contiguous(), q, k, v, out, lse, 0.0, False, attn_mask=mask)
            return dq, dk, dv, None
        return _explicit_backward(q, k, v, out, lse, mask, d_out) + (None,)


def _explicit_backward(q, k, v, out, lse, mask, d_out):
    """The attention backward from matrix products (batches under vmap); fp32 accumulation for 16-bit inputs."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s = 1.0 / math.sqrt(q.shape[-1])
    qa, ka, va, oa, da = (t.to(acc) for t in (q, k, v, out, d_out))
    logits = qa @ ka.transpose(-1, -2) * s
    if mask is not None:
        logits = logits + mask.to(acc)
    p = torch.exp(logits - lse.to(acc).unsqueeze(-1))
    dv = p.transpose(-1, -2) @ da
    dp = da @ va.transpose(-1, -2)
    ds = p * (dp - (da * oa).sum(-1, keepdim=True))
    dq = ds @ ka * s
    dk = ds.transpose(-1, -2) @ qa * s
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v [B, H, N, d]; key_mask bool broadcastable to [B, H, N, N] (True = attend) or None -> [B, H, N, d]."""
    if q.device.type != "cpu" or dropout_p > 0.0 or q.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
    if torch.is_autocast_enabled("cpu"):
        # the fused op is not on autocast's list: give it one dtype, as the autocast SDPA would
        dt = torch.get_autocast_dtype("cpu")
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    return _CPUAttention.apply(q, k, v, _additive(key_mask, q.dtype))[0]
