"""Loaders of map-style data: rank-disjoint epochs, per-epoch reshuffling, exact resumption from a step
without producing the skipped batches (also with worker processes), sampler override, eval passes."""
import itertools

import pytest
import torch
from torch.utils.data import Sampler

from harmony.config import DataConfig
from harmony.data import BAD_KINDS, build_loader
from harmony.data.sampler import EpochBatchSampler, SamplerBatches
from harmony.data.synthetic import SyntheticDataset


def take(it, n):
    return list(itertools.islice(iter(it), n))


def test_epochs_are_disjoint_across_ranks_and_reshuffled():
    n, world, bs = 103, 3, 8
    samplers = [EpochBatchSampler(n, bs, r, world, seed=11) for r in range(world)]
    nb = samplers[0].batches_per_epoch()
    assert nb == (n // world) // bs == 4
    for epoch in range(3):
        shares = [s.epoch_indices(epoch) for s in samplers]
        flat = torch.cat(shares)
        assert all(len(x) == n // world for x in shares)
        assert len(set(flat.tolist())) == len(flat) == n - n % world  # disjoint, one dropped
        batches = [take(s, (epoch + 1) * nb)[epoch * nb:] for s in samplers]
        for s, share, bl in zip(samplers, shares, batches):
            assert sum(bl, []) == share[: nb * bs].tolist()
    e0, e1 = samplers[0].epoch_indices(0), samplers[0].epoch_indices(1)
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, EpochBatchSampler(n, bs, 0, world, seed=11).epoch_indices(0))
    assert not torch.equal(e0, EpochBatchSampler(n, bs, 0, world, seed=12).epoch_indices(0))


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_from_any_step_equals_skipping(drop_last):
    full = take(EpochBatchSampler(50, 7, 1, 2, seed=3, drop_last=drop_last), 30)
    for k in (0, 1, 3, 4, 7, 11, 20):
        got = take(EpochBatchSampler(50, 7, 1, 2, seed=3, start_step=k, drop_last=drop_last), 30 - k)
        assert got == full[k:], k
    if not drop_last:
        assert [len(b) for b in full[:4]] == [7, 7, 7, 4]  # 25 items per rank and epoch


def test_eval_pass_covers_every_item_once_across_ranks():
    n, world = 37, 3
    seen = []
    for r in range(world):
        s = EpochBatchSampler(n, 5, r, world, shuffle=False, drop_last=False)
        batches = list(s)
        assert len(batches) == len(s)
        seen += sum(batches, [])
    assert sorted(seen) == list(range(n))
    assert len(EpochBatchSampler(n, 5, 0, world, shuffle=False, drop_last=True)) == 2


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        EpochBatchSampler(10, 8, 0, 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_synthetic_loader_resumes_exactly(workers):
    cfg = DataConfig(size=96, eval_size=16, workers=workers)
    fresh = take(build_loader(cfg, "train", 16, seed=7), 9)  # crosses epochs (6 batches per epoch)
    for k in (2, 6, 7):
        resumed = take(build_loader(cfg, "train", 16, seed=7, start_step=k), 9 - k)
        for a, b in zip(fresh[k:], resumed):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])
            assert torch.equal(a["text"], b["text"]) and a["source"] == b["source"]
    epoch0 = torch.cat([b["index"] for b in fresh[:6]])
    assert sorted(epoch0.tolist()) == list(range(96))
    epoch1_start = torch.cat([b["index"] for b in fresh[6:9]])
    assert not torch.equal(epoch0[:48], epoch1_start)  # reshuffled


def test_skipped_batches_are_not_generated(monkeypatch):
    calls = []
    real = SyntheticDataset.generate
    monkeypatch.setattr(SyntheticDataset, "generate", lambda self, i: calls.append(i) or real(self, i))
    cfg = DataConfig(size=64, eval_size=0)
    batch = next(iter(build_loader(cfg, "train", 8, start_step=1000)))
    assert len(calls) == 8 and sorted(calls) == sorted(batch["index"].tolist())


def test_ranks_get_disjoint_batches():
    cfg = DataConfig(size=64, eval_size=0)
    a = torch.cat([b["index"] for b in take(build_loader(cfg, "train", 8, rank=0, world_size=2, seed=1), 4)])
    b = torch.cat([b["index"] for b in take(build_loader(cfg, "train", 8, rank=1, world_size=2, seed=1), 4)])
    assert not set(a.tolist()) & set(b.tolist()) and len(set(a.tolist()) | set(b.tolist())) == 64


def test_train_loader_continues_and_reports_state():
    cfg = DataConfig(size=64, eval_size=0)
    loader = build_loader(cfg, "train", 8, seed=2)
    first = take(loader, 3)
    assert loader.state_dict()["step"] == 3
    again = take(loader, 2)  # a new iteration continues, it does not restart
    ref = take(build_loader(cfg, "train", 8, seed=2), 5)
    assert [b["index"].tolist() for b in first + again] == [b["index"].tolist() for b in ref]
    assert set(loader.stats) == set(BAD_KINDS) and sum(loader.stats.values()) == 0
    with pytest.raises(TypeError):
        len(loader)


def test_eval_loader_length_and_repeatable_passes():
    cfg = DataConfig(size=64, eval_size=50)
    loader = build_loader(cfg, "eval", 16, drop_last=False)
    assert len(loader) == 4
    p1 = [b["index"].tolist() for b in loader]
    p2 = [b["index"].tolist() for b in loader]
    assert p1 == p2 and sum(p1, []) == list(range(50))
    assert not any(bool(b["noisy_text"].any()) for b in loader)


class EpochSeededSampler(Sampler):
    """Random indices with replacement, seeded per epoch (a stand-in for a prioritized sampler)."""

    def __init__(self, n, num, seed):
        self.n, self.num, self.seed, self.epochs = n, num, seed, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randint(0, self.n, (self.num,), generator=g).tolist())

    def __len__(self):
        return self.num


def test_sampler_override_batches_epochs_and_resume():
    cfg = DataConfig(size=64, eval_size=0)
    s = EpochSeededSampler(64, 20, seed=5)
    full = take(build_loader(cfg, "train", 8, sampler=s), 7)  # 2 full batches per epoch (drop_last)
    assert s.epochs[:4] == [0, 1, 2, 3]
    ref = EpochSeededSampler(64, 20, seed=5)
    ref.set_epoch(0)
    assert full[0]["index"].tolist() == list(ref)[:8]
    resumed = take(build_loader(cfg, "train", 8, sampler=EpochSeededSampler(64, 20, seed=5), start_step=3), 4)
    assert [b["index"].tolist() for b in resumed] == [b["index"].tolist() for b in full[3:]]
    finite = SamplerBatches(EpochSeededSampler(64, 20, seed=5), 8, drop_last=False, infinite=False)
    finite.sampler.set_epoch(0)
    assert len(finite) == 3 and [len(b) for b in finite] == [8, 8, 4]


def test_bad_split_name():
    with pytest.raises(ValueError, match="split"):
        build_loader(DataConfig(), "test", 8)


def test_oracle_control_masks_the_flagged_pairs_of_training_batches_only():
    """data.oracle_drop: the training loader hands out every flagged caption's video–text pair and every flagged
    audio track's video–audio pair masked (the sample stays in the batch); evaluation batches are untouched."""
    base = DataConfig(size=64, eval_size=16, frames=2, image_size=8, noise=0.3, noise_bias=0.0, noise_audio=0.25)
    oracle = DataConfig(**{**base.__dict__, "oracle_drop": True})
    plain_b = next(iter(build_loader(base, "train", 32, seed=3)))
    orc_b = next(iter(build_loader(oracle, "train", 32, seed=3)))
    assert torch.equal(plain_b["index"], orc_b["index"]) and plain_b["mask_vt"].all() and plain_b["mask_va"].all()
    nt, na = plain_b["noisy_text"].bool(), plain_b["noisy_audio"].bool()
    assert nt.any() and na.any() and (~nt).any()
    assert torch.equal(orc_b["mask_vt"].bool(), ~nt) and torch.equal(orc_b["mask_va"].bool(), ~na)
    ev = next(iter(build_loader(oracle, "eval", 16, drop_last=False)))
    assert ev["mask_vt"].all() and ev["mask_va"].all()
