"""Arm benchmark: training throughput of each arm of the web grid against plain training, side by side.

Each arm is a short real training run (``train.py``, default.yaml's model and data with the web-mix noise) in its own
process; the arms run round-robin (repeat r of every arm, then repeat r + 1, the order rotated each round) so that the
machine's noise hits all of them alike. The throughput of a run is its median samples/s over the logged windows after
the first (warm-up, data workers, allocator); the table gives each arm's median over the repeats and its ratio to
plain training without any instrumentation (``plain-bare``: harmony off, eval.feature_cos off), the floor every arm is
up against. Rows are appended to a CSV with the machine, the thread count and the git commit.

    python benchmarks/bench_arms.py                        # 60 steps, 3 repeats, one thread per run
    python benchmarks/bench_arms.py --steps 100 --repeats 5 --arms plain-bare,gmm-pair,comb-pair
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import device_name, git_commit  # noqa: E402
from harmony.experiments.grid import REGIMES, WEB_ARMS, format_value  # noqa: E402

BARE = {"harmony.enabled": False, "eval.feature_cos": False}
ARMS = {"plain-bare": BARE, **WEB_ARMS}


def run_arm(name: str, steps: int, threads: int, out: Path) -> float:
    """One short training run of arm ``name``; -> its median samples/s after the first logged window."""
    over = {**REGIMES["web-mix"], **ARMS[name], "train.steps": steps, "log.every": 10, "eval.every": 0,
            "eval.final": False, "train.ckpt_every": 0, "log.plots": False, "log.progress": False,
            "harmony.curriculum_start": 0.0, "log.run_dir": str(out)}
    if name == "oracle":
        over["harmony.enabled"] = False
    args = [sys.executable, str(ROOT / "train.py")] + [f"--{k}={format_value(v)}" for k, v in over.items()]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(args, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(r["samples_per_s"] for r in rows[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "out" / "bench_arms.csv"))
    a = ap.parse_args(argv)
    arms = [x for x in a.arms.split(",") if x]
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    got = {x: [] for x in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            order = arms[r % len(arms):] + arms[:r % len(arms)]
            for name in order:
                got[name].append(run_arm(name, a.steps, a.threads, Path(tmp) / f"{name}-{r}"))
                print(f"repeat {r} {name}: {got[name][-1]:.1f} samples/s", flush=True)
    base = statistics.median(got["plain-bare"]) if "plain-bare" in got else None
    machine = device_name(torch.device("cpu"))
    print(f"\n{machine}, {a.threads} thread(s) per run, {a.steps} steps, {a.repeats} repeats, round-robin")
    print(f"{'arm':12s} {'samples/s':>10s} {'x plain-bare':>12s}")
    rows = []
    for name in arms:
        med = statistics.median(got[name])
        ratio = base / med if base else float("nan")
        print(f"{name:12s} {med:10.1f} {ratio:12.2f}")
        rows.append({"arm": name, "samples_per_s": round(med, 2), "time_vs_plain_bare": round(ratio, 3),
                     "steps": a.steps, "repeats": a.repeats, "threads": a.threads, "machine": machine,
                     "commit": git_commit(),
                     "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    path = Path(a.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
