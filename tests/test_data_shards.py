"""WebDataset shards: indexing, rank/worker shard assignment, per-shard shuffling, exact resumption (also with
bad samples and worker processes), held-out split, and the shards-per-worker check."""
import io
import itertools
import tarfile

import pytest
import torch

from harmony.config import DataConfig
from harmony.data import build_dataset, build_loader
from harmony.data import shards as shards_mod
from harmony.data.export import export
from harmony.data.shards import ShardStream, build_shard_splits, expand_pattern, scan_shard

N, SHARDS = 16, 4


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    export(DataConfig(frames=4, image_size=16, sample_rate=4000), str(out), N, SHARDS)
    return out


def cfg_for(shard_dir, **kw):
    base = dict(kind="shards", shards=str(shard_dir / "shards" / "shard-{000000..000003}.tar"), eval_size=0,
                frames=4, image_size=16, sample_rate=4000, shuffle_buffer=3)
    base.update(kw)
    return DataConfig.clips(**base)


def take(it, n):
    return list(itertools.islice(iter(it), n))


def ids(batches):
    return [b["index"].tolist() for b in batches]


def test_pattern_and_scan(shard_dir):
    paths = expand_pattern(str(shard_dir / "shards" / "shard-{000000..000003}.tar"))
    assert paths == expand_pattern(str(shard_dir / "shards" / "shard-*.tar"))
    counts = {}
    assert [len(scan_shard(p, counts)) for p in paths] == [4, 4, 4, 4]
    with pytest.raises(FileNotFoundError):
        expand_pattern(str(shard_dir / "nothing-*.tar"))


def test_item_stream_in_order(shard_dir):
    ds = build_dataset(cfg_for(shard_dir), "train")
    assert isinstance(ds, ShardStream) and len(ds) == N
    items = list(ds)
    assert [it["index"] for it in items] == list(range(N))
    assert items[0]["video"].shape == (3, 4, 16, 16) and items[0]["audio"].shape == (4000,)


def test_ranks_take_disjoint_shards_each_epoch(shard_dir):
    cfg = cfg_for(shard_dir)
    per_rank = [ids(take(build_loader(cfg, "train", 4, rank=r, world_size=2, seed=9), 6)) for r in range(2)]
    for epoch in range(3):  # 8 items = 2 batches per rank and epoch
        a = sum(per_rank[0][2 * epoch:2 * epoch + 2], [])
        b = sum(per_rank[1][2 * epoch:2 * epoch + 2], [])
        assert not set(a) & set(b) and sorted(a + b) == list(range(N))
        shard_of = lambda xs: {i // 4 for i in xs}  # noqa: E731
        assert len(shard_of(a)) == 2 and not shard_of(a) & shard_of(b)
    assert per_rank[0][:2] != per_rank[0][2:4]  # a new shard order / shuffle each epoch


def test_shuffle_buffer_permutes_within_shards(shard_dir):
    stream = ShardStream(build_shard_splits(cfg_for(shard_dir))[0], cfg_for(shard_dir), train=True, seed=1)
    order = [j for _, j in stream._shard_samples(2, epoch=0)]
    assert sorted(order) == [8, 9, 10, 11] and order != [8, 9, 10, 11]
    assert order == [j for _, j in stream._shard_samples(2, epoch=0)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(shard_dir, workers):
    cfg = cfg_for(shard_dir, workers=workers)
    fresh = take(build_loader(cfg, "train", 3, seed=5), 12)
    for k in (1, 4, 7):
        resumed = take(build_loader(cfg, "train", 3, seed=5, start_step=k), 12 - k)
        assert ids(resumed) == ids(fresh[k:]), k
        assert all(torch.equal(a["video"], b["video"]) for a, b in zip(resumed, fresh[k:]))


def test_skipped_items_are_not_decoded(shard_dir, monkeypatch):
    decoded = []
    real = shards_mod.load_item
    monkeypatch.setattr(shards_mod, "load_item", lambda rec, cfg, counts: decoded.append(rec.index) or
                        real(rec, cfg, counts))
    batch = next(iter(build_loader(cfg_for(shard_dir), "train", 3, start_step=9)))
    assert sorted(decoded) == sorted(batch["index"].tolist())


def test_every_worker_needs_a_shard(shard_dir):
    with pytest.raises(ValueError, match="every DataLoader worker needs at least one shard"):
        build_loader(cfg_for(shard_dir, workers=3), "train", 2, world_size=2)


def test_held_out_split(shard_dir):
    cfg = cfg_for(shard_dir, eval_size=100)
    train, held = build_shard_splits(cfg)
    assert len(held) == 1 and len(train) == N - 1  # min(eval_size, n // 10)
    tr = {(p, k) for p, ks in zip(train.shards, train.keys) for k in ks}
    he = {(p, k) for p, ks in zip(held.shards, held.keys) for k in ks}
    assert not tr & he
    ev = build_loader(cfg, "eval", 4, drop_last=False)
    assert len(ev) == 1 and ids(list(ev)) == [[0]]
    seen = set(sum(ids(take(build_loader(cfg, "train", 3), 5)), []))
    assert len(seen) == 15 and max(seen) == 14  # dense train indices
    explicit = cfg_for(shard_dir, eval_shards=str(shard_dir / "shards" / "shard-000003.tar"))
    assert len(build_dataset(explicit, "eval")) == 4 and len(build_dataset(explicit, "train")) == N


@pytest.fixture(scope="module")
def bad_shards(shard_dir, tmp_path_factory):
    """Copies of the shards where shard 1 holds a sample with no video, one with an undecodable mp4, and a
    truncated tail."""
    out = tmp_path_factory.mktemp("bad_shards")
    for s in range(SHARDS):
        src = shard_dir / "shards" / f"shard-{s:06d}.tar"
        dst = out / src.name
        if s != 1:
            dst.write_bytes(src.read_bytes())
            continue
        with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
            for m in tin.getmembers():
                data = tin.extractfile(m).read()
                if m.name == "00000004.mp4":
                    continue                      # sample 4: no video member
                if m.name == "00000005.mp4":
                    data = b"\x00garbage" * 50    # sample 5: undecodable
                info = tarfile.TarInfo(m.name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
    raw = (out / "shard-000001.tar").read_bytes()
    marker = raw.find(b"00000007.wav")
    (out / "shard-000001.tar").write_bytes(raw[: marker + 1024])  # cut inside sample 7
    return out


def test_bad_samples_are_replaced_counted_and_resume_stays_exact(bad_shards):
    cfg = cfg_for(bad_shards, shards=str(bad_shards / "shard-*.tar"), shuffle_buffer=0)
    split = build_shard_splits(cfg)[0]
    assert [len(k) for k in split.keys] == [4, 3, 4, 4] and split.counts["decode_error"] == 1
    items = list(build_dataset(cfg, "train"))
    got = [(it["index"], {k: v for k, v in it["bad"].items() if v}) for it in items[4:7]]
    print(got)
    assert got == [(6, {"no_video": 1}), (6, {"decode_error": 1}), (6, {})]
    cfg.workers = 2
    loader = build_loader(cfg, "train", 3, seed=2)
    fresh = take(loader, 10)  # 30 items: two epochs of 15
    print(loader.stats)
    assert loader.stats["no_video"] == 2 and loader.stats["decode_error"] == 1 + 2
    for k in (1, 2, 5):
        assert ids(take(build_loader(cfg, "train", 3, seed=2, start_step=k), 10 - k)) == ids(fresh[k:])
