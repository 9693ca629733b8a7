"""Manifest source: the GRID manifest end to end, and every bad-input case of docs/DATA.md — skipped or masked,
counted, warned once per kind, never NaN — also through DataLoader worker processes."""
import json
import logging
import os
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from harmony.config import DataConfig
from harmony.data import BAD_KINDS, build_dataset, build_loader
from harmony.data.batch import reset_warnings
from harmony.data.manifest import label_map, read_manifest, split_entries
from harmony.data.text import tokenize


def grid_dir() -> Path:
    d = Path(os.environ.get("HARMONY_GRID_DIR",
                            Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "grid"))
    if not (d / "manifest.jsonl").exists():
        pytest.skip(f"GRID test clips not found at {d} (set HARMONY_GRID_DIR)")
    return d


def grid_entries():
    return [json.loads(x) for x in (grid_dir() / "manifest.jsonl").read_text().splitlines() if x.strip()]


def write_clip(path, video=True, audio=True, seconds=2, fps=10, rate=16000):
    """A small mp4 with moving grey frames and/or a 440 Hz tone."""
    with av.open(str(path), mode="w") as out:
        if video:
            vs = out.add_stream("libx264", rate=fps)
            vs.width, vs.height, vs.pix_fmt = 48, 32, "yuv420p"
            for k in range(seconds * fps):
                frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 40 + 3 * k, np.uint8), format="rgb24")
                frame.pts, frame.time_base = k, Fraction(1, fps)
                out.mux(vs.encode(frame))
            out.mux(vs.encode(None))
        if audio:
            aus = out.add_stream("aac", rate=rate)
            aus.layout = "mono"
            t = np.arange(seconds * rate) / rate
            frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                               format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
            out.mux(aus.encode(frame))
            out.mux(aus.encode(None))


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory):
    """A manifest mixing good GRID clips with every kind of bad input. Returns (path, expectations)."""
    root = tmp_path_factory.mktemp("bad")
    g = grid_dir()
    entries = grid_entries()
    mp4 = next(e for e in entries if e["path"].endswith(".mp4"))
    mpg = next(e for e in entries if e["path"].endswith(".mpg"))
    (root / "clips").mkdir()
    (root / "align").mkdir()
    for e in (mp4, mpg):
        shutil.copy(g / e["path"], root / "clips" / Path(e["path"]).name)
        shutil.copy(g / e["align"], root / "align" / Path(e["align"]).name)
    data = (g / mp4["path"]).read_bytes()
    (root / "clips" / "cut.mp4").write_bytes(data[: len(data) // 2])   # moov atom at the end: cut short
    data = (g / mpg["path"]).read_bytes()
    (root / "clips" / "cut.mpg").write_bytes(data[: len(data) // 2])   # MPEG-PS: decodes up to the cut
    write_clip(root / "clips" / "audio_only.mp4", video=False)
    write_clip(root / "clips" / "video_only.mp4", audio=False)
    good_mp4 = {"path": "clips/" + Path(mp4["path"]).name, "text": mp4["text"],
                "align": "align/" + Path(mp4["align"]).name, "source": "grid_s1"}
    lines = [
        json.dumps(good_mp4).encode(),                                                      # 0 good
        json.dumps({"path": "clips/cut.mp4", "text": "cut clip"}).encode(),                 # 1 truncated
        json.dumps({"path": "clips/audio_only.mp4", "text": "sound only"}).encode(),        # 2 no_video
        json.dumps({"path": "clips/video_only.mp4", "text": "pictures only"}).encode(),     # 3 no_audio
        json.dumps({"path": "clips/video_only.mp4", "text": "  ...  "}).encode(),           # 4 empty caption
        b'{"path": "clips/video_only.mp4", "text": "caf\xe9 au lait"}',                     # 5 not UTF-8
        json.dumps({"path": "clips/gone.mp4", "text": "missing"}).encode(),                 # 6 missing_file
        b'{"path": "clips/broken.mp4", "text": ',                                           # bad JSON: dropped
        json.dumps({**good_mp4, "align": "align/none.align"}).encode(),                     # 7 bad_align
        json.dumps({"path": "clips/" + Path(mpg["path"]).name, "text": mpg["text"],
                    "align": "align/" + Path(mpg["align"]).name, "id": mpg["id"]}).encode(),  # 8 good mpg
        json.dumps({"path": "clips/cut.mpg", "text": mpg["text"], "end": 3.0}).encode(),   # 9 truncated
    ]
    path = root / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    return path


def test_manifest_reading_counts_bad_lines_and_flags_non_utf8(bad_manifest):
    entries, counts = read_manifest(str(bad_manifest))
    assert len(entries) == 10 and counts["bad_line"] == 1
    assert [e["_text_ok"] for e in entries] == [True] * 5 + [False] + [True] * 4


def test_every_bad_case_is_masked_or_replaced_and_counted(bad_manifest, caplog):
    cfg = DataConfig.clips(kind="manifest", manifest=str(bad_manifest), eval_size=0, frames=4, fps=4.0,
                     image_size=16, sample_rate=8000, candidates=2)
    ds = build_dataset(cfg, "train")
    assert len(ds) == 10 and ds.load_counts["bad_line"] == 1
    reset_warnings()
    caplog.clear()  # what reading the manifest warned
    with caplog.at_level(logging.WARNING, logger="harmony.data"):
        items = [ds[i] for i in range(len(ds))]
    caught = list(caplog.records)
    for i, it in enumerate(items):
        assert torch.isfinite(it["video"]).all() and torch.isfinite(it["audio"]).all()
        assert it["video"].shape == (3, 4, 16, 16) and it["audio"].shape == (8000,)
        assert it["text"].shape == (2, 16)
        print(i, it["index"], it["mask_va"], it["mask_vt"], {k: v for k, v in it["bad"].items() if v})
    bad = lambda i: {k: v for k, v in items[i]["bad"].items() if v}  # noqa: E731
    # 0: good GRID clip, caption = aligned words of the window
    assert items[0]["mask_va"] and items[0]["mask_vt"] and bad(0) == {} and items[0]["source"] == "grid_s1"
    # 1: undecodable → replaced by 2, which has no video → replaced by 3 (video only)
    assert items[1]["index"] == 3 and bad(1) == {"truncated": 1, "no_video": 1, "no_audio": 1}
    assert items[2]["index"] == 3 and bad(2) == {"no_video": 1, "no_audio": 1}
    # 3: no audio stream → audio zeros, masked
    assert items[3]["index"] == 3 and not items[3]["mask_va"] and items[3]["audio"].eq(0).all()
    assert items[3]["mask_vt"] and bad(3) == {"no_audio": 1}
    # 4: empty caption, 5: not UTF-8 → text zeros, masked
    for i, kind in ((4, "empty_caption"), (5, "bad_caption")):
        assert not items[i]["mask_vt"] and items[i]["text"].eq(0).all() and bad(i) == {"no_audio": 1, kind: 1}
    # 6: missing file → replaced by 7 (its align file is missing: the full caption is used)
    assert items[6]["index"] == 7 and bad(6) == {"missing_file": 1, "bad_align": 1}
    assert torch.equal(items[7]["text"][0], tokenize(grid_entries_text(bad_manifest, 7), 16))
    assert items[7]["text"][1].eq(0).all()  # no align: no neighbouring-window candidate
    # 8: MPEG-PS original with its align file; source defaults to the manifest stem
    assert items[8]["mask_va"] and items[8]["mask_vt"] and items[8]["source"] == "bad"
    # 9: an MPEG-PS file cut at 1.5 s, the manifest says the clip lasts 3 s: the window [1, 2) is half
    # decoded → kept (last frame repeated, audio zero after the cut), counted
    assert items[9]["index"] == 9 and items[9]["mask_va"] and bad(9) == {"truncated": 1}
    assert items[9]["audio"][4000:].abs().max() < 1e-3 < items[9]["audio"][:3000].abs().max()
    assert torch.equal(items[9]["video"][:, 2], items[9]["video"][:, 3])
    # one warning per kind, however many times it occurred
    kinds = [r.getMessage().split(":")[1].strip() for r in caught if r.name == "harmony.data"]
    print(kinds)
    assert sorted(kinds) == sorted(set(kinds))
    assert set(kinds) == {"no_video", "no_audio", "empty_caption", "bad_caption", "missing_file",
                          "bad_align", "truncated"}


def grid_entries_text(manifest, i):
    entries, _ = read_manifest(str(manifest))
    return entries[i]["text"]


def test_all_bad_run_raises_clearly(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps({"path": f"gone{i}.mp4", "text": "x"}) for i in range(3)))
    ds = build_dataset(DataConfig.clips(kind="manifest", manifest=str(path), eval_size=0), "train")
    with pytest.raises(RuntimeError, match="no usable video"):
        ds[0]


def test_counts_survive_worker_processes(bad_manifest):
    cfg = DataConfig.clips(kind="manifest", manifest=str(bad_manifest), eval_manifest=str(bad_manifest), frames=4,
                     fps=4.0, image_size=16, sample_rate=8000, workers=2)
    ds = build_dataset(cfg, "eval")
    want = dict(ds.load_counts)
    for i in range(len(ds)):
        for k, v in ds[i]["bad"].items():
            want[k] += v
    loader = build_loader(cfg, "eval", batch_size=3, drop_last=False)
    assert len(loader) == 4
    batches = list(loader)
    assert sum(len(b["index"]) for b in batches) == 10
    print(loader.stats, want)
    assert set(loader.stats) == set(BAD_KINDS)
    assert loader.stats == want and want["no_audio"] > 0 and want["bad_line"] == 1


def test_grid_manifest_end_to_end():
    g = grid_dir()
    cfg = DataConfig.clips(kind="manifest", manifest=str(g / "manifest.jsonl"), frames=8, fps=8.0, image_size=32)
    train, held = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    assert len(train) + len(held) == len(grid_entries()) and len(held) == len(grid_entries()) // 10
    names = lambda ds: {r.name for r in ds.records}  # noqa: E731
    assert not names(train) & names(held)
    assert names(build_dataset(cfg, "eval")) == names(held)  # deterministic split
    for ds, i in ((train, 0), (train, len(train) - 1), (held, 0)):
        it = ds[i]
        assert it["video"].shape == (3, 8, 32, 32) and it["audio"].shape == (8000,)
        assert it["mask_va"] and it["mask_vt"] and it["concept"] == -1 and it["source"] == "grid_s1"
        assert it["index"] == i and sum(it["bad"].values()) == 0
        rec = ds.records[i]
        sentence = set(rec.text.split())
        caption_ids = set(it["text"][0][it["text"][0] > 0].tolist())
        assert caption_ids <= set(tokenize(rec.text, 16).tolist())  # window words come from the sentence
        assert 0 < len(caption_ids) <= len(sentence)


def test_split_is_stable_and_labels_map(tmp_path):
    entries = [{"path": f"c{i}.mp4", "id": f"c{i}"} for i in range(40)]
    train, held = split_entries(entries, eval_size=512, seed=3)
    assert len(held) == 4 and len(train) == 36
    train2, held2 = split_entries(list(reversed(entries)), eval_size=512, seed=3)
    assert {e["id"] for e in held} == {e["id"] for e in held2}  # order of lines does not matter
    assert split_entries(entries, eval_size=0, seed=3)[1] == []
    assert label_map([{"label": 3}, {"label": 7}, {}]) == {3: 3, 7: 7}
    assert label_map([{"label": "dog"}, {"label": "cat"}, {"label": "dog"}]) == {"cat": 0, "dog": 1}


def test_misalign_records_swaps_between_clips_with_flags():
    from harmony.data.item import ClipRecord
    from harmony.data.manifest import misalign_records

    recs = [ClipRecord(video=f"v{i}.mp4", text=f"caption {i}", align=f"a{i}.align", index=i, name=f"c{i}")
            for i in range(37)]
    out = misalign_records(recs, 0.3, 0.2, seed=5)
    assert [r.index for r in out] == list(range(37)) and all(r.video == f"v{i}.mp4" for i, r in enumerate(out))
    text_noisy = [i for i, r in enumerate(out) if r.noisy_text]
    audio_noisy = [i for i, r in enumerate(out) if r.noisy_audio]
    assert len(text_noisy) == round(0.3 * 37) and len(audio_noisy) == round(0.2 * 37)
    for i, r in enumerate(out):
        if r.noisy_text:  # someone else's caption and alignment, together
            j = int(r.text.split()[1])
            assert j != i and r.align == f"a{j}.align"
        else:
            assert r.text == f"caption {i}" and r.align == f"a{i}.align"
        if r.noisy_audio:
            assert r.audio != f"v{i}.mp4" and r.audio.startswith("v")
        else:
            assert r.audio is None
    donors = sorted(int(out[i].text.split()[1]) for i in text_noisy)
    assert donors == sorted(text_noisy)  # a permutation of the chosen clips: each caption is used once
    again = misalign_records(recs, 0.3, 0.2, seed=5)
    assert [(r.text, r.audio) for r in again] == [(r.text, r.audio) for r in out]  # seeded
    other = misalign_records(recs, 0.3, 0.2, seed=6)
    assert [r.noisy_text for r in other] != [r.noisy_text for r in out]
    assert not any(r.noisy_text or r.noisy_audio for r in misalign_records(recs, 0.0, 0.0, seed=5))
    with pytest.raises(ValueError):
        misalign_records(recs[:1], 0.5, 0.0, seed=0)


def test_grid_noise_swaps_captions_and_audio_of_training_clips_only():
    g = grid_dir()
    cfg = DataConfig.clips(kind="manifest", manifest=str(g / "manifest.jsonl"), frames=8, fps=8.0, image_size=32,
                     noise=0.3, noise_audio=0.3).validate()
    clean_cfg = DataConfig.clips(kind="manifest", manifest=str(g / "manifest.jsonl"), frames=8, fps=8.0, image_size=32)
    train, held = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    clean = build_dataset(clean_cfg, "train")
    assert "noisy_text" not in held[0] and "noisy_text" not in clean[0]  # flags only where noise was injected
    i = next(k for k, r in enumerate(train.records) if r.noisy_text and r.noisy_audio)
    j = next(k for k, r in enumerate(train.records) if not (r.noisy_text or r.noisy_audio))
    noisy, own = train[i], clean[i]
    assert noisy["noisy_text"] and noisy["noisy_audio"] and not train[j]["noisy_text"]
    assert torch.equal(noisy["video"], own["video"])                    # same clip ...
    assert not torch.equal(noisy["text"], own["text"])                  # ... another clip's words
    assert not torch.allclose(noisy["audio"], own["audio"])             # ... another clip's sound
    assert torch.equal(train[j]["audio"], clean[j]["audio"]) and torch.equal(train[j]["text"], clean[j]["text"])
    with pytest.raises(Exception, match="swap only|supports only"):
        DataConfig.clips(kind="manifest", manifest="m.jsonl", noise=0.2, noise_kind="bias").validate()
