"""From training: RUN_DIR/suspects.jsonl at the end of a run that keeps a per-item score memory
(harmony.curriculum.ScoreMemory), so the cheapest audit is the training run itself (docs/AUDIT.md "From
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

from pathlib import Path
from typing import List, Optional

import torch

from harmony.audit.records import write_jsonl
from harmony.audit.source import describe
from harmony.data.loader import build_dataset


def memory_rows(memory, score_kind: str, dataset=None) -> List[dict]:
    """One row per item the memory has seen, sorted by index (fields: module doc and docs/AUDIT.md)."""
    if memory is None or memory.num_items == 0:
        return []
    ids = torch.nonzero(memory.count > 0).flatten()
    score, _ = memory.scores(ids)
    rows = []
    for idx, s, seen in zip(ids.tolist(), score.double().tolist(), memory.count[ids].tolist()):
        row = {"index": idx, **(describe(dataset, idx) if dataset is not None else {"id": idx})}
        row.update(memory_score=round(s, 6), memory_seen=int(seen), suspect_any=round(-s, 6))
        if score_kind == "gmm":
            row.update(suspect_text=round(1.0 - s, 6), suspect_audio=None, suspect="text" if s < 0.5 else "none")
        else:
            row.update(suspect_text=None, suspect_audio=None, suspect=None)
        rows.append(row)
    return rows


def write_suspects(run_dir: Path, cfg, harmonizer) -> Optional[Path]:
    """Write RUN_DIR/suspects.jsonl from the harmonizer's score memory (rank 0 only; the memory is the same on
    every rank); None when there is no memory or it saw no item."""
    memory = getattr(harmonizer, "memory", None)
    if memory is None or not bool((memory.count > 0).any()):
        return None
    try:
        dataset = build_dataset(cfg.data, "train")
    except (OSError, ValueError, RuntimeError):
        dataset = None  # the rows keep their ids and scores without captions
    path = Path(run_dir) / "suspects.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    write_jsonl(tmp, memory_rows(memory, cfg.harmony.curriculum_score, dataset))
    tmp.replace(path)
    return path
