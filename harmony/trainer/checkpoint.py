"""Checkpoints that make resume exact (docs/DESIGN.md "Command line and outputs").

One checkpoint is a folder ``<run_dir>/checkpoints/step_<8 digits>/``:

* ``state.pt`` (one process / DDP, written by rank 0): model and optimizer state;
  or ``dcp/`` (FSDP2): the sharded model and optimizer state written by every rank with
  torch.distributed.checkpoint;
* ``meta.pt`` (rank 0): step, scheduler state, the resolved config, world size, parallel mode;
* ``rank_<5 digits>.pt`` (one per rank): RNG states of torch (CPU and CUDA), numpy and Python, the
  harmonizer's state (score memory, GradVac EMA) and the trainer's per-rank counters — these differ per
  rank, so each rank keeps its own.

Everything is written under ``.tmp-step_...`` first (each file itself through a temp file and
``os.replace``), and the folder is renamed into place only when every rank is done, so a folder named
``step_*`` is always complete. Files are read with ``torch.load(weights_only=True)``: only tensors and
plain Python containers are stored.

A write that fails (a full disk, a quota, a file-size limit) on any rank fails the save on every rank
alike: the partial ``.tmp-step_...`` folder is removed, older checkpoints are untouched, and
:class:`CheckpointWriteError` says in one line which file, the OS error and the free space there.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from harmony import distributed as hd

_STEP_DIR = re.compile(r"^step_(\d+)$")


class _Sink:
    """A file for torch.save that keeps the OSError of a failed write: torch.save reports it only as a
    RuntimeError of its own ("unexpected pos ...")."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace: readers never see half a file.

    A failed write raises its OSError with ``filename`` set to ``path`` (the temp file is removed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            sink = _Sink(fh)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def load(path: Path, device: Optional[torch.device] = None) -> Any:
    return torch.load(path, map_location=device or "cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------ RNG

def rng_state() -> Dict[str, Any]:
    """RNG states of this process as tensors and plain containers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].cpu().numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ------------------------------------------------------------------------------------------- discovery

def step_dirs(ckpt_root: Path) -> List[Path]:
    """Complete checkpoint folders under ``ckpt_root``, oldest step first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: Path) -> Optional[Path]:
    """The newest checkpoint under a run folder, its checkpoints/ folder, or ``path`` itself if it is one."""
    path = Path(path)
    if _STEP_DIR.match(path.name) and (path / "meta.pt").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    dirs = step_dirs(root)
    return dirs[-1] if dirs else None


def step_of(ckpt: Path) -> int:
    return int(_STEP_DIR.match(Path(ckpt).name).group(1))


# ---------------------------------------------------------------------------------------- verification

class CheckpointError(Exception):
    """A checkpoint cannot be read; the message names the folder, the file and the cause."""


def _cause(exc: BaseException) -> str:
    """A short cause for an unreadable file, without torch's advice (weights_only=False is never the fix here:
    every file is written weights-only)."""
    text = str(exc).strip()
    if "Weights only load failed" in text:
        after = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else ""
        detail = next((ln.strip() for ln in after.splitlines() if ln.strip()), "")
        if detail.startswith("Check the documentation"):
            detail = ""
        return "damaged or foreign content, not a checkpoint file" + (f" ({detail})" if detail else "")
    if "central directory" in text or isinstance(exc, EOFError):
        return "the file is cut short (truncated or empty)"
    first = text.split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def verify_checkpoint(ckpt: Path) -> None:
    """Load every file of a checkpoint folder (weights_only) and check its layout; CheckpointError if one
    is missing or unreadable. A sharded checkpoint's ``dcp/`` is checked for its metadata file only."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint folder")

    def read(name: str) -> Any:
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file")
        try:
            return load(path)
        except Exception as exc:  # torch raises many kinds for damaged files
            raise CheckpointError(f"{path}: unreadable: {_cause(exc)}") from None

    meta = read("meta.pt")
    if not isinstance(meta, dict) or not {"step", "world_size", "sharded"} <= set(meta):
        raise CheckpointError(f"{ckpt / 'meta.pt'}: not a checkpoint's meta file (no step/world_size/sharded)")
    if meta["sharded"]:
        if not (ckpt / "dcp" / ".metadata").is_file():
            raise CheckpointError(f"{ckpt / 'dcp'}: the sharded state has no .metadata file")
    else:
        state = read("state.pt")
        if not isinstance(state, dict) or not {"model", "optim"} <= set(state):
            raise CheckpointError(f"{ckpt / 'state.pt'}: not a checkpoint's state file (no model/optim)")
    for rank in range(int(meta["world_size"])):
        read(f"rank_{rank:05d}.pt")


def find_readable(path: Path) -> "tuple[Optional[Path], List[tuple]]":
    """The newest checkpoint under ``path`` (a run folder or its checkpoints/) that verifies, and the
    newer ones that did not as [(folder, cause)], newest first. (None, []) when there is none at all."""
    path = Path(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    bad: List[tuple] = []
    for cand in reversed(step_dirs(root)):
        try:
            verify_checkpoint(cand)
            return cand, bad
        except CheckpointError as exc:
            bad.append((cand, str(exc)))
    return None, bad


def set_aside(ckpt: Path) -> Path:
    """Rename an unreadable checkpoint folder to ``step_N.corrupt`` (``.corrupt-2``, ... if taken); it is
    no longer a checkpoint for discovery or pruning, and stays for inspection."""
    ckpt = Path(ckpt)
    target, n = ckpt.with_name(ckpt.name + ".corrupt"), 2
    while target.exists():
        target, n = ckpt.with_name(f"{ckpt.name}.corrupt-{n}"), n + 1
    os.replace(ckpt, target)
    return target


# ------------------------------------------------------------------------------------------ save / load

class CheckpointWriteError(Exception):
    """A checkpoint could not be written on some rank (raised on every rank); the message is one line."""


def _size(n: float) -> str:
    """Bytes for a person: 0 B, 812.0 KiB, 70.0 GiB."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def _write_failure(exc: BaseException, folder: Path) -> str:
    """One line for a failed write: the file, the OS error, the free space on its disk where it can be read."""
    oserr, rank = exc, ""
    while oserr is not None and not isinstance(oserr, OSError):  # DCP wraps the writers' errors
        failures = sorted((getattr(oserr, "failures", None) or {}).items())  # DCP: {rank: (exception, traceback)}
        if failures:
            rank = f" on rank {failures[0][0]}"
        inner = [e[0] if isinstance(e, tuple) else e for _, e in failures]
        oserr = inner[0] if inner else (oserr.__cause__ or oserr.__context__)
    if oserr is None:
        return f"{folder}: {type(exc).__name__}: {exc}".splitlines()[0]
    where = Path(oserr.filename) if getattr(oserr, "filename", None) else folder
    what = f"[Errno {oserr.errno}] {oserr.strerror}{rank}" if oserr.errno else f"{oserr}{rank}"
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f" ({_size(shutil.disk_usage(probe).free)} free on that disk)"
    except OSError:
        free = ""
    return f"{where}: {what}{free}"


def _agree(error: str, cleanup: Path) -> None:
    """Every rank learns whether any rank failed (one collective); on a failure rank 0 removes ``cleanup`` and
    every rank raises CheckpointWriteError with the first failing rank's line."""
    error = hd.first_message(error)
    if not error:
        return
    if hd.get_rank() == 0:
        shutil.rmtree(cleanup, ignore_errors=True)
    hd.barrier()
    raise CheckpointWriteError(error)


def _model_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer):
    return hd.unwrap(model).state_dict(), optimizer.state_dict()


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, config: Dict[str, Any], harmonizer=None, rank_extra: Optional[dict] = None,
                    keep_last: int = 3) -> Path:
    """Write the checkpoint of ``step`` (collective: every rank calls it) and prune to ``keep_last``.

    ``rank_extra``: this rank's own plain state (trainer counters, noise window), stored in its rank file.
    Returns the final folder. A write that fails on any rank raises CheckpointWriteError on every rank, after
    the partial folder is removed; the checkpoints already there are left as they were.
    """
    env_rank, world = hd.get_rank(), hd.get_world_size()
    root = Path(ckpt_root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    error = ""
    if env_rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a run killed while saving
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as exc:
            error = _write_failure(exc, tmp)
    _agree(error, tmp)

    sharded = hd.is_fsdp(model)
    try:
        if sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.api import CheckpointException
            from torch.distributed.checkpoint.state_dict import get_state_dict

            msd, osd = get_state_dict(model, optimizer)
            try:
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
            except CheckpointException as exc:  # every rank's writer errors, raised on every rank
                error = _write_failure(exc, tmp / "dcp")
        elif env_rank == 0:
            msd, osd = _model_optim_state(model, optimizer)
            atomic_torch_save({"model": msd, "optim": osd}, tmp / "state.pt")

        per_rank = {"rng": rng_state(), "harmonizer": harmonizer.state_dict() if harmonizer is not None else None,
                    "extra": rank_extra or {}}
        if not error:
            atomic_torch_save(per_rank, tmp / f"rank_{env_rank:05d}.pt")
        if env_rank == 0 and not error:
            meta = {"step": step, "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "config": config, "world_size": world, "sharded": sharded}
            atomic_torch_save(meta, tmp / "meta.pt")
    except OSError as exc:
        error = _write_failure(exc, tmp)
    _agree(error, tmp)
    if env_rank == 0:
        try:
            if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as exc:
            error = _write_failure(exc, final)
    _agree(error, tmp)
    if env_rank == 0:
        for old in step_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    hd.barrier()
    return final


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], scheduler,
                    harmonizer=None, device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote into live objects; returns the meta dict with this
    rank's ``extra`` added. The RNG states are restored last, so nothing here disturbs them."""
    ckpt = Path(ckpt)
    rank, world = hd.get_rank(), hd.get_world_size()
    meta = load(ckpt / "meta.pt")
    if meta["sharded"]:
        if not hd.is_fsdp(model):
            raise RuntimeError(f"{ckpt} was written by an FSDP run; resume it with train.parallel=fsdp")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(ckpt / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
    else:
        if hd.is_fsdp(model):
            raise RuntimeError(f"{ckpt} was written by a non-FSDP run; resume it with train.parallel=none or ddp")
        state = load(ckpt / "state.pt", device)
        hd.unwrap(model).load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optim"])
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])

    rank_file = ckpt / f"rank_{rank:05d}.pt"
    if meta["world_size"] != world or not rank_file.is_file():
        warnings.warn(f"{ckpt} was written by {meta['world_size']} ranks, this run has {world}: per-rank RNG and "
                      "harmonizer state come from rank 0's file, so the resumed run is not bit-exact")
        rank_file = ckpt / "rank_00000.pt"
    per_rank = load(rank_file)  # on the CPU: RNG states must be CPU tensors; the harmonizer copies its own
    if harmonizer is not None and per_rank["harmonizer"] is not None:
        harmonizer.load_state_dict(per_rank["harmonizer"])
    set_rng_state(per_rank["rng"])
    meta["extra"] = per_rank["extra"]
    return meta
