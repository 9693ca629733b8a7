"""Cross-modality gradient realignment (docs/METHOD.md "Realignment rules") as per-sample coefficients.

Every rule is two coefficients per sample, (α_i, β_i), so that sample i contributes
α_i·g^va_i + β_i·g^vt_i to the update; they are computed from the three per-sample dots
dots[i] = (d_i, na_i, nt_i) = (⟨g^va_i, g^vt_i⟩, ‖g^va_i‖², ‖g^vt_i‖²) alone, so no gradient is read here.

Conventions this module fixes (docs/METHOD.md explains them):
* Arithmetic is float64 inside, results fp32. Cosines are clamped to [-1, 1]: with bf16 buffers or fp32
  round-off |d| can exceed sqrt(na·nt) by a few ulps, and GradVac needs sqrt(1 − c²) to be real.
* A sample whose g^va or g^vt is exactly zero (na = 0 or nt = 0) has cosine 0 and is never conflicting,
  whatever the threshold: there is nothing to project against, and d/na, d/nt would be 0/0.
* A sample without a cosine (valid = False: m^a = 0 or m^t = 0) reports cos = 0, α = 1, β = λ.
* GradVac with an EMA target uses φ̂ from before the batch, then folds the batch's mean valid cosine in
  (a batch never sets its own target, as in the GradVac paper). The mean is over the batch passed in:
  under data parallelism pass the global batch's dots so every rank keeps the same φ̂.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from harmony.config import ConfigError, HarmonyConfig
from harmony.nvtx import nvtx_range

# Largest EMA target used in the GradVac formula: φ = 1 would need s_φ = 0 in a denominator.
PHI_MAX = 1.0 - 1e-6


@dataclass
class Realignment:
    """Per-sample realignment of one batch; every field is [B] on the device of the dots.

    cos: fp32 cosine (0 where not valid); alpha, beta: fp32 coefficients on g^va, g^vt;
    conflict: bool, c < threshold (reported for every rule, ``none`` included, so the conflict fraction
    of a plain run can be compared; only the other rules move these samples); valid: bool, has a cosine.
    """

    cos: Tensor
    alpha: Tensor
    beta: Tensor
    conflict: Tensor
    valid: Tensor


class RealignState:
    """The GradVac EMA target φ̂, carried across steps and saved in checkpoints.

    ``RealignState(cfg)`` starts at ``cfg.gradvac_target``; a float starts it there directly.
    """

    def __init__(self, start: Union[HarmonyConfig, float] = 0.0):
        target = start.gradvac_target if isinstance(start, HarmonyConfig) else float(start)
        self.phi = torch.tensor(target, dtype=torch.float64)  # 0-d, kept on the dots' device after use
        self.updates = 0  # batches observed (one without a valid cosine counts but leaves φ̂ as it is)

    @property
    def target(self) -> float:
        """Current φ̂ as a Python float (reads the device value)."""
        return float(self.phi)

    def observe(self, cos: Tensor, valid: Tensor, rate: float) -> None:
        """φ̂ ← (1 − rate)·φ̂ + rate·mean(cos[valid]). cos, valid: [B].

        A batch without a valid finite cosine leaves φ̂ as it is. Stays on the device (no host sync).
        """
        ok = valid & torch.isfinite(cos)
        count = ok.sum()
        mean = torch.where(ok, cos.double(), 0.0).sum() / count.clamp(min=1)
        phi = self.phi.to(cos.device)
        self.phi = torch.where(count > 0, (1.0 - rate) * phi + rate * mean, phi)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"phi": self.phi.detach().cpu().clone(), "updates": int(self.updates)}

    def load_state_dict(self, d: dict) -> None:
        self.phi = torch.as_tensor(d["phi"], dtype=torch.float64).clone()
        self.updates = int(d["updates"])


def _split(dots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dots [B, 3] -> d, na, nt as float64 [B]; na, nt clamped at 0 (they are sums of squares)."""
    if dots.dim() != 2 or dots.shape[1] != 3:
        raise ValueError(f"dots must be [B, 3] (d, na, nt), got shape {tuple(dots.shape)}")
    x = dots.detach().double()
    return x[:, 0], x[:, 1].clamp(min=0.0), x[:, 2].clamp(min=0.0)


def _cos64(d: Tensor, na: Tensor, nt: Tensor, eps: float) -> Tensor:
    """c = d / (sqrt(na·nt) + ε), clamped to [-1, 1]; 0 where na·nt = 0 (NaN stays NaN). float64 [B]."""
    root = torch.sqrt(na * nt)
    zero = root == 0
    c = d / torch.where(zero, 1.0, root + eps)
    return torch.where(zero, torch.zeros_like(c), c.clamp(-1.0, 1.0))


def cosines(dots: Tensor, eps: float) -> Tensor:
    """Per-sample cosine between g^va and g^vt. dots [B, 3] (d, na, nt) -> [B] fp32.

    c = d / (sqrt(na·nt) + ε), clamped to [-1, 1]; a sample with a zero gradient gets 0.
    Non-finite dots give a non-finite cosine (the trainer's non-finite check sees it).
    """
    d, na, nt = _split(dots)
    return _cos64(d, na, nt, eps).float()


def _gradvac_phi(cfg: HarmonyConfig, state: Optional[RealignState], device) -> Tensor:
    """The target φ for this batch as a 0-d float64 tensor on ``device``."""
    if cfg.gradvac_target >= 1.0:
        raise ConfigError("harmony.gradvac_target=1.0 is not allowed with harmony.realign=gradvac: "
                          "a target cosine of 1 needs an infinite correction; choose a value in [-1, 1)")
    if cfg.gradvac_ema > 0.0 and state is None:
        raise ValueError("harmony.gradvac_ema > 0 needs a RealignState to carry the EMA target φ̂")
    if state is None or cfg.gradvac_ema == 0.0:
        return torch.tensor(cfg.gradvac_target, dtype=torch.float64, device=device)
    return state.phi.to(device).clamp(max=PHI_MAX)


def _coefficients(rule: str, d: Tensor, na: Tensor, nt: Tensor, c: Tensor, lam: float, phi: Tensor):
    """(α, β) of ``rule`` assuming every sample conflicts; float64 [B] each.

    Non-conflicting rows are replaced by the caller; denominators are made safe here so those
    rows hold finite values rather than 0/0.
    """
    one = torch.ones_like(d)
    na_s = torch.where(na > 0, na, one)
    nt_s = torch.where(nt > 0, nt, one)
    if rule == "none":
        return one, lam * one
    if rule == "pcgrad":  # g̃va = g^va − (d/nt)·g^vt, g̃vt = g^vt − (d/na)·g^va, update g̃va + λ·g̃vt
        return 1.0 - lam * d / na_s, lam - d / nt_s
    if rule == "project_va":  # only g^va moves: g̃va + λ·g^vt = g^va + (λ − d/nt)·g^vt
        return one, lam - d / nt_s
    if rule == "project_vt":  # only g^vt moves: g^va + λ·g̃vt = (1 − λ·d/na)·g^va + λ·g^vt
        return 1.0 - lam * d / na_s, lam * one
    if rule == "gradvac":  # g̃va = g^va + k_at·g^vt, g̃vt = g^vt + k_ta·g^va, update g̃va + λ·g̃vt
        s = torch.sqrt((1.0 - c * c).clamp(min=0.0))
        s_phi = torch.sqrt((1.0 - phi * phi).clamp(min=0.0))
        s_phi = torch.where(s_phi > 0, s_phi, torch.ones_like(s_phi))  # φ = −1: nothing conflicts
        lift = (phi * s - c * s_phi) / s_phi
        ratio = torch.sqrt(na_s / nt_s)
        k_at, k_ta = ratio * lift, lift / ratio
        return 1.0 + lam * k_ta, lam + k_at
    raise ConfigError(f"harmony.realign={rule!r} is not allowed; "
                      "choose one of ['none', 'pcgrad', 'project_va', 'project_vt', 'gradvac']")


@nvtx_range("harmony/realign")
def realign(dots: Tensor, valid: Tensor, cfg: HarmonyConfig,
            state: Optional[RealignState] = None) -> Realignment:
    """Per-sample realignment coefficients of ``cfg.realign``. dots [B, 3] (d, na, nt), valid [B] bool.

    conflict ⇔ valid, na > 0, nt > 0 and c < threshold (``cfg.conflict_threshold``; φ for gradvac).
    Non-conflicting samples get α = 1, β = λ. With gradvac and ``cfg.gradvac_ema`` > 0 the state's φ̂
    is used, then updated with this batch's mean valid cosine.
    """
    d, na, nt = _split(dots)
    valid = valid.to(device=dots.device, dtype=torch.bool).reshape(-1)
    if valid.shape[0] != d.shape[0]:
        raise ValueError(f"valid has {valid.shape[0]} entries for {d.shape[0]} rows of dots")
    c = torch.where(valid, _cos64(d, na, nt, cfg.eps), torch.zeros_like(d))
    lam = float(cfg.lam)
    if cfg.realign == "gradvac":
        phi = _gradvac_phi(cfg, state, dots.device)
        threshold = phi
    else:
        phi = torch.zeros((), dtype=torch.float64, device=dots.device)
        threshold = torch.tensor(cfg.conflict_threshold, dtype=torch.float64, device=dots.device)
    alpha_c, beta_c = _coefficients(cfg.realign, d, na, nt, c, lam, phi)
    conflict = valid & (na > 0) & (nt > 0) & (c < threshold)
    alpha = torch.where(conflict, alpha_c, 1.0)
    beta = torch.where(conflict, beta_c, lam)
    cos = c.float()
    if cfg.realign == "gradvac" and cfg.gradvac_ema > 0.0:
        state.observe(cos, valid, cfg.gradvac_ema)
    return Realignment(cos=cos, alpha=alpha.float(), beta=beta.float(), conflict=conflict, valid=valid)
