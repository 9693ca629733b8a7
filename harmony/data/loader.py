"""``build_dataset`` / ``build_loader``: the data API the trainer uses (docs/DATA.md "Loader API").

The train loader is infinite (epochs follow one another, reshuffled from (seed, epoch)), gives each rank
a disjoint share of every epoch, and resumes exactly: ``start_step=k`` yields what a fresh loader yields
after k batches, without producing the skipped ones. The eval loader is one pass with ``len()``.
``Loader.stats`` counts bad inputs (summed from every batch's ``bad`` field, so counts made in worker
processes arrive too, plus what was met when the manifest or shards were indexed).
"""
from __future__ import annotations

import signal
from typing import Callable, Dict, Iterator, Optional

from torch.utils.data import DataLoader, Dataset, Sampler

from harmony.data.batch import add_counts, collate, oracle_drop, zero_counts
from harmony.data.manifest import build_manifest_splits
from harmony.data.sampler import EpochBatchSampler, SamplerBatches
from harmony.data.shards import ShardStream, build_shard_splits
from harmony.data.synthetic import SyntheticDataset
from harmony.nvtx import nvtx_range

_SPLITS = ("train", "eval")


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split={split!r}: choose one of {list(_SPLITS)}")


def build_dataset(cfg, split: str = "train") -> Dataset:
    """The ``split`` of ``cfg.kind``: map-style (synthetic, manifest) or an item stream (shards, one pass).

    Every dataset has ``load_counts`` (bad inputs met while indexing) — zeros for synthetic data."""
    _check_split(split)
    cfg.validate()
    if cfg.kind == "synthetic":
        ds = SyntheticDataset(cfg, split)
        ds.load_counts = zero_counts()
        return ds
    if cfg.kind == "manifest":
        return build_manifest_splits(cfg)[_SPLITS.index(split)]
    return ShardStream(build_shard_splits(cfg)[_SPLITS.index(split)], cfg)


def train_items(cfg) -> int:
    """How many items the training split holds (map-style data: synthetic, manifest), without generating or decoding
    any; a stream (shards) has no length: ValueError."""
    if cfg.kind == "synthetic":
        return int(cfg.size)
    if cfg.kind == "manifest":
        return len(build_manifest_splits(cfg)[0])
    raise ValueError(f"data.kind={cfg.kind!r} streams: its training split has no length")


def _identity(batch):
    """collate_fn of the shard loader: workers already collate."""
    return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: SIGINT and SIGTERM are the trainer's to handle (it finishes its step, saves and stops,
    and the loader then ends its workers). A terminal's Ctrl-C or a kill of the process group reaches the
    workers too; left to the default, a worker would die (SIGTERM: the trainer's next batch fails) or print a
    KeyboardInterrupt. A worker whose trainer is gone still ends: the loader's watchdog sees it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Loader:
    """Iterable of batches (the batch contract) with ``stats``, ``state_dict()`` and, when finite, ``len()``.

    Iterating a train loader continues where the previous iteration stopped (``step`` counts the
    batches handed out); iterating an eval loader always makes one full pass."""

    def __init__(self, make: Callable[[int], Iterator[dict]], train: bool, start_step: int,
                 length: Optional[int], load_counts: Dict[str, int], meta: dict, oracle: bool = False):
        self._make, self.train, self.step, self._len = make, train, start_step, length
        self.oracle = oracle  # the oracle control (data.oracle_drop): flagged pairs come masked
        self.start_step = start_step
        self.stats = add_counts(zero_counts(), load_counts)
        self.meta = meta

    def __iter__(self) -> Iterator[dict]:
        for batch in self._make(self.step if self.train else self.start_step):
            add_counts(self.stats, batch["bad"])
            if self.train:
                self.step += 1
            yield oracle_drop(batch) if self.oracle else batch

    def __len__(self) -> int:
        if self._len is None:
            raise TypeError("the training loader is infinite")
        return self._len

    def state_dict(self) -> dict:
        """Where the stream stands: rebuild with ``start_step=state["step"]`` and the same other arguments."""
        return {"step": self.step, **self.meta}


def build_loader(cfg, split: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, drop_last: bool = True, sampler: Optional[Sampler] = None) -> Loader:
    """Batches of the ``split`` for one rank (see the module docstring).

    sampler: an index sampler replacing the default shuffling (e.g. a prioritized sampler; it must do its
    own rank sharding; epochs restart it, calling ``set_epoch(e)`` when it has that method). Not for shards.
    For evaluation pass ``drop_last=False`` to see every item.
    """
    _check_split(split)
    train = split == "train"
    dataset = build_dataset(cfg, split)
    meta = {"split": split, "batch_size": batch_size, "rank": rank, "world_size": world_size, "seed": seed,
            "workers": cfg.workers, "kind": cfg.kind}
    if isinstance(dataset, ShardStream):
        if sampler is not None:
            raise ValueError("a sampler override needs a map-style dataset; data.kind=shards streams")
        return _shard_loader(dataset, cfg, batch_size, rank, world_size, seed, start_step, drop_last, train, meta)

    def batches(start: int):
        if sampler is not None:
            return SamplerBatches(sampler, batch_size, drop_last, start, infinite=train)
        return EpochBatchSampler(len(dataset), batch_size, rank, world_size, seed, start, drop_last, shuffle=train)

    def make(start: int) -> Iterator[dict]:
        loader = DataLoader(dataset, batch_sampler=batches(start), num_workers=cfg.workers, collate_fn=collate,
                            worker_init_fn=_ignore_stop_signals)
        with nvtx_range("data/loader"):
            yield from loader

    length = None if train else len(batches(start_step))
    return Loader(make, train, start_step, length, dataset.load_counts, meta, oracle=train and cfg.oracle_drop)


def _shard_loader(dataset: ShardStream, cfg, batch_size, rank, world_size, seed, start_step, drop_last,
                  train, meta) -> Loader:
    """Loader over a shard split: workers stream, decode and collate whole batches."""

    def stream(start: int) -> ShardStream:
        return ShardStream(dataset.split, cfg, batch_size, rank, world_size, seed, start, drop_last, train)

    def make(start: int) -> Iterator[dict]:
        yield from DataLoader(stream(start), batch_size=None, num_workers=cfg.workers, collate_fn=_identity,
                              worker_init_fn=_ignore_stop_signals)

    checked = stream(start_step)  # checks shards per worker now, not at the first batch
    length = None if train else max(0, len(checked) - start_step)
    return Loader(make, train, start_step, length, dataset.load_counts, meta, oracle=train and cfg.oracle_drop)
