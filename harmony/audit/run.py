"""``python -m harmony.audit --run RUN_DIR --out OUT_DIR [options] [--section.key=value ...]``: score every item of
a run's training data (or of another source given by ``--data.*`` overrides) with the run's newest verified
checkpoint, and write OUT_DIR/audit.jsonl, OUT_DIR/index.html and its pictures (docs/AUDIT.md).

Under ``torchrun --nproc_per_node N`` every rank embeds and scores its share of the items against the same
reference set; rank 0 merges the rows and writes the folder (the same files as one process).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from harmony import distributed as hd
from harmony.audit import records
from harmony.audit.scoring import PAIRS, chance_loss, pair_scores, select_reference
from harmony.audit.source import (AuditError, load_config, load_model, open_dataset, rank_batches,
                                  verified_checkpoint)
from harmony.data.batch import add_counts, zero_counts
from harmony.trainer.metrics import Progress, write_json

USAGE = ("usage: python -m harmony.audit --run RUN_DIR --out OUT_DIR [--top N] [--reference N] [--batch-size N] "
         "[--section.key=value ...] (under torchrun write --run-dir: torchrun's own parser claims --run)")
_OPTIONS = {"run": str, "out": str, "top": int, "reference": int, "batch-size": int}
_DEFAULTS = {"top": 12, "reference": 4096, "batch-size": 64}
_EMB = ("z_va_v", "z_va_a", "z_vt_v", "z_vt_t")


def parse_argv(argv: Sequence[str]) -> Tuple[dict, List[Tuple[str, str]]]:
    """argv -> (audit options, [(section.key, value)] config overrides). AuditError on a bad argument."""
    opts, overrides = dict(_DEFAULTS), []
    i, argv = 0, list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise AuditError(f"unexpected argument {arg!r}; {USAGE}")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise AuditError(f"--{name} needs a value; {USAGE}")
            value, i = argv[i + 1], i + 1
        i += 1
        name = "run" if name == "run-dir" else name
        if name in _OPTIONS:
            try:
                opts[name] = _OPTIONS[name](value)
            except ValueError:
                raise AuditError(f"--{name}={value!r} is not a {_OPTIONS[name].__name__}") from None
        elif "." in name:
            overrides.append((name, value))
        else:
            raise AuditError(f"unknown option --{name}; {USAGE}")
    for need in ("run", "out"):
        if need not in opts:
            raise AuditError(f"--{need} is required; {USAGE}")
    if opts["top"] < 1 or opts["batch-size"] < 1:
        raise AuditError("--top and --batch-size must be at least 1")
    return opts, overrides


# ---------------------------------------------------------------------------------------------- embedding

@torch.no_grad()
def embed_share(model, cfg, dataset, batch_size: int, env, progress_every: float = 10.0):
    """Embed this rank's share: -> (embeddings {key: [n, ...]} + index, valid_va [n, 1], valid_vt [n, L];
    row info dicts; bad-media counts; [(index, why)] items that could not be scored)."""
    rows: Dict[str, list] = {k: [] for k in _EMB + ("index", "valid_va", "valid_vt")}
    infos, bad, unscored = [], zero_counts(), []
    total = _share_batches(dataset, batch_size, env)
    progress = Progress(total or 0, enabled=False)
    last, embedded = time.perf_counter(), 0
    for n, batch in enumerate(rank_batches(cfg, dataset, batch_size, env.rank, env.world_size), 1):
        embedded += int(batch["index"].numel())
        add_counts(bad, batch["bad"])
        unscored += batch["failed"]
        if batch["index"].numel():
            keep = batch["index"] == batch["requested"]
            for req in batch["requested"][~keep].tolist():
                unscored.append((req, "no usable video: the data layer substituted the next clip"))
            if keep.any():
                _embed_batch(model, batch, keep, env.device, rows, infos)
        if env.is_main and total and (time.perf_counter() - last > progress_every or n == total):
            last = time.perf_counter()
            print(f"audit: embedding batch {progress.line(n, {'items on rank 0': embedded})}", flush=True)
    return _stack(rows, model, cfg), infos, bad, unscored


def _stack(rows: Dict[str, list], model, cfg) -> Dict[str, torch.Tensor]:
    """Concatenate the batches' rows; a rank with no item gets empty tensors of the right shapes (its share
    still takes part in the collectives)."""
    d_va, d_vt, cands = model.dims["d_va"], model.dims["d_vt"], cfg.data.candidates
    empty = {"z_va_v": (d_va,), "z_va_a": (d_va,), "z_vt_v": (d_vt,), "z_vt_t": (cands, d_vt), "index": (),
             "valid_va": (1,), "valid_vt": (cands,)}
    dtypes = {"index": torch.long, "valid_va": torch.bool, "valid_vt": torch.bool}
    return {k: torch.cat(v) if v else torch.zeros((0,) + empty[k], dtype=dtypes.get(k, torch.float32))
            for k, v in rows.items()}


def _share_batches(dataset, batch_size: int, env) -> Optional[int]:
    try:
        return math.ceil(len(range(env.rank, len(dataset), env.world_size)) / batch_size)
    except TypeError:
        return None


def _embed_batch(model, batch, keep, device, rows, infos) -> None:
    out = model(batch["video"][keep].to(device), batch["audio"][keep].to(device), batch["text"][keep].to(device))
    for k in _EMB:
        rows[k].append(getattr(out, k).float().cpu())
    index = batch["index"][keep]
    rows["index"].append(index)
    rows["valid_va"].append(batch["mask_va"][keep].bool()[:, None])
    rows["valid_vt"].append(batch["mask_vt"][keep].bool()[:, None] & out.cand_mask.cpu().bool())
    infos += [batch["info"][k] for k in keep.nonzero().flatten().tolist()]


# ----------------------------------------------------------------------------------------------- scoring

def reference_of(emb: dict, size: int, seed: int) -> dict:
    """The reference items' embeddings on every rank (sorted by index): the indices come from every rank,
    the reference is drawn from their union, and each rank contributes the reference rows it holds."""
    all_ids = hd.all_gather_rows(emb["index"])
    if all_ids.numel() == 0:  # every rank knows: all stop with the same error
        raise AuditError("no item of the data could be scored (see the bad-media warnings above)")
    ref_ids = select_reference(all_ids, size, seed)
    mine = torch.isin(emb["index"], ref_ids)
    packed = {k: hd.all_gather_rows(v[mine]) for k, v in emb.items()}
    order = torch.argsort(packed["index"])
    return {k: v[order] for k, v in packed.items()}


def score_share(emb: dict, ref: dict) -> Dict[str, object]:
    """Both pairs' PairScores of this rank's rows against the reference."""
    return {
        "text": pair_scores(emb["z_vt_v"], emb["z_vt_t"], emb["valid_vt"], emb["index"], ref["z_vt_v"],
                            ref["z_vt_t"], ref["valid_vt"], ref["index"]),
        "audio": pair_scores(emb["z_va_v"], emb["z_va_a"][:, None], emb["valid_va"], emb["index"], ref["z_va_v"],
                             ref["z_va_a"][:, None], ref["valid_va"], ref["index"]),
    }


def share_rows(emb: dict, infos: List[dict], scores: dict, ref: dict) -> List[dict]:
    """This rank's audit rows (before the split): index, the item's description, loss and rank per pair."""
    out = []
    ref_index = ref["index"].tolist()
    for k, idx in enumerate(emb["index"].tolist()):
        row = {"index": idx, **infos[k]}
        for pair in PAIRS:
            s = scores[pair]
            loss = float(s.loss[k])
            row[f"loss_{pair}"] = None if not math.isfinite(loss) else round(loss, 6)
            row[f"rank_{pair}"] = int(s.rank[k]) if math.isfinite(loss) else None
        best = int(scores["text"].best[k])
        row["best_text_index"] = ref_index[best] if best >= 0 else -1
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------- main

def audit(opts: dict, overrides: List[Tuple[str, str]]) -> Optional[dict]:
    """The whole audit on this rank; -> the summary on rank 0, None elsewhere."""
    cfg = load_config(Path(opts["run"]), overrides)
    checkpoint = verified_checkpoint(Path(opts["run"]))
    env = hd.init_distributed(cfg.train.device, "none")
    model = load_model(cfg, checkpoint).to(env.device)
    dataset = open_dataset(cfg)
    t0 = time.perf_counter()
    emb, infos, bad, unscored = embed_share(model, cfg, dataset, opts["batch-size"], env)
    ref = reference_of(emb, opts["reference"], cfg.data.seed)
    rows = records.merge_rows(share_rows(emb, infos, score_share(emb, ref), ref))
    bad_parts = hd.gather_object((bad, unscored))
    if not env.is_main:
        hd.barrier()
        return None
    bad = add_counts(zero_counts(), getattr(dataset, "load_counts", {}))
    unscored = []
    for counts, failed in bad_parts:
        add_counts(bad, counts)
        unscored += failed
    m = int(ref["index"].numel())
    splits = records.finish_rows(rows, {"text": chance_loss(m, cfg.data.candidates), "audio": chance_loss(m)})
    report = records.ground_truth_report(rows) if records.has_ground_truth(rows) else None
    summary = {"run": str(opts["run"]), "checkpoint": str(checkpoint), "items": len(rows),
               "reference_items": int(ref["index"].numel()), "world_size": env.world_size,
               "bad_media": {k: v for k, v in bad.items() if v},
               "bad_media_names": {k: v for k, v in getattr(bad, "names", {}).items() if v},
               "unscored": [{"index": i, "why": why} for i, why in sorted(unscored)],
               "splits": {p: s.as_dict() if s else None for p, s in splits.items()},
               "ground_truth": report, "seconds": time.perf_counter() - t0}
    with records.staged_output(Path(opts["out"])) as tmp:
        records.write_jsonl(tmp / "audit.jsonl", rows)
        write_json(tmp / "summary.json", summary)
        from harmony.audit.page import write_page  # matplotlib only when writing the page
        write_page(tmp, rows, summary, splits, cfg, dataset, opts["top"])
    _print_summary(summary, opts["out"])
    hd.barrier()
    return summary


def _print_summary(summary: dict, out: str) -> None:
    bad = ", ".join(f"{k} {v}" for k, v in summary["bad_media"].items()) or "none"
    print(f"audit: {summary['items']} items scored against {summary['reference_items']} reference items in "
          f"{summary['seconds']:.1f}s; bad media: {bad}; {len(summary['unscored'])} unscored", flush=True)
    if summary["ground_truth"]:
        for line in records.report_lines(summary["ground_truth"]):
            print(f"audit: {line}", flush=True)
    print(f"audit: wrote {out}/audit.jsonl and {out}/index.html", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: 0 on success; a one-line error and 2 (bad arguments or input) otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    try:
        opts, overrides = parse_argv(argv)
        audit(opts, overrides)
        return 0
    except AuditError as exc:
        print(f"audit: error: {exc}", file=sys.stderr)
        return 2
    finally:
        hd.shutdown()
