"""The rules: per-sample weights from scores, higher = more trusted (threshold, ratio, soft) and the keep guard; batch
statistics over the tensors passed in."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from harmony.config import ConfigError, HarmonyConfig
from harmony.method.curriculum.schedule import kappa, keep_ratio


HARD_RULES = ("threshold", "ratio")


RULES = ("threshold", "ratio", "soft")


def _ceil_count(frac: float, n: Tensor) -> Tensor:
    """ceil(frac·n) as an int64 tensor; rounding to 6 decimals first so 0.7·10 is 7, not 8."""
    return torch.ceil(torch.round(frac * n.double(), decimals=6)).long()


def _ranks(scores: Tensor, valid: Tensor) -> Tensor:
    """Rank of every sample by score, highest first, valid before invalid, ties to the lower index.

    scores [N] float, valid [N] bool -> [N] int64 (0 = best). NaN scores rank as the lowest valid ones.
    """
    key = torch.where(valid & ~torch.isnan(scores), scores.double(), -math.inf)
    # two stable sorts: valid first, then by score inside each group, so a -inf valid never mixes with invalid
    order = torch.sort(key, descending=True, stable=True).indices
    order = order[torch.sort((~valid[order]).to(torch.uint8), stable=True).indices]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


def _kth_highest(scores: Tensor, valid: Tensor, ranks: Tensor, k: Tensor) -> Tensor:
    """Score of the valid sample of rank k−1 (the k-th highest); +inf when k = 0. 0-d float64."""
    at_k = valid & (ranks == (k - 1))
    value = torch.where(at_k, scores.double(), -math.inf).max() if scores.numel() else scores.new_zeros(()).double()
    return torch.where(k > 0, value, torch.full_like(value, math.inf))


def rule_weights(scores: Tensor, valid: Tensor, p: float, rule: str, cfg: HarmonyConfig) -> Tensor:
    """Weights of one schedule at progress p. scores [N] (cosines or memory scores), valid [N] bool -> [N] fp32.

    threshold: 1[s ≥ κ(p)]; ratio: top ceil(ρ(p)·n) valid samples by s; soft: sigmoid((s − κ(p))/T)
    normalised to mean 1 over valid samples. Guard: at least k_min = ceil(min_keep·n) valid samples
    are kept (threshold: κ is lowered to the k_min-th highest score; ratio: the count is raised to
    k_min; soft: κ is lowered the same way, so k_min samples reach sigmoid ≥ 1/2). Invalid: 1.
    """
    s = scores.double()
    n_valid = valid.sum()
    k_min = _ceil_count(cfg.min_keep, n_valid)
    ranks = _ranks(s, valid)
    if rule == "ratio":
        k = torch.maximum(_ceil_count(keep_ratio(p, cfg), n_valid), k_min)
        w = (ranks < k).double()
    elif rule in ("threshold", "soft"):
        kap = torch.minimum(torch.tensor(kappa(p, cfg), dtype=torch.float64, device=s.device),
                            _kth_highest(s, valid, ranks, k_min))
        if rule == "threshold":
            w = (s >= kap).double()
        else:
            w = _soft_normalised(s, valid, kap, cfg.temperature, n_valid)
    else:
        raise ConfigError(f"curriculum rule {rule!r} is not allowed; choose one of {list(RULES)}")
    return torch.where(valid, w, 1.0).float()


def _soft_normalised(s: Tensor, valid: Tensor, kap: Tensor, temperature: float, n_valid: Tensor) -> Tensor:
    """sigmoid((s − κ)/T) scaled to mean 1 over valid entries, in log space so that an underflowing
    sigmoid (tiny T) cannot give 0/0. [N] float64 (invalid entries: garbage, replaced by the caller)."""
    log_sig = torch.nn.functional.logsigmoid((s - kap) / temperature)
    log_sig = torch.where(valid, log_sig, -math.inf)
    top = log_sig.max() if s.numel() else log_sig.new_zeros(())
    rel = torch.exp(log_sig - torch.where(torch.isfinite(top), top, 0.0))
    return rel * n_valid / rel.sum().clamp(min=torch.finfo(torch.float64).tiny)
