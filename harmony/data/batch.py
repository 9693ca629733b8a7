"""Items, batches and bad-input accounting shared by every data source (docs/DATA.md "The batch contract").

An item is a dict with ``video`` [3, T, H, W] float32 in [0, 1], ``audio`` [S] float32 in [-1, 1],
``text`` [L, N] int64, ``mask_va``/``mask_vt`` bool, ``index`` int, ``source`` str, ``concept`` int,
optional synthetic ground truth, and ``bad``: the bad-input counts met while producing it (so the
counts travel with the data out of DataLoader worker processes). ``collate`` stacks items into a batch.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Mapping

import torch

from harmony.config import ConfigError

# Every bad-input kind the data code counts; loaders report all of them (zeros included).
BAD_KINDS = (
    "missing_file",   # the clip's file does not exist: item replaced by the next usable one
    "decode_error",   # the container cannot be opened / no frame decodes / window outside the clip: replaced
    "no_video",       # the container has no video stream: replaced
    "truncated",      # decoding stopped inside the window: replaced if under half the frames decoded, else
                      # kept with the last frame repeated and the audio zero-padded; an mp4/mov file that
                      # ends inside its own structure (cut short) cannot be opened: replaced
    "no_audio",       # no (decodable) audio stream, or none of it inside the window: mask_va False, audio zeros
    "empty_caption",  # caption with no words (or no aligned word inside the window): mask_vt False
    "bad_caption",    # caption that is not valid UTF-8: mask_vt False
    "bad_align",      # word-alignment file missing or unparsable: the full "text" field is used instead
    "bad_line",       # manifest line that is not a JSON object with a "path": dropped when the manifest is read
)

# Keys stacked into tensors by ``collate`` (dtype), when every item has them.
_TENSOR_KEYS = {"mask_va": torch.bool, "mask_vt": torch.bool, "index": torch.int64, "concept": torch.int64,
                "text_concept": torch.int64, "audio_concept": torch.int64,
                "noisy_text": torch.bool, "noisy_audio": torch.bool,
                "text_kind": torch.int64, "audio_kind": torch.int64, "hard": torch.bool}

_WARNED: set = set()
# one line per warning: with no logging configured, Python prints a warning's message alone on stderr
# (warnings.warn would add its file:line and echo the calling source line under it)
_LOG = logging.getLogger("harmony.data")


class BadCounts(dict):
    """{kind: count} of bad inputs met (each occurrence: an item drawn twice counts twice), with ``names``:
    {kind: [the offending clips / manifest lines, in the order met]}. A plain dict otherwise; it pickles with
    its names, so they travel out of DataLoader worker processes with the batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.names: Dict[str, List[str]] = {}

    @classmethod
    def of(cls, counts: Mapping[str, int]) -> "BadCounts":
        """``counts`` itself when it is a BadCounts, else its counts with no names (a stand-in loader's plain
        dict): the one place a plain mapping becomes the counter type."""
        return counts if isinstance(counts, cls) else cls(counts)


def zero_counts() -> "BadCounts":
    """A fresh counter dict with every bad-input kind at 0."""
    return BadCounts({k: 0 for k in BAD_KINDS})


def add_counts(into: Dict[str, int], other: Mapping[str, int]) -> Dict[str, int]:
    """Add ``other``'s counts (and names, when both carry them) into ``into`` (in place) and return it."""
    for k, v in other.items():
        into[k] = into.get(k, 0) + int(v)
    if hasattr(into, "names"):
        for k, names in getattr(other, "names", {}).items():
            into.names.setdefault(k, []).extend(names)
    return into


def note_bad(counts: Dict[str, int], kind: str, detail: str, name: str = "") -> None:
    """Count one bad input of ``kind`` (``name``: which clip or manifest line) and warn the first time this
    process meets that kind (one line on stderr, through the ``harmony.data`` logger)."""
    if kind not in BAD_KINDS:
        raise KeyError(f"unknown bad-input kind {kind!r}; known: {BAD_KINDS}")
    counts[kind] = counts.get(kind, 0) + 1
    if name and hasattr(counts, "names"):
        counts.names.setdefault(kind, []).append(str(name))
    if kind not in _WARNED:
        _WARNED.add(kind)
        msg = f"harmony.data: {kind}: {detail} (further '{kind}' cases are counted, not warned)"
        _LOG.warning(msg)


def reset_warnings() -> None:
    """Forget which kinds were warned about (tests use it to see the warning again)."""
    _WARNED.clear()


def collate(items: List[dict]) -> dict:
    """Stack item dicts into a batch dict (the batch contract); ``bad`` becomes the batch's summed counts.

    video [B, 3, T, H, W] float32, audio [B, S] float32, text [B, L, N] int64, mask_va/mask_vt [B] bool,
    index [B] int64, source list[str], concept [B] int64 (and the synthetic ground truth when present),
    bad {kind: int}.
    """
    if not items:
        raise ValueError("collate: empty list of items")
    batch = {
        "video": torch.stack([it["video"] for it in items]),
        "audio": torch.stack([it["audio"] for it in items]),
        "text": torch.stack([it["text"] for it in items]),
    }
    for key, dtype in _TENSOR_KEYS.items():
        if all(key in it for it in items):
            batch[key] = torch.tensor([it[key] for it in items], dtype=dtype)
    batch["source"] = [it["source"] for it in items]
    bad = zero_counts()
    for it in items:
        add_counts(bad, it.get("bad", {}))
    batch["bad"] = bad
    return batch


def oracle_drop(batch: dict) -> dict:
    """The data.oracle_drop control, applied by the training loader: mask the loss a misalignment flag says is wrong
    (mask_vt for noisy_text, mask_va for noisy_audio), as a curriculum weight of 0 would; the sample stays in the
    batch (and a negative)."""
    if "noisy_text" not in batch or "noisy_audio" not in batch:
        raise ConfigError("data.oracle_drop=true needs misalignment flags in the data (synthetic data, or "
                          "data.noise / data.noise_audio on a manifest)")
    batch["mask_vt"] = batch["mask_vt"].bool() & ~batch["noisy_text"].bool()
    batch["mask_va"] = batch["mask_va"].bool() & ~batch["noisy_audio"].bool()
    return batch
