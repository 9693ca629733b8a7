"""Per-item pair scores against a fixed reference set, the two-component split, and the suspect rule
(docs/AUDIT.md "How an item is scored").

Why a fixed reference: the training loss of a pair depends on which other items shared its batch (they are
its negatives), so the same clip scores differently in another batch. Here every item is embedded alone in eval
mode (no DropToken, no layer mixes samples) and each of its two pairs is scored against the SAME reference set:
``reference_size`` items of the dataset drawn by a seeded permutation of the sorted item indices (all items
when the dataset is smaller). An item's score therefore depends on its own embeddings and the reference only,
not on the batch size, the order or the number of processes.

For a pair (anchor e, candidates c_1..c_L: the video and its caption candidates, or the video and its audio),
with cosine logits s(x, y) = x̂·ŷ / τ (τ = the training losses' default 0.07) and R' = the reference without
the item itself, the score is the training loss's asymmetric NCE with the reference as the negatives::

    pos_i  = logsumexp_l s(e_i, c_{i,l})
    all_i  = logsumexp( [s(e_i, c_{i,l})]·2  ++  [s(e_i, c_{r,l}) : r ∈ R']  ++  [s(e_r, c_{i,l}) : r ∈ R'] )
    loss_i = all_i − pos_i                                 (nats; about log(2|R|) for a pair the model ignores)

and the retrieval rank of the item's own candidates for its anchor: 1 + #{r ∈ R' : max_l s(e_i, c_{r,l}) ≥
max_l s(e_i, c_{i,l})} (ties count against the item). Everything is computed in float64 from the fp32
embeddings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from harmony.method.curriculum import LossMixture

TEMPERATURE = 0.07      # harmony.model.losses' default: the temperature the model was trained with
PAIRS = ("text", "audio")
SPLIT_ITERS = 200       # EM iterations of the split (the mixture converges in tens on a few thousand losses)


def select_reference(indices: Tensor, size: int, seed: int) -> Tensor:
    """The reference: ``size`` of the distinct dataset indices [N] drawn by a permutation seeded with ``seed``
    of their sorted order (all of them when ``size`` <= 0 or >= their number). -> sorted [M] long."""
    ids = torch.unique(indices.long().cpu())
    if size <= 0 or size >= ids.numel():
        return ids
    perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(int(seed)))
    return ids[perm[:size]].sort().values


@dataclass
class PairScores:
    """Scores of n items' pairs: loss [n] float64 (NaN where the pair is unusable), rank [n] long (0 there),
    best [n] long: the reference row whose candidates the anchor prefers (-1 when its own are at least as
    likely, or with an empty reference)."""

    loss: Tensor
    rank: Tensor
    best: Tensor


def pair_scores(anchor: Tensor, cands: Tensor, valid: Tensor, ids: Tensor, ref_anchor: Tensor, ref_cands: Tensor,
                ref_valid: Tensor, ref_ids: Tensor, temperature: float = TEMPERATURE, chunk: int = 256) -> PairScores:
    """Score items against the reference (module doc).

    anchor [n, d], cands [n, L, d], valid [n, L] bool (candidate usable), ids [n] dataset indices; ref_* the
    same for the M reference items. A reference anchor always serves as a negative (the pair mask says the
    pair is unusable, not the clip); a reference candidate only when valid.
    """
    if cands.dim() == 2:
        cands, ref_cands = cands[:, None], ref_cands[:, None]
        valid, ref_valid = valid.reshape(-1, 1), ref_valid.reshape(-1, 1)
    e_ref = F.normalize(ref_anchor.double(), dim=-1)
    c_ref = F.normalize(ref_cands.double(), dim=-1)
    m, cands_n, d = c_ref.shape
    parts = []
    for s in range(0, anchor.shape[0], chunk):
        parts.append(_chunk_scores(F.normalize(anchor[s:s + chunk].double(), dim=-1),
                                   F.normalize(cands[s:s + chunk].double(), dim=-1), valid[s:s + chunk].bool(),
                                   ids[s:s + chunk].long(), e_ref, c_ref.reshape(m * cands_n, d), ref_valid.bool(),
                                   ref_ids.long(), temperature))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return PairScores(torch.zeros(0, dtype=torch.float64), empty, empty)
    return PairScores(*(torch.cat(x) for x in zip(*parts)))


def _chunk_scores(e, c, valid, ids, e_ref, c_ref_flat, ref_valid, ref_ids, temperature):
    """One chunk of ``pair_scores``: e [b, d], c [b, L, d], valid [b, L]; e_ref [M, d], c_ref_flat [M·L, d],
    ref_valid [M, L] -> (loss [b], rank [b], best [b])."""
    b, cands_n, _ = c.shape
    m = e_ref.shape[0]
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    other = ids[:, None] != ref_ids[None, :]                                           # [b, M]: R' per item
    pos = torch.where(valid, (e[:, None, :] * c).sum(-1) / temperature, neg_inf)       # [b, L]
    rows = (e @ c_ref_flat.T / temperature).reshape(b, m, -1)                          # [b, M, L]: s(e_i, c_r)
    rows = torch.where(other[:, :, None] & ref_valid[None], rows, neg_inf)
    cols = (c.reshape(b * cands_n, -1) @ e_ref.T / temperature).reshape(b, cands_n, m)  # [b, L, M]: s(e_r, c_i)
    cols = torch.where(other[:, None, :] & valid[:, :, None], cols, neg_inf)
    usable = valid.any(1)
    every = torch.cat([pos, pos, rows.reshape(b, -1), cols.reshape(b, -1)], dim=1)
    safe = torch.where(usable[:, None], every, torch.zeros_like(every))
    safe_pos = torch.where(usable[:, None], pos, torch.zeros_like(pos))
    loss = torch.logsumexp(safe, 1) - torch.logsumexp(safe_pos, 1)
    loss = torch.where(usable, loss, torch.full_like(loss, float("nan")))
    own = pos.amax(1)                                                                  # [b]
    ref_best = rows.amax(2)                                                            # [b, M]
    rank = 1 + (ref_best >= own[:, None]).sum(1)
    rank = torch.where(usable, rank, torch.zeros_like(rank))
    if m:
        top, arg = ref_best.max(1)
        best = torch.where(torch.isfinite(top) & (top > own), arg, torch.full_like(arg, -1))
    else:
        best = torch.full((b,), -1, dtype=torch.long)
    return loss, rank, best


# ------------------------------------------------------------------------------------------------ split

@dataclass
class Split:
    """A two-Gaussian fit to one pair's losses: the low-loss (aligned) and high-loss (misaligned) components."""

    weight: tuple     # (aligned, misaligned) mixing weights
    mean: tuple
    var: tuple
    chance: float = math.inf    # the loss of a pair the model cannot tell from random (log of the term count)

    @property
    def informative(self) -> bool:
        """Whether the aligned component sits clearly below chance (mean + 2 sd < chance). When it does not,
        the model does not tell this pair's aligned items from random ones and the two components only
        describe the shape of noise around chance: no item is flagged on such a split."""
        return self.mean[0] + 2 * math.sqrt(self.var[0]) < self.chance

    def as_dict(self) -> Dict[str, object]:
        return {"weight": list(self.weight), "mean": list(self.mean), "var": list(self.var), "chance": self.chance,
                "informative": self.informative}


def chance_loss(reference_items: int, candidates: int = 1) -> float:
    """The score of a pair whose logits all tie: log of the number of terms in ``all_i`` (module doc), the
    reference's 2·|R|·L plus the item's own."""
    return math.log(2 * max(reference_items, 1) * candidates)


def fit_split(losses: Tensor, chance: float = math.inf) -> Optional[Split]:
    """Fit the split to the finite losses [N] (harmony.method.curriculum.LossMixture run to convergence on all of
    them); None when there are fewer than 4 distinct-enough values. ``chance``: see Split.informative."""
    x = losses.double().reshape(-1)
    x = x[torch.isfinite(x)]
    mix = LossMixture(window=max(1, x.numel()), iters=SPLIT_ITERS)
    mix.add(x, torch.ones_like(x, dtype=torch.bool))
    params = mix.fit()
    if params is None:
        return None
    w, mu, var = (params[k].tolist() for k in range(3))
    lo, hi = (0, 1) if mu[0] <= mu[1] else (1, 0)
    return Split((w[lo], w[hi]), (mu[lo], mu[hi]), (var[lo], var[hi]), float(chance))


def misaligned_posterior(losses: Tensor, split: Optional[Split]) -> Tensor:
    """p(misaligned component | loss) [N] float64, made non-decreasing in the loss: with unequal variances the
    raw posterior turns back up far below the aligned mean (or down far above the misaligned one), so the loss
    is clamped to [aligned mean, misaligned mean], between which the posterior is monotone. NaN stays NaN;
    NaN everywhere without a split or with one that is not informative."""
    x = losses.double().reshape(-1)
    if split is None or not split.informative:
        return torch.full_like(x, float("nan"))
    w, mu, var = (torch.tensor(v, dtype=torch.float64) for v in (split.weight, split.mean, split.var))
    xc = x.clamp(min=split.mean[0], max=split.mean[1])
    logp = torch.log(w.clamp(min=1e-12)) - 0.5 * (torch.log(2 * math.pi * var) + (xc[:, None] - mu) ** 2 / var)
    post = torch.softmax(logp, dim=1)[:, 1]
    return torch.where(torch.isfinite(x), post, x)


def suspicion(losses: Tensor, split: Optional[Split]) -> Tensor:
    """suspect_<pair> [N] float64: the loss in standard deviations of the aligned component above its mean
    (strictly increasing in the loss, comparable between the pairs; NaN where the loss is)."""
    x = losses.double().reshape(-1)
    if split is None:
        return x - x[torch.isfinite(x)].mean() if torch.isfinite(x).any() else x
    return (x - split.mean[0]) / math.sqrt(split.var[0])


def suspect_pair(p_text: Tensor, p_audio: Tensor, threshold: float = 0.5) -> list:
    """Which pair is broken: a pair is flagged when its misaligned posterior exceeds ``threshold``;
    -> ["text" | "audio" | "both" | "none"] per item (an unusable pair, NaN, is never flagged)."""
    flag_t = (p_text > threshold).tolist()
    flag_a = (p_audio > threshold).tolist()
    names = {(True, False): "text", (False, True): "audio", (True, True): "both", (False, False): "none"}
    return [names[(t, a)] for t, a in zip(flag_t, flag_a)]
