"""Data throughput: synthetic items/s, and GRID clips decoded per second per worker (MPEG-PS/mp2 originals and
H.264/AAC clips), plus a manifest loader with worker processes. Prints a table, appends rows to a CSV.

    python benchmarks/bench_data.py [--clips 20] [--synthetic 512] [--workers 0 2] [--csv benchmarks/out/data.csv]

Per-item rows time each item on its own after a warm-up and report the median (wall ms and process CPU ms:
on a shared machine the CPU time is the steadier number). The GRID folder is ``<repo>/../shared/data/grid``
or ``$HARMONY_GRID_DIR``; its rows are skipped when it is absent.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, git_commit  # noqa: E402
from harmony.config import DataConfig  # noqa: E402
from harmony.data import build_loader, collate  # noqa: E402
from harmony.data.decode import decode_clip  # noqa: E402
from harmony.data.synthetic import SyntheticDataset  # noqa: E402


def grid_dir() -> Path:
    return Path(os.environ.get("HARMONY_GRID_DIR", REPO / ".." / "shared" / "data" / "grid"))


def per_item(fn, items, warmup=2):
    """Median wall and CPU milliseconds of fn(item) over items (after ``warmup`` untimed calls)."""
    for it in items[:warmup]:
        fn(it)
    wall, cpu = [], []
    for it in items:
        w, c = time.perf_counter(), time.process_time()
        fn(it)
        wall.append((time.perf_counter() - w) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def row(kind, source, n, workers, wall_ms, cpu_ms=None, per_s=None):
    return {"kind": kind, "source": source, "items": n, "workers": workers, "median_ms": round(wall_ms, 3),
            "cpu_ms": "" if cpu_ms is None else round(cpu_ms, 3),
            "items_per_s": round(per_s if per_s is not None else 1e3 / wall_ms, 1)}


def bench_synthetic(n):
    cfg = DataConfig.clips(size=max(n, 64), frames=8)  # the shape the published rows name: 8 frames, no noise
    ds = SyntheticDataset(cfg)
    rows = [row("synthetic item", "synthetic 8x32x32, 8 kHz 1 s", n, 0, *per_item(lambda i: ds[i], list(range(n))))]
    batches = [list(range(b * 32, b * 32 + 32)) for b in range(max(1, n // 32))]
    wall, cpu = per_item(lambda idx: collate([ds[i] for i in idx]), batches, warmup=1)
    rows.append(row("synthetic batch of 32", "synthetic", len(batches) * 32, 0, wall, cpu, per_s=32e3 / wall))
    return rows


def bench_grid(n, workers_list):
    g = grid_dir()
    if not (g / "manifest.jsonl").exists():
        print(f"GRID clips not found at {g}: skipping the decode rows")
        return []
    entries = [json.loads(x) for x in (g / "manifest.jsonl").read_text().splitlines() if x.strip()]
    rows = []
    for ext, name in (("mpg", "GRID MPEG-PS/mp2 360x288"), ("mp4", "GRID H.264/AAC 180x144")):
        paths = [str(g / e["path"]) for e in entries if e["path"].endswith("." + ext)][:n]
        wall, cpu = per_item(lambda p: decode_clip(p, 8, 8.0, 32, 8000, 1.0), paths)
        rows.append(row("decode clip (1 worker)", name, len(paths), 1, wall, cpu))
    for workers in workers_list:
        cfg = DataConfig.clips(kind="manifest", manifest=str(g / "manifest.jsonl"), workers=workers)
        loader = build_loader(cfg, "train", 16, seed=0)
        it = iter(loader)
        next(it)  # start-up (worker processes) not timed
        steps = max(2, 4 * n // 16)
        t = time.perf_counter()
        for _ in itertools.islice(it, steps):
            pass
        wall = (time.perf_counter() - t) * 1e3 / (steps * 16)
        rows.append(row("manifest loader, batch 16", "GRID manifest (mixed)", steps * 16, workers, wall))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=20, help="GRID clips per container")
    ap.add_argument("--synthetic", type=int, default=512, help="synthetic items")
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="loader worker counts")
    ap.add_argument("--csv", default=str(REPO / "benchmarks" / "out" / "data.csv"))
    args = ap.parse_args(argv)
    rows = bench_synthetic(args.synthetic) + bench_grid(args.clips, args.workers)
    head = f"{'what':<26} {'source':<30} {'items':>5} {'workers':>7} {'median ms':>9} {'cpu ms':>7} {'items/s':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['kind']:<26} {r['source']:<30} {r['items']:>5} {r['workers']:>7} {r['median_ms']:>9} "
              f"{r['cpu_ms']:>7} {r['items_per_s']:>8}")
    stamp = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "commit": git_commit(), "device": device_name(torch.device("cpu"))}
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(stamp) + list(rows[0]) if rows else list(stamp))
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**stamp, **r})
    print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
