"""Gradient-based curriculum (docs/METHOD.md "Curriculum"): per-sample weights from cosines, a per-item score
memory, and a sampler driven by that memory (``memory_sampler``: the trainer's, following its step).

Conventions this module fixes (docs/METHOD.md explains them):
* Progress starts at the curriculum's start: p = (step − curriculum_start·T) / (ramp·T), clipped to
  [0, 1]; before curriculum_start·T every weight is 1. The curriculum is therefore strictest (κ0, ρ0)
  the step it switches on and admits everything ramp·T steps later (or never fully, when
  curriculum_start + ramp > 1).
* Batch statistics (the ratio ranking, the soft normalisation, the guard, the norm of
  ``update_coefficients``) are taken over the tensors passed in. Under data parallelism pass the
  global batch (B scalars per rank, all-gathered) and take this rank's rows afterwards; otherwise
  each rank applies the rule to its own shard and the result differs from a single-process run.
* Ties between equal cosines go to the lower batch position (stable sort); a threshold keeps all
  samples tied at the threshold.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from harmony import distributed as hd
from harmony.config import ConfigError, HarmonyConfig
from harmony.nvtx import nvtx_range

HARD_RULES = ("threshold", "ratio")
RULES = ("threshold", "ratio", "soft")


def is_active(step: int, total_steps: int, cfg: HarmonyConfig) -> bool:
    """True from step curriculum_start·total_steps on (steps count from 0)."""
    _check_total(total_steps)
    return step >= cfg.curriculum_start * total_steps


def progress(step: int, total_steps: int, cfg: HarmonyConfig) -> float:
    """p = (step − curriculum_start·T) / (ramp·T) clipped to [0, 1], T = total_steps."""
    _check_total(total_steps)
    p = (step - cfg.curriculum_start * total_steps) / (cfg.ramp * total_steps)
    return min(1.0, max(0.0, p))


def kappa(p: float, cfg: HarmonyConfig) -> float:
    """Cosine threshold of the threshold/soft rules: κ0 → κ1 linearly in p."""
    return cfg.kappa0 + (cfg.kappa1 - cfg.kappa0) * p


def keep_ratio(p: float, cfg: HarmonyConfig) -> float:
    """Kept fraction of the ratio rule: ρ0 → 1 linearly in p."""
    return cfg.rho0 + (1.0 - cfg.rho0) * p


def _check_total(total_steps: int) -> None:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")


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


@nvtx_range("harmony/curriculum_weights")
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


def update_coefficients(alpha: Tensor, beta: Tensor, weights: Tensor, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Combine coefficients of G = Σ_i (ca_i·g^va_i + cv_i·g^vt_i). alpha, beta, weights [B] -> ca, cv [B] fp32.

    ca = w·α / norm, cv = w·β / norm with norm = Σ_i w_i / B over the whole batch (samples without a
    cosine included: they carry w = 1 and their one valid loss), so w ≡ 1 gives norm = 1 and plain
    training's L_va + λ·L_vt. norm = 1 when not renormalising, when Σw = 0 or when B = 0.
    """
    w = weights.double()
    if renormalize and w.numel() > 0:
        total = w.sum()
        norm = torch.where(total > 0, total / w.numel(), torch.ones_like(total))
    else:
        norm = torch.ones((), dtype=torch.float64, device=w.device)
    return (w * alpha.double() / norm).float(), (w * beta.double() / norm).float()


SCORES = ("cos", "loss", "gvt", "gmm", "combo", "agree", "loss_agree")
#: scores read from the cross-modal neighbourhood agreement (harmony.agreement), not from gradients or losses
AGREEMENT_SCORES = ("agree", "loss_agree")


def standardize(x: Tensor, valid: Tensor) -> Tensor:
    """(x − mean) / std over the valid entries (std 1 when fewer than two or all equal). float64."""
    x = x.double()
    v = x[valid & torch.isfinite(x)]
    if v.numel() < 2:
        return x - (v.mean() if v.numel() else 0.0)
    sd = v.std()
    return (x - v.mean()) / torch.where(sd > 0, sd, torch.ones_like(sd))


def magnitude_score(dots: Tensor, cos: Tensor, pair: str) -> Tensor:
    """−‖g^k_i‖·(1 − c_i) [N] float64 for pair k = "vt" or "va", from the dots [N, 3] (⟨g^va, g^vt⟩, ‖g^va‖²,
    ‖g^vt‖²) and the cosines [N]: a large gradient of that loss that does not agree with the other one."""
    return -dots[:, 2 if pair == "vt" else 1].double().clamp(min=0).sqrt() * (1 - cos.double())


def sample_scores(kind: str, cos: Tensor, dots: Tensor, l_va: Tensor, l_vt: Tensor, valid: Tensor, lam: float,
                  gmm: Optional["LossMixture"] = None) -> Tensor:
    """What the curriculum ranks or thresholds, higher = more trusted, [N] float32 (``harmony.curriculum_score``).

    cos: the per-sample cosine c_i; gvt: −‖g^vt_i‖·(1 − c_i) from the measured dots (a large caption gradient
    that does not agree with the audio one); loss: −(ℓ^va_i + λ·ℓ^vt_i) (the small-loss detector); gmm: the
    posterior of the low-loss component of a two-component Gaussian mixture fitted to recent ℓ^vt (as the
    noisy-correspondence literature splits clean from noisy pairs; needs ``gmm``); combo: the mean of the
    batch-standardized loss and gvt scores. dots [N, 3]; l_va, l_vt [N] (0 where masked); valid [N] bool.
    """
    if kind == "cos":
        return cos
    gvt = magnitude_score(dots, cos, "vt")
    loss = -(l_va.double() + lam * l_vt.double())
    if kind == "gvt":
        out = gvt
    elif kind == "loss":
        out = loss
    elif kind == "combo":
        out = (standardize(loss, valid) + standardize(gvt, valid)) / 2
    elif kind == "gmm":
        if gmm is None:
            raise ValueError("curriculum_score=gmm needs a LossMixture")
        out = gmm.clean_posterior(l_vt)
    else:
        raise ConfigError(f"harmony.curriculum_score={kind!r} is not one of {list(SCORES)}")
    return out.to(cos.dtype)


def mixture_names(kind: str, target: str) -> tuple:
    """The LossMixtures a score needs, by what each is fitted to: loss_vt / loss_va (the per-sample losses),
    agree_vt / agree_va (the disagreements −agree^k); the audio pair's only when the target is per pair."""
    pairs = ("vt", "va") if target == "pair" else ("vt",)
    sources = {"gmm": ("loss",), "agree": ("agree",), "loss_agree": ("loss", "agree")}.get(kind, ())
    return tuple(f"{src}_{p}" for src in sources for p in pairs)


def pair_scores(kind: str, cos: Tensor, dots: Tensor, l_va: Tensor, l_vt: Tensor, valid: Tensor, lam: float,
                mixtures: dict, agree: Optional[tuple] = None) -> tuple:
    """(text score, audio score) [N] float32, higher = that pair more trusted: the per-pair form of ``sample_scores``
    for harmony.curriculum_target=pair. cos, gvt: (c, c) and (−‖g^vt‖(1 − c), −‖g^va‖(1 − c)); loss: (−ℓ^vt,
    −ℓ^va); gmm: the clean posteriors of mixtures["loss_vt"] at ℓ^vt and ["loss_va"] at ℓ^va; agree: the clean
    posteriors of mixtures["agree_vt"/"agree_va"] at −agree^vt / −agree^va (``agree`` = (agree^vt, agree^va));
    loss_agree: the mean of the gmm and agree posteriors of each pair; combo: the mean of the batch-standardized
    loss and magnitude-aware scores of each pair."""
    c = cos.double()
    loss = {"vt": l_vt.double(), "va": l_va.double()}
    dis = {"vt": None if agree is None else -agree[0], "va": None if agree is None else -agree[1]}
    out = []
    for p in ("vt", "va"):
        if kind == "cos":
            s = c
        elif kind == "gvt":
            s = magnitude_score(dots, cos, p)
        elif kind == "loss":
            s = -loss[p]
        elif kind == "combo":
            s = (standardize(-loss[p], valid) + standardize(magnitude_score(dots, cos, p), valid)) / 2
        elif kind in ("gmm", "agree", "loss_agree"):
            parts = []
            if kind != "agree":
                parts.append(mixtures[f"loss_{p}"].clean_posterior(loss[p]).double())
            if kind != "gmm":
                if dis[p] is None:
                    raise ValueError(f"curriculum_score={kind} needs the neighbourhood agreement")
                post = mixtures[f"agree_{p}"].clean_posterior(dis[p].to(c.device)).double()
                parts.append(torch.where(torch.isfinite(dis[p].to(c.device)), post, torch.full_like(post, 0.5)))
            s = sum(parts) / len(parts)
        else:
            raise ConfigError(f"harmony.curriculum_score={kind!r} is not one of {list(SCORES)}")
        out.append(s.to(cos.dtype))
    return out[0], out[1]


class LossMixture:
    """A two-component 1-D Gaussian mixture over the most recent ``window`` valid per-sample losses, refitted
    by EM at every call (warm-started from the last fit); the posterior of the lower-mean component is the
    probability that a sample is clean. The window is state (``state_dict``), so a resumed run refits the
    same mixture."""

    def __init__(self, window: int = 4096, iters: int = 10, min_var: float = 1e-4, min_weight: float = 0.01):
        self.window, self.iters, self.min_var = int(window), int(iters), float(min_var)
        self.min_weight = float(min_weight)
        self.values = torch.zeros(0, dtype=torch.float64)
        self.params: Optional[Tensor] = None      # [3, 2]: weights, means, variances

    def add(self, losses: Tensor, valid: Tensor) -> None:
        v = losses.detach().cpu().double().reshape(-1)[valid.detach().cpu().bool().reshape(-1)]
        v = v[torch.isfinite(v)]
        self.values = torch.cat([self.values, v])[-self.window:]

    def fit(self) -> Optional[Tensor]:
        """Refit by EM, warm-started from the last fit. A warm start can collapse (one component left with almost
        no weight, e.g. on a spike of early losses that later leave the window), and EM never revives an empty
        component: then the fit starts again cold, from the window's quartiles."""
        x = self.values
        if x.numel() < 4 or float(x.max() - x.min()) <= 0:
            self.params = None
            return None
        params = self._em(x, self.params if self.params is not None else self._cold(x))
        if float(params[0].min()) < self.min_weight:
            params = self._em(x, self._cold(x))
        self.params = params
        return self.params

    def _cold(self, x: Tensor) -> Tensor:
        lo, hi = torch.quantile(x, 0.25), torch.quantile(x, 0.75)
        var = x.var().clamp(min=self.min_var)
        return torch.stack([torch.tensor([0.5, 0.5], dtype=torch.float64), torch.stack([lo, hi]),
                            torch.stack([var, var])])

    def _em(self, x: Tensor, start: Tensor) -> Tensor:
        w, mu, var = start.clone()
        for _ in range(self.iters):
            logp = torch.log(w.clamp(min=1e-12)) - 0.5 * (torch.log(2 * math.pi * var)
                                                          + (x[:, None] - mu) ** 2 / var)
            r = torch.softmax(logp, dim=1)                                   # [n, 2] responsibilities
            nk = r.sum(0).clamp(min=1e-9)
            w = nk / nk.sum()
            mu = (r * x[:, None]).sum(0) / nk
            var = ((r * (x[:, None] - mu) ** 2).sum(0) / nk).clamp(min=self.min_var)
        return torch.stack([w, mu, var])

    def clean_posterior(self, losses: Tensor) -> Tensor:
        """p(low-loss component | ℓ) for losses [N] with the current fit (0.5 everywhere without one)."""
        x = losses.detach().cpu().double().reshape(-1)
        if self.params is None:
            return torch.full_like(x, 0.5).to(losses.device)
        w, mu, var = self.params
        logp = torch.log(w.clamp(min=1e-12)) - 0.5 * (torch.log(2 * math.pi * var) + (x[:, None] - mu) ** 2 / var)
        post = torch.softmax(logp, dim=1)[:, int(torch.argmin(mu))]
        return post.to(losses.device)

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "params": None if self.params is None else self.params.clone()}

    def load_state_dict(self, d: dict) -> None:
        self.values = d["values"].double().clone()
        self.params = None if d.get("params") is None else d["params"].double().clone()


class ScoreMemory:
    """Per-item score: an EMA of each dataset item's cosine across its observations (epochs).

    First observation: score = c; later: score ← decay·score + (1 − decay)·c. Kept on the CPU, indexed by
    the item's stable dataset index, grown as larger ids arrive. Under data parallelism update it with
    the global batch on every rank, so all ranks hold the same memory (the sampler relies on it).
    """

    def __init__(self, decay: float, num_items: int = 0):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.score = torch.zeros(num_items, dtype=torch.float32)
        self.count = torch.zeros(num_items, dtype=torch.int32)  # observations per item; 0 = never seen

    @property
    def num_items(self) -> int:
        return self.score.numel()

    def _grow(self, n: int) -> None:
        if n > self.num_items:
            cap = max(n, 2 * self.num_items)
            self.score = torch.cat([self.score, self.score.new_zeros(cap - self.num_items)])
            self.count = torch.cat([self.count, self.count.new_zeros(cap - self.count.numel())])

    def update(self, ids: Tensor, cos: Tensor, valid: Tensor) -> None:
        """Fold this batch's cosines into the items' scores. ids [B] long, cos [B], valid [B] bool.

        An id repeated inside the batch is folded in batch order (one EMA step per occurrence).
        """
        ids, cos = ids.detach().cpu().long().reshape(-1), cos.detach().cpu().double().reshape(-1)
        keep = valid.detach().cpu().bool().reshape(-1) & torch.isfinite(cos)
        ids, cos = ids[keep], cos[keep]
        if ids.numel() == 0:
            return
        if int(ids.min()) < 0:
            raise ValueError("item ids must be non-negative dataset indices")
        self._grow(int(ids.max()) + 1)
        occurrence = _occurrence(ids)
        for r in range(int(occurrence.max()) + 1):  # one round per repeat; almost always a single round
            sel = occurrence == r
            self._fold(ids[sel], cos[sel])

    def _fold(self, ids: Tensor, cos: Tensor) -> None:
        """One EMA step for distinct ids [n] with cosines [n] float64."""
        old = self.score[ids].double()
        first = self.count[ids] == 0
        new = torch.where(first, cos, self.decay * old + (1.0 - self.decay) * cos)
        self.score[ids] = new.float()
        self.count[ids] = (self.count[ids] + 1).clamp(max=torch.iinfo(torch.int32).max)

    def scores(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Memory of the given items. ids [B] long -> (score [B] fp32, seen [B] bool), on the CPU.

        Items never observed (or beyond the memory) have seen = False and score 0.
        """
        ids = ids.detach().cpu().long().reshape(-1)
        inside = (ids >= 0) & (ids < self.num_items)
        safe = torch.where(inside, ids, 0)
        if self.num_items == 0:
            return torch.zeros(ids.numel()), torch.zeros(ids.numel(), dtype=torch.bool)
        seen = inside & (self.count[safe] > 0)
        return torch.where(seen, self.score[safe], 0.0), seen

    def state_dict(self) -> dict:
        n = self._used()
        return {"score": self.score[:n].clone(), "count": self.count[:n].clone()}

    def _used(self) -> int:
        """Length up to the last item ever observed (capacity growth beyond it is not saved)."""
        nz = torch.nonzero(self.count).flatten()
        return int(nz[-1]) + 1 if nz.numel() else 0

    def load_state_dict(self, d: dict) -> None:
        self.score = d["score"].to(torch.float32).clone()
        self.count = d["count"].to(torch.int32).clone()


def _occurrence(ids: Tensor) -> Tensor:
    """For each entry, how many earlier entries carry the same id. ids [n] long -> [n] long."""
    order = torch.sort(ids, stable=True).indices
    sorted_ids = ids[order]
    start = torch.ones_like(sorted_ids, dtype=torch.bool)
    start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    pos = torch.arange(ids.numel())
    group_start = torch.cummax(torch.where(start, pos, 0), 0).values
    occ = torch.empty_like(ids)
    occ[order] = pos - group_start
    return occ


class PrioritizedSampler(torch.utils.data.Sampler):
    """Draws dataset indices with probability ∝ the memory curriculum's weight of each item.

    At each epoch the priorities are ``rule_weights`` of the items' memory scores under
    ``cfg.memory_schedule`` at the progress of ``set_epoch``'s step (all ones before curriculum_start);
    items never seen get the mean priority of the seen ones (1 when none is seen: uniform).
    replacement=True: ``num_samples`` draws with replacement (items may repeat); False: a weighted
    random order without replacement (exponential race), zero-priority items last.
    One global draw of (num_samples // world_size)·world_size positions, the same on every rank (same
    seed, epoch and memory); rank r takes positions r, r + world_size, ..., so ranks never share a
    position, and without replacement never share an item.
    """

    def __init__(self, memory: ScoreMemory, num_items: int, cfg: HarmonyConfig, total_steps: int, *,
                 num_samples: Optional[int] = None, replacement: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        if world_size is None:
            world_size, rank = hd.get_world_size(), hd.get_rank()
        rank = 0 if rank is None else rank
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        num_samples = num_items if num_samples is None else num_samples
        if num_items <= 0 or num_samples < world_size:
            raise ValueError(f"need num_items > 0 and num_samples >= world_size, got {num_items}, {num_samples}")
        if not replacement and num_samples > num_items:
            raise ValueError("without replacement num_samples cannot exceed num_items")
        _check_total(total_steps)
        self.memory, self.num_items, self.cfg, self.total_steps = memory, num_items, cfg, total_steps
        self.num_samples, self.replacement, self.seed = num_samples, replacement, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.step = 0, 0
        self._indices: Optional[Tensor] = None  # this rank's draw of the current epoch
        self._position = 0  # indices of it already yielded
        self._resume = False

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def set_epoch(self, epoch: int, step: int) -> None:
        """Start epoch ``epoch`` at training step ``step`` (the curriculum's progress for its priorities;
        required, so that a loop that forgets it fails instead of staying at p = 0). Keeps a draw
        restored by load_state_dict for the same epoch (its step then comes from the checkpoint)."""
        if not (self._resume and epoch == self.epoch):
            self._indices, self._position, self._resume = None, 0, False
            self.step = step
        self.epoch = epoch

    def priorities(self) -> Tensor:
        """Priority of every item [num_items] float64 (unnormalised)."""
        score, seen = self.memory.scores(torch.arange(self.num_items))
        if not is_active(self.step, self.total_steps, self.cfg) or not bool(seen.any()):
            return torch.ones(self.num_items, dtype=torch.float64)
        p = progress(self.step, self.total_steps, self.cfg)
        w = rule_weights(score, seen, p, self.cfg.memory_schedule, self.cfg).double()
        return torch.where(seen, w, w[seen].mean())

    def _generator(self) -> torch.Generator:
        seed = np.random.SeedSequence([int(self.seed), int(self.epoch)]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(seed[0]) << 32 | int(seed[1]))

    def _draw(self) -> Tensor:
        """This rank's indices for the epoch: [len(self)] int64."""
        prio, g = self.priorities(), self._generator()
        total = len(self) * self.world_size
        if self.replacement:  # inverse CDF: no category limit, zero priorities are never hit
            cdf = torch.cumsum(prio, 0)
            u = torch.rand(total, generator=g, dtype=torch.float64) * cdf[-1]
            draw = torch.searchsorted(cdf, u, right=True).clamp(max=self.num_items - 1)
        else:  # exponential race: key E_i / w_i, smallest first; zero priorities after all others
            e = -torch.log1p(-torch.rand(self.num_items, generator=g, dtype=torch.float64))
            key = torch.where(prio > 0, e / prio.clamp(min=1e-300), e)
            order = torch.sort(key, stable=True).indices
            order = order[torch.sort((prio[order] <= 0).to(torch.uint8), stable=True).indices]
            draw = order[:total]
        return draw[self.rank::self.world_size].clone()

    def __iter__(self) -> Iterator[int]:
        if not self._resume or self._indices is None:
            self._indices, self._position = self._draw(), 0
        self._resume = False
        while self._position < self._indices.numel():
            i = int(self._indices[self._position])
            self._position += 1
            yield i

    def state_dict(self, consumed: Optional[int] = None) -> dict:
        """Everything needed to continue this epoch exactly. ``consumed``: indices of this epoch the
        trainer actually used (a DataLoader prefetches ahead of the sampler's own count)."""
        position = self._position if consumed is None else int(consumed)
        indices = self._indices if self._indices is not None else torch.zeros(0, dtype=torch.long)
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "position": position,
                "rank": self.rank, "world_size": self.world_size, "indices": indices.clone()}

    def load_state_dict(self, d: dict) -> None:
        if int(d["world_size"]) != self.world_size or int(d["rank"]) != self.rank:
            raise ValueError(f"sampler state is for rank {d['rank']} of {d['world_size']}, "
                             f"this is rank {self.rank} of {self.world_size}")
        self.epoch, self.step, self.seed = int(d["epoch"]), int(d["step"]), int(d["seed"])
        indices = d["indices"]
        self._indices = indices.clone() if indices.numel() else None
        self._position = int(d["position"])
        self._resume = self._indices is not None


class StepAwareSampler(torch.utils.data.Sampler):
    """Hands the trainer's current step (``step_of()``) to a ``PrioritizedSampler`` at each epoch start (its
    priorities follow the curriculum's progress); the loader only knows the epoch number."""

    def __init__(self, sampler: PrioritizedSampler, step_of):
        self.sampler, self.step_of = sampler, step_of

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch, step=self.step_of())

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def memory_sampler(cfg, harmonizer, rank: int, world_size: int, step_of) -> Optional[StepAwareSampler]:
    """The training loader's sampler under harmony.curriculum=memory with memory_use=sampler: a
    ``PrioritizedSampler`` over the harmonizer's score memory that follows the trainer's step (``step_of()``);
    None for every other setting. ``cfg``: the whole run config."""
    h = cfg.harmony
    if not (h.enabled and h.curriculum == "memory" and h.memory_use == "sampler"):
        return None
    if cfg.data.kind == "shards":
        raise ConfigError("harmony.memory_use='sampler' needs indexable data; data.kind='shards' streams "
                          "(use harmony.memory_use='weights')")
    from harmony.data import build_dataset

    items = len(build_dataset(cfg.data, "train"))
    return StepAwareSampler(PrioritizedSampler(harmonizer.memory, items, h, cfg.train.steps, seed=cfg.train.seed,
                                               rank=rank, world_size=world_size), step_of)
