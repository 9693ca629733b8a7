"""Every misalignment detector side by side, scored against the data's ground truth (docs/METHOD.md "Detectors";
the noise monitor calls this once per log window).

A detector gives each sample one score per pair, higher = that pair more trusted. From what one training step
already has:

* ``loss``: −ℓ^k, the sample's own loss of the pair (the small-loss detector);
* ``lossgmm``: the clean posterior of a two-Gaussian mixture fitted to the window's ℓ^k (as NCR splits pairs);
* ``resid``: the two-dimensional view of (ℓ^va, ℓ^vt): −(z(ℓ^k) − ρ·z(ℓ^other)), the part of a pair's
  standardised loss that the other pair's loss does not explain (ρ: their correlation over the window). A hard
  clip raises both losses; a wrong caption raises only ℓ^vt;
* ``agree``: the cross-modal neighbourhood agreement with the run's kernel (harmony.method.agreement); ``agreecos``: the
  same neighbours' plain mean cosine;
* ``comb``: the combined detector, the mean of the lossgmm posterior and the clean posterior of a mixture fitted to
  the window's disagreements −agree^k (what harmony.curriculum_score=loss_agree acts on);
* ``featcos`` / ``featmag``: the own-pair gradient cosine at the pooled video feature and −‖g^k‖(1 − c) there;
  ``featref``: the cosine of the sample's own-pair gradient of that loss with the mean of the other samples'
  (a gradient-against-reference score);
* ``cos`` / ``mag``: the harmonizer's cosine and −‖g^k‖(1 − c) (over the parameter scope in the exact tiers).

Each AUC is of the noisy samples of that pair against the samples clean in both pairs, and split: by kind
(``_swap``, ``_bias``, ``_unrelated``), against only the hard or only the easy clean samples (``_hard``, ``_easy``),
among the tail or head concepts only (``_tail``, ``_head``, with imbalanced concepts); the mixture-based detectors
also give their false-positive rate (posterior < ½) on the hard and the easy clean samples (``fpr_*``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from harmony.method.curriculum import LossMixture, standardize
from harmony.trainer.evaluate import roc_auc

KINDS = {"swap": 1, "bias": 2, "unrelated": 3}
_PAIRS = {"text": ("vt", "va", "noisy_text", "text_kind"), "audio": ("va", "vt", "noisy_audio", "audio_kind")}


def split_aucs(score: torch.Tensor, cat: Dict[str, torch.Tensor], pair: str, prefix: str,
               tail_from: Optional[int] = None) -> Dict[str, float]:
    """AUC of −score for the pair's noisy samples against the samples clean in both pairs, overall and split (module
    doc). score [N] (NaN: no value); cat: the window's flags (noisy_text, noisy_audio; text_kind, audio_kind, hard,
    concept when the data has them). Keys without positives or negatives are NaN."""
    valid = torch.isfinite(score)
    noisy = cat[_PAIRS[pair][2]].bool()
    clean = ~(cat["noisy_text"].bool() | cat["noisy_audio"].bool())

    def auc(pos, neg):
        sel = valid & (pos | neg)
        return roc_auc(-score[sel].double(), pos[sel])

    out = {prefix: auc(noisy, clean)}
    kind = cat.get(_PAIRS[pair][3])
    if kind is not None:
        for name, code in KINDS.items():
            if bool((kind == code).any()):
                out[f"{prefix}_{name}"] = auc(kind == code, clean)
    if "hard" in cat and bool(cat["hard"].any()):
        hard = cat["hard"].bool()
        out[f"{prefix}_hard"], out[f"{prefix}_easy"] = auc(noisy, clean & hard), auc(noisy, clean & ~hard)
    if tail_from is not None and "concept" in cat:
        tail = cat["concept"] >= tail_from
        out[f"{prefix}_tail"], out[f"{prefix}_head"] = auc(noisy & tail, clean & tail), auc(noisy & ~tail,
                                                                                              clean & ~tail)
    return out


def _posterior(values: torch.Tensor) -> torch.Tensor:
    """Clean posterior of a two-Gaussian mixture fitted to ``values`` (lower = cleaner) [N]; NaN stays NaN."""
    mix = LossMixture(window=max(8, values.numel()))
    mix.add(values, torch.isfinite(values))
    mix.fit()
    post = mix.clean_posterior(torch.nan_to_num(values)).double()
    return torch.where(torch.isfinite(values), post, torch.full_like(post, float("nan")))


def pair_detectors(cat: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """{pair: {detector: score [N] float64}} for the detectors the window has values for (module doc)."""
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for pair, (k, other, _, _) in _PAIRS.items():
        d: Dict[str, torch.Tensor] = {}
        loss, loss_o = cat[f"loss_{k}"].double(), cat[f"loss_{other}"].double()
        d["loss"] = -loss
        d["lossgmm"] = _posterior(loss)
        z, zo = standardize(loss, torch.isfinite(loss)), standardize(loss_o, torch.isfinite(loss_o))
        both = torch.isfinite(z) & torch.isfinite(zo)
        rho = float((z[both] * zo[both]).mean()) if int(both.sum()) > 2 else 0.0
        d["resid"] = -(z - rho * zo)
        if f"agreecos_{k}" in cat:
            d["agreecos"] = cat[f"agreecos_{k}"].double()
        if f"agree_{k}" in cat:
            agree = cat[f"agree_{k}"].double()
            d["agree"] = agree
            post = _posterior(-agree)
            d["comb"] = (d["lossgmm"] + torch.where(torch.isfinite(post), post, torch.full_like(post, 0.5))) / 2
        mag = "gvt" if k == "vt" else "gva"
        for name, key in (("featcos", "feat_cos_own_pair"), ("featmag", f"feat_{mag}_own_pair"),
                          ("featref", f"feat_ref_{k}"), ("cos", "cos"), ("mag", mag)):
            if key in cat:
                d[name] = cat[key].double()
        out[pair] = d
    return out


def detector_report(cat: Dict[str, torch.Tensor], tail_from: Optional[int] = None) -> Dict[str, float]:
    """noise_auc_<detector>_<pair>[_<split>] for every detector and pair, and fpr_<detector>_<pair>_hard/_easy for
    the mixture-based ones (module doc)."""
    out: Dict[str, float] = {}
    clean = ~(cat["noisy_text"].bool() | cat["noisy_audio"].bool())
    for pair, dets in pair_detectors(cat).items():
        for name, score in dets.items():
            out.update(split_aucs(score, cat, pair, f"noise_auc_{name}_{pair}", tail_from))
            if name in ("lossgmm", "comb") and "hard" in cat:
                hard = cat["hard"].bool()
                for tag, sel in (("hard", clean & hard), ("easy", clean & ~hard)):
                    sel = sel & torch.isfinite(score)
                    if bool(sel.any()):
                        out[f"fpr_{name}_{pair}_{tag}"] = float((score[sel] < 0.5).double().mean())
    return out
