"""What an audit reads: the run (its resolved config and newest verified checkpoint, as a model in eval mode)
and the data (this rank's share of every item, streamed in batches, with what a person needs to see an item:
its id, path, source, caption text and, where the data carries it, the ground truth of injected misalignment).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from harmony.trainer import checkpoint as ckpt
from harmony.cli import REAL_DATA_VALUES, apply_mapping, set_value
from harmony.config import Config, ConfigError
from harmony.data.align import AlignError, read_grid_align
from harmony.data.batch import collate
from harmony.data.loader import build_dataset
from harmony.data.manifest import ManifestDataset
from harmony.data.shards import ShardStream
from harmony.data.synthetic import SyntheticDataset


class AuditError(Exception):
    """A problem with the audit's input: the message is the one line the user sees."""


# --------------------------------------------------------------------------------------------- the run

def load_config(run_dir: Path, overrides: Sequence[Tuple[str, str]]) -> Config:
    """RUN_DIR/config.yaml (the run's resolved config) with ``--section.key=value`` overrides applied."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditError(f"--run {run_dir}: no such run folder")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise AuditError(f"--run {run_dir}: no config.yaml (not a run folder written by train.py)")
    try:
        cfg = Config()
        apply_mapping(cfg, yaml.safe_load(path.read_text()) or {}, origin=str(path))
        trained_on = _source(cfg)
        for dotted, value in overrides:
            set_value(cfg, dotted, value)
        if _source(cfg) != trained_on and cfg.data.kind != "synthetic":
            # as train.py does for real data: the run's injected noise does not carry over to another source
            for dotted, value in REAL_DATA_VALUES.items():
                if dotted not in dict(overrides):
                    setattr(cfg.data, dotted.split(".", 1)[1], value)
        return cfg.validate()
    except (ConfigError, yaml.YAMLError) as exc:
        raise AuditError(f"{path}: {exc}") from None


def _source(cfg: Config) -> tuple:
    return cfg.data.kind, cfg.data.manifest, cfg.data.shards


def verified_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of the run that verifies (harmony.trainer.checkpoint.find_readable); newer unreadable
    ones are named on stderr. AuditError when there is none, or none readable."""
    found, bad = ckpt.find_readable(Path(run_dir))
    if found is None:
        if bad:
            raise AuditError(f"--run {run_dir}: no readable checkpoint ({bad[0][1]})")
        raise AuditError(f"--run {run_dir}: no checkpoint (checkpoints/step_* is empty or missing)")
    for folder, cause in bad:
        print(f"audit: skipping unreadable checkpoint {folder}: {cause}; using {found.name}", file=sys.stderr)
    return found


def load_model(cfg: Config, checkpoint: Path) -> torch.nn.Module:
    """VATT of the run's config with the checkpoint's weights, on the CPU, in eval mode (no DropToken)."""
    from harmony.model import VATT

    model = VATT(cfg.model, cfg.data)
    meta = ckpt.load(checkpoint / "meta.pt")
    try:
        if meta["sharded"]:
            import torch.distributed.checkpoint as dcp

            state = {"model": model.state_dict()}
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, checkpoint_id=str(checkpoint / "dcp"), no_dist=True)
            model.load_state_dict(state["model"])
        else:
            model.load_state_dict(ckpt.load(checkpoint / "state.pt")["model"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AuditError(f"{checkpoint}: its weights do not fit the run's model config ({first})") from None
    return model.eval()


# -------------------------------------------------------------------------------------------- the data

def open_dataset(cfg: Config):
    """The training split of cfg.data (map-style, or a ShardStream); AuditError for data that cannot be read."""
    try:
        return build_dataset(cfg.data, "train")
    except (OSError, ValueError, RuntimeError) as exc:
        where = cfg.data.manifest if cfg.data.kind == "manifest" else cfg.data.shards
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise AuditError(f"data.{cfg.data.kind} {where}: cannot read it ({text})") from None


def describe(dataset, index: int, item: Optional[dict] = None, captions: Optional[List[str]] = None) -> dict:
    """What a person needs to see item ``index``: id, caption (the first candidate), and for real clips path
    and source; with ground truth, noisy_text / noisy_audio. ``item`` (and for synthetic data ``captions``):
    the item when at hand, so it is not generated again."""
    if isinstance(dataset, SyntheticDataset):
        if item is None or captions is None:
            item, captions = dataset.generate(index)
        return {"id": index, "caption": captions[0] if captions else "", "source": "synthetic",
                "noisy_text": bool(item["noisy_text"]), "noisy_audio": bool(item["noisy_audio"])}
    if isinstance(dataset, ManifestDataset):
        rec = dataset.records[index]
        info = {"id": rec.name, "path": str(rec.video), "source": rec.source, "caption": _record_caption(rec)}
        if rec.noisy_text is not None:
            info.update(noisy_text=bool(rec.noisy_text), noisy_audio=bool(rec.noisy_audio))
        return info
    return {"id": index, "source": (item or {}).get("source", ""), "caption": None}


def _record_caption(rec) -> str:
    """The caption of a manifest record: its text, else the words of its alignment file."""
    if rec.text is not None:
        return rec.text if isinstance(rec.text, str) else " | ".join(map(str, rec.text))
    if isinstance(rec.align, (str, bytes, os.PathLike)):
        try:
            return " ".join(w for _, _, w in read_grid_align(rec.align))
        except AlignError:
            return ""
    if rec.align:
        return " ".join(str(w[2]) for w in rec.align if len(w) > 2)
    return ""


class _Requested(Dataset):
    """Items of a map-style dataset with the index that was asked for (a clip without usable video comes back
    as a later one: the asked-for index is then reported as bad media, not scored twice)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        captions = None
        try:
            if isinstance(self.dataset, SyntheticDataset):
                item, captions = self.dataset.generate(int(index))
            else:
                item = self.dataset[int(index)]
        except RuntimeError as exc:  # a run of clips without video: nothing to substitute
            return {"requested": int(index), "failed": str(exc).splitlines()[0]}
        item["requested"] = int(index)
        item["info"] = describe(self.dataset, item["index"], item, captions)
        return item


def _collate(items: List[dict]) -> dict:
    ok = [it for it in items if "failed" not in it]
    batch = collate(ok) if ok else {"index": torch.zeros(0, dtype=torch.long), "bad": {}}
    batch["info"] = [it["info"] for it in ok]
    batch["requested"] = torch.tensor([it["requested"] for it in ok], dtype=torch.long)
    batch["failed"] = [(it["requested"], it["failed"]) for it in items if "failed" in it]
    return batch


def rank_batches(cfg: Config, dataset, batch_size: int, rank: int, world: int) -> Iterator[dict]:
    """This rank's share of every item, one pass, in batches: map-style items rank, rank+world, ... (each item
    exactly once over the ranks); shards: the rank's shards (harmony.data.shards). Each batch is the batch
    contract plus ``requested`` [b] (map-style) and ``failed`` [(index, why)]."""
    if isinstance(dataset, ShardStream):
        stream = ShardStream(dataset.split, cfg.data, batch_size, rank, world, cfg.train.seed, 0, False, False)
        for batch in DataLoader(stream, batch_size=None, num_workers=cfg.data.workers, collate_fn=lambda b: b):
            batch["requested"] = batch["index"].clone()
            batch["info"] = [describe(dataset, i, {"source": src}) for i, src in zip(batch["index"].tolist(),
                                                                                     batch["source"])]
            batch["failed"] = []
            yield batch
        return
    mine = list(range(rank, len(dataset), world))
    chunks = [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
    yield from DataLoader(_Requested(dataset), batch_sampler=chunks, num_workers=cfg.data.workers,
                          collate_fn=_collate)


def fetch_items(cfg: Config, dataset, indices: Sequence[int]) -> Dict[int, dict]:
    """Decoded items for the page ({index: item}); a stream is read once, keeping the wanted ones."""
    wanted = set(int(i) for i in indices)
    if isinstance(dataset, ShardStream):
        out = {}
        for batch in rank_batches(cfg, dataset, 16, 0, 1):
            for k, idx in enumerate(batch["index"].tolist()):
                if idx in wanted:
                    out[idx] = {"video": batch["video"][k], "audio": batch["audio"][k]}
        return out
    return {i: dataset[i] for i in sorted(wanted)}
