"""ghost_dots: per-sample gradient dots of a linear map straight from activations (docs/KERNELS.md; where it is
used: docs/HARMONIZER.md "3. The measurement tiers").

For one layer with input X_i [T, Din] and output gradients Ga_i, Gb_i [T, Dout] of sample i, the
per-sample weight gradients are Ga_iᵀX_i and Gb_iᵀX_i; this adds, without forming them,
(⟨Ga_iᵀX_i, Gb_iᵀX_i⟩, ‖Ga_iᵀX_i‖², ‖Gb_iᵀX_i‖²) per sample into out [B, 3] fp32.
Gram form: ⟨GaᵀX, GbᵀX⟩ = Σ_{t,s} (X Xᵀ)_{ts} (Ga Gbᵀ)_{ts}, chosen when 2T² ≤ Din·Dout.

The op in one place: its reference ``ghost_dots_ref``, the fake shared by its registered ops, the registration of
its Triton launcher (kernels/ghost_dots.py) as ``torch.ops.harmony.ghost_dots_triton`` and the public
``ghost_dots``. The C++ op ``torch.ops.harmony.ghost_dots`` (csrc/cpu/ghost_dots.cpp, csrc/cuda/ghost_dots.cu) has
the same schema: ``ghost_dots(Tensor X, Tensor Ga, Tensor Gb, Tensor(a!) out, str method) -> ()``, method "gram"
or "instantiate".
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from harmony.ops import _ext
from harmony.ops.backends import backend_for
from harmony.ops import _dispatch
from harmony.ops._checks import check_dots_out, check_ghost, op_range

METHODS = ("auto", "gram", "instantiate")


def use_gram_form(T: int, d_in: int, d_out: int) -> bool:
    """The cheaper of the two forms: Gram costs ~T²(Din+Dout), instantiation ~T·Din·Dout."""
    return 2 * T * T <= d_in * d_out


def ghost_dots_ref(X: torch.Tensor, Ga: torch.Tensor, Gb: torch.Tensor, out: Optional[torch.Tensor] = None,
                   upcast: bool = False) -> torch.Tensor:
    """Pure-PyTorch reference. X [B, T, Din], Ga/Gb [B, T, Dout] -> [B, 3] fp32 (float64 with upcast).

    With ``out`` given ([B, 3]), the result is added into it and ``out`` is returned.
    """
    acc = torch.float64 if upcast else torch.float32
    X, Ga, Gb = X.to(acc), Ga.to(acc), Gb.to(acc)
    ga = Ga.transpose(1, 2) @ X          # [B, Dout, Din]
    gb = Gb.transpose(1, 2) @ X
    res = torch.stack([(ga * gb).sum((1, 2)), (ga * ga).sum((1, 2)), (gb * gb).sum((1, 2))], 1)
    if out is not None:
        out += res.to(out.dtype)
        return out
    return res


def _ghost_dots_fake(X: Tensor, Ga: Tensor, Gb: Tensor, out: Tensor, method: str) -> None:
    """Shapes only, for torch.compile and opcheck: out is updated in place, nothing is returned."""
    return None


if _ext.C is not None:
    torch.library.register_fake("harmony::ghost_dots")(_ghost_dots_fake)


def _register_triton() -> None:
    from harmony.kernels.ghost_dots import ghost_dots as launch
    from harmony.ops._triton import triton_op

    def ghost_dots_triton(X: Tensor, Ga: Tensor, Gb: Tensor, out: Tensor, method: str) -> None:
        launch(X, Ga, Gb, out, method)

    triton_op("harmony::ghost_dots_triton", ghost_dots_triton, mutates_args={"out"}, fake=_ghost_dots_fake)


_dispatch.register("ghost_dots", lambda X, Ga, Gb, out, method: ghost_dots_ref(X, Ga, Gb, out=out),
                   _register_triton)


def ghost_dots(X: torch.Tensor, Ga: torch.Tensor, Gb: torch.Tensor, out: Optional[torch.Tensor] = None,
               method: str = "auto", backend: Optional[str] = None) -> torch.Tensor:
    """Per sample (⟨Ga_iᵀX_i, Gb_iᵀX_i⟩_F, ‖Ga_iᵀX_i‖², ‖Gb_iᵀX_i‖²) -> [B, 3] fp32, never writing Ga_iᵀX_i.

    X [B, T, Din], Ga and Gb [B, T, Dout]: one dtype (float32, bfloat16, float16) and device; made contiguous.
    method: "gram" (via X Xᵀ and Ga Gbᵀ, cost ~T²), "instantiate" (Ga_iᵀX_i tile by tile on chip, cost
    ~T·Din·Dout) or "auto" (``use_gram_form``). out: optional [B, 3] fp32, the result is ADDED into it.
    backend: as for ``gram`` (ref always instantiates, in plain PyTorch).
    """
    if method not in METHODS:
        raise ValueError(f"harmony.ops.ghost_dots: method must be one of {METHODS}, got {method!r}")
    check_ghost("ghost_dots", X, Ga, Gb)
    B, T, d_in = X.shape
    d_out = Ga.shape[2]
    check_dots_out("ghost_dots", out, B, X.device)
    if out is None:
        out = torch.zeros(B, 3, dtype=torch.float32, device=X.device)
    if B == 0:
        return out
    if method == "auto":
        method = "gram" if use_gram_form(T, d_in, d_out) else "instantiate"
    name = backend_for("ghost_dots", X.device.type, X.dtype, backend)
    with op_range(f"ghost_dots/{name}"):
        X, Ga, Gb = _dispatch.kernel_layout(name, [X, Ga, Gb])
        _dispatch.kernel("ghost_dots", name)(X, Ga, Gb, out, method)
    return out
