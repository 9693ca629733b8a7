"""Where the method works: the premise map, the headroom map and the outcome table of long runs.

``python -m harmony.experiments maps --premise DIR [DIR ...] --headroom DIR --outcome DIR --out OUT`` reads
experiment folders made by ``run`` (long_premise, long_headroom, long_outcome) and writes ``OUT/maps.md`` with

* the premise map: per noise setting and detector, the AUC of each training window (mean ± std over seeds),
  the first window in which the seeds' mean AUC reaches 0.7, and the v2t concept accuracy of the evaluation
  at the end of that window; plus ``OUT/premise_<setting>.png`` (AUC curves beside concept accuracy);
* the headroom map: v2t / t2v concept accuracy of plain training and of the oracle at every evaluation, the
  oracle's gain and whether it exceeds twice the larger seed spread;
* the outcome table: each arm's final concept accuracies and probe against plain and oracle, the arm's gain
  as a fraction of the oracle's, and its wall time relative to plain training.

Each cell is mean ± sample std over the runs of one setting (seeds), computed here from the runs'
``metrics.jsonl`` / ``eval.jsonl`` / ``summary.json``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from harmony.experiments.aggregate import (Group, _fmt, _pyplot, _save, _style, group_runs, load_runs, mean_std,
                                           varied_fields)

# (label, metrics.jsonl key): the detectors of misaligned captions (``_audio`` for the audio-noise setting)
DETECTORS = [("cos path (feature)", "noise_auc_feat"), ("cos own_row (feature)", "noise_auc_feat_own_row"),
             ("cos own_pair (feature)", "noise_auc_feat_own_pair"),
             ("‖g^vt‖(1−c) path (feature)", "noise_auc_feat_gvt"),
             ("‖g^vt‖(1−c) own_pair (feature)", "noise_auc_feat_gvt_own_pair"),
             ("‖g^va‖(1−c) own_pair (feature)", "noise_auc_feat_gva_own_pair"),
             ("own loss ℓvt", "noise_auc_loss_text"), ("own loss ℓva", "noise_auc_loss_audio")]
WINDOWS = [(0, 250), (250, 500), (500, 1000), (1000, 1500), (1500, 2000)]
INFORMATIVE = 0.7


def _eval_rows(run_dir: Path) -> List[dict]:
    path = run_dir / "eval.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _concept(row: dict, direction: str) -> Optional[float]:
    return row.get("retrieval", {}).get(direction, {}).get("concept_acc")


def _window_mean(rows: Sequence[dict], key: str, lo: int, hi: int) -> Optional[float]:
    vals = [r[key] for r in rows if lo < r.get("step", 0) <= hi and isinstance(r.get(key), (int, float))
            and math.isfinite(r[key])]
    return math.fsum(vals) / len(vals) if vals else None


def _groups(exp_dir: Path) -> Tuple[List[Group], Dict[str, Path]]:
    runs = [r for r in load_runs(exp_dir) if r.summary is not None]
    dirs = {r.name: Path(exp_dir) / r.name for r in runs}
    return group_runs(runs, varied_fields(runs)), dirs


def _kind_suffix(g: Group) -> str:
    """'_audio' for a setting with misaligned audio only, else '_text'."""
    c = g.runs[0].config
    return "_audio" if (c.get("data.noise_audio") or 0) > 0 and not (c.get("data.noise") or 0) > 0 else "_text"


def premise_section(exp_dirs: Sequence[Path], out: Path, plots: bool) -> List[str]:
    lines = ["## Premise map: when does each detector find the misaligned samples?", "",
             "AUC of each score for telling misaligned from clean training samples, averaged over the windows of "
             "10 steps inside each range of steps (mean ± std over seeds). `first ≥ 0.7`: the end of the first "
             "range whose seed-mean AUC reaches 0.7, with the v2t / t2v concept accuracy of the evaluation at that "
             "step (held-out, clean).", ""]
    for exp_dir in exp_dirs:
        groups, dirs = _groups(Path(exp_dir))
        for g in groups:
            if g.runs[0].config.get("data.oracle_drop"):
                continue                                  # the oracle's loss leaves the misaligned samples out
            sfx = _kind_suffix(g)
            evals = {r.name: _eval_rows(dirs[r.name]) for r in g.runs}
            head = f"### {Path(exp_dir).name}: {g.label()} (n = {len(g.runs)})"
            lines += [head, "", "| detector | " + " | ".join(f"steps {lo + 1}–{hi}" for lo, hi in WINDOWS)
                      + " | first ≥ 0.7 |", "|---|" + "---|" * (len(WINDOWS) + 1)]
            series = []
            for label, key in DETECTORS:
                if key.startswith("noise_auc_loss"):      # the own-loss keys name their kind already
                    if not key.endswith(sfx):
                        continue
                    k = key
                else:
                    k = key + sfx
                cells, first = [], "never"
                for lo, hi in WINDOWS:
                    vals = [v for v in (_window_mean(r.rows, k, lo, hi) for r in g.runs) if v is not None]
                    m, s, n = mean_std(vals)
                    cells.append(_fmt(m, s, n))
                    if first == "never" and m is not None and m >= INFORMATIVE:
                        accs = [_acc_at(evals[r.name], hi) for r in g.runs]
                        v2t = mean_std([a[0] for a in accs if a[0] is not None])[0]
                        t2v = mean_std([a[1] for a in accs if a[1] is not None])[0]
                        first = f"{hi} (concept {v2t:.2f} / {t2v:.2f})" if v2t is not None else str(hi)
                if all(c == "–" for c in cells):
                    continue
                lines.append(f"| {label} | " + " | ".join(cells) + f" | {first} |")
                series.append((label, k))
            accs = [[_acc_at(evals[r.name], hi) for r in g.runs] for _, hi in WINDOWS]
            cells = [_fmt(*mean_std([a[0] for a in row if a[0] is not None])) + " / "
                     + _fmt(*mean_std([a[1] for a in row if a[1] is not None])) for row in accs]
            lines += ["| v2t / t2v concept accuracy at the range's end | " + " | ".join(cells) + " | |", ""]
            if plots:
                name = f"premise_{Path(exp_dir).name}_{g.label().replace(' ', '_').replace('=', '-')}.png"
                _plot_premise(g, series, evals, out / name)
                lines += [f"![{g.label()}]({name})", ""]
    return lines


def _acc_at(evals: Sequence[dict], step: int) -> Tuple[Optional[float], Optional[float]]:
    """(v2t, t2v) concept accuracy of the evaluation at ``step`` (the closest one at or before it)."""
    best = None
    for r in evals:
        if r.get("step", 0) <= step and (best is None or r["step"] > best["step"]):
            best = r
    return (_concept(best, "v2t"), _concept(best, "t2v")) if best else (None, None)


def _plot_premise(g: Group, series, evals, path: Path) -> None:
    from harmony.experiments.aggregate import mean_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for label, key in series:
        steps, vals = mean_curve(g.runs, key)
        # smooth the 10-step windows over 5 windows so the lines stay readable
        sm = [math.fsum(vals[max(0, i - 4):i + 1]) / len(vals[max(0, i - 4):i + 1]) for i in range(len(vals))]
        ax.plot(steps, sm, label=label, linewidth=1.1)
    ax.axhline(0.5, color="grey", linewidth=0.6)
    ax2 = ax.twinx()
    pts: Dict[int, List[float]] = {}
    for rows in evals.values():
        for r in rows:
            if _concept(r, "v2t") is not None:
                pts.setdefault(r["step"], []).append(_concept(r, "v2t"))
    steps = sorted(pts)
    ax2.plot(steps, [math.fsum(pts[s]) / len(pts[s]) for s in steps], "k--o", markersize=3, linewidth=1,
             label="v2t concept acc (right)")
    ax2.set_ylabel("v2t concept accuracy")
    ax2.set_ylim(0, 1)
    _style(ax, "step", "noise-detection AUC", g.label(), legend=6)
    _save(plt, fig, path)


def _final(r, direction: str) -> Optional[float]:
    return (r.summary or {}).get("retrieval", {}).get(direction, {}).get("concept_acc")


def headroom_section(exp_dir: Path) -> List[str]:
    groups, dirs = _groups(Path(exp_dir))
    lines = ["## Headroom map: what the noise costs at each point of training", "",
             "Concept accuracy (held-out, clean) of plain training and of the oracle (misaligned captions or audio "
             "left out of their loss) at each evaluation of the same 2000-step runs (mean ± std over seeds). "
             "`gain`: oracle − plain; `> 2σ`: the gain exceeds twice the larger of the two seed spreads.", ""]
    by_setting: Dict[str, Dict[str, Group]] = {}
    for g in groups:
        arm = "oracle" if g.runs[0].config.get("data.oracle_drop") else "plain"
        setting = " ".join(f"{k}={v}" for k, v in g.labels.items() if k != "arm") or g.label(["data.oracle_drop"])
        by_setting.setdefault(setting, {})[arm] = g
    for setting, arms in by_setting.items():
        if set(arms) != {"plain", "oracle"}:
            continue
        ev = {a: [_eval_rows(dirs[r.name]) for r in arms[a].runs] for a in arms}
        steps = sorted({r["step"] for rows in ev["plain"] for r in rows})
        lines += [f"### {setting} (n = {len(arms['plain'].runs)} / {len(arms['oracle'].runs)})", "",
                  "| step | plain v2t | oracle v2t | gain v2t | > 2σ | plain t2v | oracle t2v | gain t2v | > 2σ |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in steps:
            cells = []
            for d in ("v2t", "t2v"):
                p = mean_std([_concept(r, d) for rows in ev["plain"] for r in rows if r["step"] == s])
                o = mean_std([_concept(r, d) for rows in ev["oracle"] for r in rows if r["step"] == s])
                gain = o[0] - p[0] if p[0] is not None and o[0] is not None else None
                sig = max(p[1] or 0.0, o[1] or 0.0)
                cells += [_fmt(*p), _fmt(*o), f"{gain:+.3f}" if gain is not None else "–",
                          ("yes" if gain > 2 * sig else "no") if gain is not None else "–"]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def outcome_section(outcome_dir: Path, headroom_dir: Path, size: int) -> List[str]:
    groups, _ = _groups(Path(outcome_dir))
    hgroups, _ = _groups(Path(headroom_dir))
    ref = {("oracle" if g.runs[0].config.get("data.oracle_drop") else "plain"): g for g in hgroups
           if g.runs[0].config.get("data.size") == size}
    lines = ["## Outcome: does acting on a detector recover the oracle's gain?", "",
             "Final held-out concept accuracy and linear probe (mean ± std over seeds); `of oracle gain`: "
             "(arm − plain) / (oracle − plain) of the seed means; `wall`: the arm's mean wall time over plain "
             "training's (the runs shared the machine two at a time).", "",
             "| arm | n | v2t concept | t2v concept | probe | v2t of oracle gain | t2v of oracle gain | wall |",
             "|---|---|---|---|---|---|---|---|"]
    if set(ref) != {"plain", "oracle"}:
        return lines + ["", "(the plain and oracle controls of this data size are missing)", ""]

    def stats(g: Group):
        v = mean_std([_final(r, "v2t") for r in g.runs if _final(r, "v2t") is not None])
        t = mean_std([_final(r, "t2v") for r in g.runs if _final(r, "t2v") is not None])
        p = mean_std([(r.summary or {}).get("probe_acc") for r in g.runs if (r.summary or {}).get("probe_acc")])
        w = mean_std([(r.summary or {}).get("wall_s") for r in g.runs if (r.summary or {}).get("wall_s")])
        return v, t, p, w

    base = stats(ref["plain"])
    orc = stats(ref["oracle"])
    rows = [("plain (control)", ref["plain"]), ("oracle (control)", ref["oracle"])] + [(g.label(), g) for g in groups]
    for name, g in rows:
        v, t, p, w = stats(g)
        frac = []
        for i, cur in enumerate((v, t)):
            span = orc[i][0] - base[i][0]
            frac.append(f"{(cur[0] - base[i][0]) / span:+.2f}" if cur[0] is not None and abs(span) > 1e-9 else "–")
        wall = f"{w[0] / base[3][0]:.2f}×" if w[0] and base[3][0] else "–"
        lines.append(f"| {name} | {len(g.runs)} | {_fmt(*v)} | {_fmt(*t)} | {_fmt(*p)} | {frac[0]} | {frac[1]} | "
                     f"{wall} |")
    return lines + [""]


def maps(premise: Sequence[Path], headroom: Optional[Path], outcome: Optional[Path], out: Path,
         outcome_size: int = 4096, plots: bool = True) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Long runs: premise map, headroom map, outcome", ""]
    if premise:
        lines += premise_section([Path(p) for p in premise], out, plots)
    if headroom:
        lines += headroom_section(Path(headroom))
    if outcome and headroom:
        lines += outcome_section(Path(outcome), Path(headroom), outcome_size)
    path = out / "maps.md"
    path.write_text("\n".join(lines) + "\n")
    return path
