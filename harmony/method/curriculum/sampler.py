"""The prioritized sampler over the score memory (score_memory with memory_use=sampler) and the step-aware wrapper
the trainer's loader uses; the number of training items is passed in."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from harmony import distributed as hd
from harmony.config import ConfigError, HarmonyConfig
from harmony.method.curriculum.memory import ScoreMemory
from harmony.method.curriculum.rules import rule_weights
from harmony.method.curriculum.schedule import check_total, is_active, progress


class PrioritizedSampler(torch.utils.data.Sampler):
    """Draws dataset indices with probability ∝ the memory curriculum's weight of each item.

    At each epoch the priorities are ``rule_weights`` of the items' memory scores under
    the rule ``cfg.curriculum`` at the progress of ``set_epoch``'s step (all ones before curriculum_start);
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
        check_total(total_steps)
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
        w = rule_weights(score, seen, p, self.cfg.curriculum, self.cfg).double()
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


def memory_sampler(cfg, memory: ScoreMemory, num_items: Callable[[], int], rank: int, world_size: int,
                   step_of) -> Optional[StepAwareSampler]:
    """The training loader's sampler under harmony.score_memory with memory_use=sampler: a
    ``PrioritizedSampler`` over ``memory`` (the harmonizer's score memory) and ``num_items()`` training items (the
    data's count, passed in) that follows the trainer's step (``step_of()``); None for every other setting.
    ``cfg``: the whole run config."""
    h = cfg.harmony
    if not (h.enabled and h.score_memory and h.curriculum != "none" and h.memory_use == "sampler"):
        return None
    if cfg.data.kind == "shards":
        raise ConfigError("harmony.memory_use='sampler' needs indexable data; data.kind='shards' streams "
                          "(use harmony.memory_use='weights')")
    return StepAwareSampler(PrioritizedSampler(memory, num_items(), h, cfg.train.steps, seed=cfg.train.seed,
                                               rank=rank, world_size=world_size), step_of)
