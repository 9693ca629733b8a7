"""Launch the runs of a grid as ``python train.py ...`` subprocesses under one experiment folder.

Each run writes ``OUT/<run name>/`` (``--log.run_dir``): the trainer's outputs, plus ``run.json`` (grid, axis
labels, seed, the exact command) and ``train.log`` (the subprocess's stdout and stderr). A run whose
``summary.json`` exists is skipped, so relaunching an interrupted sweep only runs what is missing. Runs go
one at a time or ``jobs`` at a time; with a time budget no new run starts once the budget is spent (the ones
already running finish). A failed run is reported and the sweep goes on.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from harmony.experiments.grid import Run

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "train.py"


@dataclass
class RunResult:
    name: str
    status: str  # done | skipped | failed | not_started
    returncode: Optional[int] = None
    seconds: float = 0.0


def is_done(run_dir: Path) -> bool:
    """A run is complete when the trainer has written its summary.json (the last thing it writes)."""
    return (Path(run_dir) / "summary.json").is_file()


def _child_env(jobs: int) -> Dict[str, str]:
    """The runs' environment: with several jobs, split the cores between them unless the caller chose."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def _shown(run_dir: Path) -> str:
    """The run folder as the command names it: relative to the repository root (the runs' working directory)
    when it lies inside it, so that the printed command holds no machine path; else absolute."""
    try:
        return str(run_dir.relative_to(REPO))
    except ValueError:
        return str(run_dir)


def _launch(run: Run, run_dir: Path, extra: Dict, python: str, script: Path, env: Dict[str, str]):
    """Write run.json, start the subprocess with its output in train.log. -> (Popen, open log file)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    shown = _shown(run_dir)
    args = run.args(shown, extra)
    meta = {"grid": run.grid, "name": run.name, "labels": run.labels, "seed": run.seed,
            "command": run.command(shown, extra)}
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    log = open(run_dir / "train.log", "w")
    log.write("$ " + " ".join(shlex.quote(a) for a in [python, str(script), *args]) + "\n")
    log.flush()
    proc = subprocess.Popen([python, str(script), *args], cwd=str(REPO), env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    return proc, log


def run_grid(runs: Sequence[Run], out: Path, jobs: int = 1, budget_min: Optional[float] = None,
             extra: Optional[Dict] = None, python: str = sys.executable, script: Path = TRAIN_SCRIPT,
             say: Callable[[str], None] = print, poll_s: float = 0.2) -> List[RunResult]:
    """Run every run of ``runs`` not yet done under ``out``, ``jobs`` at a time. -> one result per run, in order.

    ``budget_min``: no run is started after this many minutes from the call (None: no limit).
    ``extra``: ``section.key -> value`` overrides added to every run (the CLI's --set).
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {r.name: RunResult(r.name, "not_started") for r in runs}
    pending = deque()
    for r in runs:
        if is_done(out / r.name):
            results[r.name].status = "skipped"
        else:
            pending.append(r)
    say(f"{len(runs)} runs, {len(runs) - len(pending)} already done, {len(pending)} to run, jobs={jobs}"
        + (f", budget {budget_min} min" if budget_min is not None else ""))
    env = _child_env(jobs)
    active = {}  # Popen -> (run, start time, log file)
    start = time.monotonic()
    try:
        while pending or active:
            while pending and len(active) < max(1, jobs):
                if budget_min is not None and time.monotonic() - start >= budget_min * 60:
                    say(f"time budget spent: {len(pending)} runs not started")
                    pending.clear()
                    break
                r = pending.popleft()
                proc, log = _launch(r, out / r.name, extra or {}, python, script, env)
                active[proc] = (r, time.monotonic(), log)
                say(f"start {r.name}")
            for proc in [p for p in active if p.poll() is not None]:
                r, t0, log = active.pop(proc)
                log.close()
                res = results[r.name]
                res.returncode, res.seconds = proc.returncode, time.monotonic() - t0
                res.status = "done" if proc.returncode == 0 and is_done(out / r.name) else "failed"
                say(f"{res.status} {r.name} ({res.seconds:.1f} s)"
                    + (f": exit {proc.returncode}, see {out / r.name / 'train.log'}" if res.status == "failed" else ""))
            if active:
                time.sleep(poll_s)
    finally:  # interrupted: stop our own children, keep what they wrote (they resume from checkpoints)
        for proc, (_, _, log) in active.items():
            proc.terminate()
            proc.wait()
            log.close()
    return [results[r.name] for r in runs]


def summarize(results: Sequence[RunResult]) -> str:
    """'8 runs: 6 done, 2 skipped, 0 failed, 0 not started'."""
    count = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed", "not_started")}
    return (f"{len(results)} runs: {count['done']} done, {count['skipped']} skipped, {count['failed']} failed, "
            f"{count['not_started']} not started")
