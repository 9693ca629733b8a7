"""PNG plots of a run (docs/DESIGN.md "Command line and outputs"), drawn from metrics.jsonl, eval.jsonl and summary.json
with matplotlib's Agg backend (no display needed). A plot whose data the run does not have (e.g. cosines of a plain,
non-harmonized run) is not drawn."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from harmony.trainer.metrics import read_jsonl

DIRECTIONS = ("v2t", "t2v", "v2a", "a2v")


def _series(rows: List[dict], key: str):
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _line_plot(out: Path, rows: List[dict], keys: List[str], title: str, ylabel: str) -> Optional[Path]:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for key in keys:
        x, y = _series(rows, key)
        if x:
            ax.plot(x, y, label=key)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _cos_hist_plot(out: Path, rows: List[dict]) -> Optional[Path]:
    """Heat map: one column per logged step, the histogram of per-sample cosines over [-1, 1] up the y axis."""
    hist_rows = [r for r in rows if r.get("cos_hist")]
    if not hist_rows:
        return None
    import numpy as np

    plt = _figure()
    counts = np.array([r["cos_hist"] for r in hist_rows], dtype=float)
    counts = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
    steps = [r["step"] for r in hist_rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    im = ax.imshow(counts.T, origin="lower", aspect="auto", cmap="viridis",
                   extent=(steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1, -1.0, 1.0))
    ax.axhline(0.0, color="w", lw=0.8, ls="--")
    ax.set(title="per-sample gradient cosine c_i over training", xlabel="step", ylabel="cosine")
    fig.colorbar(im, ax=ax, label="fraction of samples")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _retrieval_plot(out: Path, evals: List[dict], summary: Optional[dict]) -> Optional[Path]:
    """R@1 per direction over the periodic evaluations, and the final R@1/5/10 as bars."""
    final = (summary or {}).get("retrieval") or {}
    if not evals and not final:
        return None
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for d in DIRECTIONS:
        pts = [(e["step"], e["retrieval"][d]["r1"]) for e in evals if d in e.get("retrieval", {})]
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=d)
    axes[0].set(title="R@1 during training", xlabel="step", ylabel="R@1", ylim=(0, 1))
    if axes[0].lines:
        axes[0].legend()
    width = 0.25
    dirs = [d for d in DIRECTIONS if d in final]
    for j, k in enumerate(("r1", "r5", "r10")):
        axes[1].bar([i + (j - 1) * width for i in range(len(dirs))], [final[d][k] for d in dirs], width, label=k)
    axes[1].set_xticks(range(len(dirs)), dirs)
    axes[1].set(title="final retrieval", ylabel="recall", ylim=(0, 1))
    if dirs:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def make_plots(run_dir: Path, summary: Optional[Dict] = None) -> List[Path]:
    """Write run_dir/plots/*.png; returns the files written."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [
        _line_plot(out_dir / "losses.png", rows, ["loss", "loss_va", "loss_vt"], "training losses", "loss"),
        _cos_hist_plot(out_dir / "cos_hist.png", rows),
        _line_plot(out_dir / "conflict.png", rows, ["frac_conflict"], "conflicting samples (c_i < threshold)",
                   "fraction"),
        _line_plot(out_dir / "kept.png", rows, ["kept"], "kept by the curriculum (w_i > 0)", "fraction"),
        _retrieval_plot(out_dir / "retrieval.png", evals, summary),
    ]
    return [p for p in made if p is not None]
