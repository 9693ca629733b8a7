"""From training: RUN_DIR/suspects.jsonl at the end of a run that keeps a per-item score memory
(harmony.method.curriculum.ScoreMemory), so the cheapest audit is the training run itself (docs/AUDIT.md "From
training").

The memory holds ONE number per item: an EMA, over the epochs, of the score the curriculum ranks by
(``harmony.curriculum_score``), measured in the training batches. What that number can say:

* ``gmm``: the posterior that the item's caption loss belongs to the low-loss component, so
  ``suspect_text`` = 1 − memory score (a probability) and ``suspect`` is "text" above 1/2, else "none";
  the memory says nothing about the audio pair: ``suspect_audio`` is null.
* ``cos``, ``gvt``, ``combo``, ``loss``: a cross-modal agreement or a loss of the whole triplet: it ranks
  items (``suspect_any`` = −memory score, higher = more suspect) but cannot name the broken pair, so
  ``suspect_text``, ``suspect_audio`` and ``suspect`` are null.

The memory scores come from batches (they depend on the batch an item met); ``python -m harmony.audit``
scores against a fixed reference instead and names the pair.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import torch

from harmony.audit.records import write_jsonl
from harmony.audit.source import describe
from harmony.data.loader import build_dataset


def memory_rows(memory, score_kind: str, dataset=None, num_items: Optional[int] = None) -> List[dict]:
    """One row per item the memory has seen, sorted by index (fields: module doc and docs/AUDIT.md). Only the
    memory's ``scores(ids) -> (score, seen)`` is required (as the noise monitor uses it); ``count`` (how many
    observations), when the memory has it, fills ``memory_seen``. ``num_items``: the ids to ask about
    (default: the memory's own size)."""
    n = num_items if num_items is not None else int(getattr(memory, "num_items", 0))
    if memory is None or n == 0:
        return []
    ids = torch.arange(n)
    score, seen = memory.scores(ids)
    ids, score = ids[seen], score[seen].double()
    count = getattr(memory, "count", None)
    rows = []
    for idx, s in zip(ids.tolist(), score.tolist()):
        row = {"index": idx, **(describe(dataset, idx) if dataset is not None else {"id": idx})}
        times = int(count[idx]) if count is not None and idx < count.numel() else None
        row.update(memory_score=round(s, 6), memory_seen=times, suspect_any=round(-s, 6))
        if score_kind == "gmm":
            row.update(suspect_text=round(1.0 - s, 6), suspect_audio=None, suspect="text" if s < 0.5 else "none")
        else:
            row.update(suspect_text=None, suspect_audio=None, suspect=None)
        rows.append(row)
    return rows


def write_suspects(run_dir: Path, cfg, harmonizer) -> Optional[Path]:
    """Write RUN_DIR/suspects.jsonl from the harmonizer's score memory (rank 0 only; the memory is the same on
    every rank); None when there is no memory or it saw no item."""
    memory = harmonizer.memory if harmonizer is not None else None  # the trainer's contract: a harmonizer keeps one
    if memory is None:
        return None
    try:
        dataset = build_dataset(cfg.data, "train")
        num_items = len(dataset)
    except (OSError, ValueError, RuntimeError, TypeError):
        dataset, num_items = None, None  # the rows keep their ids and scores without captions
    try:
        rows = memory_rows(memory, cfg.harmony.curriculum_score, dataset, num_items)
        if not rows:
            return None
        path = Path(run_dir) / "suspects.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        write_jsonl(tmp, rows)
        tmp.replace(path)
        return path
    except Exception as exc:  # the run is over and its summary written: a list it cannot make is not worth a crash
        print(f"suspects.jsonl not written: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
