"""The Triton kernels of kernels/ as torch custom ops (so torch.compile and opcheck see them):

  harmony::gram_triton(A[], V[], out!)                      out [B, 3] fp32 += per-row dots
  harmony::combine_triton(A[], V[], ca, cv, out![], acc)    out_k (+)= Σ_i ca_i A_k[i] + cv_i V_k[i]
  harmony::ghost_dots_triton(X, Ga, Gb, out!, method)       out [B, 3] fp32 += per-sample dots

Inputs arrive validated and contiguous from harmony.ops. Importing this module imports triton and kernels/;
whether their kernels are interpreted is fixed by TRITON_INTERPRET at that moment.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from kernels import _common
from kernels import combine as _combine
from kernels import ghost_dots as _ghost_dots
from kernels import gram as _gram


def interpreting() -> bool:
    """True when the kernels run under the Triton interpreter (CPU tensors only)."""
    return _common.interpreting()


@torch.library.custom_op("harmony::gram_triton", mutates_args={"out"})
def gram_triton(A: List[Tensor], V: List[Tensor], out: Tensor) -> None:
    _gram.gram(A, V, out)


@gram_triton.register_fake
def _gram_triton_fake(A, V, out):
    return None


@torch.library.custom_op("harmony::combine_triton", mutates_args={"out"})
def combine_triton(A: List[Tensor], V: List[Tensor], ca: Tensor, cv: Tensor, out: List[Tensor],
                   accumulate: bool) -> None:
    _combine.combine(A, V, ca, cv, out, accumulate)


@combine_triton.register_fake
def _combine_triton_fake(A, V, ca, cv, out, accumulate):
    return None


@torch.library.custom_op("harmony::ghost_dots_triton", mutates_args={"out"})
def ghost_dots_triton(X: Tensor, Ga: Tensor, Gb: Tensor, out: Tensor, method: str) -> None:
    _ghost_dots.ghost_dots(X, Ga, Gb, out, method)


@ghost_dots_triton.register_fake
def _ghost_dots_triton_fake(X, Ga, Gb, out, method):
    return None
