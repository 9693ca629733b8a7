"""The run folder: where a run writes, and which checkpoint it resumes from (docs/DESIGN.md "Command line and
outputs"). Rank 0 decides (the folder name carries its clock) and tells the others."""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Tuple

from harmony.trainer import checkpoint as ckpt
from harmony import distributed as hd
from harmony.config import dump_yaml
from harmony.config import Config, ConfigError
from harmony.trainer.inputs import check_inputs
from harmony.trainer.metrics import truncate_after
from harmony.trainer.runlock import RunLock


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def resolve_run_dir(cfg: Config, config_name: str, root: Path = Path("runs")) -> Path:
    """log.run_dir, else (resume=auto) the newest runs/<name>-* holding a checkpoint, else a new
    runs/<name>-<UTC time> (a numeric suffix if that exists)."""
    if cfg.log.run_dir:
        return Path(cfg.log.run_dir)
    if cfg.train.resume == "auto" and root.is_dir():
        candidates = [p for p in root.glob(f"{config_name}-*") if ckpt.latest_checkpoint(p) is not None]
        if candidates:
            return max(candidates, key=lambda p: p.stat().st_mtime)
    base = root / f"{config_name}-{_utc_stamp()}"
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    return path


def _check_resume(cfg: Config, run_dir: Path) -> Optional[Path]:
    """What can be checked before the run folder is touched: '' into a folder with checkpoints is an error;
    an explicit train.resume must name a readable checkpoint (returned). Errors name train.resume."""
    if cfg.train.resume == "":
        if ckpt.step_dirs(run_dir / "checkpoints"):
            raise ConfigError(f"log.run_dir={str(run_dir)!r} already holds checkpoints; continue it with "
                              "--train.resume=auto or choose another --log.run_dir")
        return None
    if cfg.train.resume == "auto":
        return None
    found = ckpt.latest_checkpoint(Path(cfg.train.resume))
    if found is None:
        raise ConfigError(f"train.resume={cfg.train.resume!r}: no checkpoint there; give '', 'auto', a run folder "
                          "or a checkpoints/step_* folder")
    try:
        ckpt.verify_checkpoint(found)
    except ckpt.CheckpointError as exc:
        raise ConfigError(f"train.resume={cfg.train.resume!r}: cannot resume from {found}: {exc}") from None
    return found


def _auto_resume(run_dir: Path) -> Optional[Path]:
    """train.resume=auto: the newest checkpoint of ``run_dir`` that reads back. Newer unreadable ones are named
    with their cause and renamed to step_N.corrupt; if none reads back, a ConfigError names them all."""
    found, bad = ckpt.find_readable(run_dir)
    if found is None and bad:
        raise ConfigError("train.resume=auto: no readable checkpoint in " + str(run_dir) + ": "
                          + "; ".join(cause for _, cause in bad))
    for folder, cause in bad:
        moved = ckpt.set_aside(folder)
        print(f"checkpoint {folder} is unreadable ({cause}); moved aside to {moved.name}, resuming from an "
              f"older one", file=sys.stderr, flush=True)
    return found


def prepare_run_dir(cfg: Config, config_name: str, is_main: bool) -> Tuple[Path, Optional[Path], Optional[RunLock]]:
    """On every rank: (run folder, checkpoint to resume from or None, rank 0's lock on the folder or None).

    Rank 0 checks the user's inputs before the folder exists, resolves it and the checkpoint, locks the folder
    (one live run per folder) and writes the resolved config; a ConfigError is raised on every rank."""
    run_dir, error, resume_from, lock = "", "", "", None
    try:
        if is_main:
            try:
                check_inputs(cfg)  # user-input errors come before the run folder exists
                found_dir = resolve_run_dir(cfg, config_name)
                found = _check_resume(cfg, found_dir)
                lock = RunLock(found_dir).acquire()  # creates the folder
                if cfg.train.resume == "auto":
                    found = _auto_resume(found_dir)
                run_dir, resume_from = str(found_dir), str(found or "")
            except ConfigError as exc:  # raised on every rank below, not only on rank 0
                error = str(exc)
        run_dir, error, resume_from = hd.broadcast_object((run_dir, error, resume_from))
        if error:
            raise ConfigError(error)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    cfg.log.run_dir = run_dir
    if is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "config.yaml").write_text(dump_yaml(cfg))
        d = cfg.data
        if d.kind != "synthetic" and (d.noise > 0 or d.noise_audio > 0):
            print(f"data.noise={d.noise:g}, data.noise_audio={d.noise_audio:g}: injecting noise into real data "
                  f"({d.noise:.0%} of training captions and {d.noise_audio:.0%} of audio tracks swapped between "
                  "clips)", flush=True)
    hd.barrier()
    return Path(run_dir), Path(resume_from) if resume_from else None, lock


def reset_logs(run_dir: Path, step: Optional[int], is_main: bool) -> None:
    """The run's logs (metrics.jsonl, eval.jsonl) as of ``step``: lines after it dropped on a resume, the files
    deleted on a fresh run (``step`` None). Rank 0 writes; every rank waits for it."""
    if is_main:
        for name in ("metrics.jsonl", "eval.jsonl"):
            if step is None:
                (run_dir / name).unlink(missing_ok=True)
            else:
                truncate_after(run_dir / name, step)
    hd.barrier()
