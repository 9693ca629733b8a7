"""Pre-LN Transformer encoder (docs/DESIGN.md "The model (VATT)") built from nn.Linear / nn.LayerNorm only.

Attention is written with one qkv nn.Linear, an output nn.Linear and scaled dot-product attention
(harmony.model.attention, whose backward also batches; not nn.MultiheadAttention, whose weights bypass nn.Linear), so
every weight the harmonizer sees is a Linear or LayerNorm applied token-wise, and nothing mixes samples: row b of the
output depends on row b of the input only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from harmony.model.attention import attention


class SelfAttention(nn.Module):
    """Multi-head self-attention with an optional key-padding mask."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, N, d], key_mask [B, N] bool (True = attend to this key) or None -> [B, N, d]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # broadcast over heads and queries
        y = attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    """Linear -> GELU -> Linear, token-wise."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, d] -> [B, N, d]
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN residual block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, N, d], key_mask [B, N] bool or None -> [B, N, d]."""
        x = x + self.drop(self.attn(self.norm1(x), key_mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of pre-LN blocks and the final LayerNorm; returns the pooled AGG token (position 0)."""

    def __init__(self, layers: int, width: int, heads: int, mlp: int, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, N, d] with the AGG token at position 0 -> final-normed AGG output [B, d].

        The final norm is token-wise, so applying it to the AGG token alone equals normalising every token
        and then pooling, at 1/N of the cost.
        """
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x[:, 0])
