"""``ScoreMemory``: a score source over epochs, each item's score folded into an EMA across its visits (what
score_memory=true ranks by, and what the prioritized sampler draws by)."""
from __future__ import annotations


import torch
from torch import Tensor



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
