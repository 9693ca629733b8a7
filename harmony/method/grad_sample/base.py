"""Per-sample gradient samplers: the base class, the record of one module call, and shape helpers.

A sampler turns what the harmonizer keeps of a layer's forward calls (inputs X, output Y) and the
output gradients G measured at Y into per-sample quantities of the layer's *direct* parameters:

* ``dots``: per sample i, over the layer's scoped parameters, (⟨g^a_i, g^b_i⟩, ‖g^a_i‖², ‖g^b_i‖²),
  where g^a, g^b are the gradients belonging to the two columns of G (the two losses);
* ``per_sample``: the per-sample gradients themselves, [C, B, *param.shape] (materialize mode);
* ``weighted``: Σ_i of the per-sample gradients for one combined output gradient (the update).

Batch layout: every call's tensors carry the samples in dim 0. A call may see N = k·B rows (a text
encoder run on B·L candidates): rows are sample-major, row r belongs to sample r // k. A layer called
several times per step accumulates per sample: its calls' tokens are concatenated along T.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn


class PerSampleError(RuntimeError):
    """A module or call whose per-sample gradients cannot be taken; the message says why and what to do."""


@dataclass
class Call:
    """One recorded forward call of a hooked module.

    ``args``/``kwargs`` are the call's inputs (detached), ``output`` the output tensor Y (kept attached:
    the measurement backward stops there), ``params`` detached copies of the module's direct parameters
    at call time (only kept for samplers that need parameter values, e.g. the generic one).
    """

    args: tuple
    kwargs: dict
    output: torch.Tensor
    params: Optional[Dict[str, torch.Tensor]] = None
    versions: tuple = ()

    def tensors(self) -> List[torch.Tensor]:
        """The call's output and tensor arguments (their version counters tell in-place changes)."""
        out = [self.output] if isinstance(self.output, torch.Tensor) else []
        return out + [a for a in self.args if isinstance(a, torch.Tensor)] + \
            [v for v in self.kwargs.values() if isinstance(v, torch.Tensor)]

    def stamp(self) -> "Call":
        self.versions = tuple(t._version for t in self.tensors())
        return self

    def modified(self) -> bool:
        """True when the output or an input was changed in place after the call (the kept values are stale)."""
        return tuple(t._version for t in self.tensors()) != self.versions


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 when any input is float64, else float32 (whatever the training dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def fold_rows(t: torch.Tensor, B: int, dim: int, module_name: str) -> torch.Tensor:
    """[..., N, *rest] -> [..., B, k, *rest] with N = k·B rows in sample-major order at ``dim``."""
    N = t.shape[dim]
    if B == 0 or N % B != 0:
        raise PerSampleError(
            f"module '{module_name}' was called on {N} rows, which is not a multiple of the batch size {B}: "
            "every hooked module must see the samples (or k rows per sample, sample-major) in dim 0")
    return t.unflatten(dim, (B, N // B))


def split_columns(G: torch.Tensor):
    """The two columns (loss va, loss vt) of a measured gradient [2, ...]."""
    return G[0], G[1]


def dots_from_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, n] x [B, n] -> [B, 3] fp32 (a·b, a·a, b·b), accumulated in a's accumulation dtype."""
    dt = acc_dtype(a, b)
    a, b = a.to(dt), b.to(dt)
    return torch.stack([(a * b).sum(1), (a * a).sum(1), (b * b).sum(1)], 1).float()


class GradSampler:
    """Per-sample gradients of one module type's direct parameters (subclass and register one per type).

    ``calls``: the module's recorded calls this step; ``grads``: per call the measured output gradient
    [C, *Y.shape] (C columns; None where the call did not reach the losses); ``B``: the batch size;
    ``names``: the direct parameter names to return (the scoped ones, or all).
    """

    #: set by samplers that read parameter values inside ``per_sample``/``weighted`` (kept per call)
    needs_params: bool = False

    def per_sample(self, module: nn.Module, name: str, calls: Sequence[Call], grads: Sequence[Optional[torch.Tensor]],
                   B: int, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """{param name: [C, B, *param.shape]} per-sample gradients for each column of the grads."""
        raise NotImplementedError

    def dots(self, module: nn.Module, name: str, calls: Sequence[Call], grads: Sequence[Optional[torch.Tensor]],
             B: int, names: Sequence[str], method: str = "auto") -> torch.Tensor:
        """[B, 3] fp32 per-sample (⟨g^a, g^b⟩, ‖g^a‖², ‖g^b‖²) over ``names``; default: from ``per_sample``."""
        out = None
        for g in self.per_sample(module, name, calls, grads, B, names).values():
            d = dots_from_rows(g[0].reshape(B, -1), g[1].reshape(B, -1))
            out = d if out is None else out + d
        return out if out is not None else torch.zeros(B, 3)

    def weighted(self, module: nn.Module, name: str, calls: Sequence[Call], grads: Sequence[Optional[torch.Tensor]],
                 B: int, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        """{param name: Σ_i per-sample gradient} for one combined output gradient per call ([*Y.shape] each)."""
        ps = self.per_sample(module, name, calls, [None if g is None else g.unsqueeze(0) for g in grads], B, names)
        return {n: g[0].sum(0) for n, g in ps.items()}


def live(calls: Sequence[Call], grads: Sequence[Optional[torch.Tensor]]) -> List[tuple]:
    """The (call, grad) pairs whose call reached the losses."""
    return [(c, g) for c, g in zip(calls, grads) if g is not None]
