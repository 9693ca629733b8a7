"""Word-level hashed tokenizer (docs/DESIGN.md "The model (VATT)": lower-cased words hashed into 2^16 buckets, 0 =
padding).

Words are runs of letters, digits and apostrophes after lower-casing (Unicode letters count; a run of
apostrophes alone is not a word). Each word is hashed with 32-bit FNV-1a over its UTF-8 bytes — a
stable hash, unlike Python's salted ``hash()`` — into ``[1, buckets)``, so id 0 stays free for padding
and every process, worker and run maps a word to the same id.
"""
from __future__ import annotations

import re
from typing import List, Sequence

import torch

_WORD = re.compile(r"(?:[^\W_]|')+")
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def words(text: str) -> List[str]:
    """Lower-cased words of ``text`` (runs of letters/digits/apostrophes, apostrophe-only runs dropped)."""
    return [w for w in _WORD.findall(text.lower()) if w.strip("'")]


def fnv1a32(data: bytes) -> int:
    """32-bit FNV-1a hash of ``data``."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def word_id(word: str, buckets: int = 65536) -> int:
    """Stable id of one word in [1, buckets)."""
    if buckets < 2:
        raise ValueError(f"buckets={buckets} must be >= 2 (id 0 is padding)")
    return 1 + fnv1a32(word.encode("utf-8", "surrogatepass")) % (buckets - 1)


def tokenize(text: str, max_words: int, buckets: int = 65536) -> torch.Tensor:
    """Hashed word ids of ``text``, truncated / zero-padded to ``max_words``: LongTensor [max_words]."""
    ids = [word_id(w, buckets) for w in words(text)[:max_words]]
    out = torch.zeros(max_words, dtype=torch.int64)
    if ids:
        out[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


def tokenize_candidates(texts: Sequence[str], candidates: int, max_words: int,
                        buckets: int = 65536) -> torch.Tensor:
    """Token ids of up to ``candidates`` texts: LongTensor [L, N]; missing candidates are all-zero rows."""
    out = torch.zeros(candidates, max_words, dtype=torch.int64)
    for l, text in enumerate(list(texts)[:candidates]):
        out[l] = tokenize(text, max_words, buckets)
    return out
