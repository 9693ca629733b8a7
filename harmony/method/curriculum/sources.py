"""The score sources: what a rule compares, per sample or per pair (cos, gvt, loss, gmm, combo, agree, loss_agree; the
score memory, a source over epochs, is harmony.method.curriculum.memory)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from harmony.method.curriculum.mixture import LossMixture

from harmony.config import ConfigError


SCORES = ("cos", "loss", "gvt", "gmm", "combo", "agree", "loss_agree")


#: scores read from the cross-modal neighbourhood agreement (harmony.method.agreement), not from gradients or losses
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
                  gmm: Optional[LossMixture] = None) -> Tensor:
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
