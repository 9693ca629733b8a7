"""The trainer: a loop of named phases (data, forward, harmonize, step, eval, checkpoint) over VATT with
per-sample gradient harmonization, inside DDP or FSDP2; observers watch it (docs/DESIGN.md "The trainer and its
observers": the global batch, randomness, gradient accumulation, skipped steps and fault tolerance).

``python train.py --config configs/default.yaml --train.steps=100`` or, on N processes,
``torchrun --nproc_per_node N train.py ... --train.parallel=ddp``.

* ``train.batch_size`` is the GLOBAL batch of one optimizer step (batch_size / (world_size · grad_accum) per
  rank and micro-step); the losses gather negatives over ranks, so N ranks see the batch of one process.
* Model init uses ``train.seed`` on every rank, then each rank reseeds with seed + 100003·rank (dropout);
  DropToken draws from a generator seeded by (seed, micro-step index), the same on every rank.
* Micro-steps' gradients are summed (no DDP/FSDP sync before the last one) and scaled by 1/grad_accum before
  clipping: the harmonizer's ``backward`` ADDS into .grad like autograd.
* A non-finite loss or gradient norm on any rank skips the step on every rank (``train.max_bad_steps``).
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from harmony.trainer import checkpoint as ckpt
from harmony import distributed as hd
from harmony.audit.observer import write_suspects
from harmony.cli import format_help, parse_args
from harmony.config import config_to_dict
from harmony.config import Config, ConfigError
from harmony.trainer.contracts import Batch, Forward, HarmonyStats, Parts, batch_to, default_parts
from harmony.method.curriculum import memory_sampler
from harmony.data.loader import train_items
from harmony.data.synthetic import tail_concepts_from
from harmony.trainer.evaluate import evaluate
from harmony.trainer.metrics import MetricsWriter, Progress, write_json
from harmony.trainer.monitor import NoiseMonitor
from harmony.model.losses import plain_backward
from harmony.nvtx import nvtx_range
from harmony.trainer.optim import build_optimizer, follow_new_total
from harmony.trainer.preempt import Interrupted, Preemption
from harmony.trainer.profiling import StepProfiler
from harmony.trainer.rundir import prepare_run_dir, reset_logs, resolve_run_dir
from harmony.trainer.schedule import build_scheduler
from harmony.trainer.window import BadLedger, MetricsWindow, Throughput, summary_line

__all__ = ["Trainer", "TrainingStopped", "Parts", "default_parts", "resolve_run_dir", "run", "main"]

_RANK_SEED_STRIDE = 100003


class TrainingStopped(RuntimeError):
    """The run stopped before train.steps for a reason of its own (train.max_bad_steps); summary.json says why."""


class FinalCheckpointFailed(RuntimeError):
    """Every step ran, metrics.jsonl and summary.json are written, but the final checkpoint could not be."""


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One training run. ``Trainer(cfg, name).fit()`` -> the summary dict (rank 0 writes the run folder)."""

    def __init__(self, cfg: Config, config_name: str = "default", parts: Optional[Parts] = None):
        self.cfg = cfg.validate()
        self.parts = parts or default_parts()
        self.env = hd.init_distributed(cfg.train.device, cfg.train.parallel, cfg.train.dist_timeout_s)
        self._owns_group = self.env.backend != ""
        self._lock = None
        try:
            self.micro_batch = self._micro_batch()
            self.run_dir, self.resume_from, self._lock = prepare_run_dir(self.cfg, config_name, self.env.is_main)
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

    def _build(self) -> None:
        cfg, env = self.cfg, self.env
        _seed_all(cfg.train.seed)  # identical init on every rank
        self.raw_model = self.parts.build_model(cfg).to(env.device)
        self.model = hd.wrap_model(self.raw_model, cfg.train.parallel, env, cfg.train.precision)
        _seed_all(cfg.train.seed + _RANK_SEED_STRIDE * env.rank)  # per-rank randomness (dropout)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg, env.device)
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
        memory = self.harmonizer.memory if self.harmonizer is not None else None  # the per-item score memory
        self.sampler = memory_sampler(cfg, memory, lambda: train_items(cfg.data), env.rank, env.world_size,
                                      lambda: self.step)
        self.step = self.skipped_total = self.consecutive_bad = 0  # with the ledger and monitor: checkpointed
        self._stop_reason = ""  # set when train.max_bad_steps consecutive steps were skipped
        self._save_error = ""  # why the latest checkpoint could not be written ('' once one is)
        self.bad = BadLedger()
        self.monitor = NoiseMonitor(cfg, memory)

    def _restore(self) -> None:
        """Load the checkpoint chosen by train.resume (model, optimizer, schedule, harmonizer, RNG, counters)."""
        self.start_step = 0
        if self.resume_from is None:
            reset_logs(self.run_dir, None, self.env.is_main)  # a fresh run in this folder: start the logs over
            return
        meta = ckpt.load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler,
                                    self.harmonizer, self.env.device)
        said = follow_new_total(self.scheduler, self.cfg.train.steps, int(meta["step"]))
        if said and self.env.is_main:
            print(said, flush=True)
        saved = meta.get("config", {}).get("train", {})
        if saved.get("batch_size") != self.cfg.train.batch_size or saved.get("grad_accum") != self.cfg.train.grad_accum:
            warnings.warn(f"resuming {self.resume_from} with a different train.batch_size/grad_accum than it was "
                          "written with: the data position and schedule no longer line up")
        extra = meta["extra"]
        self.step = self.start_step = int(meta["step"])
        self.skipped_total = int(extra.get("skipped_total", 0))
        self.consecutive_bad = int(extra.get("consecutive_bad", 0))
        self.bad.load_state_dict(extra)
        self.monitor.load_state_dict(extra)
        if self.env.is_main:
            print(f"resumed from {self.resume_from} at step {self.step}", flush=True)
        reset_logs(self.run_dir, self.step, self.env.is_main)

    # ------------------------------------------------------------------------------------------ phases
    def _phase(self, name: str):
        return nvtx_range(name) if self.cfg.profile.nvtx else contextlib.nullcontext()

    def _train_loader(self):
        t, env = self.cfg.train, self.env
        kwargs = {} if self.sampler is None else {"sampler": self.sampler}
        return self.parts.build_loader(self.cfg.data, "train", self.micro_batch, env.rank, env.world_size, t.seed,
                                       self.step * t.grad_accum, **kwargs)

    def _eval_loader(self):
        per_rank = max(1, self.cfg.eval.batch_size // self.env.world_size)
        return self.parts.build_loader(self.cfg.data, "eval", per_rank, self.env.rank, self.env.world_size,
                                       self.cfg.train.seed, 0, drop_last=False)

    def _droptoken_generator(self, micro_index: int) -> torch.Generator:
        """The same CPU generator on every rank for one micro-step (DropToken's shared permutation)."""
        return torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + micro_index) % (2**63))

    def forward(self, batch: Batch, micro_index: int) -> Forward:
        """The model and the per-sample losses of one micro-batch."""
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(batch["video"], batch["audio"], batch["text"],
                             generator=self._droptoken_generator(micro_index))
        return Forward(out, batch, self.parts)

    def harmonize(self, batch: Batch, fwd: Forward) -> Optional[HarmonyStats]:
        """Fill .grad (added to what earlier micro-steps left): harmonized, or the plain L_va + λ·L_vt."""
        h = self.cfg.harmony
        if self.harmonizer is None:
            plain_backward(fwd.l_va, batch["mask_va"].bool(), fwd.l_vt, batch["mask_vt"].bool(), h.lam)
            return None
        extra = {}                               # only what the settings use: a user's harmonizer may not take them
        if h.upstream != "path":
            extra["measure_losses"] = fwd.losses(h.upstream)
        if h.mode == "feature":
            extra["feature"] = fwd.feat_v
        return self.harmonizer.backward(fwd.l_va, fwd.l_vt, va_inputs=fwd.va_inputs, vt_inputs=fwd.vt_inputs,
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

    def train_step(self, batches: Iterator[Batch], window: MetricsWindow) -> float:
        """One optimizer step over train.grad_accum micro-steps, recorded in ``window`` and the noise monitor.
        -> its wall time in seconds."""
        ts, ga, device = time.perf_counter(), self.cfg.train.grad_accum, self.env.device
        with self._phase("data"):
            micro = [batch_to(next(batches), device) for _ in range(ga)]
        loss_sum = torch.zeros((), device=device)
        for k, batch in enumerate(micro):
            with hd.grad_sync(self.model, enabled=k == ga - 1):
                with self._phase("forward"):
                    fwd = self.forward(batch, self.step * ga + k)
                feature = self.monitor.feature_scores(batch, fwd)
                with self._phase("harmonize"):
                    stats = self.harmonize(batch, fwd)
            window.add_micro_step(batch, fwd.l_va, fwd.l_vt, stats)
            self.monitor.on_micro_step(batch, fwd, stats, feature)
            loss_sum = loss_sum + (fwd.l_va.detach().sum() + fwd.l_vt.detach().sum())
        with self._phase("step"):
            info = self.optimizer_step(loss_sum)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - ts
        self.step += 1
        window.add_step(info, dt)
        return dt

    # ------------------------------------------------------------------------------------- eval / save
    def run_eval(self) -> dict:
        """Retrieval and probe on the held-out split; the training RNG streams are left untouched."""
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return evaluate(self.model, self._eval_loader(), self.env.device, self.cfg.eval.size,
                            self.cfg.eval.probe, self.cfg.eval.probe_ridge, self.cfg.train.precision,
                            tail_concepts_from(self.cfg.data.concepts, self.cfg.data.imbalance))

    def save(self) -> Optional[Path]:
        """A checkpoint of this step; each rank's own state (counters, bad-input ledger, noise monitor) in its file.
        None when a write failed on some rank: one line says why, training goes on and the next save retries
        (the final save's failure ends the run after its summary, see ``fit``)."""
        rank_state = {"skipped_total": self.skipped_total, "consecutive_bad": self.consecutive_bad,
                      **self.bad.state_dict(), **self.monitor.state_dict()}
        try:
            saved = ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, self.model, self.optimizer,
                                         self.scheduler, config_to_dict(self.cfg), self.harmonizer, rank_state,
                                         self.cfg.train.keep_last)
        except ckpt.CheckpointWriteError as exc:
            t = self.cfg.train
            self._save_error = f"checkpoint of step {self.step} not written: {exc}"
            if self.env.is_main and self.step < t.steps:
                after = min((self.step // t.ckpt_every + 1) * t.ckpt_every, t.steps) if t.ckpt_every else t.steps
                print(f"{self._save_error}; training goes on, the checkpoint of step {after} tries again",
                      file=sys.stderr, flush=True)
            return None
        self._save_error = ""
        return saved

    # --------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Train from the current step to train.steps, evaluate, write summary.json and plots. -> summary."""
        cfg, env = self.cfg, self.env
        clock = Throughput()
        writer = MetricsWriter(self.run_dir, env.is_main, cfg.log.tensorboard)
        eval_writer = MetricsWriter(self.run_dir, env.is_main, False, filename="eval.jsonl")
        progress = Progress(cfg.train.steps, self.step, enabled=cfg.log.progress and env.is_main)
        window = MetricsWindow(cfg.log.hist_bins, cfg.harmony.lam)
        self.model.train()
        batches = self._batches(window) if self.step < cfg.train.steps else None
        last_row: dict = {}
        preempt = Preemption(verbose=env.is_main)
        try:
            with preempt, StepProfiler(cfg.profile, cfg.train.steps, self.run_dir, env.rank, env.device) as prof:
                while self.step < cfg.train.steps:
                    prof.at_step(self.step)
                    clock.seconds += self.train_step(batches, window)
                    clock.samples += self.micro_batch * cfg.train.grad_accum * env.world_size
                    logged = self.step % cfg.log.every == 0 or self.step == cfg.train.steps or bool(self._stop_reason)
                    if logged:
                        last_row = self._log(window, writer)
                    if env.is_main:
                        progress.update(self.step, {"loss": last_row.get("loss"),
                                                    "samples/s": last_row.get("samples_per_s")}, logged)
                    self._after_step(eval_writer, preempt, clock)
        finally:
            progress.close()
            writer.close()
        if preempt.signum and env.world_size == 1:  # a signal after the last step's check: the final checkpoint
            signal.raise_signal(preempt.signum)     # is written, so end now as that signal would have
        summary = self._finish(eval_writer, clock)
        if self._save_error:  # the final save failed: the metrics and summary are written, the weights are not
            newest = ckpt.latest_checkpoint(self.run_dir)
            raise FinalCheckpointFailed(f"{self._save_error}; it was the final checkpoint, so the run ends with "
                                        f"status 1 (metrics.jsonl and summary.json are written; the newest "
                                        f"checkpoint is {newest or 'none'})")
        return summary

    def _batches(self, window: MetricsWindow) -> Iterator[Batch]:
        """The training batches from the current step; bad manifest lines met while indexing go into ``window``
        (counted once, by rank 0, on a fresh run)."""
        loader = self._train_loader()
        load_counts = self.parts.load_stats(loader)
        if load_counts and self.step == 0 and self.env.is_main:
            window.add_bad(load_counts)
        return iter(loader)

    def _log(self, window: MetricsWindow, writer: MetricsWriter) -> dict:
        """Reduce the window over ranks into one metrics.jsonl row (with the noise monitor's), write it, reset."""
        row = window.row(self.step, self.skipped_total, self.bad, device=self.env.device)
        row.update(self.monitor.on_log())
        if self.env.device.type == "cuda":
            row["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        writer.write(row)
        window.reset()
        return row

    def _after_step(self, eval_writer: MetricsWriter, preempt: Preemption, clock: Throughput) -> None:
        """Evaluate, checkpoint, stop on max_bad_steps or on a signal every rank agrees on, as the step says."""
        cfg = self.cfg
        if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
            with self._phase("eval"):
                eval_writer.write({"step": self.step, **self.run_eval()})
        saved = None
        if (cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0) or self.step == cfg.train.steps:
            with self._phase("checkpoint"):
                saved = self.save()
        if self._stop_reason:  # the model and optimizer are those of the last good step
            self._stop_bad_steps(saved or self.save(), clock)
        signum = preempt.agreed(self.env.world_size, self.env.device)  # every rank stops after the same step
        if signum:
            saved = saved or self.save()
            if self.env.is_main:
                where = f"checkpoint written to {saved}" if saved else \
                    f"NO checkpoint written (the newest is {ckpt.latest_checkpoint(self.run_dir) or 'none'})"
                print(f"stopped at step {self.step} on {signal.Signals(signum).name}: {where}; continue with "
                      f"--train.resume=auto --log.run_dir={self.run_dir}", file=sys.stderr, flush=True)
            raise Interrupted(signum, self.step, saved)

    def _summary(self, clock: Throughput) -> dict:
        return {"steps": self.step, "samples_per_s": clock.samples_per_s(), "wall_s": time.perf_counter() - clock.start,
                "skipped_steps": self.skipped_total, **self.bad.report(), "world_size": self.env.world_size,
                "run_dir": str(self.run_dir)}

    def _finish(self, eval_writer: MetricsWriter, clock: Throughput) -> dict:
        """The final evaluation and noise statistics into summary.json; plots; the summary line."""
        summary = self._summary(clock)
        if self.cfg.eval.final:
            with self._phase("eval"):
                result = self.run_eval()
            eval_writer.write({"step": self.step, **result})
            summary.update(result)
        eval_writer.close()
        summary.update(self.monitor.summary())
        if self._save_error:
            summary["checkpoint_error"] = self._save_error
        summary["wall_s"] = time.perf_counter() - clock.start
        if self.env.is_main:
            write_json(self.run_dir / "summary.json", summary)
            write_suspects(self.run_dir, self.cfg, self.harmonizer)  # the score memory's suspects.jsonl
            if self.cfg.log.plots:
                from harmony.trainer.plots import make_plots  # matplotlib only when plotting
                make_plots(self.run_dir, summary)
            print(summary_line(summary), flush=True)
        hd.barrier()
        return summary

    def _stop_bad_steps(self, saved: Path, clock: Throughput) -> None:
        """train.max_bad_steps reached: write a summary saying why (the checkpoint ``saved`` holds the last
        good weights) and raise TrainingStopped."""
        summary = {"steps": self.step, "stopped": self._stop_reason, "checkpoint": str(saved),
                   **{k: v for k, v in self._summary(clock).items() if k != "steps"}}
        if self.env.is_main:
            write_json(self.run_dir / "summary.json", summary)
        hd.barrier()
        raise TrainingStopped(f"{self._stop_reason} after step {self.step}; the last good weights are in {saved}; "
                              f"summary in {self.run_dir / 'summary.json'}")

    def close(self) -> None:
        """Release the run folder's lock and the process group this trainer created. What holds the group (the
        wrapped model, optimizer, harmonizer, ...) is dropped first, so that its threads end here rather than
        during the interpreter's exit, where gloo's threads abort the process ('terminate called without an
        active exception'). The trainer is not usable afterwards."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._owns_group:
            for name in ("model", "raw_model", "params", "optimizer", "scheduler", "harmonizer", "sampler", "monitor"):
                self.__dict__.pop(name, None)
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
    except (TrainingStopped, FinalCheckpointFailed) as exc:
        if os.environ.get("RANK", "0") == "0":  # the process group is already torn down here
            print(f"training stopped: {exc}" if isinstance(exc, TrainingStopped) else str(exc), file=sys.stderr,
                  flush=True)
        raise SystemExit(1)
