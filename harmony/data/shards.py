"""WebDataset tar shards, streamed by DataLoader workers, rank-aware and exactly resumable (docs/DATA.md "Shards").

Layout: plain (uncompressed) POSIX tars; members grouped by key, WebDataset style (``<key>.<ext>``):
``<key>.mp4`` (or webm/mkv/mov/avi/mpg: the clip, usually with its audio), optional ``<key>.wav`` (or
flac/mp3/ogg/m4a: audio used instead of the container's), ``<key>.txt`` (the caption, UTF-8) and optional
``<key>.json`` (``{"id", "source", "label", "start", "end", "align": [[start_s, end_s, word], ...]}``).

Indexing. On construction every shard's tar headers are read (not the data) to list its keys, which
gives stable dense item indices (shard order of the pattern, then tar order), the split sizes and the
lengths of finite loaders. Without ``data.eval_shards`` the eval split is min(eval_size, max(1, n // 10))
items held out by a stable hash of (seed, shard name, key); the train stream skips them.

Streaming. Epoch e orders the shards by a permutation from (seed, e); rank r takes shards r, r+world, ...
of that order, and logical worker w of the rank takes every W-th of those (W = max(1, data.workers));
so there must be at least world × W shards. Inside a shard, samples pass through a shuffle buffer of
``data.shuffle_buffer`` raw samples seeded by (seed, e, shard). Each worker turns its own item stream
(continuous across epochs) into batches; the DataLoader takes batches from workers round-robin, so
global batch k comes from logical worker k mod W.

Resumption granularity: one batch. ``start_step=k`` makes logical worker w skip the ⌈(k−w)/W⌉ batches
it made before step k: whole epochs and whole shards are skipped by arithmetic on the indexed shard
lengths, and inside the one shard where the position falls, raw samples are read and dropped without
decoding. The physical workers are rotated so that the first batch out is global batch k. The state is
therefore (epoch, shard order, items consumed) per logical worker, all derived from k; changing the batch
size, world size or worker count changes the stream (``Loader.state_dict`` records them).

Bad samples (no video member, undecodable clip, unreadable shard tail) take the next usable sample of the
same worker's stream (looked ahead, so positions never shift and resumption stays exact), counted.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from harmony.data.batch import collate, note_bad, zero_counts
from harmony.data.decode import ClipError
from harmony.data.item import ClipRecord, load_item
from harmony.data.manifest import MAX_REPLACEMENTS
from harmony.data.sampler import epoch_permutation
from harmony.nvtx import nvtx_range

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "mpg", "mpeg")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg", "m4a")
_META = re.compile(r"__[^/]*__($|/)")


def expand_pattern(pattern: str) -> List[str]:
    """Shard paths of a brace pattern and/or glob (``data/shard-{000000..000009}.tar``, ``data/*.tar``)."""
    paths: List[str] = []
    for part in braceexpand(pattern):
        paths.extend(sorted(glob.glob(part)) if glob.has_magic(part) else [part])
    if not paths:
        raise FileNotFoundError(f"data.shards={pattern!r} matches no file")
    return paths


def scan_shard(path: str, counts: Dict[str, int]) -> List[str]:
    """Sample keys of one tar in order, from its headers. A truncated or damaged tail is cut off together
    with the sample it interrupts (whose members may be incomplete), counted once as ``decode_error``."""
    keys: List[str] = []
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tf:
            for info in tf:
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"truncated inside member {info.name}")
                if not info.isreg() or _META.match(info.name):
                    continue
                key, _ = base_plus_ext(info.name)
                if key is not None and (not keys or keys[-1] != key):
                    keys.append(key)
    except FileNotFoundError:
        note_bad(counts, "missing_file", f"shard {path} does not exist", path)
    except (tarfile.TarError, OSError) as exc:
        note_bad(counts, "decode_error", f"shard {path}: {exc}; its last {1 if keys else 0} sample(s) dropped",
                 path)
        keys = keys[:-1]
    return keys


@dataclass
class ShardSplit:
    """The items of one split: shards that hold any, and per shard the split's keys in tar order."""

    shards: List[str] = field(default_factory=list)
    keys: List[List[str]] = field(default_factory=list)
    counts: Dict[str, int] = field(default_factory=zero_counts)

    def __post_init__(self):
        self.first = list(np.cumsum([0] + [len(k) for k in self.keys])[:-1])

    def __len__(self) -> int:
        return int(sum(len(k) for k in self.keys))


def _split_from(paths: List[str], keys: List[List[str]], keep, counts) -> ShardSplit:
    """ShardSplit of the keys for which ``keep(shard_path, key)`` holds (empty shards dropped)."""
    shards, kept = [], []
    for path, ks in zip(paths, keys):
        sel = [k for k in ks if keep(path, k)]
        if sel:
            shards.append(path)
            kept.append(sel)
    return ShardSplit(shards, kept, counts)


def build_shard_splits(cfg) -> Tuple[ShardSplit, ShardSplit]:
    """(train, eval) splits of ``data.shards`` (eval: ``data.eval_shards`` or a hashed hold-out)."""
    if not cfg.shards:
        raise ValueError("data.kind=shards needs --data.shards=PATTERN (brace pattern or glob of .tar files)")
    counts = zero_counts()
    paths = expand_pattern(cfg.shards)
    keys = [scan_shard(p, counts) for p in paths]
    if cfg.eval_shards:
        eval_counts = zero_counts()
        eval_paths = expand_pattern(cfg.eval_shards)
        eval_keys = [scan_shard(p, eval_counts) for p in eval_paths]
        return (_split_from(paths, keys, lambda p, k: True, counts),
                _split_from(eval_paths, eval_keys, lambda p, k: True, eval_counts))
    tag = lambda p, k: f"{os.path.basename(p)}/{k}"  # noqa: E731
    every = [tag(p, k) for p, ks in zip(paths, keys) for k in ks]
    n = len(every)
    n_eval = 0 if n < 2 else min(cfg.eval_size, max(1, n // 10))
    held = set(sorted(every, key=lambda t: (zlib.crc32(f"{cfg.seed}:{t}".encode()), t))[:n_eval])
    return (_split_from(paths, keys, lambda p, k: tag(p, k) not in held, counts),
            _split_from(paths, keys, lambda p, k: tag(p, k) in held, zero_counts()))


def read_shard(path: str, wanted: List[str]) -> Iterator[Tuple[int, dict]]:
    """(position in ``wanted``, raw sample {ext: bytes, "__key__"}) for the ``wanted`` keys of a shard, in
    order; a key that cannot be read (shard vanished or damaged since indexing) gives a ``__missing__``
    placeholder, so every position is produced exactly once."""
    pos = 0
    error = "not found in the shard"
    if wanted:
        try:
            with open(path, "rb") as f:
                files = ({**s, "__url__": path} for s in tar_file_iterator(f))
                for sample in group_by_keys(files):
                    if pos < len(wanted) and sample["__key__"] == wanted[pos]:
                        yield pos, sample
                        pos += 1
                        if pos == len(wanted):
                            return
        except Exception as exc:  # an unreadable tail: the rest becomes placeholders
            error = repr(exc)
    for j in range(pos, len(wanted)):
        yield j, {"__key__": wanted[j], "__missing__": error, "__url__": path}


def shuffled(samples: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Buffer shuffle: keep ``size`` samples, emit a random one as each new one arrives, then the rest."""
    if size <= 1:
        yield from samples
        return
    buf: List[dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = s
    for j in rng.permutation(len(buf)):
        yield buf[j]


def sample_record(sample: dict, index: int) -> ClipRecord:
    """Raw shard sample → ClipRecord; ``ClipError`` when it has no video member or was unreadable."""
    name = f"{os.path.basename(sample.get('__url__', '?'))}/{sample['__key__']}"
    if "__missing__" in sample:
        raise ClipError("missing_file", f"{name}: {sample['__missing__']}")
    video = next((sample[e] for e in VIDEO_EXTS if e in sample), None)
    if video is None:
        raise ClipError("no_video", f"{name} has no video member ({'/'.join(VIDEO_EXTS)})")
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
            meta = meta if isinstance(meta, dict) else {}
        except ValueError:
            meta = {}
    text, text_ok = meta.get("text"), True
    if "txt" in sample:
        try:
            text = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            text_ok = False
    label = meta.get("label")
    stem = os.path.splitext(os.path.basename(sample.get("__url__", "shards")))[0]
    num = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # noqa: E731
    return ClipRecord(video=video, text=text, text_ok=text_ok, align=meta.get("align"),
                      start=num(meta.get("start")), end=num(meta.get("end")),
                      audio=next((sample[e] for e in AUDIO_EXTS if e in sample), None),
                      source=str(meta.get("source") or stem),
                      label=label if isinstance(label, int) and not isinstance(label, bool) else -1,
                      index=index, name=name)


class ShardStream(IterableDataset):
    """Item or batch stream of a shard split for one rank (see the module docstring).

    batch_size None: items, one pass (what ``build_dataset`` returns); else batches (``build_loader``):
    infinite over epochs when ``train``, else one pass.
    """

    def __init__(self, split: ShardSplit, cfg, batch_size: Optional[int] = None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, start_step: int = 0, drop_last: bool = True,
                 train: bool = False):
        self.split, self.cfg = split, cfg
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.seed, self.start_step, self.drop_last, self.train = seed, start_step, drop_last, train
        self.workers = max(1, cfg.workers)
        self.load_counts = split.counts
        if train and len(split.shards) < world_size * self.workers:
            raise ValueError(f"{len(split.shards)} shard(s) with training items for {world_size} rank(s) x "
                             f"{self.workers} worker(s): every DataLoader worker needs at least one shard; "
                             f"write at least {world_size * self.workers} shards or lower data.workers")

    def __len__(self) -> int:
        """Items of this rank (batch_size None) or batches of one pass (finite streams only)."""
        if self.train and self.batch_size is not None:
            raise TypeError("the training stream is infinite")
        if self.batch_size is None:
            return self._worker_items(0, 0, 1)
        bs = self.batch_size
        return sum((n // bs if self.drop_last else -(-n // bs))
                   for n in (self._worker_items(0, w, self.workers) for w in range(self.workers)))

    # -- which shards, which items ------------------------------------------------------------------
    def _worker_shards(self, epoch: int, worker: int, workers: int) -> List[int]:
        """Shard ids that logical ``worker`` of ``workers`` on this rank reads in ``epoch``."""
        n = len(self.split.shards)
        order = epoch_permutation(n, self.seed, epoch).tolist() if self.train else list(range(n))
        return order[self.rank::self.world][worker::workers]

    def _worker_items(self, epoch: int, worker: int, workers: int) -> int:
        return sum(len(self.split.keys[s]) for s in self._worker_shards(epoch, worker, workers))

    def _shard_samples(self, shard: int, epoch: int) -> Iterator[Tuple[dict, int]]:
        """(raw sample, dense index) of one shard in this epoch's order."""
        raw = read_shard(self.split.shards[shard], self.split.keys[shard])
        if self.train:
            rng = np.random.Generator(np.random.SFC64([self.seed % 2 ** 63, epoch, shard]))
            raw = shuffled(raw, self.cfg.shuffle_buffer, rng)
        for j, sample in raw:
            yield sample, int(self.split.first[shard]) + j

    def _raw_items(self, worker: int, workers: int, skip: int) -> Iterator[Tuple[dict, int]]:
        """The worker's raw item stream from position ``skip`` (skipped by arithmetic where possible)."""
        epoch = 0
        while True:
            shards = self._worker_shards(epoch, worker, workers)
            total = sum(len(self.split.keys[s]) for s in shards)
            if self.train and skip >= total > 0:
                skip -= total
                epoch += 1
                continue
            for s in shards:
                n = len(self.split.keys[s])
                if skip >= n:
                    skip -= n
                    continue
                for j, entry in enumerate(self._shard_samples(s, epoch)):
                    if j >= skip:
                        yield entry
                skip = 0
            if not self.train or total == 0:
                return
            epoch += 1

    # -- decoding -----------------------------------------------------------------------------------
    def _decode(self, raw: Tuple[dict, int]) -> Tuple[Optional[dict], Dict[str, int]]:
        counts = zero_counts()
        sample = raw[0]
        name = f"{os.path.basename(sample.get('__url__', '?'))}/{sample.get('__key__', '?')}"
        try:
            item = load_item(sample_record(*raw), self.cfg, counts)
        except ClipError as exc:
            note_bad(counts, exc.kind, exc.detail, name)
            return None, counts
        return item, counts

    def _items(self, raw: Iterator[Tuple[dict, int]]) -> Iterator[dict]:
        """Decoded items, one per raw position; a bad one is replaced by the next good one ahead (or the
        last good one at the end of a finite stream)."""
        raw = iter(raw)
        ahead: deque = deque()  # [raw entry, decoded result or None]

        def peek(j: int):
            while len(ahead) <= j:
                entry = next(raw, None)
                if entry is None:
                    return None
                ahead.append([entry, None])
            if ahead[j][1] is None:
                ahead[j][1] = self._decode(ahead[j][0])
            return ahead[j][1]

        last_good, dropped = None, 0
        while peek(0) is not None:
            item, counts = ahead.popleft()[1]
            if item is None:
                item = next((r[0] for j in range(MAX_REPLACEMENTS) if (r := peek(j)) is not None
                             and r[0] is not None), last_good)
                if item is None:  # nothing decodable before or near: the position is dropped (counted)
                    dropped += 1
                    if dropped > max(len(self.split), MAX_REPLACEMENTS):  # an endless train stream of junk
                        raise RuntimeError(f"{dropped} samples in a row from {self.split.shards} have no usable "
                                           "video; check the shards")
                    continue
                item = dict(item)
            else:
                last_good, dropped = item, 0
            item["bad"] = counts
            yield item

    # -- iteration ----------------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        if self.batch_size is None:  # plain item stream: split the shards among whatever workers run it
            worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
            yield from self._items(self._raw_items(worker, workers, 0))
            return
        if (info.num_workers if info is not None else 1) != self.workers:
            raise RuntimeError(f"batch stream built for {self.workers} worker(s) runs under "
                               f"{info.num_workers if info is not None else 0} DataLoader workers")
        # Rotate: physical worker 0 plays the logical worker that makes global batch start_step.
        worker = ((info.id if info is not None else 0) + self.start_step) % self.workers
        bs = self.batch_size
        skip_batches = max(0, -(-(self.start_step - worker) // self.workers))
        with nvtx_range("data/shards"):
            batch: List[dict] = []
            for item in self._items(self._raw_items(worker, self.workers, skip_batches * bs)):
                batch.append(item)
                if len(batch) == bs:
                    yield collate(batch)
                    batch = []
            if batch and not self.drop_last:
                yield collate(batch)

