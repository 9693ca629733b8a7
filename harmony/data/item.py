"""One real clip record → one item of the batch contract (shared by the manifest and shard sources).

A record names the clip (a path or in-memory container bytes), its caption (a string, a list of
candidate strings, or word timings) and its metadata. ``load_item`` decodes the clip window, builds the
caption of that window, counts every defect into ``counts`` and raises ``ClipError`` when the clip has
no usable video (the caller then substitutes another item).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch

from harmony.data.align import AlignError, parse_inline_align, read_grid_align, window_captions
from harmony.data.batch import note_bad
from harmony.data.decode import Source, decode_clip
from harmony.data.text import tokenize_candidates


@dataclass
class ClipRecord:
    """What is known about one real clip before decoding it."""

    video: Source                                   # path, or the container's bytes
    text: Union[str, List[str], None] = None        # caption, or candidate captions
    text_ok: bool = True                            # False: the caption was not valid UTF-8
    align: Union[str, Sequence, None] = None        # GRID align file path, or inline [[s, e, word], ...]
    start: Optional[float] = None                   # clip part [start, end) in seconds
    end: Optional[float] = None
    audio: Optional[Source] = None                  # separate audio container (e.g. a shard's wav)
    source: str = ""
    label: int = -1
    index: int = 0
    name: str = ""                                  # for messages
    noisy_text: Optional[bool] = None               # ground truth of injected misalignment (None: no flags)
    noisy_audio: Optional[bool] = None


def _captions(rec: ClipRecord, v0: float, span: float, candidates: int, counts: Dict[str, int]) -> List[str]:
    """Caption candidates for the window starting at ``v0`` (aligned words when available)."""
    if rec.align is not None:
        try:
            words = read_grid_align(rec.align) if isinstance(rec.align, (str, bytes, os.PathLike)) \
                else parse_inline_align(rec.align)
            return window_captions(words, v0, span, candidates)
        except AlignError as exc:
            note_bad(counts, "bad_align", f"{rec.name}: {exc}; using the whole caption", rec.name)
    if rec.text is None:
        return []
    return [rec.text] if isinstance(rec.text, str) else [str(t) for t in rec.text]


def load_item(rec: ClipRecord, cfg, counts: Dict[str, int]) -> dict:
    """Decode ``rec`` into an item dict (batch contract; ``bad`` is left to the caller).

    Raises ``harmony.data.decode.ClipError`` when there is no usable video."""
    clip = decode_clip(rec.video, cfg.frames, cfg.fps, cfg.image_size, cfg.sample_rate, cfg.audio_seconds,
                       start=rec.start, end=rec.end, audio_src=rec.audio, name=rec.name)
    for kind, detail in clip.problems:
        note_bad(counts, kind, detail, rec.name)
    text = torch.zeros(cfg.candidates, cfg.max_words, dtype=torch.int64)
    if not rec.text_ok:
        note_bad(counts, "bad_caption", f"{rec.name}: caption is not valid UTF-8", rec.name)
    else:
        text = tokenize_candidates(_captions(rec, clip.v0, cfg.frames / cfg.fps, cfg.candidates, counts),
                                   cfg.candidates, cfg.max_words)
        if not bool(text[0].any()):
            note_bad(counts, "empty_caption", f"{rec.name}: caption has no words in the sampled window",
                     rec.name)
            text.zero_()
    item = {
        "video": clip.video, "audio": clip.audio, "text": text,
        "mask_va": clip.has_audio, "mask_vt": bool(text[0].any()),
        "index": rec.index, "source": rec.source, "concept": rec.label,
    }
    if rec.noisy_text is not None:
        item["noisy_text"], item["noisy_audio"] = bool(rec.noisy_text), bool(rec.noisy_audio)
    return item
