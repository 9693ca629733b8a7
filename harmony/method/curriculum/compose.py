"""The composition the harmonizer calls: a source's scores (the batch's, or the memory's), a rule, from the schedule's
start."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from harmony.config import HarmonyConfig
from harmony.method.curriculum.memory import ScoreMemory
from harmony.method.curriculum.rules import rule_weights
from harmony.method.curriculum.schedule import is_active, progress


def curriculum_weights(cos: Tensor, valid: Tensor, step: int, total_steps: int, cfg: HarmonyConfig,
                       ids: Optional[Tensor] = None, memory: Optional["ScoreMemory"] = None) -> Tensor:
    """Per-sample weights w_i: the rule ``cfg.curriculum`` on the source's scores. cos [B] (the batch's scores),
    valid [B] bool -> [B] fp32.

    Before curriculum_start all ones. With ``cfg.score_memory`` the source is ``memory``: the items' remembered
    scores (ids [B], the dataset's stable indices) replace the batch's, an item not yet in memory uses its current
    score; with ``cfg.memory_use == 'sampler'`` the weights stay 1 (the PrioritizedSampler applies the rule).
    Call ``memory.update`` after this, not before.
    """
    valid = valid.to(device=cos.device, dtype=torch.bool).reshape(-1)
    ones = torch.ones(cos.shape[0], dtype=torch.float32, device=cos.device)
    rule = cfg.curriculum
    if rule == "none" or not is_active(step, total_steps, cfg):
        return ones
    scores = cos
    if cfg.score_memory:
        if cfg.memory_use == "sampler":
            return ones
        if ids is None or memory is None:
            raise ValueError("harmony.score_memory=true needs the items' ids and a ScoreMemory")
        remembered, seen = memory.scores(ids)
        scores = torch.where(seen.to(cos.device), remembered.to(cos.device, cos.dtype), cos)
    return rule_weights(scores, valid, progress(step, total_steps, cfg), rule, cfg)
