"""Real clips listed in a JSONL manifest (docs/DATA.md "Your own videos").

One JSON object per line::

    {"path": "clips/a.mp4", "text": "a caption", "start": 3.0, "end": 9.5,
     "align": "align/a.align", "id": "a", "source": "mycorpus", "label": 3}

``path`` (required) and a relative ``align`` path are relative to the manifest's folder. ``text`` is a
caption or a list of candidate captions; ``align`` (a GRID-style file, times in 1/25000 s, or an inline
list of ``[start_s, end_s, word]``) replaces it by the words inside the sampled window. ``label`` (an
int, or strings mapped to ids in sorted order) becomes ``concept``; without it ``concept`` is −1.
``source`` defaults to the manifest's file stem.

Bad input never stops reading: an unparsable line is dropped and counted (``bad_line``); a line that is
not UTF-8 is read with its undecodable bytes escaped, and its caption is masked (``bad_caption``) when
they fall in the caption. A clip with no usable video is replaced by the next usable index (counted).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from harmony.data.batch import note_bad, zero_counts
from harmony.data.decode import ClipError
from harmony.data.item import ClipRecord, load_item

# A clip that gives no video is replaced by the next index; give up after this many in a row.
MAX_REPLACEMENTS = 32


def _has_escapes(value) -> bool:
    """True when a JSON value holds characters escaped from non-UTF-8 bytes (surrogateescape)."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, list):
        return any(_has_escapes(v) for v in value)
    return False


def _parse_line(raw: bytes, n: int, path: str, counts: Dict[str, int]) -> Optional[dict]:
    """One manifest line → dict with a ``_text_ok`` flag, or None (blank or bad line, counted)."""
    try:
        line, utf8 = raw.decode("utf-8"), True
    except UnicodeDecodeError:
        line, utf8 = raw.decode("utf-8", "surrogateescape"), False
    if not line.strip():
        return None
    try:
        entry = json.loads(line)
    except ValueError as exc:
        note_bad(counts, "bad_line", f"{path}:{n}: not JSON ({exc})", f"{path}:{n}")
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
        note_bad(counts, "bad_line", f"{path}:{n}: not an object with a \"path\" string", f"{path}:{n}")
        return None
    entry["_text_ok"] = utf8 or not _has_escapes(entry.get("text"))
    entry["_line"] = n
    return entry


def read_manifest(path: str) -> Tuple[List[dict], Dict[str, int]]:
    """Parsed manifest lines (with ``_text_ok`` / ``_line``) and the load-time bad-input counts."""
    counts = zero_counts()
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    entries = [e for n, raw in enumerate(lines, 1) if (e := _parse_line(raw, n, path, counts)) is not None]
    return entries, counts


def label_map(entries: Sequence[dict]) -> Dict:
    """label value → class id: integer labels map to themselves, otherwise sorted distinct strings → 0.."""
    labels = {e["label"] for e in entries if e.get("label") is not None}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return {v: v for v in labels}
    names = sorted({str(v) for v in labels})
    return {v: names.index(str(v)) for v in labels}


def _resolve(base: str, rel: str) -> str:
    """A manifest path relative to the manifest folder (absolute paths kept)."""
    return rel if os.path.isabs(rel) else os.path.join(base, rel)


def to_record(entry: dict, base: str, default_source: str, labels: Dict, index: int) -> ClipRecord:
    """Manifest entry → ClipRecord (paths resolved against the manifest folder)."""
    align = entry.get("align")
    if isinstance(align, str):
        align = _resolve(base, align)
    text = entry.get("text")
    if text is not None and not isinstance(text, (str, list)):
        text = str(text)
    num = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # noqa: E731
    name = entry.get("id") or entry["path"]
    return ClipRecord(video=_resolve(base, entry["path"]), text=text, text_ok=entry.get("_text_ok", True),
                      align=align, start=num(entry.get("start")), end=num(entry.get("end")),
                      source=str(entry.get("source") or default_source), label=labels.get(entry.get("label"), -1),
                      index=index, name=str(name))


def split_entries(entries: List[dict], eval_size: int, seed: int) -> Tuple[List[dict], List[dict]]:
    """Hold out min(eval_size, max(1, n // 10)) entries (none when n < 2) chosen by a stable hash of
    (seed, id or path): the split does not move when lines are reordered or added elsewhere."""
    n = len(entries)
    n_eval = 0 if n < 2 else min(eval_size, max(1, n // 10))
    keyed = sorted(range(n), key=lambda i: (zlib.crc32(f"{seed}:{entries[i].get('id') or entries[i]['path']}"
                                                     .encode("utf-8", "surrogateescape")), i))
    held = set(keyed[:n_eval])
    return [e for i, e in enumerate(entries) if i not in held], [e for i, e in enumerate(entries) if i in held]


def _donors(chosen: List[int], n: int, rng: random.Random) -> Dict[int, int]:
    """Each chosen index -> another index whose content it takes: a cycle through the chosen ones (shuffled),
    so every chosen clip gets some other chosen clip's content and no clip keeps its own."""
    order = list(chosen)
    rng.shuffle(order)
    if len(order) == 1:
        return {order[0]: (order[0] + 1 + rng.randrange(n - 1)) % n}
    return {a: order[(i + 1) % len(order)] for i, a in enumerate(order)}


def misalign_records(records: List[ClipRecord], rate_text: float, rate_audio: float,
                     seed: int) -> List[ClipRecord]:
    """Real-data noise for the premise check: ``round(rate · n)`` records, chosen by ``seed``, take another
    record's caption (text and word alignment), and independently ``round(rate_audio · n)`` take another
    record's audio track (decoded from that clip over the same window). Every record gets ground-truth flags
    ``noisy_text`` / ``noisy_audio``. Needs at least two records for a non-zero rate."""
    n = len(records)
    out = [dataclasses.replace(r, noisy_text=False, noisy_audio=False) for r in records]
    if n < 2:
        if rate_text > 0 or rate_audio > 0:
            raise ValueError(f"data.noise needs at least 2 training clips to swap between, got {n}")
        return out
    rng = random.Random(f"misalign:{seed}")
    for rate, kind in ((rate_text, "text"), (rate_audio, "audio")):
        k = int(round(rate * n))
        if k == 0:
            continue
        for i, j in _donors(rng.sample(range(n), k), n, rng).items():
            donor = records[j]
            if kind == "text":
                out[i] = dataclasses.replace(out[i], text=donor.text, text_ok=donor.text_ok, align=donor.align,
                                             noisy_text=True)
            else:
                out[i] = dataclasses.replace(out[i], audio=donor.audio if donor.audio is not None else donor.video,
                                             noisy_audio=True)
    return out


class ManifestDataset(Dataset):
    """Map-style dataset of real clips; item ``i`` is ``records[i]`` or, when that clip has no usable
    video, the next usable one (``i+1``, ``i+2``, ... wrapping), with the failures counted in ``bad``."""

    def __init__(self, cfg, records: List[ClipRecord], load_counts: Optional[Dict[str, int]] = None):
        self.cfg = cfg
        self.records = records
        self.load_counts = load_counts if load_counts is not None else zero_counts()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        counts = zero_counts()
        n = len(self.records)
        for attempt in range(min(n, MAX_REPLACEMENTS)):
            rec = self.records[(int(index) + attempt) % n]
            try:
                item = load_item(rec, self.cfg, counts)
            except ClipError as exc:
                note_bad(counts, exc.kind, exc.detail, rec.name)
                continue
            item["bad"] = counts
            return item
        raise RuntimeError(f"{min(n, MAX_REPLACEMENTS)} clips in a row from index {index} have no usable "
                           f"video (counts: { {k: v for k, v in counts.items() if v} }); check the data")


def build_manifest_splits(cfg) -> Tuple[ManifestDataset, ManifestDataset]:
    """(train, eval) datasets from ``data.manifest`` and ``data.eval_manifest`` (or a held-out split)."""
    if not cfg.manifest:
        raise ValueError("data.kind=manifest needs --data.manifest=PATH.jsonl")
    train, counts = read_manifest(cfg.manifest)
    if cfg.eval_manifest:
        held, eval_counts = read_manifest(cfg.eval_manifest)
        eval_path = cfg.eval_manifest
    else:
        train, held = split_entries(train, cfg.eval_size, cfg.seed)
        eval_counts, eval_path = zero_counts(), cfg.manifest
    labels = label_map(train + held)

    def records(entries, path):
        base = os.path.dirname(os.path.abspath(path))
        stem = os.path.splitext(os.path.basename(path))[0]
        return [to_record(e, base, stem, labels, i) for i, e in enumerate(entries)]

    train_records = records(train, cfg.manifest)
    if cfg.noise > 0 or cfg.noise_audio > 0:  # the held-out split stays clean
        train_records = misalign_records(train_records, cfg.noise, cfg.noise_audio, cfg.seed)
    return (ManifestDataset(cfg, train_records, counts),
            ManifestDataset(cfg, records(held, eval_path), eval_counts))
