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
    """Per-sample weights w_i of ``cfg.curriculum``. cos [B] (from raw gradients), valid [B] bool -> [B] fp32.

    Before curriculum_start all ones. ``memory``: the items' memory scores (ids [B], the dataset's stable
    indices) replace the cosines, an item not yet in memory uses its current cosine, and
    ``cfg.memory_schedule`` is the rule; with ``cfg.memory_use == 'sampler'`` the weights stay 1 (the
    PrioritizedSampler applies the curriculum). Call ``memory.update`` after this, not before.
    """
    valid = valid.to(device=cos.device, dtype=torch.bool).reshape(-1)
    ones = torch.ones(cos.shape[0], dtype=torch.float32, device=cos.device)
    rule = cfg.curriculum
    if rule == "none" or not is_active(step, total_steps, cfg):
        return ones
    scores = cos
    if rule == "memory":
        if cfg.memory_use == "sampler":
            return ones
        if ids is None or memory is None:
            raise ValueError("harmony.curriculum=memory needs the items' ids and a ScoreMemory")
        remembered, seen = memory.scores(ids)
        scores = torch.where(seen.to(cos.device), remembered.to(cos.device, cos.dtype), cos)
        rule = cfg.memory_schedule
    return rule_weights(scores, valid, progress(step, total_steps, cfg), rule, cfg)
