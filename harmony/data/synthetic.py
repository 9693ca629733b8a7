"""Synthetic controlled-misalignment benchmark (docs/DATA.md): video, audio and captions of K concepts.

A concept is a (shape, colour) pair. Item ``i`` of a split is generated from (data seed, split, i) alone,
so it is the same in every epoch, process and worker, and its noise flags never change:

* video [3, T, H, W]: a sprite of the concept's shape and colour moving in one of 8 directions over a
  noisy, randomly lit background, with a small grey distractor square wandering about;
* audio [S]: two tones, one set by the shape and one by the colour (random phase, onset, offset and
  slight detuning), a weak distractor tone away from every concept tone, and white noise;
* text [L, N]: templated sentences with synonyms for shape, colour and motion, filler words and the
  direction (L paraphrases of the same description).

Misalignment (train split only) at rate ``noise`` (text) and ``noise_audio`` (audio), of kind ``noise_kind``:
``swap`` (another random concept's caption / tones), ``bias`` (a fixed wrong concept per concept: the
same wrong word for every item of a concept), ``unrelated`` (off-topic talk / background sound with no
concept tone). ``noise_bias`` adds narrator-biased captions at their own rate on top of ``noise`` (web-like
mixed noise). Training items may also be made hard (``hard``: a smaller, dimmer sprite and quieter concept
tones, the content still right) and the concepts imbalanced (``imbalance``: a long tail). Every item carries
its ground truth: ``noisy_text``/``noisy_audio``, ``text_kind``/``audio_kind`` (NOISE_KINDS codes), ``hard``.
The eval split is clean, easy and uniform, and uses disjoint generator streams.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from harmony.data.batch import zero_counts
from harmony.data.text import tokenize_candidates
from harmony.nvtx import nvtx_range

# (name, synonyms); the first K factors of shapes × colours are used.
SHAPES = (
    ("square", ("square", "box", "block", "tile")),
    ("circle", ("circle", "ball", "disc", "orb")),
    ("triangle", ("triangle", "wedge", "pyramid", "arrowhead")),
    ("plus", ("plus", "cross", "plus sign")),
    ("diamond", ("diamond", "rhombus", "lozenge")),
    ("ring", ("ring", "hoop", "donut", "loop")),
    ("bar", ("bar", "stick", "rod", "plank")),
    ("x", ("x shape", "saltire", "letter x")),
)
COLOURS = (
    ("red", (0.95, 0.12, 0.10), ("red", "crimson", "scarlet", "ruby")),
    ("green", (0.10, 0.85, 0.15), ("green", "emerald", "lime")),
    ("blue", (0.12, 0.25, 0.95), ("blue", "azure", "cobalt", "navy")),
    ("yellow", (0.95, 0.90, 0.10), ("yellow", "golden", "lemon")),
    ("magenta", (0.90, 0.10, 0.85), ("magenta", "pink", "fuchsia")),
    ("cyan", (0.10, 0.90, 0.90), ("cyan", "turquoise", "teal")),
    ("orange", (1.00, 0.55, 0.05), ("orange", "amber", "tangerine")),
    ("white", (0.97, 0.97, 0.97), ("white", "ivory", "snowy")),
)
# (dx, dy) in image coordinates (y grows downwards) and the phrases a caption may use.
DIRECTIONS = (
    ((1, 0), ("right", "rightward", "to the right", "eastward")),
    ((-1, 0), ("left", "leftward", "to the left", "westward")),
    ((0, -1), ("up", "upward", "to the top", "skyward")),
    ((0, 1), ("down", "downward", "to the bottom", "groundward")),
    ((1, -1), ("up and right", "to the top right", "diagonally up right")),
    ((-1, -1), ("up and left", "to the top left", "diagonally up left")),
    ((1, 1), ("down and right", "to the bottom right", "diagonally down right")),
    ((-1, 1), ("down and left", "to the bottom left", "diagonally down left")),
)
TEMPLATES = (
    "a {c} {s} moves {d}",
    "the {c} {s} is moving {d} {f}",
    "{f} a {c} {s} going {d}",
    "watch the {s} it is {c} and it goes {d}",
    "there is a {c} {s} sliding {d} {f}",
    "{f} {c} {s} heading {d}",
    "a {s} in {c} drifts {d}",
    "we see one {c} {s} that travels {d} {f}",
)
# Fillers never use a direction word ("right here" would read as a direction).
FILLERS = ("look", "here", "now", "again", "you see", "in the video", "on screen", "today", "okay so",
           "as shown", "just", "clearly")
OFF_TOPIC = ("today", "we", "talk", "about", "cooking", "recipe", "music", "weather", "subscribe", "channel",
             "thanks", "for", "watching", "hello", "everyone", "welcome", "back", "next", "time", "please",
             "comment", "below", "garden", "travel", "coffee", "morning", "story", "friends", "really", "nice")
MAX_CONCEPTS = len(SHAPES) * len(COLOURS)

_SPLITS = {"train": 0, "eval": 1}
#: codes of ``text_kind`` / ``audio_kind``: what a modality of an item carries
NOISE_KINDS = {"clean": 0, "swap": 1, "bias": 2, "unrelated": 3}
# Hard items: sprite radius ×0.6, sprite colour 40% of the way from the background to its colour, concept tones ×0.3.
_HARD_RADIUS, _HARD_CONTRAST, _HARD_TONE = 0.6, 0.4, 0.3


def concept_frequencies(k: int, imbalance: float) -> np.ndarray:
    """Training frequency of each concept [k]: ∝ (rank + 1)^−a with a = ln(imbalance)/ln(k), so that the first
    concept is ``imbalance`` times as common as the last (uniform at 1). Sums to 1."""
    a = math.log(imbalance) / math.log(k) if imbalance > 1.0 else 0.0
    w = np.arange(1, k + 1, dtype=np.float64) ** -a
    return w / w.sum()


def tail_concepts_from(k: int, imbalance: float) -> Optional[int]:
    """The first tail concept under a long tail (concepts ``tail_from..k-1``, the rarer half), or None when the
    concepts are uniform. Detector splits and the held-out accuracy per frequency use the same halves."""
    return k // 2 if imbalance > 1.0 else None


def concept_of_items(n: int, k: int, imbalance: float) -> np.ndarray:
    """The concept of each of n items [n] int64: i % k when uniform; otherwise contiguous runs whose lengths follow
    ``concept_frequencies`` (item i takes the concept whose cumulative share holds (i + 0.5)/n)."""
    if imbalance <= 1.0:
        return np.arange(n, dtype=np.int64) % k
    cum = np.cumsum(concept_frequencies(k, imbalance))
    return np.minimum(np.searchsorted(cum, (np.arange(n) + 0.5) / n), k - 1).astype(np.int64)


def concept_factors(k: int) -> Tuple[int, int]:
    """(number of shapes, number of colours) used for K concepts; concept c = colour·n_shapes + shape."""
    if not 2 <= k <= MAX_CONCEPTS:
        raise ValueError(f"data.concepts={k} must be in [2, {MAX_CONCEPTS}] ({len(SHAPES)} shapes x "
                         f"{len(COLOURS)} colours)")
    n_shapes = min(len(SHAPES), math.ceil(math.sqrt(k)))
    return n_shapes, math.ceil(k / n_shapes)


def shape_mask(shape: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside-test of shape ``shape`` at coordinates normalised to the sprite radius ([-1, 1] box)."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == 0:  # square
        return np.maximum(ax, ay) <= 0.85
    if shape == 1:  # circle
        return x * x + y * y <= 1.0
    if shape == 2:  # upward triangle: apex at y=-1, base at y=0.8
        return (y >= -1.0) & (y <= 0.8) & (ax <= (y + 1.0) / 1.8)
    if shape == 3:  # plus
        return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
    if shape == 4:  # diamond
        return ax + ay <= 1.0
    if shape == 5:  # ring
        r2 = x * x + y * y
        return (r2 <= 1.0) & (r2 >= 0.3)
    if shape == 6:  # horizontal bar
        return (ax <= 1.0) & (ay <= 0.35)
    # x: two diagonal strokes
    return ((np.abs(x - y) <= 0.4) | (np.abs(x + y) <= 0.4)) & (np.maximum(ax, ay) <= 0.9)


class SyntheticDataset(Dataset):
    """Finite synthetic split: ``len`` = data.size (train) or data.eval_size (eval); items as docs/DATA.md "Synthetic
    benchmark" describes."""

    def __init__(self, cfg, split: str = "train"):
        if split not in _SPLITS:
            raise ValueError(f"split={split!r}: choose 'train' or 'eval'")
        self.cfg, self.split = cfg, split
        self.n = cfg.size if split == "train" else cfg.eval_size
        self.k = cfg.concepts
        self.n_shapes, self.n_colours = concept_factors(self.k)
        # The eval split is clean: its items measure retrieval, not robustness.
        train = split == "train"
        self.noise = cfg.noise if train else 0.0
        self.noise_audio = cfg.noise_audio if train else 0.0
        self.noise_bias = cfg.noise_bias if train else 0.0
        self.hard = cfg.hard if train else 0.0
        self.concepts_of = concept_of_items(self.n, self.k, cfg.imbalance if train else 1.0)
        self.seed = int(cfg.seed) % (2 ** 63)
        self.samples = int(round(cfg.sample_rate * cfg.audio_seconds))
        sr = cfg.sample_rate
        # Tone bands as fractions of the sample rate so any rate keeps them under Nyquist.
        self.shape_freqs = np.geomspace(0.03, 0.12, self.n_shapes) * sr
        self.colour_freqs = np.geomspace(0.16, 0.40, self.n_colours) * sr
        self._tones = tuple(float(f) for f in np.concatenate([self.shape_freqs, self.colour_freqs]))
        # Narrator bias: a fixed wrong concept per concept, different for text and audio when K > 2.
        self.bias_text = 1 + self.seed % (self.k - 1)
        self.bias_audio = 1 + (self.seed + self.k // 2) % (self.k - 1)

    def __len__(self) -> int:
        return self.n

    def describe(self, concept: int) -> Tuple[int, int]:
        """(shape, colour) indices of a concept."""
        return concept % self.n_shapes, concept // self.n_shapes

    def _rng(self, index: int) -> np.random.Generator:
        """The item's own generator, keyed by (seed, split, index) (SFC64: cheap to create per item)."""
        key = (self.seed * 2 + _SPLITS[self.split]) * 2 ** 40 + index
        return np.random.Generator(np.random.SFC64(key))

    # -- misalignment -------------------------------------------------------------------------------
    def _corrupt(self, rng: np.random.Generator, concept: int, rate: float, offset: int,
                 bias_rate: float = 0.0) -> Tuple[int, str]:
        """(concept the modality shows, -1 for unrelated content; its NOISE_KINDS name). One uniform draw u:
        u < rate gives data.noise_kind, rate ≤ u < rate + bias_rate narrator bias."""
        u = rng.random()
        other = int((concept + rng.integers(1, self.k)) % self.k)  # drawn always: keeps streams aligned
        kind = self.cfg.noise_kind if u < rate else "bias" if u < rate + bias_rate else "clean"
        if kind == "clean":
            return concept, kind
        if kind == "swap":
            return other, kind
        if kind == "bias":
            return (concept + offset) % self.k, kind
        return -1, kind

    def _is_hard(self, index: int) -> bool:
        """Whether training item ``index`` is hard: its own stream, so the main stream's draws never change."""
        if self.hard <= 0:
            return False
        key = ((self.seed * 2 + _SPLITS[self.split]) * 2 ** 40 + index) ^ (1 << 62)
        return bool(np.random.Generator(np.random.SFC64(key)).random() < self.hard)

    # -- modalities ---------------------------------------------------------------------------------
    def _video(self, rng: np.random.Generator, concept: int, direction: int, hard: bool = False) -> np.ndarray:
        """Moving sprite on a noisy background: [3, T, H, W] float32 in [0, 1]."""
        T, S = self.cfg.frames, self.cfg.image_size
        shape, colour = self.describe(concept)
        grid = np.arange(S, dtype=np.float32) + 0.5
        # Background: random brightness, a gentle random gradient, pixel noise.
        level = rng.uniform(0.15, 0.55)
        slope = rng.uniform(-0.15, 0.15, size=2) / S
        bg = level + slope[0] * (grid[None, :] - S / 2) + slope[1] * (grid[:, None] - S / 2)
        video = np.broadcast_to(bg, (3, T, S, S)).astype(np.float32)
        # Distractor: a small grey square on a random walk, drawn under the sprite.
        dpos = rng.uniform(0.1 * S, 0.9 * S, size=2) + np.cumsum(rng.normal(0, 0.04 * S, size=(T, 2)), 0)
        dsize = max(1.0, 0.06 * S)
        dmask = (np.abs(grid[None, None, :] - dpos[:, 0, None, None]) <= dsize) & \
                (np.abs(grid[None, :, None] - dpos[:, 1, None, None]) <= dsize)
        video = np.where(dmask[None], np.float32(rng.uniform(0.3, 0.9)), video)
        # Sprite: radius, speed and a start point keeping the whole path inside the frame.
        radius = S * rng.uniform(0.14, 0.22) * (_HARD_RADIUS if hard else 1.0)
        (dx, dy), _ = DIRECTIONS[direction]
        unit = np.array([dx, dy], dtype=np.float64) / math.hypot(dx, dy)
        travel = unit * S * rng.uniform(0.025, 0.05) * max(T - 1, 0)
        lo = radius + np.maximum(0.0, -travel)
        hi = S - radius - np.maximum(0.0, travel)
        start = rng.uniform(lo, np.maximum(lo, hi))
        steps = np.linspace(0.0, 1.0, T) if T > 1 else np.zeros(1)
        centres = start[None, :] + steps[:, None] * travel[None, :]  # [T, 2]
        xs = (grid[None, None, :] - centres[:, 0, None, None]) / radius
        ys = (grid[None, :, None] - centres[:, 1, None, None]) / radius
        mask = shape_mask(shape, xs, ys)  # [T, S, S]
        rgb = np.clip(np.array(COLOURS[colour][1]) * rng.uniform(0.8, 1.05), 0.0, 1.0).astype(np.float32)
        if hard:  # low contrast: most of the way back to the background's level
            rgb = (level + _HARD_CONTRAST * (rgb - level)).astype(np.float32)
        video = np.where(mask[None], rgb[:, None, None, None], video)
        # Pixel noise from raw bytes: uniform, zero-mean, std ≈ sigma (Gaussian draws cost 10x more here).
        sigma = np.float32(rng.uniform(0.03, 0.08) * math.sqrt(12.0) / 255.0)
        noise = np.frombuffer(rng.bytes(video.size), dtype=np.uint8).reshape(video.shape)
        video += (noise.astype(np.float32) - np.float32(127.5)) * sigma
        return np.clip(video, 0.0, 1.0, out=video)

    def _far_tone(self, rng: np.random.Generator) -> float:
        """A frequency at least 6% away from every concept tone (distractors must not mimic a concept)."""
        sr = self.cfg.sample_rate
        f = rng.uniform(0.02, 0.45) * sr
        for _ in range(16):
            if all(abs(f - tone) > 0.06 * tone for tone in self._tones):
                break
            f = rng.uniform(0.02, 0.45) * sr
        return float(f)

    def _audio(self, rng: np.random.Generator, concept: int, hard: bool = False) -> np.ndarray:
        """Concept tones (or none when concept == -1) + distractor tone + noise: [S] float32 in [-1, 1]."""
        n, sr = self.samples, self.cfg.sample_rate
        idx = np.arange(n, dtype=np.float32)
        out = np.zeros(n, dtype=np.float32)

        def tone(freq: float, amp: float) -> np.ndarray:
            # float32 phase: < 1e-2 rad of error over tens of seconds, 3x cheaper than float64 sines
            return np.float32(amp) * np.sin(idx * np.float32(2 * np.pi * freq / sr)
                                             + np.float32(rng.uniform(0, 2 * np.pi)))

        if concept >= 0:
            shape, colour = self.describe(concept)
            onset, offset = rng.uniform(0.0, 0.25) * n, rng.uniform(0.75, 1.0) * n
            ramp = np.float32(1.0 / max(1.0, 0.02 * n))
            env = np.clip((idx - np.float32(onset)) * ramp, 0, 1) * np.clip((np.float32(offset) - idx) * ramp, 0, 1)
            gain = _HARD_TONE if hard else 1.0
            for f in (self.shape_freqs[shape], self.colour_freqs[colour]):
                out += tone(f * (1.0 + rng.uniform(-0.015, 0.015)), rng.uniform(0.25, 0.4) * gain)
            out *= env
        else:
            # Unrelated background: a second distractor tone instead of the concept tones.
            out += tone(self._far_tone(rng), rng.uniform(0.1, 0.3))
        out += tone(self._far_tone(rng), rng.uniform(0.04, 0.12))
        # White noise: uniform, std = sigma.
        sigma = np.float32(rng.uniform(0.03, 0.1) * math.sqrt(12.0))
        out += (rng.random(n, dtype=np.float32) - np.float32(0.5)) * sigma
        return np.clip(out, -1.0, 1.0, out=out)

    def _caption(self, rng: np.random.Generator, concept: int, direction: int) -> str:
        """One sentence about ``concept`` moving in ``direction`` (off-topic words when concept == -1)."""
        if concept < 0:
            n = int(rng.integers(5, 11))
            return " ".join(OFF_TOPIC[j] for j in rng.integers(0, len(OFF_TOPIC), size=n))
        shape, colour = self.describe(concept)
        pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731

        def word(synonyms):
            # the plain word half the time: a tiny model learns it fast, the synonyms keep it from being trivial
            return synonyms[0] if rng.random() < 0.5 else pick(synonyms)

        return pick(TEMPLATES).format(s=word(SHAPES[shape][1]), c=word(COLOURS[colour][2]),
                                      d=word(DIRECTIONS[direction][1]), f=pick(FILLERS))

    # -- items --------------------------------------------------------------------------------------
    @nvtx_range("data/synthetic")
    def generate(self, index: int) -> Tuple[dict, List[str]]:
        """Item ``index`` (the batch-contract dict) and its caption strings (for export)."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for a synthetic {self.split} split of {self.n}")
        concept = int(self.concepts_of[index])  # uniform: i % k; many items (directions, positions) each
        # One generator, fixed draw order: noise flags (a fixed number of draws), video, text, audio. A clean
        # item's content is therefore the same whatever the noise rates are (hardness has its own stream).
        rng = self._rng(index)
        hard = self._is_hard(index)
        text_concept, text_kind = self._corrupt(rng, concept, self.noise, self.bias_text, self.noise_bias)
        audio_concept, audio_kind = self._corrupt(rng, concept, self.noise_audio, self.bias_audio)
        noisy_text, noisy_audio = text_kind != "clean", audio_kind != "clean"
        direction = int(rng.integers(len(DIRECTIONS)))
        # A swapped caption is another clip's caption: it carries that clip's (random) direction.
        other_direction = int(rng.integers(len(DIRECTIONS)))
        text_direction = other_direction if text_kind == "swap" else direction
        video = self._video(rng, concept, direction, hard)
        captions = [self._caption(rng, text_concept, text_direction) for _ in range(self.cfg.candidates)]
        audio = self._audio(rng, audio_concept, hard)
        item = {
            "video": torch.from_numpy(video),
            "audio": torch.from_numpy(audio),
            "text": tokenize_candidates(captions, self.cfg.candidates, self.cfg.max_words),
            "mask_va": True, "mask_vt": True,
            "index": index, "source": "synthetic",
            "concept": concept, "text_concept": text_concept, "audio_concept": audio_concept,
            "noisy_text": noisy_text, "noisy_audio": noisy_audio,
            "text_kind": NOISE_KINDS[text_kind], "audio_kind": NOISE_KINDS[audio_kind], "hard": hard,
            "bad": zero_counts(),
        }
        return item, captions

    def __getitem__(self, index: int) -> dict:
        return self.generate(int(index))[0]
