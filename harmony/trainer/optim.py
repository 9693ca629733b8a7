"""The optimizer and its learning-rate schedule: AdamW with decoupled weight decay on matrices, the VATT schedule
(linear warm-up, cosine decay; ``harmony.trainer.schedule``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from harmony.config import Config, ConfigError


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only (biases, norms and 1-D tables get none).

    ``train.optimizer=adamw``: torch's fused implementation where the parameters allow it, else foreach.
    ``apex``: apex.optimizers.FusedAdam (adam_w_mode) — only when apex is importable; never a requirement."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if t.optimizer == "apex":
        try:
            from apex.optimizers import FusedAdam
        except Exception as exc:
            raise ConfigError(f"train.optimizer='apex' but apex is not importable ({exc}); use train.optimizer=adamw")
        return FusedAdam(groups, lr=t.lr, betas=(t.beta1, t.beta2), adam_w_mode=True)
    # fused kernels exist for CUDA and CPU tensors; DTensor (FSDP2) parameters support them on CUDA only
    sharded = any(hasattr(p, "device_mesh") for p in params)
    fused = device.type == "cuda" or (device.type == "cpu" and not sharded)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused,
                             foreach=None if fused else True)


def follow_new_total(scheduler, total_steps: int, step: int) -> Optional[str]:
    """The schedule stores its total step count; resuming with another train.steps makes the cosine decay
    follow the new total (an extended run does not continue at the old schedule's final lr). -> a line saying
    so, or None when the total is unchanged."""
    lam = scheduler.lr_lambdas[0]
    old = getattr(lam, "total_steps", None)
    if old is None or old == total_steps:
        return None
    lam.total_steps = total_steps
    scheduler.last_epoch -= 1  # re-take the current step under the new total: the groups' lr and get_last_lr()
    scheduler.step()
    lrs = scheduler.get_last_lr()
    return (f"train.steps changed from {old} to {total_steps} on resume: the lr schedule now decays over "
            f"{total_steps} steps (lr at step {step + 1}: {lrs[0]:.4g})")
