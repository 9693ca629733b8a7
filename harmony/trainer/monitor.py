"""The noise monitor: how well each per-sample detector score flags the misaligned samples, an observer of the
trainer (docs/DESIGN.md "The trainer and its observers"; the detectors in docs/METHOD.md).

It only watches: it reads each micro-step's batch, losses and harmonizer statistics and never changes the
update. Where the data carries ground-truth misalignment flags (``noisy_text``, ``noisy_audio``), the monitor

* per micro-step (``on_micro_step``, after the harmonizer's backward) keeps the detector scores of every sample:
  the harmonizer's cosine and curriculum score, the magnitude-aware −‖g^k‖(1 − c) from its dots, and the
  sample's own losses; with ``eval.feature_cos``, the same three at the pooled video feature under each
  per-sample definition (``feature_scores``, before the backward): the harmonizer's own definition (mode feature)
  is reused from its measurement every step, the others are measured on the first micro-step of each log window
  only (the other micro-steps hold NaN, "no value", for them);
* per log line (``on_log``) scores them by noise AUC over every rank's samples of the window;
* over the last ``eval.noise_window`` steps and over the score memory (``summary``) gives summary.json's
  noise_auc* keys; that window and each item's flags are checkpointed (``state_dict``).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Dict, List, Optional

import torch

from harmony import distributed as hd
from harmony.method.agreement import AgreementBank
from harmony.config import Config
from harmony.method.curriculum import magnitude_score
from harmony.trainer.contracts import Batch, Forward, HarmonyStats
from harmony.data.synthetic import tail_concepts_from
from harmony.method.detectors import detector_report, split_aucs
from harmony.trainer.evaluate import noise_detection_auc
from harmony.method.realign import cosines

DEFINITIONS = ("path", "own_row", "own_pair")
_GROUND_TRUTH = ("text_kind", "audio_kind", "hard", "concept")


def _finite(metrics: Dict[str, float]) -> Dict[str, float]:
    """Drop NaN entries (an AUC with no positives or no negatives in the window)."""
    return {k: v for k, v in metrics.items() if v == v}


def _has_flags(batch: Batch) -> bool:
    return "noisy_text" in batch and "noisy_audio" in batch


class NoiseMonitor:
    """Noise-detection statistics of a run (module doc). ``memory``: the harmonizer's score memory (None
    without a harmonizer)."""

    def __init__(self, cfg: Config, memory: Any = None):
        self.cfg, self.memory = cfg, memory
        self.entries: List[dict] = []  # this log window's micro-steps (local to this rank)
        # one entry per micro-step: the window spans eval.noise_window optimizer steps
        self.recent: deque = deque(maxlen=cfg.eval.noise_window * cfg.train.grad_accum)
        self.item_flags = torch.full((0,), -1, dtype=torch.int8)  # per item: noisy_text + 2·noisy_audio
        # the cross-modal neighbourhood agreement of each sample (this rank's recent samples as candidates)
        self.bank = AgreementBank(cfg.harmony.agree_bank, cfg.harmony.agree_k, cfg.harmony.agree_kernel) \
            if cfg.eval.feature_cos else None
        self.tail_from = tail_concepts_from(cfg.data.concepts, cfg.data.imbalance)
        self._feature_due = True  # the feature-level definitions are measured once per log window
        h = cfg.harmony
        # the definition whose feature-level scores the harmonizer itself measures (mode feature): reused from its
        # statistics every step instead of measured again
        self.reused = h.upstream if h.enabled and h.measure and h.mode == "feature" else None

    # ------------------------------------------------------------------------------------------ hooks
    def feature_scores(self, batch: Batch, fwd: Forward) -> Optional[Dict[str, torch.Tensor]]:
        """Per-sample detector scores at the pooled video feature f_i, for every per-sample definition (path,
        own_row, own_pair), or None when eval.feature_cos is off or the batch carries no misalignment flags.

        For definition d, g^k_i = ∂L̃_k/∂f_i (the batch loss under d; by the path decomposition sample i's own
        gradient at its own pooled feature). Returns {"feat_cos[_d]": c_i, "feat_gvt[_d]": −‖g^vt_i‖·(1 − c_i),
        "feat_gva[_d]": −‖g^va_i‖·(1 − c_i)} [b] (higher = more trusted, like the cosine; NaN where a loss is masked;
        a zero gradient has cosine 0, the harmonizer's convention); the suffix is empty for path. Measured on the
        first call of each log window, NaN (no value) on the others. Small backwards through the heads and the
        losses only; the parameters' .grad is untouched. Not under FSDP2 (its backward hooks)."""
        feat = fwd.feat_v
        if not (self.cfg.eval.feature_cos and self.cfg.train.parallel != "fsdp" and feat is not None
                and feat.requires_grad and _has_flags(batch)):
            return None
        if not self._feature_due:  # sampled once per window: NaN (no value) on the other micro-steps
            nan = torch.full((batch["index"].shape[0],), float("nan"))
            return {k: nan for k in _feature_keys()}
        self._feature_due = False
        masks = (batch["mask_va"].bool(), batch["mask_vt"].bool())
        out = {}
        for definition in DEFINITIONS:
            grads = []
            for loss, m in zip(fwd.losses(definition), masks):
                total = torch.where(m, loss, torch.zeros_like(loss)).sum()
                g = torch.autograd.grad(total, feat, retain_graph=True, allow_unused=True)[0] \
                    if total.requires_grad else None
                grads.append(torch.zeros_like(feat) if g is None else g)
            g_va, g_vt = (g.detach().double() for g in grads)
            dots = torch.stack([(g_va * g_vt).sum(1), (g_va * g_va).sum(1), (g_vt * g_vt).sum(1)], 1)
            cos = cosines(dots, self.cfg.harmony.eps).double()  # the harmonizer's cosine and zero convention
            ok = masks[0] & masks[1]
            nan = torch.full_like(cos, float("nan"))
            sfx = _suffix(definition)
            out[f"feat_cos{sfx}"] = torch.where(ok, cos, nan).float().cpu()
            out[f"feat_gvt{sfx}"] = torch.where(ok, magnitude_score(dots, cos, "vt"), nan).float().cpu()
            out[f"feat_gva{sfx}"] = torch.where(ok, magnitude_score(dots, cos, "va"), nan).float().cpu()
            if definition == "own_pair":  # against a reference: the mean of the other samples' gradients of that loss
                for name, g, m in (("feat_ref_vt", g_vt, masks[1]), ("feat_ref_va", g_va, masks[0])):
                    out[name] = _reference_cosine(g, m).float().cpu()
        return out

    def on_micro_step(self, batch: Batch, fwd: Forward, stats: Optional[HarmonyStats],
                      feature: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Keep the micro-step's detector scores and flags (nothing without flags); with a cosine, also for the
        final noise AUC over the last eval.noise_window steps, and each item's ground-truth flags."""
        if not _has_flags(batch):
            return
        entry = self._entry(batch, fwd, stats)
        if feature is not None:
            entry.update(feature)
            if self.reused is not None and "cos" in entry:  # the harmonizer measured this definition: every step
                sfx = _suffix(self.reused)
                entry.update({f"feat_cos{sfx}": entry["cos"], f"feat_gvt{sfx}": entry["gvt"],
                              f"feat_gva{sfx}": entry["gva"]})
        if self.bank is not None:
            # the run's kernel (what curriculum_score=agree acts on) and the plain mean cosine, same neighbours
            (entry["agree_vt"], entry["agree_va"], entry["agreecos_vt"],
             entry["agreecos_va"]) = self.bank.score(batch["index"], fwd.vt_inputs, fwd.va_inputs,
                                                     batch["mask_vt"].bool(), batch["mask_va"].bool(),
                                                     kernels=(self.bank.kernel, 0.0))
        self.entries.append(entry)
        if "cos" not in entry:
            return
        nt, na = entry["noisy_text"], entry["noisy_audio"]
        self.recent.append({"cos": entry["cos"], "score": entry.get("score", entry["cos"]), "noisy_text": nt,
                            "noisy_audio": na, **{k: entry[k] for k in ("score_audio",) + _GROUND_TRUTH
                                                  if k in entry}})
        ids = batch["index"].long().cpu()
        if ids.numel():
            need = int(ids.max()) + 1
            if need > self.item_flags.numel():
                grown = torch.full((need,), -1, dtype=torch.int8)
                grown[: self.item_flags.numel()] = self.item_flags
                self.item_flags = grown
            self.item_flags[ids] = (nt.to(torch.int8) + 2 * na.to(torch.int8))

    @staticmethod
    def _entry(batch: Batch, fwd: Forward, stats: Optional[HarmonyStats]) -> dict:
        """The micro-step's flags, own losses and (with stats) cosine, score and −‖g^k‖(1 − c); NaN where a
        sample has no value."""
        entry = {"noisy_text": batch["noisy_text"].bool().cpu(), "noisy_audio": batch["noisy_audio"].bool().cpu()}
        entry.update({k: batch[k].cpu() for k in _GROUND_TRUTH if k in batch})
        for key, loss, m in (("loss_va", fwd.l_va, batch["mask_va"]), ("loss_vt", fwd.l_vt, batch["mask_vt"])):
            loss = loss.detach().float()
            entry[key] = torch.where(m.bool(), loss, torch.full_like(loss, float("nan"))).cpu()
        if stats is None:
            return entry
        cos = stats.cos.float()
        valid = stats.valid.bool() & torch.isfinite(cos)
        nan = torch.full_like(cos, float("nan"))
        entry["cos"] = torch.where(valid, cos, nan).cpu()
        for key, pair in (("gva", "va"), ("gvt", "vt")):  # −‖g^k_i‖·(1 − c_i) from the harmonizer's dots
            entry[key] = torch.where(valid, magnitude_score(stats.dots, cos, pair).float(), nan).cpu()
        # the run's detector (harmony.curriculum_score; per pair: score_audio too); NaN where it has no value
        for key, score in (("score", stats.score), ("score_audio", stats.score_audio)):
            if score is not None:
                score = score.float()
                ok = stats.valid.bool() & torch.isfinite(score)
                entry[key] = torch.where(ok, score, torch.full_like(score, float("nan"))).cpu()
        return entry

    def on_log(self) -> dict:
        """The window's statistics over all ranks, then a fresh window: noise AUC of the run's detector score
        (noise_auc: what the curriculum ranks by, harmony.curriculum_score; by default the caption and audio
        mixtures' posteriors, per pair), of the cosine (noise_auc_cos; overall, text, audio), of −‖g^vt‖(1 −
        c), −‖g^va‖(1 − c) (noise_auc_gvt*, noise_auc_gva*), of the same three at the pooled video feature
        under each per-sample definition (noise_auc_feat*, noise_auc_feat_gvt*, noise_auc_feat_gva*; suffix
        _own_row / _own_pair, none for path), the conflict fraction (cosine below
        harmony.conflict_threshold) on clean, text- and audio-misaligned samples, the score memory's AUC
        over the items seen so far, and the small-loss detector's (noise_auc_loss_text: ℓ^vt,
        noise_auc_loss_audio: ℓ^va). Keys whose score was not measured are absent."""
        parts = hd.all_gather_object(self.entries)
        self.entries = []
        self._feature_due = True
        entries = [e for p in parts for e in p]
        if not entries:
            return {}
        nt = torch.cat([e["noisy_text"] for e in entries])
        na = torch.cat([e["noisy_audio"] for e in entries])
        scores = [("score" if all("score" in e for e in entries) else "cos", "noise_auc"), ("cos", "noise_auc_cos"),
                  ("gvt", "noise_auc_gvt"), ("gva", "noise_auc_gva")]
        scores += [(f"feat_{s}{d}", f"noise_auc_feat{'' if s == 'cos' else '_' + s}{d}")
                   for d in ("", "_own_row", "_own_pair") for s in ("cos", "gvt", "gva")]
        out: dict = {}
        for key, prefix in scores:
            if all(key in e for e in entries):
                out.update(self._auc(torch.cat([e[key] for e in entries]), nt, na, prefix, conflict=key == "cos"))
        if all("score_audio" in e for e in entries):
            out.pop("noise_auc", None), out.pop("noise_auc_audio", None)
            out.update(_pair_aucs(torch.cat([e["score"] for e in entries]),
                                  torch.cat([e["score_audio"] for e in entries]), nt, na))
        for key, kind in (("loss_vt", "text"), ("loss_va", "audio")):  # a high own loss flags the sample
            loss = torch.cat([e[key] for e in entries])
            auc = noise_detection_auc(-loss, torch.isfinite(loss), nt, na, prefix="noise_auc_loss")
            out.update(_finite({f"noise_auc_loss_{kind}": auc[f"noise_auc_loss_{kind}"]}))
        if self.bank is not None:  # every detector side by side, split by noise kind, hardness and concept frequency
            out.update(_finite(detector_report(_cat(entries), self.tail_from)))
        out.update(_finite(self._memory_auc()))
        return out

    def _auc(self, score, nt, na, prefix: str, conflict: bool) -> dict:
        """noise_detection_auc of ``score`` (NaN: no value); for the cosine also the conflict fractions."""
        valid = torch.isfinite(score)
        out = _finite(noise_detection_auc(score, valid, nt, na, prefix=prefix))
        if conflict:
            below = score < self.cfg.harmony.conflict_threshold
            for name, sel in (("clean", ~(nt | na)), ("text", nt), ("audio", na)):
                sel = sel & valid
                if bool(sel.any()):
                    out[f"frac_conflict_{name}"] = float(below[sel].double().mean())
        return out

    def summary(self) -> dict:
        """Over the last eval.noise_window training steps: noise_auc of the run's detector score (what the
        curriculum ranks by, harmony.curriculum_score: by default the mixtures' posteriors, per pair),
        noise_auc_cos of the cosine; and noise_auc_memory of the score memory."""
        out = {}
        local = None
        if self.recent:
            # entries from checkpoints of older runs carry a separate "valid" mask instead of NaN cosines
            cos = [torch.where(w["valid"], w["cos"], float("nan")) if "valid" in w else w["cos"] for w in self.recent]
            score = [w.get("score", c) for w, c in zip(self.recent, cos)]
            local = {"cos": torch.cat(cos), "score": torch.cat(score),
                     **{k: torch.cat([w[k] for w in self.recent]) for k in ("noisy_text", "noisy_audio")}}
            extra = [k for k in ("score_audio",) + _GROUND_TRUTH if all(k in w for w in self.recent)]
            local.update({k: torch.cat([w[k] for w in self.recent]) for k in extra})
        parts = [p for p in hd.all_gather_object(local) if p is not None]
        if parts:
            cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            for key, prefix in (("score", "noise_auc"), ("cos", "noise_auc_cos")):
                out.update(_finite(noise_detection_auc(cat[key], torch.isfinite(cat[key]), cat["noisy_text"],
                                                       cat["noisy_audio"], prefix=prefix)))
            if "score_audio" in cat:
                for key in ("noise_auc", "noise_auc_text", "noise_auc_audio"):
                    out.pop(key, None)
                out.update(_pair_aucs(cat["score"], cat["score_audio"], cat["noisy_text"], cat["noisy_audio"]))
            if "text_kind" in cat:
                out.update(_finite(split_aucs(cat["score"], cat, "text", "noise_auc_text", self.tail_from)))
                audio = cat.get("score_audio", cat["score"])
                out.update(_finite(split_aucs(audio, cat, "audio", "noise_auc_audio", self.tail_from)))
        out.update(self._memory_auc())
        return out

    def _memory_auc(self) -> dict:
        """noise_auc_memory(_text/_audio): the score memory's AUC over the items seen so far ({} without one)."""
        if self.memory is None:
            return {}
        ids = torch.nonzero(self.item_flags >= 0).flatten()
        score, seen = self.memory.scores(ids) if ids.numel() else (torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        flags = self.item_flags[ids]
        gathered = hd.all_gather_object({"ids": ids[seen], "score": score[seen].float(), "flags": flags[seen]})
        ids = torch.cat([g["ids"] for g in gathered])
        if not ids.numel():
            return {}
        order = torch.argsort(ids, stable=True)
        first = torch.ones(ids.numel(), dtype=torch.bool)
        first[1:] = ids[order][1:] != ids[order][:-1]  # items seen on several ranks count once
        sel = order[first]
        score = torch.cat([g["score"] for g in gathered])[sel]
        flags = torch.cat([g["flags"] for g in gathered])[sel]
        return noise_detection_auc(score, torch.ones_like(score, dtype=torch.bool), flags % 2 == 1, flags >= 2,
                                   prefix="noise_auc_memory")

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The recent micro-steps' scores and each item's flags (checkpointed per rank)."""
        return {"noise_window": list(self.recent), "item_flags": self.item_flags.clone()}

    def load_state_dict(self, d: dict) -> None:
        self.recent.extend(d.get("noise_window", []))
        self.item_flags = d.get("item_flags", self.item_flags)


def _suffix(definition: str) -> str:
    """The key suffix of a per-sample definition's feature-level scores: none for path, else _<definition>."""
    return "" if definition == "path" else f"_{definition}"


def _feature_keys() -> List[str]:
    """The keys ``feature_scores`` fills: three scores per definition and the two reference cosines."""
    return [f"feat_{s}{_suffix(d)}" for d in DEFINITIONS for s in ("cos", "gvt", "gva")] + ["feat_ref_vt",
                                                                                          "feat_ref_va"]


def _cat(entries: List[dict]) -> Dict[str, torch.Tensor]:
    """The window's entries as one dict of [N] tensors (keys every entry has)."""
    keys = [k for k in entries[0] if all(k in e for e in entries)]
    return {k: torch.cat([e[k] for e in entries]) for k in keys}


def _reference_cosine(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cos(g_i, mean of the other valid samples' g_j) [b] float64, NaN where g_i is masked or zero (a
    gradient-against-reference score, after AGRA/RGC: higher = moves the representation as the rest of the batch's
    loss does). g [b, d] float64, mask [b] bool."""
    m = mask.to(g.device).bool()
    gm = torch.where(m[:, None], g, torch.zeros_like(g))
    n = int(m.sum())
    ref = (gm.sum(0, keepdim=True) - gm) / max(n - 1, 1)
    num = (g * ref).sum(1)
    den = g.norm(dim=1) * ref.norm(dim=1)
    ok = m & (den > 0) & (n > 1)
    return torch.where(ok, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(num, float("nan")))


def _pair_aucs(st: torch.Tensor, sa: torch.Tensor, nt: torch.Tensor, na: torch.Tensor) -> Dict[str, float]:
    """noise_auc(_text/_audio) of a per-pair detector (curriculum_target=pair): each pair's flags by its own score
    (caption score st, audio score sa [N]), and a triplet as suspect as its worse pair (min of the two)."""
    both = torch.minimum(st, sa)
    return _finite({"noise_auc": noise_detection_auc(both, torch.isfinite(both), nt, na)["noise_auc"],
                    "noise_auc_text": noise_detection_auc(st, torch.isfinite(st), nt, na)["noise_auc_text"],
                    "noise_auc_audio": noise_detection_auc(sa, torch.isfinite(sa), nt, na)["noise_auc_audio"]})
