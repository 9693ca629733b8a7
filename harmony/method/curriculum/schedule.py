"""When the curriculum acts and how strict it is: the progress p of training through the ramp, the threshold κ(p) and
the kept fraction ρ(p) (docs/METHOD.md "Curriculum")."""
from __future__ import annotations



from harmony.config import HarmonyConfig


def is_active(step: int, total_steps: int, cfg: HarmonyConfig) -> bool:
    """True from step curriculum_start·total_steps on (steps count from 0)."""
    check_total(total_steps)
    return step >= cfg.curriculum_start * total_steps


def progress(step: int, total_steps: int, cfg: HarmonyConfig) -> float:
    """p = (step − curriculum_start·T) / (ramp·T) clipped to [0, 1], T = total_steps."""
    check_total(total_steps)
    p = (step - cfg.curriculum_start * total_steps) / (cfg.ramp * total_steps)
    return min(1.0, max(0.0, p))


def kappa(p: float, cfg: HarmonyConfig) -> float:
    """Cosine threshold of the threshold/soft rules: κ0 → κ1 linearly in p."""
    return cfg.kappa0 + (cfg.kappa1 - cfg.kappa0) * p


def keep_ratio(p: float, cfg: HarmonyConfig) -> float:
    """Kept fraction of the ratio rule: ρ0 → 1 linearly in p."""
    return cfg.rho0 + (1.0 - cfg.rho0) * p


def check_total(total_steps: int) -> None:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
