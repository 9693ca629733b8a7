"""Read an experiment folder's runs into one table: mean ± std over seeds per setting, CSV, Markdown, plots.

Every sub-folder holding a ``config.yaml`` is a run; its ``summary.json`` gives the final metrics (a run
without one is listed as incomplete and left out of the means), ``metrics.jsonl`` the curves over training,
and ``run.json`` (written by the runner) its axis labels and command. Runs are grouped by the config fields
that differ between them, seeds excepted; the spread is the sample standard deviation (n − 1) over the runs
of a group that report the metric (a metric a run cannot have, e.g. ``noise_auc`` of the plain baseline,
which measures no cosines, is absent rather than zero).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from harmony.config import config_to_dict
from harmony.config import Config
from harmony.experiments.grid import short_name
from harmony.trainer.metrics import read_jsonl

# column -> path into summary.json
METRICS: Dict[str, Tuple[str, ...]] = {
    **{f"{d}_r{k}": ("retrieval", d, f"r{k}") for d in ("v2t", "t2v", "v2a", "a2v") for k in (1, 5)},
    "v2t_concept_acc": ("retrieval", "v2t", "concept_acc"),
    "t2v_concept_acc": ("retrieval", "t2v", "concept_acc"),
    "probe_acc": ("probe_acc",),
    "noise_auc": ("noise_auc",), "noise_auc_text": ("noise_auc_text",), "noise_auc_audio": ("noise_auc_audio",),
    "noise_auc_memory": ("noise_auc_memory",),
    "wall_s": ("wall_s",), "samples_per_s": ("samples_per_s",),
}
# per-window statistics of metrics.jsonl, summarised per run as the mean over the windows of one phase of
# training: "early" = the first quarter of the steps, "late" = the last quarter (column <key>_early / _late)
WINDOW_KEYS = ["noise_auc", "noise_auc_text", "noise_auc_audio", "noise_auc_feat", "noise_auc_feat_text",
               "noise_auc_feat_audio", "noise_auc_memory", "noise_auc_loss_text", "noise_auc_loss_audio",
               "frac_conflict_clean", "frac_conflict_text", "frac_conflict_audio"]
PHASES = ("early", "late")
WINDOW_METRICS = [f"{k}_{p}" for k in WINDOW_KEYS for p in PHASES]
# the Markdown table's columns (the CSV has all of METRICS)
TABLE_METRICS = ["v2t_r1", "v2t_r5", "t2v_r1", "t2v_r5", "v2a_r1", "a2v_r1", "v2t_concept_acc", "probe_acc",
                 "noise_auc", "noise_auc_memory", "wall_s", "samples_per_s"]
# the second Markdown table (premise (a)), shown when the runs log them
PREMISE_METRICS = ["noise_auc_early", "noise_auc_late", "noise_auc_feat_early", "noise_auc_feat_late",
                   "noise_auc_loss_text_early", "noise_auc_loss_text_late", "noise_auc_memory_late",
                   "frac_conflict_clean_late", "frac_conflict_text_late", "frac_conflict_audio_late"]
# plotted against the noise rate
PLOT_METRICS = ["v2t_r1", "t2v_r1", "v2a_r1", "v2t_concept_acc", "probe_acc", "noise_auc", "noise_auc_memory"]
# plotted over training from metrics.jsonl when a run logs them
CURVE_KEYS = ["noise_auc", "noise_auc_text", "noise_auc_audio", "noise_auc_feat", "noise_auc_memory",
              "frac_conflict", "frac_conflict_clean", "frac_conflict_text", "cos_mean", "kept", "loss"]
ALL_METRICS = [*METRICS, *WINDOW_METRICS]
# fields that differ between runs without defining a setting
SEED_FIELDS = ("train.seed", "data.seed", "log.run_dir", "train.resume")
NOISE_FIELDS = ("data.noise", "data.noise_audio")


@dataclass
class RunRecord:
    name: str
    config: Dict[str, Any]  # 'section.key' -> value
    summary: Optional[Dict[str, Any]]
    rows: List[Dict[str, Any]]
    labels: Dict[str, str] = field(default_factory=dict)
    command: str = ""


@dataclass
class Group:
    """The runs of one setting (all seeds) and their statistics: metric -> (mean, std or None, n)."""

    key: Tuple
    fields: Dict[str, Any]
    runs: List[RunRecord]
    stats: Dict[str, Tuple[Optional[float], Optional[float], int]] = field(default_factory=dict)

    @property
    def labels(self) -> Dict[str, str]:
        return {k: v for k, v in self.runs[0].labels.items() if k != "seed"}

    def label(self, exclude: Sequence[str] = ()) -> str:
        """Axis labels (or varied fields when the runs carry none) minus the ``exclude`` fields."""
        skip = {short_name(f) for f in exclude}
        if self.labels:
            parts = [f"{k}={v}" for k, v in self.labels.items() if k not in skip]
        else:
            parts = [f"{short_name(k)}={v}" for k, v in self.fields.items() if short_name(k) not in skip]
        return " ".join(parts) or "all"


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def flatten_config(cfg: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """{section: {key: v}} -> {'section.key': v} (lists become tuples so settings can be compared and hashed)."""
    return {f"{s}.{k}": _hashable(v) for s, sec in (cfg or {}).items() for k, v in (sec or {}).items()}


# What a field meant in the runs saved before it existed (its value then), where today's default differs.
ABSENT_MEANT = {"data.noise_bias": 0.0, "data.hard": 0.0, "data.imbalance": 1.0, "harmony.curriculum_target": "triplet",
                "harmony.update": "rows"}


def load_runs(exp_dir: Path) -> List[RunRecord]:
    """Every run folder under ``exp_dir`` (any depth) that holds a config.yaml, sorted by path. A field that a
    run's saved config lacks (saved before the field existed) takes the value it had then (``ABSENT_MEANT``, else the
    current default), so that runs of one setting saved by older and newer code still group together."""
    defaults = {**flatten_config(config_to_dict(Config())), **ABSENT_MEANT}
    records = []
    for cfg_path in sorted(Path(exp_dir).rglob("config.yaml")):
        run_dir = cfg_path.parent
        summary_path = run_dir / "summary.json"
        meta_path = run_dir / "run.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        records.append(RunRecord(
            name=str(run_dir.relative_to(exp_dir)),
            config={**defaults, **flatten_config(yaml.safe_load(cfg_path.read_text()))},
            summary=json.loads(summary_path.read_text()) if summary_path.is_file() else None,
            rows=read_jsonl(run_dir / "metrics.jsonl"),
            labels={str(k): str(v) for k, v in meta.get("labels", {}).items()},
            command=meta.get("command", "")))
    return records


def varied_fields(records: Sequence[RunRecord]) -> List[str]:
    """Config fields whose value differs between the runs, seeds and run folders excepted, in config order."""
    keys = list(dict.fromkeys(k for r in records for k in r.config))
    return [k for k in keys if k not in SEED_FIELDS and len({r.config.get(k) for r in records}) > 1]


def metric_value(summary: Optional[Dict], path: Tuple[str, ...]) -> Optional[float]:
    """summary[path...] as a finite float, else None (missing, null, NaN)."""
    node: Any = summary
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        return None
    return float(node)


def phase_value(rows: Sequence[Dict[str, Any]], key: str, phase: str) -> Optional[float]:
    """Mean of ``key`` over the metrics.jsonl rows of one phase: "early" = steps in the first quarter of the
    run (its last logged step), "late" = steps in the last quarter; None when no row of the phase has it."""
    steps = [int(r["step"]) for r in rows if isinstance(r.get("step"), int)]
    if not steps:
        return None
    total = max(steps)
    lo, hi = (0, total / 4) if phase == "early" else (total * 3 / 4, total)
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
            and math.isfinite(r[key]) and lo < int(r["step"]) <= hi]
    return math.fsum(vals) / len(vals) if vals else None


def run_metric(r: "RunRecord", name: str) -> Optional[float]:
    """A run's value of one column: from summary.json (METRICS) or its metrics.jsonl phases (WINDOW_METRICS)."""
    if name in METRICS:
        return metric_value(r.summary, METRICS[name])
    key, _, phase = name.rpartition("_")
    return phase_value(r.rows, key, phase)


def mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float], int]:
    """(mean, sample std with n − 1, n); std None below two values, both None for none."""
    n = len(values)
    if n == 0:
        return None, None, 0
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None, 1
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)), n


def _sort_key(key: Tuple) -> Tuple:
    """Numbers by value, everything else by text, so rows come out as 0 < 0.2 < 0.4 and a < b."""
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
                 for v in key)


def group_runs(records: Sequence[RunRecord], fields: Sequence[str]) -> List[Group]:
    """Complete runs grouped by the values of ``fields``, with every metric's mean ± std over the group."""
    groups: Dict[Tuple, Group] = {}
    for r in records:
        if r.summary is None:
            continue
        key = tuple(r.config.get(f) for f in fields)
        groups.setdefault(key, Group(key, dict(zip(fields, key)), [])).runs.append(r)
    out = [groups[k] for k in sorted(groups, key=_sort_key)]
    for g in out:
        for name in ALL_METRICS:
            g.stats[name] = mean_std([v for v in (run_metric(r, name) for r in g.runs) if v is not None])
    return out


def _seed(r: RunRecord) -> Any:
    return r.config.get("train.seed")


def write_csv(groups: Sequence[Group], fields: Sequence[str], path: Path) -> Path:
    """One row per setting: the varied fields, label, seeds, then <metric>_mean, _std, _n for every metric."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*fields, "label", "seeds", *[f"{m}_{s}" for m in ALL_METRICS for s in ("mean", "std", "n")],
                    "command"])
        for g in groups:
            stats = [x if x is not None else "" for m in ALL_METRICS for x in g.stats[m]]
            w.writerow([*(g.fields[f] for f in fields), g.label(), " ".join(str(_seed(r)) for r in g.runs),
                        *stats, g.runs[0].command])
    return path


def _fmt(mean: Optional[float], std: Optional[float], n: int) -> str:
    if mean is None:
        return "–"
    digits = 1 if abs(mean) >= 100 else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f} (n=1)"


def write_markdown(groups: Sequence[Group], fields: Sequence[str], path: Path, title: str,
                   incomplete: Sequence[str] = ()) -> Path:
    """A table of mean ± std over seeds per setting, then the command that reproduces each row (first seed)."""
    lines = [f"# {title}", "",
             f"Mean ± sample std over seeds (n − 1); varied fields: {', '.join(fields) or 'none'}.", "",
             "| # | setting | seeds | " + " | ".join(TABLE_METRICS) + " |",
             "|---|---|---|" + "---|" * len(TABLE_METRICS)]
    for i, g in enumerate(groups):
        cells = [_fmt(*g.stats[m]) for m in TABLE_METRICS]
        lines.append(f"| {i} | {g.label()} | {len(g.runs)} | " + " | ".join(cells) + " |")
    premise = [m for m in PREMISE_METRICS if any(g.stats[m][0] is not None for g in groups)]
    if premise:
        lines += ["", "Noise detection over training (per-window statistics of metrics.jsonl; early = first quarter "
                  "of the steps, late = last quarter; `feat` = the cosine at the pooled video feature):", "",
                  "| # | setting | " + " | ".join(premise) + " |", "|---|---|" + "---|" * len(premise)]
        for i, g in enumerate(groups):
            lines.append(f"| {i} | {g.label()} | " + " | ".join(_fmt(*g.stats[m]) for m in premise) + " |")
    lines += ["", "Reproduce a row (its first seed; other seeds: change --train.seed and --data.seed):", ""]
    for i, g in enumerate(groups):
        if g.runs[0].command:
            lines.append(f"{i}. `{g.runs[0].command}`")
    if incomplete:
        lines += ["", f"Incomplete runs (no summary.json, left out): {', '.join(incomplete)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_vs_noise(groups: Sequence[Group], fields: Sequence[str], out_dir: Path) -> List[Path]:
    """metric vs noise rate with ±std error bars, one line per method, one panel per noise kind."""
    paths = []
    for x in [f for f in NOISE_FIELDS if f in fields]:
        panel_field = "data.noise_kind" if "data.noise_kind" in fields else None
        panels = sorted({g.fields[panel_field] for g in groups}) if panel_field else [None]
        for metric in PLOT_METRICS:
            if all(g.stats[metric][0] is None for g in groups):
                continue
            plt = _pyplot()
            fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
            for ax, panel in zip(axes[0], panels):
                series: Dict[str, List[Tuple[float, float, float]]] = {}
                for g in groups:
                    mean, std, _ = g.stats[metric]
                    if mean is None or (panel_field and g.fields[panel_field] != panel):
                        continue
                    series.setdefault(g.label(exclude=[x, panel_field or ""]), []).append(
                        (float(g.fields[x]), mean, std or 0.0))
                xs = sorted({p[0] for pts in series.values() for p in pts})
                nudge = 0.012 * ((xs[-1] - xs[0]) if len(xs) > 1 else 1.0)
                for i, (name, pts) in enumerate(series.items()):
                    pts.sort()
                    shift = (i - (len(series) - 1) / 2) * nudge  # methods with equal values stay visible
                    ax.errorbar([p[0] + shift for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                                marker="o", capsize=3, label=name)
                _style(ax, x, metric, f"{short_name(panel_field)}={panel}" if panel_field else metric,
                       legend=7 if series else None)
            paths.append(_save(plt, fig, out_dir / f"{metric}_vs_{short_name(x)}.png"))
    return paths


def _style(ax, xlabel: str, ylabel: str, title: str, legend: Optional[int]) -> None:
    """Axis labels, title, a light grid and (legend = its font size) a legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mean_curve(runs: Sequence[RunRecord], key: str) -> Tuple[List[int], List[float]]:
    """(steps, mean over the runs of ``key`` at each logged step where any run has a value)."""
    by_step: Dict[int, List[float]] = {}
    for r in runs:
        for row in r.rows:
            v = row.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                by_step.setdefault(int(row["step"]), []).append(float(v))
    steps = sorted(by_step)
    return steps, [math.fsum(by_step[s]) / len(by_step[s]) for s in steps]


def plot_curves(groups: Sequence[Group], out_dir: Path) -> List[Path]:
    """Each CURVE_KEYS entry that the runs log, over training steps, one line per setting (mean over seeds)."""
    paths = []
    for key in CURVE_KEYS:
        curves = [(g.label(), *mean_curve(g.runs, key)) for g in groups]
        curves = [c for c in curves if c[1]]
        if not curves:
            continue
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, steps, values in curves:
            ax.plot(steps, values, label=name, linewidth=1.2)
        _style(ax, "step", key, f"{key} over training (mean over seeds)", legend=6 if len(curves) <= 16 else None)
        paths.append(_save(plt, fig, out_dir / f"curve_{key}.png"))
    return paths


def aggregate(exp_dir: Path, plots: bool = True) -> Dict[str, Any]:
    """Write results.csv, results.md and plots/ into ``exp_dir``. -> {groups, fields, csv, md, plots, incomplete}."""
    exp_dir = Path(exp_dir)
    records = load_runs(exp_dir)
    complete = [r for r in records if r.summary is not None]
    incomplete = [r.name for r in records if r.summary is None]
    fields = varied_fields(complete)
    groups = group_runs(complete, fields)
    out = {"groups": groups, "fields": fields, "incomplete": incomplete,
           "csv": write_csv(groups, fields, exp_dir / "results.csv"),
           "md": write_markdown(groups, fields, exp_dir / "results.md", f"Results: {exp_dir.name}", incomplete),
           "plots": []}
    if plots and groups:
        plot_dir = exp_dir / "plots"
        plot_dir.mkdir(exist_ok=True)
        out["plots"] = plot_vs_noise(groups, fields, plot_dir) + plot_curves(groups, plot_dir)
    return out
