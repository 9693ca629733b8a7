"""The trainer: a loop of named phases (data, forward, harmonize, step, eval, checkpoint) over VATT with
per-sample gradient harmonization, inside DDP or FSDP2 (SPEC §7, §10, §11, §13).

``python train.py --config configs/default.yaml --train.steps=100`` or, on N processes,
``torchrun --nproc_per_node N train.py ... --train.parallel=ddp``.

Decisions worth knowing:
* ``train.batch_size`` is the GLOBAL batch of one optimizer step; every rank takes
  batch_size / (world_size · grad_accum) samples per micro-step. The contrastive losses gather negatives
  over ranks, so one step on N ranks sees the same batch as one process (the tests check that).
* Randomness: model init uses ``train.seed`` on every rank (identical weights); afterwards each rank reseeds
  with seed + 100003·rank (dropout differs per rank). DropToken draws its one permutation per micro-step
  from a generator seeded by (seed, micro-step index) that is the SAME on every rank, so DropToken does
  not depend on the number of ranks, and needs no saved state.
* Gradient accumulation: the micro-steps' gradients are summed (no DDP/FSDP sync before the last one)
  and scaled by 1/grad_accum before clipping; the harmonizer's ``backward`` must therefore ADD into .grad
  like autograd does.
* Non-finite loss or gradient norm on any rank: the step is skipped on every rank (one all-reduced flag),
  counted in metrics (``skipped_steps``); ``train.max_bad_steps`` consecutive skips abort the run.
* Fault tolerance: under ``torchrun --max-restarts=K`` use ``--train.resume=auto`` (and a fixed
  ``--log.run_dir``, or the default one, which auto-resume finds as the newest ``runs/<config>-*``
  folder with a checkpoint): a restarted group continues from the last checkpoint, exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import random
import signal
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import nn

from harmony import checkpoint as ckpt
from harmony import distributed as hd
from harmony.cli import config_to_dict, dump_yaml, format_help, parse_args
from harmony.config import Config, ConfigError, _parse_step_range
from harmony.evaluate import evaluate, flatten_metrics, noise_detection_auc, roc_auc
from harmony.inputs import check_inputs
from harmony.metrics import MetricsWriter, Progress, truncate_after, write_json
from harmony.nvtx import nvtx_range
from harmony.preempt import Interrupted, Preemption
from harmony.runlock import RunLock
from harmony.schedule import build_scheduler

_RANK_SEED_STRIDE = 100003


class TrainingStopped(RuntimeError):
    """The run stopped before train.steps for a reason of its own (train.max_bad_steps); summary.json says why."""


# ----------------------------------------------------------------------------------------------- parts

@dataclass
class Parts:
    """What the trainer drives. ``default_parts()`` gives the project's own; tests may pass small ones with
    the same interfaces."""

    build_model: Callable[[Config], nn.Module]                 # cfg -> model(video, audio, text) -> outputs
    build_loader: Callable[..., Iterable[dict]]                # (data_cfg, split, batch, rank, world, seed, start_step,
                                                               #  drop_last=, sampler=)
    nce: Callable[..., torch.Tensor]                           # (z_v, z_a, mask=, definition=) -> ℓ^va [B]
    mil_nce: Callable[..., torch.Tensor]                       # (z_vt, z_t, mask=, cand_mask=, definition=) -> ℓ^vt
    build_harmonizer: Optional[Callable[[nn.Module, Any], Any]] = None  # (wrapped model, harmony_cfg) -> harmonizer


def default_parts() -> Parts:
    """VATT, the harmony data loaders, the CMA losses and the GradientHarmonizer."""
    from harmony.data import build_loader
    from harmony.losses import mil_nce, nce
    from harmony.model import VATT

    def build_harmonizer(model, harmony_cfg):
        from harmony import GradientHarmonizer

        return GradientHarmonizer(model, harmony_cfg)

    return Parts(build_model=lambda cfg: VATT(cfg.model, cfg.data), build_loader=build_loader, nce=nce,
                 mil_nce=mil_nce, build_harmonizer=build_harmonizer)


# ------------------------------------------------------------------------------------------- run folder

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


# ------------------------------------------------------------------------------------------- helpers

def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _bad_names(batch: dict) -> Dict[str, List[str]]:
    """The batch's offending clips / manifest lines per bad-input kind (empty when the data names none)."""
    return dict(getattr(batch.get("bad"), "names", {}) or {})


_BAD_EXAMPLES = 5  # offending clips / lines of each kind named in summary.json


def _bad_counts(batch: dict) -> Dict[str, float]:
    """The batch's bad-input counts as {kind: n} (a plain number is reported as 'bad')."""
    bad = batch.get("bad")
    if bad is None:
        return {}
    if isinstance(bad, dict):
        return {k: float(v) for k, v in bad.items()}
    return {"bad": float(torch.as_tensor(bad).sum())}


def _stat(stats: Any, name: str) -> Optional[torch.Tensor]:
    v = getattr(stats, name, None) if not isinstance(stats, dict) else stats.get(name)
    return v.detach() if torch.is_tensor(v) else v


def _build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only (biases, norms and 1-D tables get none).

    ``train.optimizer=adamw``: torch's fused implementation where the parameters allow it, else foreach.
    ``apex``: apex.optimizers.FusedAdam (adam_w_mode) — only when apex is importable; never a requirement."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if t.optimizer == "apex":
        try:
            from apex.optimizers import FusedAdam
        except Exception as exc:
            raise ConfigError(f"train.optimizer='apex' but apex is not importable ({exc}); use train.optimizer=adamw")
        return FusedAdam(groups, lr=t.lr, betas=(t.beta1, t.beta2), adam_w_mode=True)
    # fused kernels exist for CUDA and CPU tensors; DTensor (FSDP2) parameters support them on CUDA only
    sharded = any(hasattr(p, "device_mesh") for p in params)
    fused = device.type == "cuda" or (device.type == "cpu" and not sharded)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused,
                             foreach=None if fused else True)


class _StepAwareSampler(torch.utils.data.Sampler):
    """Hands the trainer's current step to the prioritized sampler at each epoch start (its priorities
    follow the curriculum's progress); the loader only knows the epoch number."""

    def __init__(self, sampler, trainer: "Trainer"):
        self.sampler, self.trainer = sampler, trainer

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch, step=self.trainer.step)

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _Window:
    """Sums over the steps since the last log line (local to this rank; reduced over ranks when logged)."""

    def __init__(self, bins: int):
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.sums = dict.fromkeys(("cos_sum", "cos_n", "conflict_n", "kept_n", "samples", "skipped", "grad_norm",
                                   "grad_norm_n", "time"), 0.0)
        self.loss_parts: List[float] = []  # per micro-step: Σ m ℓ^va, Σ m^a, Σ m ℓ^vt, Σ m^t (local)
        self.bad: Dict[str, float] = {}
        self.bad_names: Dict[str, List[str]] = {}
        self.hist = torch.zeros(self.bins, dtype=torch.float64)
        self.has_cos = False
        # per micro-step, where the batch carries ground-truth misalignment flags: per-sample cosines and flags
        # for the noise statistics of this window (noise AUC, conflict fraction on clean vs misaligned samples)
        self.noise: List[dict] = []


def _finite(metrics: Dict[str, float]) -> Dict[str, float]:
    """Drop NaN entries (an AUC with no positives or no negatives in the window)."""
    return {k: v for k, v in metrics.items() if v == v}


# -------------------------------------------------------------------------------------------- trainer

class Trainer:
    """One training run. ``Trainer(cfg, name).fit()`` -> the summary dict (rank 0 writes the run folder)."""

    def __init__(self, cfg: Config, config_name: str = "default", parts: Optional[Parts] = None):
        self.cfg = cfg.validate()
        self.config_name = config_name
        self.profile_nsys = _parse_step_range(cfg.profile.nsys, "profile.nsys")
        self.profile_torch = _parse_step_range(cfg.profile.torch, "profile.torch")
        self.parts = parts or default_parts()
        self.env = hd.init_distributed(cfg.train.device, cfg.train.parallel)
        self._owns_group = self.env.backend != ""
        self._lock: Optional[RunLock] = None
        try:
            self.micro_batch = self._micro_batch()
            self._setup_run_dir()
            self._build()
            self._restore()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ setup
    def _micro_batch(self) -> int:
        t, world = self.cfg.train, self.env.world_size
        if t.batch_size % (world * t.grad_accum):
            raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by world_size·grad_accum = "
                              f"{world}·{t.grad_accum} (it is the global batch of one optimizer step)")
        if world > 1 and t.parallel == "none":
            raise ConfigError(f"train.parallel='none' with {world} processes; choose one of ['ddp', 'fsdp']")
        return t.batch_size // (world * t.grad_accum)

    def _setup_run_dir(self) -> None:
        run_dir, error, resume_from = "", "", ""
        if self.env.is_main:  # rank 0 decides (the folder name carries its clock) and tells the others
            try:
                check_inputs(self.cfg)  # user-input errors come before the run folder exists
                found_dir = resolve_run_dir(self.cfg, self.config_name)
                found = _check_resume(self.cfg, found_dir)
                self._lock = RunLock(found_dir).acquire()  # creates the folder; one live run per folder
                if self.cfg.train.resume == "auto":
                    found = _auto_resume(found_dir)
                run_dir, resume_from = str(found_dir), str(found or "")
            except ConfigError as exc:  # raised on every rank below, not only on rank 0
                error = str(exc)
        run_dir, error, resume_from = hd.broadcast_object((run_dir, error, resume_from))
        if error:
            raise ConfigError(error)
        self.run_dir = Path(run_dir)
        self.resume_from = Path(resume_from) if resume_from else None
        self.cfg.log.run_dir = str(self.run_dir)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
            d = self.cfg.data
            if d.kind != "synthetic" and (d.noise > 0 or d.noise_audio > 0):
                print(f"data.noise={d.noise:g}, data.noise_audio={d.noise_audio:g}: injecting noise into real data "
                      f"({d.noise:.0%} of training captions and {d.noise_audio:.0%} of audio tracks swapped between "
                      "clips)", flush=True)
        hd.barrier()

    def _build(self) -> None:
        cfg, env = self.cfg, self.env
        _seed_all(cfg.train.seed)  # identical init on every rank
        model = self.parts.build_model(cfg).to(env.device)
        self.raw_model = model
        self._takes_generator = "generator" in inspect.signature(model.forward).parameters
        self.model = hd.wrap_model(model, cfg.train.parallel, env, cfg.train.precision)
        _seed_all(cfg.train.seed + _RANK_SEED_STRIDE * env.rank)  # per-rank randomness (dropout)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = _build_optimizer(self.model, cfg, env.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.warmup_steps, cfg.train.steps,
                                         cfg.train.min_lr_ratio)
        self.harmonizer = None
        if cfg.harmony.enabled:
            if self.parts.build_harmonizer is None:
                raise ConfigError("harmony.enabled=true but no harmonizer is available")
            # the wrapped model: the harmonizer reads DDP/FSDP2 from it to work on the global batch
            self.harmonizer = self.parts.build_harmonizer(self.model, cfg.harmony)
        # bf16 autocast; under FSDP2 too, on top of its bf16 MixedPrecisionPolicy: the policy casts parameters
        # and inputs, but fp32 buffers (e.g. input normalisation constants) would promote activations back to
        # fp32 and meet bf16 weights — autocast makes each op pick its dtype
        self.autocast = cfg.train.precision == "bf16"
        self.sampler = self._build_sampler()
        # state that checkpoints carry
        self.step = 0
        self.skipped_total = 0
        self.consecutive_bad = 0
        self._stop_reason = ""  # set when train.max_bad_steps consecutive steps were skipped
        self.bad_total: Dict[str, float] = {}  # occurrences (draws) per kind, over all ranks
        self.bad_seen: Dict[str, List[str]] = {}  # distinct offending items per kind, in the order first met
        # one entry per micro-step: the window spans eval.noise_window optimizer steps
        self.noise_window: deque = deque(maxlen=cfg.eval.noise_window * cfg.train.grad_accum)
        self.item_flags = torch.full((0,), -1, dtype=torch.int8)  # per item: noisy_text + 2·noisy_audio

    def _build_sampler(self):
        """The score-memory prioritized sampler (harmony.curriculum=memory, memory_use=sampler), else None."""
        h = self.cfg.harmony
        if not (h.enabled and h.curriculum == "memory" and h.memory_use == "sampler"):
            return None
        from harmony.curriculum import PrioritizedSampler

        if self.cfg.data.kind == "shards":
            raise ConfigError("harmony.memory_use='sampler' needs indexable data; data.kind='shards' streams "
                              "(use harmony.memory_use='weights')")
        from harmony.data import build_dataset

        items = len(build_dataset(self.cfg.data, "train"))
        return _StepAwareSampler(PrioritizedSampler(self.harmonizer.memory, items, h, self.cfg.train.steps,
                                                    seed=self.cfg.train.seed, rank=self.env.rank,
                                                    world_size=self.env.world_size), self)

    def _rank_state(self) -> dict:
        return {"skipped_total": self.skipped_total, "consecutive_bad": self.consecutive_bad,
                "bad_total": dict(self.bad_total), "bad_seen": {k: list(v) for k, v in self.bad_seen.items()},
                "noise_window": list(self.noise_window),
                "item_flags": self.item_flags.clone()}

    def _restore(self) -> None:
        """Load the checkpoint chosen by train.resume (model, optimizer, schedule, harmonizer, RNG, counters)."""
        self.start_step = 0
        if self.resume_from is None:
            if self.env.is_main:  # a fresh run in this folder: start the logs over
                for name in ("metrics.jsonl", "eval.jsonl"):
                    (self.run_dir / name).unlink(missing_ok=True)
            hd.barrier()
            return
        meta = ckpt.load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler,
                                    self.harmonizer, self.env.device)
        saved = meta.get("config", {}).get("train", {})
        self._follow_new_total(int(meta["step"]))
        if saved.get("batch_size") != self.cfg.train.batch_size or saved.get("grad_accum") != self.cfg.train.grad_accum:
            warnings.warn(f"resuming {self.resume_from} with a different train.batch_size/grad_accum than it was "
                          "written with: the data position and schedule no longer line up")
        extra = meta["extra"]
        self.step = self.start_step = int(meta["step"])
        self.skipped_total = int(extra.get("skipped_total", 0))
        self.consecutive_bad = int(extra.get("consecutive_bad", 0))
        self.bad_total = dict(extra.get("bad_total", {}))
        self.bad_seen = {k: list(v) for k, v in extra.get("bad_seen", {}).items()}
        self.noise_window.extend(extra.get("noise_window", []))
        self.item_flags = extra.get("item_flags", self.item_flags)
        if self.env.is_main:
            for name in ("metrics.jsonl", "eval.jsonl"):
                truncate_after(self.run_dir / name, self.step)
            print(f"resumed from {self.resume_from} at step {self.step}", flush=True)
        hd.barrier()

    def _follow_new_total(self, step: int) -> None:
        """The schedule stores its total step count; resuming with another train.steps makes the cosine decay
        follow the new total (an extended run does not continue at the old schedule's final lr), said once."""
        lam = self.scheduler.lr_lambdas[0]
        old = getattr(lam, "total_steps", None)
        if old is None or old == self.cfg.train.steps:
            return
        lam.total_steps = self.cfg.train.steps
        lrs = [base * lam(self.scheduler.last_epoch) for base in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        if self.env.is_main:
            print(f"train.steps changed from {old} to {self.cfg.train.steps} on resume: the lr schedule now decays "
                  f"over {self.cfg.train.steps} steps (lr at step {step + 1}: {lrs[0]:.4g})", flush=True)

    # ------------------------------------------------------------------------------------------ phases
    def _phase(self, name: str):
        return nvtx_range(name) if self.cfg.profile.nvtx else contextlib.nullcontext()

    def _train_loader(self):
        t, env = self.cfg.train, self.env
        args = (self.cfg.data, "train", self.micro_batch, env.rank, env.world_size, t.seed, self.step * t.grad_accum)
        if self.sampler is not None:
            return self.parts.build_loader(*args, sampler=self.sampler)
        return self.parts.build_loader(*args)

    def _eval_loader(self):
        env = self.env
        per_rank = max(1, self.cfg.eval.batch_size // env.world_size)
        return self.parts.build_loader(self.cfg.data, "eval", per_rank, env.rank, env.world_size,
                                       self.cfg.train.seed, 0, drop_last=False)

    def _oracle(self, batch: dict) -> dict:
        """data.oracle_drop: mask the loss a misalignment flag says is wrong (mask_vt for noisy_text, mask_va for
        noisy_audio), as a curriculum weight of 0 would; the sample stays in the batch (and a negative)."""
        if not self.cfg.data.oracle_drop:
            return batch
        if "noisy_text" not in batch or "noisy_audio" not in batch:
            raise ConfigError("data.oracle_drop=true needs misalignment flags in the data (synthetic data, or "
                              "data.noise / data.noise_audio on a manifest)")
        batch["mask_vt"] = batch["mask_vt"].bool() & ~batch["noisy_text"].bool()
        batch["mask_va"] = batch["mask_va"].bool() & ~batch["noisy_audio"].bool()
        return batch

    def _droptoken_generator(self, micro_index: int) -> Optional[torch.Generator]:
        """The same CPU generator on every rank for one micro-step (DropToken's shared permutation)."""
        if not self._takes_generator:
            return None
        seed = (self.cfg.train.seed * 1_000_003 + micro_index) % (2**63)
        return torch.Generator().manual_seed(seed)

    def forward(self, batch: dict, micro_index: int):
        """Model and per-sample losses of one micro-batch -> (l_va [b], l_vt [b], inputs of the two losses)."""
        kwargs = {}
        gen = self._droptoken_generator(micro_index)
        if gen is not None:
            kwargs["generator"] = gen
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(batch["video"], batch["audio"], batch["text"], **kwargs)
        self._feat_v = getattr(out, "feat_v", None)
        # the contrastive losses run in fp32 whatever the model's precision
        z_va_v, z_va_a = out.z_va_v.float(), out.z_va_a.float()
        z_vt_v, z_vt_t = out.z_vt_v.float(), out.z_vt_t.float()
        mask_va, mask_vt = batch["mask_va"], batch["mask_vt"]
        cand = getattr(out, "cand_mask", None)
        self._loss_args = (z_va_v, z_va_a, mask_va, z_vt_v, z_vt_t, mask_vt, cand)
        self._losses_by_def = {}
        l_va, l_vt = self.losses_under("path")
        return l_va, l_vt, (z_va_v, z_va_a), (z_vt_v, z_vt_t)

    def losses_under(self, definition: str):
        """(ℓ^va, ℓ^vt) [b] of the last forward whose gradients follow a per-sample ``definition`` (path, own_row,
        own_pair; harmony.losses): the same values, other gradients. Computed once per forward per definition
        (the harmonizer's measurement and the feature-level instrumentation share them)."""
        if definition in self._losses_by_def:
            return self._losses_by_def[definition]
        z_va_v, z_va_a, mask_va, z_vt_v, z_vt_t, mask_vt, cand = self._loss_args
        d = {} if definition == "path" else {"definition": definition}
        l_va = self.parts.nce(z_va_v, z_va_a, mask=mask_va, **d)
        l_vt = self.parts.mil_nce(z_vt_v, z_vt_t, mask=mask_vt, **({"cand_mask": cand} if cand is not None else {}),
                                  **d)
        self._losses_by_def[definition] = (l_va, l_vt)
        return l_va, l_vt

    def harmonize(self, batch: dict, l_va, l_vt, va_inputs, vt_inputs):
        """Fill .grad (added to what earlier micro-steps left): harmonized, or the plain L_va + λ·L_vt."""
        lam = self.cfg.harmony.lam
        if self.harmonizer is None:
            loss = hd.global_masked_mean(l_va, batch["mask_va"]) + lam * hd.global_masked_mean(l_vt, batch["mask_vt"])
            loss.backward()
            return None
        h = self.cfg.harmony
        extra = {}                               # only what the settings use: a user's harmonizer may not take them
        if h.upstream != "path":
            extra["measure_losses"] = self.losses_under(h.upstream)
        if h.mode == "feature":
            extra["feature"] = self._feat_v
        return self.harmonizer.backward(l_va, l_vt, va_inputs=va_inputs, vt_inputs=vt_inputs,
                                        mask_va=batch["mask_va"], mask_vt=batch["mask_vt"], step=self.step,
                                        total_steps=self.cfg.train.steps, ids=batch["index"], **extra)

    def optimizer_step(self, loss: torch.Tensor) -> Dict[str, float]:
        """Average accumulated gradients, clip, skip on any rank's non-finite value, step AdamW and the schedule."""
        t = self.cfg.train
        hd.scale_grads(self.params, 1.0 / t.grad_accum)
        norm = hd.clip_grad_norm(self.params, t.clip_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = hd.any_nonfinite(loss, norm.reshape(1), device=self.env.device)
        if skipped:
            self.skipped_total += 1
            self.consecutive_bad += 1
            if self.env.is_main:
                print(f"step {self.step + 1}: non-finite loss or gradient on some rank; step skipped "
                      f"({self.consecutive_bad} in a row)", file=sys.stderr, flush=True)
            if t.max_bad_steps and self.consecutive_bad >= t.max_bad_steps:  # every rank agrees (all-reduced)
                self._stop_reason = (f"{self.consecutive_bad} consecutive non-finite steps (train.max_bad_steps="
                                     f"{t.max_bad_steps})")
        else:
            self.optimizer.step()
            self.consecutive_bad = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule follows the step index, skipped steps included
        return {"grad_norm": float(norm), "lr": lr, "skipped": float(skipped)}

    # --------------------------------------------------------------------------------------- bookkeeping
    def feature_cosine(self, batch: dict, l_va, l_vt) -> Optional[Dict[str, torch.Tensor]]:
        """Per-sample detector scores at the pooled video feature f_i, for every per-sample definition (path,
        own_row, own_pair), or None when eval.feature_cos is off or the batch carries no misalignment flags.

        For definition d, g^k_i = ∂L̃_k/∂f_i (the batch loss under d; by the path decomposition sample i's own
        gradient at its own pooled feature). Returns {"feat_cos[_d]": c_i, "feat_gvt[_d]": −‖g^vt_i‖·(1 − c_i),
        "feat_gva[_d]": −‖g^va_i‖·(1 − c_i)} [b] (higher = more trusted, like the cosine; NaN where a loss is masked
        or a gradient is zero); the suffix is empty for path. Small backwards through the heads and the losses
        only; the parameters' .grad is untouched. Not under FSDP2 (its backward hooks)."""
        feat = self._feat_v
        if not (self.cfg.eval.feature_cos and self.cfg.train.parallel != "fsdp" and feat is not None
                and feat.requires_grad and "noisy_text" in batch and "noisy_audio" in batch):
            return None
        m_va, m_vt = batch["mask_va"].bool(), batch["mask_vt"].bool()
        out = {}
        for definition in ("path", "own_row", "own_pair"):
            losses = (l_va, l_vt) if definition == "path" else self.losses_under(definition)
            grads = []
            for loss, m in zip(losses, (m_va, m_vt)):
                total = torch.where(m, loss, torch.zeros_like(loss)).sum()
                g = torch.autograd.grad(total, feat, retain_graph=True, allow_unused=True)[0] \
                    if total.requires_grad else None
                grads.append(torch.zeros_like(feat) if g is None else g)
            g_va, g_vt = (g.detach().double() for g in grads)
            n_va, n_vt = g_va.norm(dim=1), g_vt.norm(dim=1)
            cos = (g_va * g_vt).sum(1) / (n_va * n_vt)
            ok = m_va & m_vt & (n_va > 0) & (n_vt > 0)
            nan = torch.full_like(cos, float("nan"))
            sfx = "" if definition == "path" else f"_{definition}"
            out[f"feat_cos{sfx}"] = torch.where(ok, cos, nan).float().cpu()
            out[f"feat_gvt{sfx}"] = torch.where(ok, -n_vt * (1 - cos), nan).float().cpu()
            out[f"feat_gva{sfx}"] = torch.where(ok, -n_va * (1 - cos), nan).float().cpu()
        return out

    def _record(self, win: _Window, batch: dict, l_va, l_vt, stats, feat_cos=None) -> None:
        """Add one micro-step's losses, cosine statistics and data counters to the window."""
        for l, m in ((l_va, batch["mask_va"]), (l_vt, batch["mask_vt"])):
            m = m.bool()
            win.loss_parts += [float(torch.where(m, l.detach(), torch.zeros_like(l)).double().sum()), float(m.sum())]
        win.sums["samples"] += int(batch["index"].shape[0])
        for k, v in _bad_counts(batch).items():
            win.bad[k] = win.bad.get(k, 0.0) + v
        for k, names in _bad_names(batch).items():
            win.bad_names.setdefault(k, []).extend(names)
        cos = _stat(stats, "cos") if stats is not None else None
        if cos is not None:
            valid = _stat(stats, "valid")
            valid = (valid.bool() if valid is not None else torch.ones_like(cos, dtype=torch.bool)) \
                & torch.isfinite(cos)
        entry = None
        if "noisy_text" in batch and "noisy_audio" in batch:
            entry = {"noisy_text": batch["noisy_text"].bool().cpu(), "noisy_audio": batch["noisy_audio"].bool().cpu()}
            for key, loss, m in (("loss_va", l_va, batch["mask_va"]), ("loss_vt", l_vt, batch["mask_vt"])):
                loss = loss.detach().float()
                entry[key] = torch.where(m.bool(), loss, torch.full_like(loss, float("nan"))).cpu()
            if cos is not None:  # NaN marks a sample without a valid cosine
                nan = torch.full_like(cos.float(), float("nan"))
                entry["cos"] = torch.where(valid, cos.float(), nan).cpu()
                dots = _stat(stats, "dots")
                if dots is not None:   # the magnitude-aware scores −‖g^k_i‖·(1 − c_i) from the harmonizer's dots
                    dots = dots.detach().float()
                    for key, col in (("gva", 1), ("gvt", 2)):
                        entry[key] = torch.where(valid, -dots[:, col].clamp(min=0).sqrt() * (1 - cos.float()),
                                                 nan).cpu()
            score = _stat(stats, "score") if stats is not None else None
            if score is not None:  # the run's detector (harmony.curriculum_score); NaN where it has no value
                ok = _stat(stats, "valid").bool() & torch.isfinite(score)
                entry["score"] = torch.where(ok, score.float(), torch.full_like(score.float(), float("nan"))).cpu()
            if feat_cos is not None:
                entry.update(feat_cos)
            win.noise.append(entry)
        if cos is None:
            return
        cos_v = cos[valid].double().cpu()
        win.has_cos = True
        win.sums["cos_sum"] += float(cos_v.sum())
        win.sums["cos_n"] += cos_v.numel()
        conflict = _stat(stats, "conflict")
        if conflict is not None:
            win.sums["conflict_n"] += float(conflict.bool()[valid].sum())
        weights = _stat(stats, "weights")
        win.sums["kept_n"] += float((weights[valid] > 0).sum()) if weights is not None else cos_v.numel()
        win.hist += torch.histc(cos_v.clamp(-1, 1), bins=win.bins, min=-1.0, max=1.0)
        self._record_noise(batch, entry)

    def _record_noise(self, batch: dict, entry: Optional[dict]) -> None:
        """Keep the micro-step's cosines (NaN: no valid cosine) and flags from its window ``entry`` for the
        final noise AUC over the last eval.noise_window steps, and each item's ground-truth flags."""
        if entry is None:
            return
        nt, na = entry["noisy_text"], entry["noisy_audio"]
        self.noise_window.append({"cos": entry["cos"], "score": entry.get("score", entry["cos"]), "noisy_text": nt,
                                  "noisy_audio": na})
        ids = batch["index"].long().cpu()
        if ids.numel():
            need = int(ids.max()) + 1
            if need > self.item_flags.numel():
                grown = torch.full((need,), -1, dtype=torch.int8)
                grown[: self.item_flags.numel()] = self.item_flags
                self.item_flags = grown
            self.item_flags[ids] = (nt.to(torch.int8) + 2 * na.to(torch.int8))

    def _log_row(self, win: _Window) -> dict:
        """Reduce the window over ranks into one metrics.jsonl row."""
        keys = list(win.sums)
        gathered = hd.all_gather_object((sorted(win.bad), win.bad_names))
        bad_keys = sorted(set().union(*(g[0] for g in gathered)))
        for _, names in gathered:  # every rank keeps the same union of distinct offending items
            for k, ns in names.items():
                seen = self.bad_seen.setdefault(k, [])
                known = set(seen)
                for n in ns:
                    if n not in known:
                        known.add(n)
                        seen.append(n)
        n_loss = len(win.loss_parts)
        flat = win.loss_parts + [win.sums[k] for k in keys] + [win.bad.get(k, 0.0) for k in bad_keys] \
            + win.hist.tolist() + [float(win.has_cos)]
        red = hd.reduce_scalars(flat, "sum", device=self.env.device)
        world = self.env.world_size
        # per micro-step global masked means, then their average over the window
        parts = torch.tensor(red[:n_loss], dtype=torch.float64).reshape(-1, 4)
        l_va = parts[:, 0] / parts[:, 1].clamp_min(1)
        l_vt = parts[:, 2] / parts[:, 3].clamp_min(1)
        red = red[n_loss:]
        s = dict(zip(keys, red[: len(keys)]))
        bad = dict(zip(bad_keys, red[len(keys): len(keys) + len(bad_keys)]))
        hist = red[len(keys) + len(bad_keys): -1]
        has_cos = red[-1] > 0
        for k, v in bad.items():
            self.bad_total[k] = self.bad_total.get(k, 0.0) + v
        row = {"step": self.step,
               "loss_va": l_va.mean().item(), "loss_vt": l_vt.mean().item(),
               "loss": (l_va + self.cfg.harmony.lam * l_vt).mean().item(),
               "cos_mean": s["cos_sum"] / s["cos_n"] if has_cos and s["cos_n"] else None,
               "frac_conflict": s["conflict_n"] / s["cos_n"] if has_cos and s["cos_n"] else None,
               "kept": s["kept_n"] / s["cos_n"] if has_cos and s["cos_n"] else None,
               "lr": self._last["lr"],
               "grad_norm": s["grad_norm"] / s["grad_norm_n"] if s["grad_norm_n"] else None,
               "samples_per_s": s["samples"] / (s["time"] / world) if s["time"] > 0 else None,
               "skipped": int(round(s["skipped"] / world)), "skipped_steps": self.skipped_total,
               "bad_samples": sum(bad.values()), "bad_samples_total": sum(self.bad_total.values()),
               "bad": {k: int(v) for k, v in bad.items()},
               "bad_items_total": {k: len(v) for k, v in self.bad_seen.items()}}
        if has_cos:
            row["cos_hist"] = [int(round(h)) for h in hist]
        row.update(self._window_noise(win))
        if self.env.device.type == "cuda":
            row["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return row

    def _window_noise(self, win: _Window) -> dict:
        """The window's premise-(a) statistics, over all ranks: noise AUC of the run's detector score (noise_auc:
        what the curriculum ranks by, harmony.curriculum_score; the cosine by default) and of the per-sample
        cosine (noise_auc_cos; overall, text, audio) and of the magnitude-aware scores ‖g^vt‖(1 − c), ‖g^va‖(1 − c) from the harmonizer's dots
        (noise_auc_gvt*, noise_auc_gva*), the same three at the pooled video feature under each per-sample
        definition (noise_auc_feat*, noise_auc_feat_gvt*, noise_auc_feat_gva*; suffix _own_row / _own_pair, none
        for path), the conflict fraction (cosine below
        harmony.conflict_threshold) on clean, text-misaligned and audio-misaligned samples, the score
        memory's AUC over the items seen so far, and for comparison the AUC of the sample's own loss
        (noise_auc_loss_text: ℓ^vt, noise_auc_loss_audio: ℓ^va). Keys whose score was not measured are absent."""
        parts = hd.all_gather_object(win.noise) if self.env.world_size > 1 else [win.noise]
        entries = [e for p in parts for e in p]
        out: dict = {}
        if not entries:
            return out
        nt = torch.cat([e["noisy_text"] for e in entries])
        na = torch.cat([e["noisy_audio"] for e in entries])
        scores = [("score" if all("score" in e for e in entries) else "cos", "noise_auc"), ("cos", "noise_auc_cos"),
                  ("gvt", "noise_auc_gvt"), ("gva", "noise_auc_gva")]
        scores += [(f"feat_{s}{d}", f"noise_auc_feat{'' if s == 'cos' else '_' + s}{d}")
                   for d in ("", "_own_row", "_own_pair") for s in ("cos", "gvt", "gva")]
        for key, prefix in scores:
            if not all(key in e for e in entries):
                continue
            cos = torch.cat([e[key] for e in entries])
            valid = torch.isfinite(cos)
            out.update(_finite(noise_detection_auc(cos, valid, nt, na, prefix=prefix)))
            if key == "cos":
                conflict = cos < self.cfg.harmony.conflict_threshold
                for name, sel in (("clean", ~(nt | na)), ("text", nt), ("audio", na)):
                    sel = sel & valid
                    if bool(sel.any()):
                        out[f"frac_conflict_{name}"] = float(conflict[sel].double().mean())
        # the small-loss baseline detector: a sample's own loss (a high one flags it), per kind of misalignment
        for key, kind in (("loss_vt", "text"), ("loss_va", "audio")):
            loss = torch.cat([e[key] for e in entries])
            auc = noise_detection_auc(-loss, torch.isfinite(loss), nt, na, prefix="noise_auc_loss")
            out.update(_finite({f"noise_auc_loss_{kind}": auc[f"noise_auc_loss_{kind}"]}))
        out.update(_finite(self._memory_auc()))
        return out

    # ------------------------------------------------------------------------------------- eval / noise
    def run_eval(self) -> dict:
        """Retrieval and probe on the held-out split; the training RNG streams are left untouched."""
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return evaluate(self.model, self._eval_loader(), self.env.device, self.cfg.eval.size,
                            self.cfg.eval.probe, self.cfg.eval.probe_ridge, self.cfg.train.precision)

    def noise_metrics(self) -> dict:
        """Over the last eval.noise_window training steps: noise_auc of the run's detector score (what the
        curriculum ranks by, harmony.curriculum_score: the cosine by default), noise_auc_cos of the cosine; and
        noise_auc_memory of the score memory."""
        out = {}
        local = None
        if self.noise_window:
            # entries from checkpoints of older runs carry a separate "valid" mask instead of NaN cosines
            cos = [torch.where(w["valid"], w["cos"], float("nan")) if "valid" in w else w["cos"]
                   for w in self.noise_window]
            score = [w.get("score", c) for w, c in zip(self.noise_window, cos)]
            local = {"cos": torch.cat(cos), "score": torch.cat(score),
                     **{k: torch.cat([w[k] for w in self.noise_window]) for k in ("noisy_text", "noisy_audio")}}
        parts = [p for p in hd.all_gather_object(local) if p is not None]
        if parts:
            cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            for key, prefix in (("score", "noise_auc"), ("cos", "noise_auc_cos")):
                out.update(_finite(noise_detection_auc(cat[key], torch.isfinite(cat[key]), cat["noisy_text"],
                                                       cat["noisy_audio"], prefix=prefix)))
        out.update(self._memory_auc())
        return out

    def _memory_auc(self) -> dict:
        """noise_auc_memory(_text/_audio): the score memory's AUC over the items seen so far ({} without one)."""
        out: dict = {}
        memory = getattr(self.harmonizer, "memory", None)
        if memory is not None:
            ids = torch.nonzero(self.item_flags >= 0).flatten()
            score, seen = memory.scores(ids) if ids.numel() else (torch.zeros(0), torch.zeros(0, dtype=torch.bool))
            flags = self.item_flags[ids]
            mine = {"ids": ids[seen], "score": score[seen].float(), "flags": flags[seen]}
            gathered = hd.all_gather_object(mine)
            ids = torch.cat([g["ids"] for g in gathered])
            if ids.numel():
                order = torch.argsort(ids, stable=True)
                first = torch.ones(ids.numel(), dtype=torch.bool)
                first[1:] = ids[order][1:] != ids[order][:-1]  # items seen on several ranks count once
                sel = order[first]
                score = torch.cat([g["score"] for g in gathered])[sel]
                flags = torch.cat([g["flags"] for g in gathered])[sel]
                out.update(noise_detection_auc(score, torch.ones_like(score, dtype=torch.bool), flags % 2 == 1,
                                               flags >= 2, prefix="noise_auc_memory"))
        return out

    # ----------------------------------------------------------------------------------------- checkpoint
    def save(self) -> Path:
        return ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, self.model, self.optimizer,
                                    self.scheduler, config_to_dict(self.cfg), self.harmonizer, self._rank_state(),
                                    self.cfg.train.keep_last)

    # ------------------------------------------------------------------------------------------- profile
    def _profile_hooks(self, starting_step: int) -> None:
        """Start/stop the Nsight (cudaProfilerApi) capture and the torch.profiler trace at step boundaries."""
        if self.profile_nsys and self.env.device.type == "cuda":
            if starting_step == self.profile_nsys[0]:
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
            elif starting_step == self.profile_nsys[1]:
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
        if self.profile_torch:
            if starting_step == self.profile_torch[0] and self._torch_prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if self.env.device.type == "cuda":
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self._torch_prof = torch.profiler.profile(activities=acts, record_shapes=True)
                self._torch_prof.__enter__()
            elif starting_step == self.profile_torch[1] and self._torch_prof is not None:
                self._finish_torch_profile()

    def _finish_torch_profile(self) -> None:
        if self._torch_prof is None:
            return
        self._torch_prof.__exit__(None, None, None)
        out = self.run_dir / "profile"
        out.mkdir(exist_ok=True)
        a, b = self.profile_torch
        self._torch_prof.export_chrome_trace(str(out / f"trace_rank{self.env.rank}_steps{a}-{b}.json"))
        self._torch_prof = None

    # --------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train from the current step to train.steps, evaluate, write summary.json and plots. -> summary."""
        cfg, env = self.cfg, self.env
        t0 = time.perf_counter()
        self._torch_prof = None
        writer = MetricsWriter(self.run_dir, env.is_main, cfg.log.tensorboard)
        eval_writer = MetricsWriter(self.run_dir, env.is_main, False, filename="eval.jsonl")
        progress = Progress(cfg.train.steps, self.step, enabled=cfg.log.progress and env.is_main)
        win = _Window(cfg.log.hist_bins)
        self._last = {"lr": self.optimizer.param_groups[0]["lr"]}
        samples_done, train_time = 0, 0.0
        self.model.train()
        loader = None
        if self.step < cfg.train.steps:
            train_loader = self._train_loader()
            load_counts = getattr(train_loader, "stats", None)  # met while indexing: bad manifest lines
            if load_counts and self.step == 0 and env.is_main:  # counted once, by rank 0, on a fresh run
                for k, v in load_counts.items():
                    win.bad[k] = win.bad.get(k, 0.0) + float(v)
                for k, names in getattr(load_counts, "names", {}).items():
                    win.bad_names.setdefault(k, []).extend(names)
            loader = iter(train_loader)
        preempt = Preemption(verbose=env.is_main)
        try:
            preempt.__enter__()
            while self.step < cfg.train.steps:
                self._profile_hooks(self.step)
                ts = time.perf_counter()
                ga = cfg.train.grad_accum
                with self._phase("data"):
                    micro = [self._oracle(_to_device(next(loader), env.device)) for _ in range(ga)]
                loss_sum = torch.zeros((), device=env.device)
                for k, batch in enumerate(micro):
                    with hd.grad_sync(self.model, enabled=k == ga - 1):
                        with self._phase("forward"):
                            l_va, l_vt, va_in, vt_in = self.forward(batch, self.step * ga + k)
                        feat_cos = self.feature_cosine(batch, l_va, l_vt)
                        with self._phase("harmonize"):
                            stats = self.harmonize(batch, l_va, l_vt, va_in, vt_in)
                    self._record(win, batch, l_va, l_vt, stats, feat_cos)
                    loss_sum = loss_sum + (l_va.detach().sum() + l_vt.detach().sum())
                with self._phase("step"):
                    info = self.optimizer_step(loss_sum)
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - ts
                self.step += 1
                win.steps += 1
                win.sums["time"] += dt
                win.sums["skipped"] += info["skipped"]
                if math.isfinite(info["grad_norm"]):
                    win.sums["grad_norm"] += info["grad_norm"]
                    win.sums["grad_norm_n"] += 1
                self._last["lr"] = info["lr"]
                samples_done += self.micro_batch * ga * env.world_size
                train_time += dt
                logged = self.step % cfg.log.every == 0 or self.step == cfg.train.steps or bool(self._stop_reason)
                if logged:
                    row = self._log_row(win)
                    writer.write(row)
                    win.reset()
                    self._last_row = row
                if env.is_main:
                    last = getattr(self, "_last_row", {})
                    progress.update(self.step, {"loss": last.get("loss"), "samples/s": last.get("samples_per_s")},
                                    logged)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                    with self._phase("eval"):
                        eval_writer.write({"step": self.step, **self.run_eval()})
                saved = None
                if (cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0) or self.step == cfg.train.steps:
                    with self._phase("checkpoint"):
                        saved = self.save()
                if self._stop_reason:  # the model and optimizer are those of the last good step
                    self._stop_bad_steps(saved or self.save(), samples_done, train_time, t0)
                signum = preempt.agreed(env.world_size, env.device)  # every rank stops after the same step
                if signum:
                    saved = saved or self.save()
                    if env.is_main:
                        print(f"stopped at step {self.step} on {signal.Signals(signum).name}: "
                              f"checkpoint written to {saved}; continue with --train.resume=auto "
                              f"--log.run_dir={self.run_dir}", file=sys.stderr, flush=True)
                    raise Interrupted(signum, self.step, saved)
            if self.profile_nsys and env.device.type == "cuda" and self.profile_nsys[1] >= cfg.train.steps:
                torch.cuda.profiler.stop()
            self._finish_torch_profile()
        finally:
            preempt.__exit__()
            progress.close()
            writer.close()
        if preempt.signum and env.world_size == 1:  # a signal after the last step's check: the final checkpoint
            signal.raise_signal(preempt.signum)     # is written, so end now as that signal would have
        summary = {"steps": self.step, "samples_per_s": samples_done / train_time if train_time > 0 else None,
                   "wall_s": None, "skipped_steps": self.skipped_total, **self._bad_report(),
                   "world_size": env.world_size, "run_dir": str(self.run_dir)}
        if cfg.eval.final:
            with self._phase("eval"):
                result = self.run_eval()
            eval_writer.write({"step": self.step, **result})
            summary.update(result)
        eval_writer.close()
        summary.update(self.noise_metrics())
        summary["wall_s"] = time.perf_counter() - t0
        if env.is_main:
            write_json(self.run_dir / "summary.json", summary)
            if cfg.log.plots:
                from harmony.plots import make_plots

                make_plots(self.run_dir, summary)
            self._print_summary(summary)
        hd.barrier()
        return summary

    def _bad_report(self) -> dict:
        """summary.json's bad-input report: bad_draws (occurrences: an item met in every epoch counts every
        time; also under the older names bad / bad_samples), bad_items (distinct clips or manifest lines)
        and bad_examples (the first few of each kind)."""
        draws = {k: int(v) for k, v in self.bad_total.items()}
        return {"bad_samples": int(sum(draws.values())), "bad": draws, "bad_draws": draws,
                "bad_items": {k: len(v) for k, v in self.bad_seen.items()},
                "bad_examples": {k: v[:_BAD_EXAMPLES] for k, v in self.bad_seen.items() if v}}

    def _stop_bad_steps(self, saved: Path, samples_done: int, train_time: float, t0: float) -> None:
        """train.max_bad_steps reached: write a summary saying why (the checkpoint ``saved`` holds the last
        good weights) and raise TrainingStopped."""
        summary = {"steps": self.step, "stopped": self._stop_reason, "checkpoint": str(saved),
                   "samples_per_s": samples_done / train_time if train_time > 0 else None,
                   "wall_s": time.perf_counter() - t0, "skipped_steps": self.skipped_total, **self._bad_report(),
                   "world_size": self.env.world_size, "run_dir": str(self.run_dir)}
        if self.env.is_main:
            write_json(self.run_dir / "summary.json", summary)
        hd.barrier()
        raise TrainingStopped(f"{self._stop_reason} after step {self.step}; the last good weights are in {saved}; "
                              f"summary in {self.run_dir / 'summary.json'}")

    def _print_summary(self, summary: dict) -> None:
        flat = flatten_metrics({k: v for k, v in summary.items() if k not in ("bad", "run_dir")})
        keys = [k for k in flat if k.endswith("/r1") or k.startswith(("probe_acc", "noise_auc", "steps", "samples"))]
        print("summary: " + ", ".join(f"{k}={flat[k]:.4g}" for k in keys) + f"  ({self.run_dir})", flush=True)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._owns_group:
            hd.shutdown()


# ----------------------------------------------------------------------------------------------- entry

def run(cfg: Config, config_name: str = "default", parts: Optional[Parts] = None) -> dict:
    """Train one run and return its summary (the process group, if created here, is torn down after)."""
    trainer = Trainer(cfg, config_name, parts)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def main(argv: Optional[List[str]] = None, parts: Optional[Parts] = None) -> Optional[dict]:
    """``train.py`` entry point: parse ``--config``/``--section.key=value`` and train. Config errors exit
    with status 2 and a message naming the field."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help())
        return None
    try:
        cfg, name = parse_args(argv)
        return run(cfg, name, parts)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    except Interrupted as exc:  # SIGTERM / SIGINT: checkpoint written, message printed by rank 0
        raise SystemExit(exc.exit_code)
    except TrainingStopped as exc:
        if os.environ.get("RANK", "0") == "0":  # the process group is already torn down here
            print(f"training stopped: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1)
