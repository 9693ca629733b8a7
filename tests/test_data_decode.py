"""Clip decoding with PyAV: window rule, frame choice, resize, audio resampling and sync — on the real GRID clips
(MPEG-PS/mp2 originals and H.264/AAC re-encodes) and on generated clips with known frame and beep times."""
import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harmony.data import decode as decode_mod
from harmony.data.align import read_grid_align, window_captions
from harmony.data.decode import ClipError, clip_window, decode_clip


def grid_dir() -> Path:
    return Path(os.environ.get("HARMONY_GRID_DIR",
                               Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "grid"))


def grid_entries():
    path = grid_dir() / "manifest.jsonl"
    if not path.exists():
        pytest.skip(f"GRID test clips not found at {grid_dir()} (set HARMONY_GRID_DIR)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def one_of_each():
    """The first MPEG-PS original and the first H.264/AAC clip."""
    entries = grid_entries()
    return [next(e for e in entries if e["path"].endswith(".mpg")),
            next(e for e in entries if e["path"].endswith(".mp4"))]


def test_clip_window_rule():
    # centred on the clip, not before 0, audio concentric
    assert clip_window(3.0, None, None, 8, 8.0, 1.0) == (1.0, 1.0)
    assert clip_window(3.0, None, None, 8, 8.0, 2.0) == (1.0, 0.5)
    assert clip_window(0.5, None, None, 8, 8.0, 1.0) == (0.0, 0.0)
    assert clip_window(None, 2.0, None, 8, 8.0, 1.0) == (2.0, 2.0)
    v0, a0 = clip_window(100.0, 10.0, 14.0, 16, 8.0, 1.0)
    assert (v0, a0) == (11.0, 11.5)


@pytest.mark.parametrize("container", ["mpg", "mp4"])
def test_grid_shapes_ranges_and_frame_choice(container):
    entry = one_of_each()[0 if container == "mpg" else 1]
    path = str(grid_dir() / entry["path"])
    clip = decode_clip(path, frames=8, fps=8.0, image_size=32, sample_rate=8000, audio_seconds=1.0)
    assert clip.video.shape == (3, 8, 32, 32) and clip.video.dtype == torch.float32
    assert clip.audio.shape == (8000,) and clip.audio.dtype == torch.float32
    assert torch.isfinite(clip.video).all() and torch.isfinite(clip.audio).all()
    assert 0 <= clip.video.min() and clip.video.max() <= 1 and clip.audio.abs().max() <= 1
    assert clip.has_audio and clip.problems == []
    assert abs(clip.v0 - (clip.duration - 1.0) / 2) < 1e-9  # centred window
    assert clip.audio.abs().mean() > 1e-3
    # Independent frame choice: all frames decoded by PyAV, the one on screen at v0 + k/fps.
    with av.open(path) as c:
        frames = [(float(f.time), f) for f in c.decode(video=0)]
        times = np.array([t for t, _ in frames])
        worst = 0.0
        for k in range(8):
            j = int(np.searchsorted(times, clip.v0 + k / 8.0 + 1e-6, side="right")) - 1
            f = frames[j][1]
            h2, w2 = 32, round(f.width * 32 / f.height)
            same = f.to_ndarray(format="rgb24", width=w2, height=h2, interpolation="AREA")
            x = (w2 - 32) // 2
            want = torch.from_numpy(same[:, x:x + 32].copy()).permute(2, 0, 1).float() / 255
            assert torch.equal(clip.video[:, k], want), k
            # the resize itself against torch's area filter on the full-resolution frame
            full = torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1)[None].float() / 255
            ref = F.interpolate(full, size=(h2, w2), mode="area")[0, :, :, x:x + 32]
            worst = max(worst, float((ref - clip.video[:, k]).abs().mean()))
    print(container, "resize mean abs diff vs torch area filter", worst)
    assert worst < 0.03


def speech_sync(path, align, rate=16000):
    """Best lag (s) between log speech energy and the align file's word intervals, corr at lag 0,
    and the word-vs-silence log-energy gap, on the whole 3 s clip."""
    clip = decode_clip(path, frames=24, fps=8.0, image_size=16, sample_rate=rate, audio_seconds=3.0)
    assert clip.a0 == 0.0 and clip.has_audio
    a = clip.audio.double().numpy()
    hop = rate // 100
    n = len(a) // hop
    energy = np.log(np.square(a[: n * hop].reshape(n, hop)).mean(1) + 1e-8)
    t = (np.arange(n) + 0.5) * 0.01
    words = np.zeros(n)
    for s, e, _ in read_grid_align(align):
        words[(t >= s) & (t < e)] = 1
    inner = slice(60, n - 60)  # keep rolled-around ends out of the correlation

    def corr(lag_frames):
        return np.corrcoef(np.roll(energy, -lag_frames)[inner], words[inner])[0, 1]

    lags = np.arange(-50, 51)
    cs = np.array([corr(int(l)) for l in lags])
    return lags[int(np.argmax(cs))] * 0.01, corr(0), energy[words > 0].mean() - energy[words == 0].mean()


@pytest.mark.parametrize("container", ["mpg", "mp4"])
def test_grid_audio_in_sync_with_word_alignment(container):
    entries = [e for e in grid_entries() if e["path"].endswith("." + container)][:2]
    for e in entries:
        lag, c0, gap = speech_sync(str(grid_dir() / e["path"]), str(grid_dir() / e["align"]))
        print(e["path"], "best lag", lag, "corr at 0", round(c0, 3), "log-energy words - silence", round(gap, 2))
        assert abs(lag) <= 0.06   # speech energy lies where the align file puts the words
        assert c0 > 0.5
        assert gap > 2.5          # > 12x more energy inside words than in silences


def test_grid_subwindow_is_a_slice_of_the_whole_clip():
    for e in one_of_each():
        path = str(grid_dir() / e["path"])
        whole = decode_clip(path, frames=24, fps=8.0, image_size=32, sample_rate=8000, audio_seconds=3.0)
        part = decode_clip(path, frames=8, fps=8.0, image_size=32, sample_rate=8000, audio_seconds=1.0,
                           start=0.5, end=2.5)
        assert part.v0 == 1.0 and part.a0 == 1.0
        err_a = float((part.audio - whole.audio[8000:16000]).abs().max())
        err_v = float((part.video - whole.video[:, 8:16]).abs().max())
        print(e["path"], "audio", err_a, "video", err_v)
        assert err_a < 1e-6 and err_v == 0.0


def test_grid_captions_from_alignment():
    for e in one_of_each():
        align = str(grid_dir() / e["align"])
        clip = decode_clip(str(grid_dir() / e["path"]), frames=8, fps=8.0, image_size=16, sample_rate=8000,
                           audio_seconds=1.0)
        got = window_captions(read_grid_align(align), clip.v0, 1.0, 3)
        # independent reading of the align file: words whose midpoint is inside each window
        rows = [line.split() for line in Path(align).read_text().splitlines() if line.strip()]

        def inside(t0, t1):
            return " ".join(w for s, t, w in rows if w != "sil" and t0 <= (int(s) + int(t)) / 50000 < t1)

        want = [inside(clip.v0, clip.v0 + 1), inside(clip.v0 - 1, clip.v0), inside(clip.v0 + 1, clip.v0 + 2)]
        print(e["path"], got, want, e["text"])
        assert got == want and got[0] and set(got[0].split()) <= set(e["text"].split())


def make_timed_clip(path, seconds=12, fps=10, rate=16000, gop=10, audio=True, video=True, size=(64, 48)):
    """Frame k is uniform grey 10 + 2k; the audio is a quiet 300 Hz hum with a 40 ms 1 kHz beep at every
    whole second from 1 s on."""
    with av.open(str(path), mode="w") as out:
        vs = aus = None
        if video:
            vs = out.add_stream("libx264", rate=fps)
            vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv444p"
            vs.options = {"qp": "0", "g": str(gop), "preset": "veryfast"}
        if audio:
            aus = out.add_stream("aac", rate=rate)
            aus.layout = "mono"
        if vs is not None:
            for k in range(seconds * fps):
                img = np.full((size[1], size[0], 3), 10 + 2 * k, dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts, frame.time_base = k, Fraction(1, fps)
                out.mux(vs.encode(frame))
            out.mux(vs.encode(None))
        if aus is not None:
            t = np.arange(seconds * rate) / rate
            wave = np.where((t % 1.0) < 0.04, 0.5 * np.sin(2 * np.pi * 1000 * t), 0.0)
            wave[t < 0.5] = 0.0
            wave += 0.03 * np.sin(2 * np.pi * 300 * t)
            frame = av.AudioFrame.from_ndarray(wave.astype(np.float32)[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
            out.mux(aus.encode(frame))
            out.mux(aus.encode(None))


def frame_numbers(video):
    """Frame index encoded in each uniform grey frame: [T]."""
    return ((video.mean(dim=(0, 2, 3)) * 255 - 10) / 2).round().long().tolist()


def beep_onsets(audio, rate):
    """Sample positions where the beep energy starts."""
    a = audio.abs().numpy() > 0.1
    return [i for i in range(1, len(a)) if a[i] and not a[max(0, i - 40):i].any()]


def test_seek_path_gives_exact_frames_and_sync(tmp_path, monkeypatch):
    path = tmp_path / "long.mp4"
    make_timed_clip(path)
    kw = dict(frames=10, fps=10.0, image_size=32, sample_rate=8000, audio_seconds=1.0, start=8.0, end=10.0)
    seeked = decode_clip(str(path), **kw)
    assert seeked.v0 == 8.5 > decode_mod.SEEK_MIN_S and seeked.seeked
    assert frame_numbers(seeked.video) == list(range(85, 95))
    onsets = beep_onsets(seeked.audio, 8000)
    print("seek: frames", frame_numbers(seeked.video), "beep onsets", onsets)
    assert len(onsets) == 1 and abs(onsets[0] - 4000) <= 16  # the beep at 9.0 s sits 0.5 s into [8.5, 9.5)
    monkeypatch.setattr(decode_mod, "SEEK_MIN_S", 1e9)
    linear = decode_clip(str(path), **kw)
    assert not linear.seeked
    err = float((linear.audio - seeked.audio).abs().max())
    print("seek vs linear decode: audio max diff", err)
    assert torch.equal(linear.video, seeked.video) and err < 1e-3


def test_frame_rate_conversion_picks_frames_on_screen(tmp_path):
    path = tmp_path / "clip.mp4"
    make_timed_clip(path, seconds=3)
    clip = decode_clip(str(path), frames=6, fps=4.0, image_size=16, sample_rate=8000, audio_seconds=1.5)
    # 3 s clip, 1.5 s window centred: v0 = 0.75 → frames on screen at 0.75, 1.0, ..., 2.0 (10 fps source)
    assert frame_numbers(clip.video) == [7, 10, 12, 15, 17, 20]
    assert clip.a0 == 0.75 and abs(beep_onsets(clip.audio, 8000)[0] - 2000) <= 16


def test_clip_shorter_than_window_repeats_last_frame_and_pads_audio(tmp_path):
    path = tmp_path / "short.mp4"
    make_timed_clip(path, seconds=1)
    clip = decode_clip(str(path), frames=8, fps=4.0, image_size=16, sample_rate=8000, audio_seconds=2.0)
    assert clip.v0 == 0.0 and clip.problems == []
    assert frame_numbers(clip.video) == [0, 2, 5, 7, 9, 9, 9, 9]
    assert clip.audio[8200:].abs().max() == 0 and clip.audio[:8000].abs().max() > 0


def test_window_after_the_end_is_a_decode_error(tmp_path):
    path = tmp_path / "clip.mp4"
    make_timed_clip(path, seconds=2)
    with pytest.raises(ClipError) as err:
        decode_clip(str(path), frames=4, fps=4.0, image_size=16, sample_rate=8000, audio_seconds=1.0,
                    start=5.0, end=6.0)
    assert err.value.kind == "decode_error"


def test_missing_no_video_and_no_audio(tmp_path):
    with pytest.raises(ClipError) as err:
        decode_clip(str(tmp_path / "nope.mp4"), 4, 4.0, 16, 8000, 1.0)
    assert err.value.kind == "missing_file"
    audio_only = tmp_path / "audio_only.mp4"
    make_timed_clip(audio_only, seconds=2, video=False)
    with pytest.raises(ClipError) as err:
        decode_clip(str(audio_only), 4, 4.0, 16, 8000, 1.0)
    assert err.value.kind == "no_video"
    video_only = tmp_path / "video_only.mp4"
    make_timed_clip(video_only, seconds=2, audio=False)
    clip = decode_clip(str(video_only), 4, 4.0, 16, 8000, 1.0)
    assert not clip.has_audio and clip.audio.eq(0).all() and [k for k, _ in clip.problems] == ["no_audio"]
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01not a container" * 100)
    with pytest.raises(ClipError) as err:
        decode_clip(str(garbage), 4, 4.0, 16, 8000, 1.0)
    assert err.value.kind == "decode_error"


def test_decode_from_bytes_matches_file(tmp_path):
    path = tmp_path / "clip.mp4"
    make_timed_clip(path, seconds=2)
    a = decode_clip(str(path), 4, 4.0, 16, 8000, 1.0)
    b = decode_clip(path.read_bytes(), 4, 4.0, 16, 8000, 1.0)
    assert torch.equal(a.video, b.video) and torch.equal(a.audio, b.audio)
