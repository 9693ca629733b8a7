"""Cross-modal neighbourhood agreement: a per-pair detector that needs no gradient and no loss (docs/METHOD.md
"Detectors"; after the neighbourhood-consistency idea of GSC and BiCro).

A sample's video has neighbours: the recent samples whose video embeddings are closest to its own. If its caption
is right, those neighbours' captions say what it says; if the caption is wrong (swapped, or a narrator's
systematic error that only part of a concept's clips carry), they mostly say something else. So

    agree^vt_i = mean_{j ∈ N_k(i)} κ(cos(t_i, t_j)),   N_k(i) = the k bank entries j ≠ i closest to v_i by cos(v_i, v_j)

in the video–text space (v = z_vt_v, t = z_vt_t), and agree^va_i the same with the audio in the video–audio
space. κ(c) = exp((c − 1)/τ) with τ = ``kernel`` counts a neighbour as agreeing only when its caption is close to
sample i's (τ = 0: κ(c) = c, the plain mean cosine); a learned caption space puts a concept's true and biased
words fairly close, and the kernel keeps that closeness from blurring the count. Higher = more trusted, like every
score here. The neighbours are found by the video, the hub of both pairs, so a wrong audio track does not make the
caption look wrong, nor a wrong caption the audio. The bank holds the last ``size`` samples' detached, normalised
embeddings (the current batch included, the sample's own entries never: neighbours are matched by item id).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def neighbour_agreement(q_key: Tensor, q_val: Tensor, bank_key: Tensor, bank_val: Tensor, allowed: Tensor,
                        k: int, kernel: float = 0.0) -> Tensor:
    """mean over the k allowed bank rows closest to each query (by cos of keys) of κ(cos(query value, row value)),
    κ(c) = exp((c − 1)/kernel), or c itself when kernel = 0.

    q_key, q_val [B, d] and bank_key, bank_val [N, d] unit rows; allowed [B, N] bool -> [B] float32 (NaN where a
    query has no allowed row). Fewer than k allowed rows: the mean over those there are."""
    B = q_key.shape[0]
    if B == 0 or bank_key.shape[0] == 0:
        return torch.full((B,), float("nan"))
    sim = torch.where(allowed, q_key @ bank_key.T, torch.full_like(allowed, -float("inf"), dtype=q_key.dtype))
    kk = min(k, bank_key.shape[0])
    top, idx = sim.topk(kk, dim=1)                                   # [B, kk]
    ok = torch.isfinite(top)
    val = (q_val[:, None, :] * bank_val[idx]).sum(-1)                # [B, kk] cos(t_i, t_j)
    if kernel > 0:
        val = torch.exp((val - 1.0) / kernel)
    n = ok.sum(1)
    mean = torch.where(ok, val, torch.zeros_like(val)).sum(1) / n.clamp(min=1)
    return torch.where(n > 0, mean, torch.full_like(mean, float("nan"))).float()


class AgreementBank:
    """The last ``size`` samples' embeddings of both pairs and their item ids; ``score`` gives (agree^vt, agree^va)
    of a batch (module doc). ``size``: how many recent samples are neighbours' candidates; ``k``: neighbours;
    ``kernel``: τ of the agreement kernel (0: the plain mean cosine)."""

    def __init__(self, size: int = 2048, k: int = 32, kernel: float = 0.1):
        if size < 1 or k < 1 or kernel < 0:
            raise ValueError(f"AgreementBank needs size >= 1, k >= 1, kernel >= 0, got {size}, {k}, {kernel}")
        self.size, self.k, self.kernel = int(size), int(k), float(kernel)
        self.ids = torch.zeros(0, dtype=torch.long)
        self.emb: Optional[dict] = None        # name -> [n, d] unit rows (CPU float32)
        self.ok: Optional[dict] = None         # "vt" / "va" -> [n] bool: that pair's loss was valid

    def score(self, ids: Tensor, vt: Tuple[Tensor, Tensor], va: Tuple[Tensor, Tensor], mask_vt: Tensor,
              mask_va: Tensor, kernels: Optional[Tuple[float, ...]] = None) -> Tuple[Tensor, ...]:
        """Add the batch, then score it. ids [B]; vt = (z_vt_v, z_vt_t), va = (z_va_v, z_va_a) [B, d_*] (z_vt_t may be
        [B, L, d]);
        masks [B] bool. -> (agree^vt, agree^va) [B] float32 on the CPU, NaN where the pair is masked; with
        ``kernels`` (τ values), (agree^vt, agree^va) for each τ in turn, from the same neighbours."""
        ids = ids.detach().cpu().long().reshape(-1)
        # text rows may be [B, L, d] (L candidate captions): their mean stands for the caption
        new = {name: F.normalize(z.detach().float().cpu().reshape(z.shape[0], -1, z.shape[-1]).mean(1), dim=1)
               for name, z in
               (("vt_v", vt[0]), ("vt_t", vt[1]), ("va_v", va[0]), ("va_a", va[1]))}
        ok = {"vt": mask_vt.detach().cpu().bool().reshape(-1), "va": mask_va.detach().cpu().bool().reshape(-1)}
        self._add(ids, new, ok)
        out = []
        for tau in (self.kernel,) if kernels is None else kernels:
            for pair, key, val in (("vt", "vt_v", "vt_t"), ("va", "va_v", "va_a")):
                allowed = (self.ids[None, :] != ids[:, None]) & self.ok[pair][None, :]
                a = neighbour_agreement(new[key], new[val], self.emb[key], self.emb[val], allowed, self.k, tau)
                out.append(torch.where(ok[pair], a, torch.full_like(a, float("nan"))))
        return tuple(out)

    def _add(self, ids: Tensor, new: dict, ok: dict) -> None:
        if self.emb is None:
            self.emb, self.ok = {k: v[:0] for k, v in new.items()}, {k: v[:0] for k, v in ok.items()}
        self.ids = torch.cat([self.ids, ids])[-self.size:]
        self.emb = {k: torch.cat([self.emb[k], v])[-self.size:] for k, v in new.items()}
        self.ok = {k: torch.cat([self.ok[k], v])[-self.size:] for k, v in ok.items()}

    def state_dict(self) -> dict:
        copy = lambda d: None if d is None else {k: v.clone() for k, v in d.items()}  # noqa: E731
        return {"ids": self.ids.clone(), "emb": copy(self.emb), "ok": copy(self.ok)}

    def load_state_dict(self, d: dict) -> None:
        self.ids = d["ids"].long().clone()
        self.emb = None if d.get("emb") is None else {k: v.float().clone() for k, v in d["emb"].items()}
        self.ok = None if d.get("ok") is None else {k: v.bool().clone() for k, v in d["ok"].items()}
