"""Timing, bandwidth and CSV helpers shared by the benchmarks (kernel level and step level).

  median_ms(fn, device)            median wall time of fn() over repeats after warm-up (CUDA-synchronised)
  copy_gbps(nbytes, device)        bandwidth of a plain copy of nbytes (dst.copy_(src), read + write counted)
  interleaved_ms(fn, copy_fn, ...) fn and a copy timed in alternating rounds (ratio robust to shared load)
  device_name(device), git_commit()
  append_csv(path, rows)           rows (dicts) appended under one fixed header, with date/commit/device
  format_table(rows, columns)      a plain-text table
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

CSV_FIELDS = ("date", "commit", "device", "threads", "bench", "op", "shape", "dtype", "backend", "ms", "rate",
              "unit", "pct_copy", "vs_torch", "copy_gbps", "notes")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10,
              min_total_s: float = 0.0) -> float:
    """Median milliseconds of fn() over ``repeats`` timed calls (at least ``min_total_s`` in all), after
    ``warmup`` untimed calls. Each call is timed alone between device synchronisations."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_total_s:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_buffers(nbytes: int, device: torch.device):
    """(dst, src) fp32 buffers of nbytes each for a plain-copy probe."""
    src = torch.rand(max(1, nbytes // 4), device=device)
    return torch.empty_like(src), src


def interleaved_ms(fn: Callable[[], object], copy_fn: Callable[[], object], device: torch.device,
                   repeats: int = 10, budget_s: float = 2.0, first_ms: Optional[float] = None):
    """(median ms of fn, median ms of copy_fn, median of the per-round ratios copy_ms / fn_ms).

    Rounds alternate one copy and one fn call, so on a shared, noisy machine both see the same load and their
    ratio stays meaningful. fn must already be warm; ``first_ms`` (the warm-up call's time, else measured)
    sets the rounds: calls slower than budget_s / repeats get fewer (at least 3)."""
    copy_fn()
    sync(device)
    if first_ms is None:
        t0 = time.perf_counter()
        fn()
        sync(device)
        first_ms = (time.perf_counter() - t0) * 1e3
    rounds = max(3, min(repeats, int(budget_s * 1e3 / max(first_ms, 1e-3))))
    op_ms, copy_ms = [], []
    for _ in range(rounds):
        for f, sink in ((copy_fn, copy_ms), (fn, op_ms)):
            t0 = time.perf_counter()
            f()
            sync(device)
            sink.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(op_ms), statistics.median(copy_ms), statistics.median(c / o for c, o in
                                                                                 zip(copy_ms, op_ms))


def copy_gbps(nbytes: int, device: torch.device, repeats: int = 10) -> float:
    """GB/s of dst.copy_(src) for an nbytes buffer on ``device``, counting bytes read plus bytes written
    (CPU: torch's copy uses all intra-op threads; GPU: a device-to-device copy)."""
    n = max(1, nbytes // 4)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats=repeats)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"


def git_commit() -> str:
    """Short commit of the working tree this runs from, '+dirty' when tracked files differ; 'unknown' if no git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=root).returncode != 0
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_csv(path: str, rows: Sequence[Dict[str, object]], device: torch.device) -> None:
    """Appends rows under CSV_FIELDS (header written when the file is new); fills date, commit, device, threads."""
    stamp = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 commit=git_commit(), device=device_name(device), threads=torch.get_num_threads())
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new = not p.exists() or p.stat().st_size == 0
    with open(p, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**stamp, **r})


def format_table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
