"""Fine-to-coarse (FAC) projection heads into the common spaces S_va and S_vt (docs/DESIGN.md "The model (VATT)").

Video reaches S_va through an MLP head and S_vt through a second MLP head applied to its S_va embedding; audio
and text reach their space through one Linear each. The norm inside the MLP heads is LayerNorm by default;
BatchNorm (VATT's choice) is allowed but mixes samples, so it breaks the per-sample gradient definition of
docs/METHOD.md "Which gradient is sample i's" for everything downstream of it (see ``VATT.scope_parameters``).
"""
from __future__ import annotations

from torch import nn

HEAD_NORMS = ("layernorm", "none", "batchnorm")


def head_norm(kind: str, dim: int) -> nn.Module:
    """The norm layer named by model.head_norm over features of size ``dim``."""
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "none":
        return nn.Identity()
    if kind == "batchnorm":
        return nn.BatchNorm1d(dim)
    raise ValueError(f"model.head_norm={kind!r} is not allowed; choose one of {list(HEAD_NORMS)}")


class FACHead(nn.Module):
    """Linear -> norm -> GELU -> Linear: [B, d_in] -> [B, d_out]."""

    def __init__(self, d_in: int, d_out: int, norm: str = "layernorm"):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_out)
        self.norm = head_norm(norm, d_out)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_out, d_out)

    def forward(self, x):  # [B, d_in] -> [B, d_out]
        return self.fc2(self.act(self.norm(self.fc1(x))))
