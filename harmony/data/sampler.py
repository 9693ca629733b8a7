"""Batch samplers for map-style datasets: rank-aware, reshuffled per epoch, resumable by step.

``EpochBatchSampler`` (train): epoch e is a permutation of all n items drawn from (seed, e); the first
n − n mod world of it are dealt round-robin to the ranks (disjoint, equal shares), and each share is cut
into batches. Batch k of the infinite stream is batch k mod nb of epoch k // nb (nb batches per epoch),
so starting at ``start_step`` costs one permutation, not k batches. Finite mode (eval): one pass in
index order, rank r takes indices r, r+world, ... (uneven shares, nothing dropped or repeated).

``SamplerBatches`` wraps a caller's index sampler (e.g. a prioritized one): batches of consecutive
indices, epochs restarted (with ``set_epoch(e)`` when the sampler has it), ``start_step`` batches drawn
and dropped — indices only, nothing is decoded. Rank sharding is then the sampler's job.
"""
from __future__ import annotations

from typing import Iterator, List

import torch
from torch.utils.data import Sampler


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's order of the n items: LongTensor [n], same for every rank."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2 ** 63))
    return torch.randperm(n, generator=g)


class EpochBatchSampler(Sampler):
    """Batches of indices for one rank; infinite over epochs when ``shuffle`` (train), else one pass."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, drop_last: bool = True, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.start_step, self.drop_last, self.shuffle = seed, start_step, drop_last, shuffle
        if shuffle and self.batches_per_epoch() == 0:
            raise ValueError(f"{n} items cannot fill one batch of {batch_size} on each of {world_size} ranks "
                             "(use a smaller batch or more data)")

    def share(self) -> int:
        """Items this rank gets per epoch."""
        if self.shuffle:
            return self.n // self.world
        return len(range(self.rank, self.n, self.world))

    def batches_per_epoch(self) -> int:
        s = self.share()
        return s // self.batch_size if self.drop_last else -(-s // self.batch_size)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's indices of an epoch, in order: LongTensor [share]."""
        if not self.shuffle:
            return torch.arange(self.rank, self.n, self.world)
        order = epoch_permutation(self.n, self.seed, epoch)
        return order[: self.share() * self.world][self.rank::self.world]

    def __iter__(self) -> Iterator[List[int]]:
        nb = self.batches_per_epoch()
        if nb == 0:
            return
        epoch, first = divmod(self.start_step, nb)
        while self.shuffle or epoch == 0:
            idx = self.epoch_indices(epoch)
            for b in range(first, nb):
                yield idx[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            epoch, first = epoch + 1, 0

    def __len__(self) -> int:
        if self.shuffle:
            raise TypeError("the training batch sampler is infinite")
        return max(0, self.batches_per_epoch() - self.start_step)


class SamplerBatches(Sampler):
    """Batches from a caller's index sampler; infinite over its epochs when ``infinite``."""

    def __init__(self, sampler, batch_size: int, drop_last: bool = True, start_step: int = 0,
                 infinite: bool = True):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.start_step, self.infinite = start_step, infinite

    def _epochs(self) -> Iterator[List[int]]:
        epoch = 0
        while True:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            batch: List[int] = []
            produced = False
            for i in self.sampler:
                batch.append(int(i))
                if len(batch) == self.batch_size:
                    produced = True
                    yield batch
                    batch = []
            if batch and not self.drop_last:
                produced = True
                yield batch
            if not self.infinite:
                return
            if not produced:
                raise ValueError(f"the sampler gave no full batch of {self.batch_size} in epoch {epoch}")
            epoch += 1

    def __iter__(self) -> Iterator[List[int]]:
        for step, batch in enumerate(self._epochs()):
            if step >= self.start_step:
                yield batch

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("the training batch sampler is infinite")
        n = len(self.sampler)
        full = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return max(0, full - self.start_step)

