"""Export synthetic items as real files and as WebDataset shards (for round trips and other tools).

    python -m harmony.data.export --out DIR --n N [--shards K] [--split train|eval] [--data.key=value ...]

writes ``DIR/items/<key>.mp4`` (H.264 4:4:4 lossless video at data.fps + an AAC audio stream),
``<key>.wav`` (16-bit PCM) and ``<key>.txt`` (first caption), ``DIR/manifest.jsonl`` (paths relative to
DIR; ``label`` = concept, plus the ground-truth fields) and ``DIR/shards/shard-NNNNNN.tar`` (``<key>.mp4``,
``.wav``, ``.txt``, ``.json``; items split into K contiguous runs). Audio and video are laid out concentric
(the shorter one centred on the longer), as the decoder's window rule reads them; read them back, with the
same data settings, through
``--data.kind=manifest --data.manifest=DIR/manifest.jsonl`` or ``--data.kind=shards
--data.shards='DIR/shards/shard-*.tar'``.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from fractions import Fraction
from typing import List, Optional, Tuple

import av
import numpy as np
import soundfile
import torch
from webdataset import TarWriter

from harmony.config import ConfigError, DataConfig
from harmony.data.synthetic import SyntheticDataset


# Sample rates the AAC encoder accepts; other rates are resampled up to the next one (PyAV does it).
AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


def encode_mp4(video: torch.Tensor, audio: Optional[torch.Tensor], fps: float, sample_rate: int,
               video_start: float = 0.0) -> bytes:
    """MP4 bytes: video [3, T, H, W] in [0,1] as lossless H.264 (yuv444p) at ``fps``, first frame at
    ``video_start`` seconds; audio [S] at ``sample_rate`` from time 0 as AAC (stored at the next rate AAC
    supports)."""
    buf = io.BytesIO()
    frames = (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()  # [T, H, W, 3]
    rate = Fraction(fps).limit_denominator(1001)
    tb = 1 / (rate * 1000)  # fine enough to start the video between two frame ticks
    with av.open(buf, mode="w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=rate)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        vs.options = {"qp": "0", "preset": "veryfast"}
        vs.codec_context.time_base = tb
        aus = None
        if audio is not None:
            aus = out.add_stream("aac", rate=next((r for r in AAC_RATES if r >= sample_rate), AAC_RATES[-1]))
            aus.layout = "mono"
            aus.bit_rate = 96000
        for k, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            frame.pts = round((video_start + k / rate) / tb)
            frame.time_base = tb
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        if aus is not None:
            samples = audio.clamp(-1, 1).numpy().astype(np.float32)[None, :]
            aframe = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            aframe.sample_rate, aframe.pts, aframe.time_base = sample_rate, 0, Fraction(1, sample_rate)
            out.mux(aus.encode(aframe))
            out.mux(aus.encode(None))
    return buf.getvalue()


def encode_wav(audio: torch.Tensor, sample_rate: int) -> bytes:
    """16-bit PCM WAV bytes of audio [S] in [-1, 1]."""
    buf = io.BytesIO()
    soundfile.write(buf, audio.clamp(-1, 1).numpy(), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def concentric_layout(cfg: DataConfig) -> Tuple[float, int]:
    """(video start in s, audio zeros to prepend) placing the audio concentric with the video, as the
    decoder's window rule expects (the synthetic item's audio and video are meant to share a centre)."""
    span, audio_s = cfg.frames / cfg.fps, cfg.audio_seconds
    if audio_s > span:
        return (audio_s - span) / 2, 0
    return 0.0, int(round((span - audio_s) / 2 * cfg.sample_rate))


def export(cfg: DataConfig, out: str, n: int, shards: int = 1, split: str = "train") -> dict:
    """Write n items of the synthetic ``split`` under ``out`` (see the module docstring); returns a summary."""
    ds = SyntheticDataset(cfg, split)
    if not 1 <= n <= len(ds):
        raise ValueError(f"--n={n} must be in [1, {len(ds)}] (the {split} split's size)")
    if not 1 <= shards <= n:
        raise ValueError(f"--shards={shards} must be in [1, n={n}]")
    items_dir, shard_dir = os.path.join(out, "items"), os.path.join(out, "shards")
    os.makedirs(items_dir, exist_ok=True)
    os.makedirs(shard_dir, exist_ok=True)
    writers: List[TarWriter] = [TarWriter(os.path.join(shard_dir, f"shard-{s:06d}.tar")) for s in range(shards)]
    lines = []
    video_start, pad = concentric_layout(cfg)
    try:
        for i in range(n):
            item, captions = ds.generate(i)
            key = f"{i:08d}"
            audio = torch.cat([torch.zeros(pad), item["audio"]])
            mp4 = encode_mp4(item["video"], audio, cfg.fps, cfg.sample_rate, video_start)
            wav = encode_wav(audio, cfg.sample_rate)
            for ext, data in (("mp4", mp4), ("wav", wav), ("txt", captions[0].encode("utf-8"))):
                with open(os.path.join(items_dir, f"{key}.{ext}"), "wb") as f:
                    f.write(data)
            meta = {"id": key, "source": "synthetic", "label": item["concept"], "index": i,
                    "text_concept": item["text_concept"], "audio_concept": item["audio_concept"],
                    "noisy_text": item["noisy_text"], "noisy_audio": item["noisy_audio"]}
            lines.append(json.dumps({"path": f"items/{key}.mp4", "text": captions[0], **meta}))
            writers[i * shards // n].write({"__key__": key, "mp4": mp4, "wav": wav, "txt": captions[0],
                                            "json": meta})
    finally:
        for w in writers:
            w.close()
    with open(os.path.join(out, "manifest.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return {"items": n, "shards": shards, "manifest": os.path.join(out, "manifest.jsonl"),
            "shard_pattern": os.path.join(shard_dir, "shard-*.tar")}


def _override(cfg: DataConfig, arg: str) -> None:
    """Apply one ``--data.key=value`` (typed like the field's default)."""
    key, _, value = arg[len("--data."):].partition("=")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if key not in fields or not _:
        raise ConfigError(f"{arg}: expected --data.<field>=<value> with a field of {sorted(fields)}")
    current = getattr(cfg, key)
    if isinstance(current, bool):
        parsed = value.lower() in ("1", "true", "yes")
    elif isinstance(current, (int, float)):
        parsed = type(current)(value)
    else:
        parsed = value
    setattr(cfg, key, parsed)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harmony.data.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, required=True, help="number of items")
    parser.add_argument("--shards", type=int, default=1, help="number of tar shards")
    parser.add_argument("--split", choices=("train", "eval"), default="train")
    args, rest = parser.parse_known_args(argv)
    cfg = DataConfig()
    for arg in rest:
        if not arg.startswith("--data."):
            parser.error(f"unknown argument {arg}")
        _override(cfg, arg)
    cfg.validate()
    summary = export(cfg, args.out, args.n, args.shards, args.split)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
