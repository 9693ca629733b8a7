"""Materialize mode (docs/HARMONIZER.md "3. The measurement tiers"): per-sample gradients in flat per-bucket buffers,
``gram`` for the dots, ``combine`` for the update.

Each scoped parameter owns a slice of one bucket; a bucket is a buffer [2, B, P_k] in
``harmony.buffer_dtype`` whose row 0 holds A (the L_va per-sample gradients) and row 1 V (L_vt).
``harmony.ops.gram`` reduces the three dots over all buckets in one call, and ``harmony.ops.combine``
writes Σ_i ca_i A_i + cv_i V_i into flat fp32 buffers [P_k] whose slices become the parameters' ``.grad``.
Memory: 2·B·P_S values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from harmony import ops
from harmony.method.grad_sample import find_sampler

#: elements per bucket row; bounds the size of one buffer, not the total (all buckets live at once)
BUCKET_CAP = 1 << 26


@dataclass
class Slot:
    """Where one parameter's per-sample gradients live: bucket index, offset and length in that bucket."""

    bucket: int
    offset: int
    numel: int
    shape: Tuple[int, ...]


class BufferPlan:
    """Layout of the scoped parameters in buckets, keyed by canonical parameter name.

    ``params``: (canonical name, numel, shape, device) per scoped parameter, in a fixed order.
    """

    def __init__(self, params: Sequence[Tuple[str, int, Tuple[int, ...], torch.device]], cap: int = BUCKET_CAP):
        self.slots: Dict[str, Slot] = {}
        self.sizes: List[int] = []
        self.devices: List[torch.device] = []
        for qname, numel, shape, device in params:
            b = len(self.sizes) - 1
            if b < 0 or self.devices[b] != device or self.sizes[b] + numel > cap and self.sizes[b] > 0:
                self.sizes.append(0)
                self.devices.append(device)
                b += 1
            self.slots[qname] = Slot(b, self.sizes[b], numel, tuple(shape))
            self.sizes[b] += numel

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def allocate(self, B: int, dtype: torch.dtype) -> List[torch.Tensor]:
        """Zeroed buffers [2, B, P_k] (zero: a layer that did not reach the losses has zero per-sample gradient)."""
        return [torch.zeros(2, B, n, dtype=dtype, device=d) for n, d in zip(self.sizes, self.devices)]


def fill(plan: BufferPlan, bufs: List[torch.Tensor], modules, records, grads, scoped: Dict[str, Sequence[str]],
         canonical: Dict[Tuple[str, str], str], B: int) -> None:
    """Write every scoped layer's per-sample gradients (both columns) into its slices (added: tied parameters)."""
    for name, names in scoped.items():
        gs = grads.get(name)
        if not gs or all(g is None for g in gs):
            continue
        module = modules[name]
        for pname, g in find_sampler(module, name).per_sample(module, name, records[name], gs, B, names).items():
            s = plan.slots[canonical[(name, pname)]]
            bufs[s.bucket][:, :, s.offset:s.offset + s.numel] += g.reshape(2, B, s.numel)


def dots(bufs: List[torch.Tensor]) -> torch.Tensor:
    """[B, 3] fp32 per-sample (A·V, A·A, V·V) over all buckets (one ``gram`` call)."""
    return ops.gram([b[0] for b in bufs], [b[1] for b in bufs])


def combined(plan: BufferPlan, bufs: List[torch.Tensor], ca: torch.Tensor, cv: torch.Tensor) -> List[torch.Tensor]:
    """Flat fp32 buffers [P_k] = Σ_i ca_i A_k[i] + cv_i V_k[i] (one ``combine`` call)."""
    outs = [torch.empty(n, dtype=torch.float32, device=d) for n, d in zip(plan.sizes, plan.devices)]
    ca = ca.to(device=plan.devices[0], dtype=torch.float32) if plan.devices else ca
    cv = cv.to(device=plan.devices[0], dtype=torch.float32) if plan.devices else cv
    ops.combine([b[0] for b in bufs], [b[1] for b in bufs], ca, cv, outs)
    return outs


def views(plan: BufferPlan, flats: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """{canonical name: view of its slice, shaped like the parameter}."""
    return {q: flats[s.bucket][s.offset:s.offset + s.numel].view(s.shape) for q, s in plan.slots.items()}
