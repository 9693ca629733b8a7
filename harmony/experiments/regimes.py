"""Regime maps of the ``web`` grid: which detector finds which noise, and which action recovers the oracle's gain.

``python -m harmony.experiments regimes DIR --out OUT`` reads the run folders of the ``web`` grid (named
``regime-<R>_arm-<A>_seed-<S>``) and writes ``OUT/regimes.md``:

* the lead table: per regime, the detector with the highest mean AUC over steps 501–2000 on each noise kind
  present, the arm with the largest share of the oracle's gain and that share;
* per regime, the detector map of the plain arm (every detector measured, the update plain training's): AUC per
  window of training for each pair, then over steps 501–2000 split by noise kind, against the hard and the easy
  clean samples only, among the tail and the head concepts (mean ± std over seeds), and the false-positive rate of
  the mixture-based detectors on hard and easy clean samples;
* per regime, the outcome: final held-out concept accuracy (v2t / t2v) and probe of every arm, its share of the
  oracle's gain, the run's own detector AUC per pair from summary.json, samples/s.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from harmony.experiments.aggregate import RunRecord, _fmt, load_runs, mean_std
from harmony.experiments.maps import WINDOWS, _window_mean

_NAME = re.compile(r"regime-(?P<regime>.+)_arm-(?P<arm>.+)_seed-(?P<seed>\d+)$")
DETECTORS = [("own loss", "loss"), ("loss mixture (NCR)", "lossgmm"), ("2-D loss residual", "resid"),
             ("neighbourhood agreement", "agree"), ("agreement, plain cosine", "agreecos"),
             ("combined (mixture + agreement)", "comb"),
             ("cos own_pair (feature)", "featcos"), ("‖g‖(1−c) own_pair (feature)", "featmag"),
             ("gradient vs reference (feature)", "featref")]
SPLITS = [("swap", "_swap"), ("bias", "_bias"), ("vs hard clean", "_hard"), ("vs easy clean", "_easy"),
          ("tail concepts", "_tail"), ("head concepts", "_head")]
LATE = (500, 2000)
ARM_ORDER = ["plain", "plain-exact", "oracle", "gmm-vt", "gmm-pair", "agree-pair", "comb-pair", "gmm-pair-early",
             "comb-pair-early", "gmm-pair-early-obj", "comb-pair-early-obj", "pcgrad"]


def _by_regime(exp_dir: Path) -> Dict[str, Dict[str, List[RunRecord]]]:
    out: Dict[str, Dict[str, List[RunRecord]]] = {}
    for r in load_runs(exp_dir):
        m = _NAME.search(Path(r.name).name)
        if m is None or r.summary is None:
            continue
        out.setdefault(m["regime"], {}).setdefault(m["arm"], []).append(r)
    return out


def _late(runs: Sequence[RunRecord], key: str) -> Tuple[Optional[float], Optional[float], int]:
    return mean_std([v for v in (_window_mean(r.rows, key, *LATE) for r in runs) if v is not None])


def _concept(r: RunRecord, d: str, key: str = "concept_acc") -> Optional[float]:
    return (r.summary or {}).get("retrieval", {}).get(d, {}).get(key)


def _final(runs: Sequence[RunRecord], d: str, key: str = "concept_acc"):
    return mean_std([v for v in (_concept(r, d, key) for r in runs) if v is not None])


def _head_tail(arms: Dict[str, List[RunRecord]], order: Sequence[str]) -> List[str]:
    """Concept accuracy on the common and on the rare concepts (runs with a long tail), one row per arm."""
    if not any(_concept(r, "v2t", "concept_acc_tail") is not None for runs in arms.values() for r in runs):
        return []
    lines = ["Concept accuracy split by the training frequency of the query's concept (head: the common half of "
             "the concepts, tail: the rare half; the evaluation split is uniform):", "",
             "| arm | n | v2t head | v2t tail | t2v head | t2v tail |", "|---|---|---|---|---|---|"]
    for arm in order:
        cells = [_fmt(*_final(arms[arm], d, f"concept_acc_{p}")) for d in ("v2t", "t2v") for p in ("head", "tail")]
        lines.append(f"| {arm} | {len(arms[arm])} | " + " | ".join(cells) + " |")
    return lines + [""]


def _summary(runs: Sequence[RunRecord], key: str):
    vals = [(r.summary or {}).get(key) for r in runs]
    return mean_std([v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)])


def _kinds(runs: Sequence[RunRecord]) -> List[Tuple[str, str]]:
    """(label, key suffix) of the noise kinds this regime's plain runs saw."""
    row = next((x for r in runs for x in r.rows if "noise_auc_loss_text" in x or "noise_auc_loss_audio" in x), {})
    kinds = []
    for label, sfx in (("swapped captions", "text_swap"), ("biased captions", "text_bias"),
                       ("swapped audio", "audio_swap")):
        if f"noise_auc_loss_{sfx}" in row:
            kinds.append((label, sfx))
    return kinds


def detector_map(regime: str, runs: Sequence[RunRecord]) -> List[str]:
    lines = [f"### {regime}: detectors (plain arm, n = {len(runs)})", "",
             "AUC per window of training (mean ± std over seeds); `text` rows score misaligned captions, `audio` rows "
             "misaligned audio, against the samples clean in both pairs.", "",
             "| detector | pair | " + " | ".join(f"steps {lo + 1}–{hi}" for lo, hi in WINDOWS) + " |",
             "|---|---|" + "---|" * len(WINDOWS)]
    pairs = [p for p in ("text", "audio") if any(f"noise_auc_loss_{p}" in x for r in runs for x in r.rows)]
    noisy = {p for p in pairs if any(math.isfinite(x.get(f"noise_auc_loss_{p}", math.nan)) for r in runs
                                     for x in r.rows)}
    for label, det in DETECTORS:
        for p in sorted(noisy):
            key = f"noise_auc_{det}_{p}"
            cells = [_fmt(*mean_std([v for v in (_window_mean(r.rows, key, lo, hi) for r in runs) if v is not None]))
                     for lo, hi in WINDOWS]
            if any(c != "–" for c in cells):
                lines.append(f"| {label} | {p} | " + " | ".join(cells) + " |")
    cols = [(f"{p} {name}", f"{p}{sfx}") for p in sorted(noisy) for name, sfx in SPLITS]
    cols = [(c, k) for c, k in cols if _late(runs, f"noise_auc_loss_{k}")[0] is not None]
    if not cols:   # e.g. real clips: no recorded noise kind, hardness or concept frequency to split by
        return lines + ["", "No split: these runs record no noise kind, hardness or concept frequency.", ""]
    lines += ["", f"Split, steps {LATE[0] + 1}–{LATE[1]}: AUC for one kind of noise against all clean samples, and "
              "for all the pair's noisy samples against only the hard or only the easy clean ones, or within the "
              "tail / head concepts; `FPR hard / easy`: share of hard / easy clean samples a mixture calls noisy "
              "(posterior < ½).", ""]
    lines += ["| detector | " + " | ".join(c for c, _ in cols) + " | FPR hard / easy (text) |",
              "|---|" + "---|" * (len(cols) + 1)]
    for label, det in DETECTORS:
        cells = [_fmt(*_late(runs, f"noise_auc_{det}_{k}")) for _, k in cols]
        fpr = "–"
        if det in ("lossgmm", "comb"):
            h, e = _late(runs, f"fpr_{det}_text_hard"), _late(runs, f"fpr_{det}_text_easy")
            if h[0] is not None:
                fpr = f"{_fmt(*h)} / {_fmt(*e)}"
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {fpr} |")
    return lines + [""]


def outcome(regime: str, arms: Dict[str, List[RunRecord]]) -> Tuple[List[str], Optional[Tuple[str, float, float]]]:
    lines = [f"### {regime}: outcome", "",
             "Final held-out concept accuracy (clean, uniform evaluation split) and probe, mean ± std over seeds; "
             "`of gain`: (arm − plain) / (oracle − plain) of the seed means; `> 2σ`: whether arm − plain exceeds "
             "twice the larger seed spread of the two (v2t / t2v); `AUC text / audio`: the arm's own score "
             "over its last 50 steps (summary.json); `samples/s`: the runs' own throughput (two runs shared the "
             "2-core machine, with other work beside them: a rough cost, not a benchmark).", "",
             "| arm | n | v2t concept | t2v concept | probe | v2t of gain | t2v of gain | > 2σ | AUC text / audio | "
             "samples/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    if "plain" not in arms or "oracle" not in arms:
        return lines + ["", "(plain or oracle control missing)", ""], None
    plain = [_final(arms["plain"], d) for d in ("v2t", "t2v")]
    base = [p[0] for p in plain]
    orc = [_final(arms["oracle"], d)[0] for d in ("v2t", "t2v")]
    best = None
    order = [a for a in ARM_ORDER if a in arms] + sorted(set(arms) - set(ARM_ORDER))
    for arm in order:
        runs = arms[arm]
        fin = [_final(runs, d) for d in ("v2t", "t2v")]
        shares = [(f[0] - b) / (o - b) if f[0] is not None and abs(o - b) > 1e-9 else None
                  for f, b, o in zip(fin, base, orc)]
        sig = " / ".join("–" if f[0] is None else ("yes" if f[0] - p[0] > 2 * max(f[1] or 0.0, p[1] or 0.0) else "no")
                         for f, p in zip(fin, plain))
        auc = " / ".join(_fmt(*_summary(runs, k)) for k in ("noise_auc_text", "noise_auc_audio"))
        lines.append(f"| {arm} | {len(runs)} | {_fmt(*fin[0])} | {_fmt(*fin[1])} | "
                     f"{_fmt(*_summary(runs, 'probe_acc'))} | "
                     + " | ".join("–" if s is None else f"{s:+.2f}" for s in shares)
                     + f" | {sig} | {auc} | {_fmt(*_summary(runs, 'samples_per_s'))} |")
        if arm not in ("plain", "oracle") and None not in shares:
            if best is None or sum(shares) > best[1] + best[2]:
                best = (arm, shares[0], shares[1])
    return lines + [""] + _head_tail(arms, order), best


def regimes(exp_dir: Path, out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = _by_regime(Path(exp_dir))
    lead = ["| regime | noise kind | best detector (AUC, steps 501–2000) | runner-up | own loss | best action | "
            "share of the oracle's gain (v2t / t2v) |", "|---|---|---|---|---|---|---|"]
    body: List[str] = []
    for regime, arms in data.items():
        best_arm = None
        if "plain" in arms:
            body += detector_map(regime, arms["plain"])
        o_lines, best_arm = outcome(regime, arms)
        body += o_lines
        act = "–" if best_arm is None else best_arm[0]
        share = "–" if best_arm is None else f"{best_arm[1]:+.2f} / {best_arm[2]:+.2f}"
        for label, sfx in _kinds(arms.get("plain", [])):
            ranked = sorted(((m, s, name) for name, det in DETECTORS
                             for m, s, _ in [_late(arms["plain"], f"noise_auc_{det}_{sfx}")] if m is not None),
                            reverse=True)
            loss = _late(arms["plain"], f"noise_auc_loss_{sfx}")
            cell = lambda t: f"{t[2]} ({_fmt(t[0], t[1], 2)})" if t else "–"  # noqa: E731
            lead.append(f"| {regime} | {label} | {cell(ranked[0] if ranked else None)} | "
                        f"{cell(ranked[1] if len(ranked) > 1 else None)} | {_fmt(*loss)} | {act} | {share} |")
    text = ["# Web-like regimes: detectors and actions", "", *lead, "", *body]
    path = out / "regimes.md"
    path.write_text("\n".join(text) + "\n")
    return path
