"""Exporter round trip: synthetic items written as mp4/wav/txt + manifest + WebDataset shards and read back
through the manifest and shard sources match the generated items."""
import json
import tarfile

import numpy as np
import pytest
import torch

from harmony.config import ConfigError, DataConfig
from harmony.data import build_dataset
from harmony.data.export import main
from harmony.data.synthetic import SyntheticDataset

N = 6


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert main(["--out", str(out), "--n", str(N), "--shards", "2", "--data.noise=0.5", "--data.seed=4"]) == 0
    cfg = DataConfig(noise=0.5, seed=4)
    originals = [SyntheticDataset(cfg)[i] for i in range(N)]
    return out, originals


def test_files_manifest_and_shards_are_written(exported):
    out, originals = exported
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(N))
    assert [x["label"] for x in lines] == [o["concept"] for o in originals]
    assert [x["noisy_text"] for x in lines] == [o["noisy_text"] for o in originals]
    for x in lines:
        for ext in ("mp4", "wav", "txt"):
            assert (out / x["path"]).with_suffix("." + ext).stat().st_size > 0
    names = []
    for shard in sorted((out / "shards").glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            names.append(tf.getnames())
    assert len(names) == 2 and sum(len(n) for n in names) == 4 * N
    assert sorted(names[0][:4]) == ["00000000.json", "00000000.mp4", "00000000.txt", "00000000.wav"]


def compare(item, orig, audio_exact):
    assert torch.equal(item["text"], orig["text"])
    assert item["concept"] == orig["concept"] and item["mask_va"] and item["mask_vt"]
    dv = (item["video"] - orig["video"]).abs()
    a, b = orig["audio"].double().numpy(), item["audio"].double().numpy()
    lag = int(np.argmax(np.correlate(b, a, "full"))) - (len(a) - 1)
    corr = float(np.corrcoef(a, b)[0, 1])
    da = float((item["audio"] - orig["audio"]).abs().max())
    print(f"video mean {float(dv.mean()):.4f} max {float(dv.max()):.4f} | audio corr {corr:.5f} lag {lag} "
          f"max diff {da:.2e}")
    assert float(dv.mean()) < 0.005 and float(dv.max()) < 0.05  # lossless H.264 4:4:4 up to RGB↔YUV rounding
    assert lag == 0 and corr > 0.99                              # AAC is lossy but in sync
    if audio_exact:
        assert da <= 1.0 / 32768 + 1e-6                          # 16-bit PCM wav


def test_round_trip_through_the_manifest(exported):
    out, originals = exported
    cfg = DataConfig.clips(kind="manifest", manifest=str(out / "manifest.jsonl"), eval_size=0, seed=4)
    ds = build_dataset(cfg, "train")
    assert len(ds) == N
    for i in range(N):
        item = ds[i]
        assert item["index"] == i and item["source"] == "synthetic" and sum(item["bad"].values()) == 0
        compare(item, originals[i], audio_exact=False)


def test_round_trip_through_the_shards(exported):
    out, originals = exported
    cfg = DataConfig.clips(kind="shards", shards=str(out / "shards" / "shard-*.tar"), eval_size=0, seed=4)
    items = list(build_dataset(cfg, "train"))
    assert [it["index"] for it in items] == list(range(N))
    for item, orig in zip(items, originals):
        assert item["source"] == "synthetic"
        compare(item, orig, audio_exact=True)


def test_cli_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.nope"):
        main(["--out", str(tmp_path), "--n", "2", "--data.nope=3"])
    with pytest.raises(ValueError, match="--shards"):
        main(["--out", str(tmp_path), "--n", "2", "--shards", "3"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--n", "2", "--bogus"])


@pytest.mark.parametrize("frames,audio_seconds", [(4, 1.0), (16, 0.75)])
def test_round_trip_when_audio_and_video_lengths_differ(tmp_path, frames, audio_seconds):
    # 0.5 s of video with 1 s of audio, and 2 s of video with 0.75 s of audio: laid out concentric
    kw = dict(frames=frames, fps=8.0, audio_seconds=audio_seconds, image_size=16, sample_rate=8000)
    main(["--out", str(tmp_path), "--n", "2"] + [f"--data.{k}={v}" for k, v in kw.items()])
    originals = [SyntheticDataset(DataConfig(**kw))[i] for i in range(2)]
    via_manifest = build_dataset(DataConfig.clips(kind="manifest", manifest=str(tmp_path / "manifest.jsonl"),
                                            eval_size=0, **kw), "train")
    via_shards = list(build_dataset(DataConfig.clips(kind="shards", shards=str(tmp_path / "shards" / "*.tar"),
                                               eval_size=0, **kw), "train"))
    for i, orig in enumerate(originals):
        compare(via_manifest[i], orig, audio_exact=False)
        compare(via_shards[i], orig, audio_exact=True)
