"""What the trainer drives, as types (docs/DESIGN.md "The trainer and its observers").

The project's own parts (VATT, the harmony data loaders, the CMA losses, GradientHarmonizer) and the small
stand-ins of the tests meet the same contracts; the trainer reads nothing else:

* a loader yields a ``Batch`` (a dict with these keys; ``harmony.data.batch`` builds them);
* the model is called as ``model(video, audio, text, generator=g)`` (``g``: a CPU generator for the
  rank-independent DropToken draws; a model without random drops ignores it) and returns a ``ModelOutput``;
* the harmonizer's ``backward`` returns a ``HarmonyStats`` and the harmonizer keeps a ``memory`` (the per-item
  score memory, ``harmony.method.curriculum.ScoreMemory``'s ``scores``) and a ``state_dict``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Protocol, Tuple, TypedDict

import torch
from torch import nn

from harmony.config import Config
from harmony.method.stats import HarmonyStats

__all__ = ["Batch", "ModelOutput", "HarmonyStats", "Parts", "default_parts", "Forward", "batch_to"]


class _BatchKeys(TypedDict):
    video: torch.Tensor       # [b, 3, T, H, W]
    audio: torch.Tensor       # [b, S]
    text: torch.Tensor        # [b, L, N] int64 word ids (0: padding)
    mask_va: torch.Tensor     # [b] bool: the video–audio pair is usable
    mask_vt: torch.Tensor     # [b] bool: the video–text pair is usable
    index: torch.Tensor       # [b] int64: stable item ids


class Batch(_BatchKeys, total=False):
    """A micro-batch as a loader yields it (a plain dict with these keys). Optional: noisy_text, noisy_audio [b]
    bool, the ground-truth misalignment flags the noise monitor scores detectors against; bad, the bad-input
    counts {kind: n} met while producing the batch (``harmony.data.batch.BadCounts``, whose ``names`` lists
    the offending items)."""

    noisy_text: torch.Tensor
    noisy_audio: torch.Tensor
    bad: Mapping[str, int]


class ModelOutput(Protocol):
    """z_va_v, z_va_a [b, d_va], z_vt_v [b, d_vt], z_vt_t [b, L, d_vt] (or [b, d_vt]): the losses' inputs;
    feat_v [b, d]: the pooled video feature (None when the model has none: no feature-level scores);
    cand_mask [b, L] bool: non-empty text candidates (None: all are)."""

    z_va_v: torch.Tensor
    z_va_a: torch.Tensor
    z_vt_v: torch.Tensor
    z_vt_t: torch.Tensor
    feat_v: Optional[torch.Tensor]
    cand_mask: Optional[torch.Tensor]


@dataclass
class Parts:
    """What the trainer drives. ``default_parts()`` gives the project's own; tests pass small ones that meet the
    same contracts (module doc)."""

    build_model: Callable[[Config], nn.Module]                 # cfg -> model(video, audio, text, generator=)
    build_loader: Callable[..., Iterable[Batch]]               # (data_cfg, split, batch, rank, world, seed,
                                                               #  start_step, drop_last=, sampler=)
    nce: Callable[..., torch.Tensor]                           # (z_v, z_a, mask=, definition=) -> ℓ^va [B]
    mil_nce: Callable[..., torch.Tensor]                       # (z_vt, z_t, mask=, cand_mask=, definition=) -> ℓ^vt
    build_harmonizer: Optional[Callable[[nn.Module, Any], Any]] = None  # (wrapped model, harmony_cfg) -> harmonizer
    # (train loader) -> the bad inputs met while building it (e.g. bad manifest lines), or None: counted once
    load_stats: Callable[[Any], Optional[Mapping[str, int]]] = lambda loader: None


def default_parts() -> Parts:
    """VATT, the harmony data loaders, the CMA losses and the GradientHarmonizer."""
    from harmony.data import build_loader
    from harmony.method.harmonizer import GradientHarmonizer
    from harmony.model.losses import mil_nce, nce
    from harmony.model import VATT

    return Parts(build_model=lambda cfg: VATT(cfg.model, cfg.data), build_loader=build_loader, nce=nce,
                 mil_nce=mil_nce, build_harmonizer=GradientHarmonizer, load_stats=lambda loader: loader.stats)


class Forward:
    """One micro-batch's forward: the losses' inputs (fp32, whatever the model's precision) and the per-sample
    losses under each per-sample definition (path, own_row, own_pair; ``harmony.model.losses``), each computed once
    (the harmonizer's measurement and the noise monitor share them)."""

    def __init__(self, out: ModelOutput, batch: Mapping[str, Any], parts: Parts):
        self.va_inputs = (out.z_va_v.float(), out.z_va_a.float())
        self.vt_inputs = (out.z_vt_v.float(), out.z_vt_t.float())
        self.mask_va, self.mask_vt = batch["mask_va"], batch["mask_vt"]
        self.feat_v, self.cand_mask = out.feat_v, out.cand_mask
        self._parts = parts
        self._by_definition: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.l_va, self.l_vt = self.losses("path")

    def losses(self, definition: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ℓ^va, ℓ^vt) [b] whose gradients follow ``definition``: the same values, other gradients."""
        if definition not in self._by_definition:
            d = {} if definition == "path" else {"definition": definition}
            cand = {} if self.cand_mask is None else {"cand_mask": self.cand_mask}
            l_va = self._parts.nce(*self.va_inputs, mask=self.mask_va, **d)
            l_vt = self._parts.mil_nce(*self.vt_inputs, mask=self.mask_vt, **cand, **d)
            self._by_definition[definition] = (l_va, l_vt)
        return self._by_definition[definition]


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """The batch with its tensors on ``device`` (other values as they are)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
