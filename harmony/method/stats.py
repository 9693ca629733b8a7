"""``HarmonyStats``: what one harmonized step measured and decided, the harmonizer's output type (the trainer, its
observers and the tests read it; ``harmony.trainer.contracts`` names it in the trainer's contracts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class HarmonyStats:
    """What one harmonized step measured and decided; every tensor is detached, fp32 unless bool.

    dots [B, 3] (⟨g^va, g^vt⟩, ‖g^va‖², ‖g^vt‖²) over the scope; cos, weights, alpha, beta [B]; coef_va, coef_vt
    [B]: the update's per-sample coefficients ca = w·α/norm, cv = w·β/norm; valid [B] (both masks), conflict
    [B]; loss_va, loss_vt: the masked means; kept: the fraction of valid samples with w > 0 (1 when none is
    valid); mode: "ghost", "materialize", "sketch", "feature", "unmeasured" or "plain"; score [B]: what the
    curriculum ranks by (harmony.curriculum_score; by default the caption mixture's clean posterior), higher =
    more trusted; score_audio [B]: with curriculum_target=pair, the audio pair's score (score is then the
    caption's).
    """

    dots: torch.Tensor
    cos: torch.Tensor
    weights: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    coef_va: torch.Tensor
    coef_vt: torch.Tensor
    valid: torch.Tensor
    conflict: torch.Tensor
    loss_va: torch.Tensor
    loss_vt: torch.Tensor
    kept: float
    mode: str
    score: Optional[torch.Tensor] = None
    score_audio: Optional[torch.Tensor] = None
