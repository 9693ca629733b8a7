"""Learning-rate schedule of VATT: linear warm-up to the peak, then cosine decay to ``min_ratio``·peak."""
from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based: the lr used BY step ``step``).

    step < warmup: (step + 1) / warmup (never 0, so step 0 already moves the weights);
    after: min_ratio + (1 - min_ratio) · ½(1 + cos(π · t)), t = (step - warmup) / (total - warmup) in [0, 1].
    A plain object (not a lambda) so that LambdaLR can save and restore it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over :class:`WarmupCosine`; call ``.step()`` once per optimizer step (skipped steps too)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio))
