"""Evaluation (docs/DESIGN.md "Evaluation"): cross-modal retrieval, linear probe, noise-detection ROC-AUC.

Conventions (also in the docs):
* Retrieval: query i's match is gallery item i. Its rank is 1 + the number of OTHER gallery items scoring
  at least as high (ties count against the query, so a constant similarity gives chance, not R@1 = 1).
  R@k is a fraction in [0, 1]; ``medr`` is the median rank (mean of the two middle ranks for an even count).
  With L text candidates an item's video–text similarity is the best candidate's (MIL).
  Only items valid for the pair (mask_va / mask_vt) take part, as queries and as gallery.
* ``concept_acc``: the top-1 retrieved item (first index on ties) has the query's concept.
* Linear probe: closed-form ridge regression onto one-hot labels from standardised frozen features; items
  sorted by dataset index, then a fixed pseudo-random half (seeded permutation) trains and the rest tests
  (deterministic; not a parity split, which would align with labels that cycle with the index).
* ROC-AUC: the Mann–Whitney statistic from average ranks (ties count ½), NaN when a class is absent.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F

from harmony import distributed as hd
from harmony.nvtx import nvtx_range

_EMB_KEYS = ("z_va_v", "z_va_a", "z_vt_v", "z_vt_t", "feat_v", "feat_a", "feat_t")
_LABEL_KEYS = ("concept", "text_concept", "audio_concept")


# ------------------------------------------------------------------------------------------------- AUC

def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x`` [N] in ascending order, tied values sharing their average rank. [N] float64."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    xs = x[order]
    n = x.numel()
    # run boundaries of equal values in sorted order
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = xs[1:] != xs[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    starts = torch.nonzero(new_run).flatten()
    ends = torch.cat([starts[1:], torch.tensor([n])])
    avg = (starts + 1 + ends).double() / 2.0  # mean of ranks start+1 .. end
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = avg[run_id]
    return ranks


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative) + ½ P(tie). scores, labels [N]."""
    labels = labels.flatten().bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(scores.flatten())
    u = ranks[labels].sum().item() - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def noise_detection_auc(cos: torch.Tensor, valid: torch.Tensor, noisy_text: torch.Tensor,
                        noisy_audio: torch.Tensor, prefix: str = "noise_auc") -> Dict[str, float]:
    """AUC of −cos against misalignment flags over samples with a cosine. All inputs [N].

    ``prefix``: noisy = text OR audio misaligned; ``prefix_text`` / ``prefix_audio``: positives are that kind,
    negatives the samples clean in both (a sample noisy only in the other kind is left out).
    """
    valid = valid.bool() & torch.isfinite(cos)
    score, nt, na = -cos[valid].double(), noisy_text[valid].bool(), noisy_audio[valid].bool()
    clean = ~(nt | na)
    out = {prefix: roc_auc(score, nt | na)}
    for kind, flag in (("text", nt), ("audio", na)):
        keep = flag | clean
        out[f"{prefix}_{kind}"] = roc_auc(score[keep], flag[keep])
    return out


# ------------------------------------------------------------------------------------------- retrieval

def retrieval_ranks(sim: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """sim [Nq, Ng] with query i's match at column i (Nq <= Ng) -> 1-based pessimistic ranks [Nq] long."""
    ranks = []
    for s in range(0, sim.shape[0], chunk):
        block = sim[s:s + chunk]
        diag = block[torch.arange(block.shape[0]), torch.arange(s, s + block.shape[0])]
        ranks.append((block >= diag[:, None]).sum(1))  # counts the match itself: rank >= 1
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def retrieval_metrics(sim: torch.Tensor, q_labels: Optional[torch.Tensor] = None,
                      g_labels: Optional[torch.Tensor] = None, tail_from: Optional[int] = None) -> Dict[str, float]:
    """r1, r5, r10 (fractions), medr, and concept_acc when labels [Nq] / [Ng] are given. sim [Nq, Ng].
    With ``tail_from`` also concept_acc_head / concept_acc_tail: over the queries whose concept is below / at
    least ``tail_from`` (the common and the rare concepts of a long-tailed training set)."""
    ranks = retrieval_ranks(sim).double()
    if ranks.numel() == 0:
        return {}
    out = {f"r{k}": (ranks <= k).double().mean().item() for k in (1, 5, 10)}
    sr = torch.sort(ranks).values
    n = sr.numel()
    out["medr"] = float(sr[n // 2]) if n % 2 else float((sr[n // 2 - 1] + sr[n // 2]) / 2)
    if q_labels is not None and g_labels is not None:
        top1 = sim.argmax(dim=1)
        hit = (g_labels[top1] == q_labels).double()
        out["concept_acc"] = hit.mean().item()
        if tail_from is not None:
            tail = q_labels >= tail_from
            for name, rows in (("head", ~tail), ("tail", tail)):
                out[f"concept_acc_{name}"] = hit[rows].mean().item() if rows.any() else float("nan")
    return out


def _normalize(z: torch.Tensor) -> torch.Tensor:
    return F.normalize(z.float(), dim=-1)


def video_text_similarity(z_v: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """z_v [N, d], z_t [N, L, d] or [N, d] -> [N, N] cosine of video i and the best candidate of text j."""
    v = _normalize(z_v)
    t = _normalize(z_t if z_t.dim() == 3 else z_t[:, None])
    return torch.einsum("id,jld->ijl", v, t).amax(dim=2)


def _labelled(emb: Dict[str, torch.Tensor]) -> bool:
    """Whether the items carry concept labels: unlabelled data (label -1 everywhere, e.g. GRID) gets no concept
    accuracy and no probe, where every top hit would trivially 'share' the label."""
    return "concept" in emb and bool((emb["concept"] >= 0).any())


def retrieval_report(emb: Dict[str, torch.Tensor], tail_from: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """The four directions from gathered embeddings (keys as in the model output plus masks and labels);
    ``tail_from`` as in ``retrieval_metrics``."""
    concept = emb.get("concept") if _labelled(emb) else None
    t_concept = emb.get("text_concept", concept) if concept is not None else None
    a_concept = emb.get("audio_concept", concept) if concept is not None else None
    out = {}
    mvt = emb["mask_vt"].bool()
    if mvt.any():
        s = video_text_similarity(emb["z_vt_v"][mvt], emb["z_vt_t"][mvt])
        lab = (lambda x: None if x is None else x[mvt])
        out["v2t"] = retrieval_metrics(s, lab(concept), lab(t_concept), tail_from)
        out["t2v"] = retrieval_metrics(s.T, lab(t_concept), lab(concept), tail_from)
    mva = emb["mask_va"].bool()
    if mva.any():
        s = _normalize(emb["z_va_v"][mva]) @ _normalize(emb["z_va_a"][mva]).T
        lab = (lambda x: None if x is None else x[mva])
        out["v2a"] = retrieval_metrics(s, lab(concept), lab(a_concept), tail_from)
        out["a2v"] = retrieval_metrics(s.T, lab(a_concept), lab(concept), tail_from)
    return out


# ------------------------------------------------------------------------------------------------ probe

def probe_split(n: int):
    """(train rows, test rows) of n items: a fixed seeded permutation, first half trains. LongTensors."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    half = (n + 1) // 2
    return perm[:half].sort().values, perm[half:].sort().values


def linear_probe(feats: torch.Tensor, labels: torch.Tensor, ridge: float = 1.0) -> float:
    """Test accuracy of a ridge classifier on feats [N, d] -> labels [N] (rows split by ``probe_split``)."""
    x, y = feats.double(), labels.long()
    tr, te = probe_split(x.shape[0])
    if tr.numel() < 2 or te.numel() == 0:
        return float("nan")
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-8)
    xs = (x - mu) / sd
    classes, y_idx = torch.unique(y, return_inverse=True)
    onehot = F.one_hot(y_idx, classes.numel()).double()
    y_mean = onehot[tr].mean(0)
    a = xs[tr].T @ xs[tr] + ridge * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(a, xs[tr].T @ (onehot[tr] - y_mean))
    pred = (xs[te] @ w + y_mean).argmax(1)
    return (pred == y_idx[te]).double().mean().item()


# ------------------------------------------------------------------------------------------- embedding

def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def embed_eval_set(model, batches: Iterable[dict], device: torch.device, max_items: int = 0,
                   precision: str = "fp32") -> Dict[str, torch.Tensor]:
    """Embed this rank's share of the eval set, gather every rank's rows, sort by dataset index.

    Every rank runs the same number of forwards (FSDP needs it): iteration stops when ANY rank runs out
    or, with ``max_items`` > 0, when that many items have been embedded over all ranks.
    Returns CPU fp32 tensors keyed like the model output, plus index, mask_va, mask_vt and labels.
    """
    rows: Dict[str, list] = {}
    it = iter(batches)
    seen = 0
    while True:
        batch = next(it, None)
        have = torch.tensor([0.0 if batch is None else 1.0], device=device)
        if hd.all_reduce(have, "min").item() == 0 or (max_items and seen >= max_items):
            break
        with _autocast(device, precision):
            out = model(batch["video"].to(device), batch["audio"].to(device), batch["text"].to(device))
        for k in _EMB_KEYS:
            rows.setdefault(k, []).append(getattr(out, k).float())
        for k in ("index", "mask_va", "mask_vt") + _LABEL_KEYS:
            if k in batch:
                # integers for the collective (gloo cannot gather bool)
                rows.setdefault(k, []).append(torch.as_tensor(batch[k]).to(device).long())
        n = torch.tensor([float(batch["index"].shape[0])], device=device)
        seen += int(hd.all_reduce(n, "sum").item())
    if not rows:
        return {}
    gathered = {k: hd.all_gather_rows(torch.cat(v)).cpu() for k, v in rows.items()}
    index = gathered["index"]
    order = torch.argsort(index, stable=True)
    keep = torch.ones(index.numel(), dtype=torch.bool)
    keep[1:] = index[order][1:] != index[order][:-1]  # drop repeats (a sampler may pad the last shard)
    order = order[keep]
    if max_items:
        order = order[:max_items]
    return {k: v[order] for k, v in gathered.items()}


def evaluate(model, batches: Iterable[dict], device: torch.device, max_items: int = 0,
             probe: bool = True, ridge: float = 1.0, precision: str = "fp32",
             tail_from: Optional[int] = None) -> Dict:
    """Retrieval in the four directions (+ concept_acc) and linear-probe accuracies on one eval pass.

    Returns {"retrieval": {dir: {r1, r5, r10, medr[, concept_acc[, concept_acc_head, concept_acc_tail]]}},
    "probe_acc"[, "probe_acc_audio", "probe_acc_text"], "eval_items"}; identical on every rank. Restores the
    model's train/eval mode. ``tail_from``: split the concept accuracy into common and rare concepts.
    """
    was_training = model.training
    model.eval()
    try:
        with nvtx_range("eval/embed"):
            emb = embed_eval_set(model, batches, device, max_items, precision)
    finally:
        model.train(was_training)
    if not emb:
        return {"eval_items": 0}
    with nvtx_range("eval/metrics"):
        result = {"retrieval": retrieval_report(emb, tail_from), "eval_items": int(emb["index"].numel())}
        if probe and _labelled(emb):
            result["probe_acc"] = linear_probe(emb["feat_v"], emb["concept"], ridge)
            result["probe_acc_audio"] = linear_probe(emb["feat_a"], emb.get("audio_concept", emb["concept"]), ridge)
            result["probe_acc_text"] = linear_probe(emb["feat_t"], emb.get("text_concept", emb["concept"]), ridge)
    return result


def flatten_metrics(d: Dict, prefix: str = "") -> Dict[str, float]:
    """{"retrieval": {"v2t": {"r1": x}}} -> {"retrieval/v2t/r1": x} (for log lines and TensorBoard)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "/"))
        elif isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            out[key] = v
    return out
