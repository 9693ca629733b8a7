"""Profiling of a step range, as a context manager around the training loop (docs/DESIGN.md "The trainer and its
observers"): an Nsight Systems capture range (``profile.nsys``, for ``nsys --capture-range=cudaProfilerApi``)
and a torch.profiler trace (``profile.torch``) into run_dir/profile.

    with StepProfiler(cfg.profile, steps, run_dir, rank, device) as prof:
        while step < steps:
            prof.at_step(step)      # starts or stops a capture at the step boundaries of the ranges
            ...
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch

from harmony.config import ProfileConfig, _parse_step_range


class StepProfiler:
    """Starts and stops the configured captures at step boundaries; a range still open when the loop ends
    normally is closed by the context's exit (the trace is written)."""

    def __init__(self, cfg: ProfileConfig, total_steps: int, run_dir: Path, rank: int, device: torch.device):
        self.nsys: Optional[Tuple[int, int]] = _parse_step_range(cfg.nsys, "profile.nsys")
        self.torch_range: Optional[Tuple[int, int]] = _parse_step_range(cfg.torch, "profile.torch")
        self.total_steps, self.run_dir, self.rank, self.cuda = total_steps, run_dir, rank, device.type == "cuda"
        self._trace = None

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        if self.nsys and self.cuda and self.nsys[1] >= self.total_steps:
            torch.cuda.profiler.stop()
        self._finish_trace()

    def at_step(self, step: int) -> None:
        """Called as step ``step`` starts."""
        if self.nsys and self.cuda and step in self.nsys:
            torch.cuda.synchronize()
            (torch.cuda.profiler.start if step == self.nsys[0] else torch.cuda.profiler.stop)()
        if self.torch_range:
            if step == self.torch_range[0] and self._trace is None:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if self.cuda:
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self._trace = torch.profiler.profile(activities=acts, record_shapes=True)
                self._trace.__enter__()
            elif step == self.torch_range[1] and self._trace is not None:
                self._finish_trace()

    def _finish_trace(self) -> None:
        if self._trace is None:
            return
        self._trace.__exit__(None, None, None)
        out = self.run_dir / "profile"
        out.mkdir(exist_ok=True)
        a, b = self.torch_range
        self._trace.export_chrome_trace(str(out / f"trace_rank{self.rank}_steps{a}-{b}.json"))
        self._trace = None
