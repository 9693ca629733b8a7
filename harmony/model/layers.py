"""Small modules that hold parameters used directly (not through nn.Linear & co).

They keep the per-sample structure obvious to the harmonizer (docs/HARMONIZER.md "3. The measurement tiers"): each maps
an input with batch dim 0 to an output with batch dim 0 and mixes no samples, and each has its own per-sample sampler.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class AddEmbedding(nn.Module):
    """y[b, n] = x[b, n] + table[index[n]]: learned positional / modality embeddings.

    ``index`` (a buffer, [N] long) maps each token position to a row of ``table`` [R, d]; a factorised
    positional embedding is several AddEmbedding modules applied in turn (e.g. T, H and W tables).
    """

    def __init__(self, rows: int, dim: int, index: Optional[torch.Tensor] = None, init_std: float = 0.02):
        super().__init__()
        self.table = nn.Parameter(torch.randn(rows, dim) * init_std)
        self.register_buffer("index", torch.arange(rows) if index is None else index.long(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, N, d]
        return x + self.table[self.index[: x.shape[1]]]


class PrependToken(nn.Module):
    """y[b] = cat(token, x[b]) along the token axis: the AGG token."""

    def __init__(self, dim: int, init_std: float = 0.02):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, dim) * init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, N, d] -> [B, N+1, d]
        return torch.cat([self.token.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
