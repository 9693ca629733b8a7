"""Word-timed captions (docs/DATA.md "Your own videos", HowTo100M-style): the words spoken inside a sampled window.

Two forms: a GRID-style file of ``start end word`` lines with times in 1/25000 s, or an inline list of
``[start_s, end_s, word]`` triples in seconds (manifest ``"align"`` / a shard's json). Silence markers
(``sil``, ``sp``) are not words. A word belongs to a window when its midpoint lies inside it.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

Word = Tuple[float, float, str]

GRID_UNITS_PER_S = 25000.0
SILENCE = frozenset({"sil", "sp"})


class AlignError(ValueError):
    """The alignment cannot be read or parsed."""


def parse_grid_align(text: str) -> List[Word]:
    """Words of a GRID-style align file: [(start_s, end_s, word)], silences dropped."""
    words: List[Word] = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 3:
            raise AlignError(f"line {n}: expected 'start end word', got {line!r}")
        try:
            t0, t1 = float(parts[0]) / GRID_UNITS_PER_S, float(parts[1]) / GRID_UNITS_PER_S
        except ValueError:
            raise AlignError(f"line {n}: times are not numbers: {line!r}") from None
        word = " ".join(parts[2:])
        if word.lower() not in SILENCE:
            words.append((t0, t1, word))
    return words


def read_grid_align(path: str) -> List[Word]:
    """Read and parse a GRID-style align file (UTF-8)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise AlignError(f"cannot read {os.fsdecode(path)}: {exc.strerror}") from None
    try:
        return parse_grid_align(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise AlignError(f"{os.fsdecode(path)} is not UTF-8") from None


def parse_inline_align(items: Sequence) -> List[Word]:
    """An inline ``[[start_s, end_s, word], ...]`` list: [(start_s, end_s, word)], silences dropped."""
    words: List[Word] = []
    try:
        for t0, t1, word in items:
            if str(word).lower() not in SILENCE:
                words.append((float(t0), float(t1), str(word)))
    except (TypeError, ValueError):
        raise AlignError(f"inline align must be a list of [start_s, end_s, word], got {items!r:.80}") from None
    return words


def words_in_window(words: Sequence[Word], t0: float, t1: float) -> List[str]:
    """Words whose midpoint lies in [t0, t1), in time order."""
    return [w for a, b, w in sorted(words) if t0 <= 0.5 * (a + b) < t1]


def window_captions(words: Sequence[Word], t0: float, span: float, candidates: int) -> List[str]:
    """Caption of the window [t0, t0+span) and, for MIL-NCE candidates, of its neighbours in the order
    previous, next, 2nd previous, 2nd next, ... (windows of the same length): ``candidates`` strings."""
    shifts = [0]
    k = 1
    while len(shifts) < candidates:
        shifts += [-k, k]
        k += 1
    return [" ".join(words_in_window(words, t0 + s * span, t0 + (s + 1) * span)) for s in shifts[:candidates]]
