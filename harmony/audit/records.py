"""The audit's rows: merged from every rank, finished on rank 0 (split, suspects), checked against ground truth,
and written to an output folder that appears whole or not at all (docs/AUDIT.md "Fields")."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from harmony import distributed as hd
from harmony.audit.scoring import PAIRS, Split, fit_split, misaligned_posterior, suspect_pair, suspicion
from harmony.trainer.evaluate import roc_auc
from harmony.trainer.metrics import dumps

PRECISION_AT = (10, 50, 100)


def merge_rows(rows: List[dict]) -> Optional[List[dict]]:
    """Every rank's rows on rank 0, one per item, sorted by dataset index (None on the other ranks)."""
    parts = hd.gather_object(rows)
    if parts is None:
        return None
    merged: Dict[int, dict] = {}
    for part in parts:
        for row in part:
            merged.setdefault(int(row["index"]), row)
    return [merged[k] for k in sorted(merged)]


def finish_rows(rows: List[dict], chance: Dict[str, float]) -> Dict[str, Optional[Split]]:
    """Fit the split of each pair to every item's loss and add suspect_<pair>, p_misaligned_<pair>, suspect and
    best_caption to the rows (in place). ``chance``: {pair: chance_loss}. -> {pair: split}."""
    splits, posts = {}, {}
    for pair in PAIRS:
        loss = torch.tensor([_num(r[f"loss_{pair}"]) for r in rows], dtype=torch.float64)
        splits[pair] = fit_split(loss, chance[pair])
        posts[pair] = misaligned_posterior(loss, splits[pair])
        for r, s, p in zip(rows, suspicion(loss, splits[pair]).tolist(), posts[pair].tolist()):
            r[f"suspect_{pair}"] = _json_float(s)
            r[f"p_misaligned_{pair}"] = _json_float(p)
    names = suspect_pair(posts["text"], posts["audio"])
    caption_of = {int(r["index"]): r.get("caption") for r in rows}
    for r, name in zip(rows, names):
        r["suspect"] = name
        best = r.pop("best_text_index", -1)
        r["best_caption"] = r.get("caption") if best < 0 else caption_of.get(best)
        r["best_caption_is_own"] = best < 0
    return splits


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _json_float(x: float) -> Optional[float]:
    return None if not math.isfinite(x) else round(float(x), 6)


def has_ground_truth(rows: Sequence[dict]) -> bool:
    return bool(rows) and all("noisy_text" in r for r in rows)


def ground_truth_report(rows: Sequence[dict]) -> dict:
    """Against the rows' noisy_text / noisy_audio flags: AUC of suspect_<pair> per pair (positives: that pair
    misaligned; negatives: every other scored item), precision@k of each pair's ranking (k in 10, 50, 100 and
    the number misaligned), and how often ``suspect`` names the right pair(s) for the misaligned items."""
    out: dict = {"items": len(rows)}
    for pair in PAIRS:
        scored = [r for r in rows if r[f"suspect_{pair}"] is not None]
        score = torch.tensor([r[f"suspect_{pair}"] for r in scored], dtype=torch.float64)
        flag = torch.tensor([bool(r[f"noisy_{pair}"]) for r in scored])
        order = torch.argsort(-score, stable=True)
        n_noisy = int(flag.sum())
        out[f"auc_{pair}"] = roc_auc(score, flag)
        out[f"misaligned_{pair}"] = n_noisy
        ks = sorted({min(k, len(scored)) for k in PRECISION_AT} | {n_noisy}) if n_noisy else []
        out[f"precision_at_{pair}"] = {str(k): float(flag[order[:k]].double().mean()) for k in ks if k > 0}
    truth = [_truth(r) for r in rows]
    bad = [(r, t) for r, t in zip(rows, truth) if t != "none"]
    flagged = [(r, t) for r, t in bad if r["suspect"] != "none"]
    out["misaligned"] = len(bad)
    out["flagged_misaligned"] = len(flagged)
    out["pair_correct_flagged"] = sum(r["suspect"] == t for r, t in flagged) / len(flagged) if flagged else float("nan")
    out["pair_correct_all"] = sum(r["suspect"] == t for r, t in bad) / len(bad) if bad else float("nan")
    out["false_flags"] = sum(r["suspect"] != "none" for r, t in zip(rows, truth) if t == "none")
    return out


def _truth(row: dict) -> str:
    t, a = bool(row["noisy_text"]), bool(row["noisy_audio"])
    return "both" if t and a else "text" if t else "audio" if a else "none"


def fmt(x, digits: int = 3) -> str:
    """A number for people: "n/a" for None or NaN (a report read back from JSON holds null for NaN)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def report_lines(report: dict) -> List[str]:
    """The ground-truth report as short lines (stdout and the page)."""
    lines = []
    for pair in PAIRS:
        pk = ", ".join(f"P@{k} {v:.3f}" for k, v in report[f"precision_at_{pair}"].items()) or "no precision"
        lines.append(f"{pair}: AUC {fmt(report[f'auc_{pair}'], 4)} over {report['items']} items "
                     f"({report[f'misaligned_{pair}']} misaligned); {pk}")
    flagged = (f"{fmt(report['pair_correct_flagged'])} of the {report['flagged_misaligned']} flagged misaligned items"
               if report["flagged_misaligned"] else "no misaligned item flagged")
    lines.append(f"suspect pair named correctly: {flagged}, {fmt(report['pair_correct_all'])} of all "
                 f"{report['misaligned']} misaligned; {report['false_flags']} clean items flagged")
    return lines


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(dumps(row) + "\n")


@contextlib.contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """A temp folder beside ``out_dir`` to write into; renamed to ``out_dir`` (replacing an older one) when
    the block ends normally, removed when it raises — a half-written OUT_DIR never appears."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


