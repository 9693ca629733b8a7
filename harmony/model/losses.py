"""The two cross-modality alignment (CMA) losses (docs/HARMONIZER.md "1. Per-sample gradients of coupled
losses"): per-sample asymmetric NCE / MIL-NCE.

For anchors e_i [B, d] and candidates c_{j,l} [B, L, d] (L = 1: NCE; L > 1: MIL-NCE), all L2-normalised,
s(x, y) = x̂·ŷ / τ and, over the GLOBAL batch (gathered from every rank with gradient):

    pos_i = logsumexp_l s(e_i, c_{i,l})
    all_i = logsumexp( [s(e_i, c_{j,l}) : all j, l]  ++  [s(e_j, c_{i,l}) : all j, l] )
    ℓ_i   = all_i − pos_i

As in the reference code the two sets are concatenated, so the positives appear in both halves. A candidate
is invalid when its sample is masked or the candidate itself is; invalid candidates enter every set as −inf.
An invalid sample (masked, or with no valid candidate) gets ℓ_i = 0 with a zero, finite gradient. Anchors of
masked samples still serve as negatives: the mask says the *pair* is unusable, not the anchor.

``definition`` picks which gradient the returned ℓ carries; its VALUE is the same in all three. It is how the
harmonizer's measured per-sample gradient is defined (``harmony.upstream``, docs/METHOD.md, "Which gradient is
sample i's"):

* ``path``: the ordinary loss. Summed over the batch, its gradient at z_i is ∂L/∂z_i, which includes sample i's
  role as a negative in every other sample's row.
* ``own_row``: the gradient of ℓ_i through sample i's own embeddings (e_i and c_{i,·}) only; every other
  sample's embeddings enter ℓ_i as constants, and ℓ_i reaches no other sample.
* ``own_pair``: only the positive-pair logits s(e_i, c_{i,l}) carry gradient (wherever they occur in ℓ_i): the
  term ∂ℓ_i/∂s_ii · ∂s_ii/∂(e_i, c_i) of the chain rule; every negative logit is a constant.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from harmony import distributed as hd
from harmony.nvtx import nvtx_range

DEFINITIONS = ("path", "own_row", "own_pair")


def _gather_global(e: torch.Tensor, c: torch.Tensor, valid: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Local e [b, d], c [b, L, d], valid [b, L] -> the global e [G, d], c [G, L, d], valid [G, L] and the
    global index of this rank's first row.

    Embeddings and masks travel in one packed collective; the mask columns carry no gradient.
    """
    b, cands, d = c.shape
    packed = torch.cat([e, c.reshape(b, cands * d), valid.to(e.dtype).detach()], dim=1)
    full, offset = hd.gather_rows(packed, differentiable=True)
    g = full.shape[0]
    e_all = full[:, :d]
    c_all = full[:, d:d + cands * d].reshape(g, cands, d)
    valid_all = full[:, d + cands * d:] > 0.5
    return e_all, c_all, valid_all, offset


def _logsumexp_rows(scores: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1 of scores [b, K] (−inf allowed); rows that are not valid give 0 instead.

    Rows of an invalid sample may be all −inf: their logsumexp is −inf and its gradient NaN (0·NaN survives a
    later torch.where), so such rows are replaced by zeros BEFORE the reduction.
    """
    safe = torch.where(row_valid[:, None], scores, torch.zeros_like(scores))
    return torch.logsumexp(safe, dim=1)


def asymmetric_nce(anchor: torch.Tensor, cands: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   cand_mask: Optional[torch.Tensor] = None, temperature: float = 0.07,
                   gather: bool = True, definition: str = "path") -> torch.Tensor:
    """Per-sample asymmetric NCE ℓ [B] of anchors [B, d] against candidates [B, L, d] (see module doc).

    mask [B] bool: sample i is valid; cand_mask [B, L] bool: candidate (i, l) is valid. With torch.distributed
    initialised, world > 1 and ``gather``, negatives come from the global batch and the local samples' ℓ is
    returned. Computed in float32 at least (float64 stays float64), also under autocast. ``definition``
    (path | own_row | own_pair): which gradient ℓ carries (module doc); the value is the same.
    """
    if definition not in DEFINITIONS:
        raise ValueError(f"definition={definition!r} is not one of {list(DEFINITIONS)}")
    if anchor.dim() != 2 or cands.dim() != 3 or cands.shape[0] != anchor.shape[0] \
            or cands.shape[2] != anchor.shape[1]:
        raise ValueError(f"asymmetric_nce needs anchor [B, d] and cands [B, L, d], got {list(anchor.shape)} "
                         f"and {list(cands.shape)}")
    b, cands_per, _ = cands.shape
    # Autocast off: the similarities and log-sum-exps stay in fp32 even inside a bf16 autocast region.
    with nvtx_range("losses/asymmetric_nce"), torch.autocast(device_type=cands.device.type, enabled=False):
        dtype = torch.promote_types(torch.promote_types(anchor.dtype, cands.dtype), torch.float32)
        valid = torch.ones(b, cands_per, dtype=torch.bool, device=cands.device)
        if mask is not None:
            valid = valid & mask.to(device=cands.device, dtype=torch.bool).reshape(b, 1)
        if cand_mask is not None:
            valid = valid & cand_mask.to(device=cands.device, dtype=torch.bool).reshape(b, cands_per)
        e = F.normalize(anchor.to(dtype), dim=-1)
        # Invalid candidates are zeroed before use: a garbage (even non-finite) embedding of a masked sample
        # then cannot reach anyone's loss or gradient.
        c = F.normalize(torch.where(valid[..., None], cands.to(dtype), torch.zeros((), dtype=dtype,
                                                                                     device=cands.device)), dim=-1)
        offset = 0
        if gather and hd.get_world_size() > 1:
            e_all, c_all, valid_all, offset = _gather_global(e, c, valid)
        else:
            e_all, c_all, valid_all = e, c, valid
        if definition == "path":
            return _per_sample_nce(e, c, valid, e_all, c_all, valid_all, temperature)
        return _own_nce(e, c, valid, e_all.detach(), c_all.detach(), valid_all, offset, temperature, definition)


def _per_sample_nce(e: torch.Tensor, c: torch.Tensor, valid: torch.Tensor, e_all: torch.Tensor,
                    c_all: torch.Tensor, valid_all: torch.Tensor, temperature: float) -> torch.Tensor:
    """ℓ [b] of the local rows. e [b, d], c [b, L, d], valid [b, L]; *_all: the same over the global batch [G, ...]."""
    b, cands, d = c.shape
    g = e_all.shape[0]
    neg_inf = torch.tensor(float("-inf"), dtype=e.dtype, device=e.device)
    # s(e_i, c_{j,l}) for all global (j, l): [b, G·L]
    rows = torch.where(valid_all.reshape(1, g * cands), e @ c_all.reshape(g * cands, d).T / temperature, neg_inf)
    # s(e_j, c_{i,l}) for all global j: [b, L, G] -> [b, L·G]
    cols = torch.where(valid[..., None], (c.reshape(b * cands, d) @ e_all.T).reshape(b, cands, g) / temperature,
                       neg_inf).reshape(b, cands * g)
    # s(e_i, c_{i,l}): [b, L]
    pos = torch.where(valid, (e[:, None, :] * c).sum(-1) / temperature, neg_inf)
    row_valid = valid.any(dim=1)
    loss = _logsumexp_rows(torch.cat([rows, cols], dim=1), row_valid) - _logsumexp_rows(pos, row_valid)
    return torch.where(row_valid, loss, torch.zeros_like(loss))


def _own_nce(e, c, valid, e_all, c_all, valid_all, offset: int, temperature: float, definition: str) -> torch.Tensor:
    """ℓ [b] with the value of ``_per_sample_nce`` whose gradient reaches only sample i's own embeddings:
    ``own_row`` through every logit of row i, ``own_pair`` through its positive logits only. e_all, c_all come
    detached (other samples are constants); the positive logits s(e_i, c_{i,l}) are put back, live in both
    e_i and c_i, where they occur in the row and column sets."""
    b, cands, d = c.shape
    g = e_all.shape[0]
    neg_inf = torch.tensor(float("-inf"), dtype=e.dtype, device=e.device)
    pos_raw = (e[:, None, :] * c).sum(-1) / temperature                                  # [b, L], live
    rows = (e @ c_all.reshape(g * cands, d).T).reshape(b, g, cands) / temperature       # live in e_i only
    cols = (c.reshape(b * cands, d) @ e_all.T).reshape(b, cands, g) / temperature       # live in c_i only
    if definition == "own_pair":
        rows, cols = rows.detach(), cols.detach()
    own = torch.arange(g, device=e.device)[None, :] == (torch.arange(b, device=e.device) + offset)[:, None]
    rows = torch.where(own[:, :, None], pos_raw[:, None, :], rows)
    cols = torch.where(own[:, None, :], pos_raw[:, :, None], cols)
    rows = torch.where(valid_all.reshape(1, g, cands), rows, neg_inf).reshape(b, g * cands)
    cols = torch.where(valid[..., None], cols, neg_inf).reshape(b, cands * g)
    pos = torch.where(valid, pos_raw, neg_inf)
    row_valid = valid.any(dim=1)
    loss = _logsumexp_rows(torch.cat([rows, cols], dim=1), row_valid) - _logsumexp_rows(pos, row_valid)
    return torch.where(row_valid, loss, torch.zeros_like(loss))


def nce(z_v: torch.Tensor, z_a: torch.Tensor, mask: Optional[torch.Tensor] = None, temperature: float = 0.07,
        gather: bool = True, definition: str = "path") -> torch.Tensor:
    """Video–audio NCE: z_v [B, d], z_a [B, d], mask [B] -> ℓ^va [B] (asymmetric NCE with L = 1)."""
    return asymmetric_nce(z_v, z_a[:, None], mask=mask, temperature=temperature, gather=gather,
                          definition=definition)


def mil_nce(z_vt: torch.Tensor, z_t: torch.Tensor, mask: Optional[torch.Tensor] = None,
            cand_mask: Optional[torch.Tensor] = None, temperature: float = 0.07, gather: bool = True,
            definition: str = "path") -> torch.Tensor:
    """Video–text MIL-NCE: z_vt [B, d], z_t [B, L, d] or [B, d], mask [B], cand_mask [B, L] -> ℓ^vt [B]."""
    if z_t.dim() == 2:
        z_t = z_t[:, None]
    return asymmetric_nce(z_vt, z_t, mask=mask, cand_mask=cand_mask, temperature=temperature, gather=gather,
                          definition=definition)


def masked_mean(losses: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ m_i ℓ_i / Σ m_i over losses [B], mask [B] (None: all valid) -> scalar; 0 (not NaN) when nothing is valid."""
    if mask is None:
        mask = torch.ones_like(losses, dtype=torch.bool)
    mask = mask.to(device=losses.device, dtype=torch.bool)
    total = torch.where(mask, losses, torch.zeros_like(losses)).sum()
    return total / mask.sum().clamp_min(1).to(losses.dtype)


def plain_backward(l_va: torch.Tensor, m_va: torch.Tensor, l_vt: torch.Tensor, m_vt: torch.Tensor, lam: float,
                   world: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The plain step, the one place it is written: backward of this rank's share of the global objective
    L_va + λ·L_vt (each a masked mean over every rank's samples, ``hd.global_masked_means``; ``world`` as there).
    -> the global masked means (detached)."""
    (L_va, L_vt), (mean_va, mean_vt) = hd.global_masked_means((l_va, m_va), (l_vt, m_vt), world=world)
    (L_va + lam * L_vt).backward()
    return mean_va, mean_vt
