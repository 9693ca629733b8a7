"""OUT_DIR/index.html: a static page with its pictures beside it (docs/AUDIT.md "The page").

Per pair (caption, audio): the histogram of every item's loss with the fitted split, then the top suspects,
one table row each: keyframes of the clip, its caption, a spectrogram of its audio, the scores, and the caption
the model finds most likely for the clip among the reference's captions. Above them: the run, the ground-truth
report when the data carries flags, and the bad media met.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harmony.audit import records  # noqa: E402
from harmony.audit.scoring import PAIRS, Split  # noqa: E402
from harmony.audit.source import fetch_items  # noqa: E402

_TITLE = {"text": "caption", "audio": "audio"}
_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
tr.suspect td { font-size: 0.9em; }
.num { font-family: monospace; white-space: nowrap; }
.bad { color: #a00; font-weight: bold; }
.ok { color: #070; }
img { display: block; }
td.caption { min-width: 12em; max-width: 20em; }
td.item { max-width: 11em; word-break: break-all; }
.scores { font-family: monospace; font-size: 0.85em; min-width: 22em; }
"""


def top_rows(rows: Sequence[dict], pair: str, k: int) -> List[dict]:
    """The k rows with the highest suspect_<pair> (unscored pairs last, ties by index)."""
    scored = [r for r in rows if r.get(f"suspect_{pair}") is not None]
    return sorted(scored, key=lambda r: (-r[f"suspect_{pair}"], r["index"]))[:k]


def write_page(out: Path, rows: Sequence[dict], summary: dict, splits: Dict[str, Optional[Split]], cfg, dataset,
               top: int) -> None:
    """Write index.html, hist_<pair>.png and media/<index>_frames.png / _audio.png for the shown rows."""
    out = Path(out)
    (out / "media").mkdir(exist_ok=True)
    tops = {pair: top_rows(rows, pair, top) for pair in PAIRS}
    shown = sorted({r["index"] for t in tops.values() for r in t})
    items = fetch_items(cfg, dataset, shown)
    for idx in shown:
        if idx in items:
            _frames_png(items[idx]["video"].numpy(), out / "media" / f"{idx}_frames.png")
            _audio_png(items[idx]["audio"].numpy(), cfg.data.sample_rate, out / "media" / f"{idx}_audio.png")
    for pair in PAIRS:
        _histogram_png(rows, pair, splits.get(pair), out / f"hist_{pair}.png")
    (out / "index.html").write_text(_html(rows, summary, tops, set(items)))


# ---------------------------------------------------------------------------------------------- pictures

def _frames_png(video: np.ndarray, path: Path) -> None:
    """video [3, T, H, W] in [0, 1] -> the T frames side by side."""
    frames = np.clip(video.transpose(1, 2, 3, 0), 0, 1)                  # [T, H, W, 3]
    strip = np.concatenate(list(frames), axis=1)
    width = frames.shape[0] * frames.shape[2]
    scale = max(1, min(64 // frames.shape[2], 320 // max(width, 1)))    # up to 64 px a frame, 320 px a strip
    plt.imsave(path, np.kron(strip, np.ones((scale, scale, 1))))


def _audio_png(audio: np.ndarray, rate: int, path: Path) -> None:
    fig, (ax_w, ax_s) = plt.subplots(2, 1, figsize=(3.2, 1.9), dpi=80, gridspec_kw={"height_ratios": [1, 2]})
    t = np.arange(audio.size) / rate
    ax_w.plot(t, audio, lw=0.4, color="#335")
    ax_w.set_xlim(0, max(t[-1] if t.size else 1.0, 1e-3))
    ax_w.axis("off")
    if np.abs(audio).max() > 0:
        ax_s.specgram(audio, NFFT=256, Fs=rate, noverlap=192, cmap="magma")
    ax_s.set_xlabel("s", fontsize=6)
    ax_s.set_ylabel("Hz", fontsize=6)
    ax_s.tick_params(labelsize=5)
    fig.tight_layout(pad=0.2)
    fig.savefig(path)
    plt.close(fig)


def _histogram_png(rows: Sequence[dict], pair: str, split: Optional[Split], path: Path) -> None:
    loss = np.array([r[f"loss_{pair}"] for r in rows if r.get(f"loss_{pair}") is not None], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 2.6), dpi=90)
    if loss.size:
        bins = np.linspace(loss.min(), loss.max() + 1e-9, 60)
        flags = [bool(r.get(f"noisy_{pair}")) for r in rows if r.get(f"loss_{pair}") is not None]
        if records.has_ground_truth(rows):
            flags = np.array(flags)
            ax.hist([loss[~flags], loss[flags]], bins=bins, stacked=True, color=["#7a9", "#d75"],
                    label=["aligned (ground truth)", "misaligned (ground truth)"])
        else:
            ax.hist(loss, bins=bins, color="#789", label="items")
        if split is not None:
            x = np.linspace(bins[0], bins[-1], 400)
            width = bins[1] - bins[0]
            for k, (name, colour) in enumerate((("aligned fit", "#064"), ("misaligned fit", "#a30"))):
                dens = split.weight[k] * np.exp(-(x - split.mean[k]) ** 2 / (2 * split.var[k])) / math.sqrt(
                    2 * math.pi * split.var[k])
                ax.plot(x, dens * loss.size * width, color=colour, lw=1.2, label=name)
            cut = _crossing(split)
            if cut is not None:
                ax.axvline(cut, color="k", ls="--", lw=1, label=f"split {cut:.2f}")
            if math.isfinite(split.chance):
                ax.axvline(split.chance, color="#888", ls=":", lw=1, label=f"chance {split.chance:.2f}")
            if not split.informative:
                ax.set_title("aligned component not below chance: nothing flagged", fontsize=8)
        ax.legend(fontsize=7)
    ax.set_xlabel(f"{_TITLE[pair]} loss against the reference (nats)")
    ax.set_ylabel("items")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _crossing(split: Split) -> Optional[float]:
    """The loss between the two means where the misaligned posterior reaches 1/2 (None if it does not)."""
    import torch

    from harmony.audit.scoring import misaligned_posterior

    x = torch.linspace(split.mean[0], split.mean[1], 2001, dtype=torch.float64)
    post = misaligned_posterior(x, split)
    above = torch.nonzero(post > 0.5).flatten()
    return float(x[above[0]]) if above.numel() else None


# ------------------------------------------------------------------------------------------------- html

def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _html(rows, summary, tops, have_media) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>harmony audit</title>",
             f"<style>{_STYLE}</style></head><body>", "<h1>Which pairs look misaligned</h1>",
             f"<p>Run <code>{_e(summary['run'])}</code>, checkpoint <code>{_e(summary['checkpoint'])}</code>. "
             f"{summary['items']} items scored, each against the same {summary['reference_items']} reference items "
             f"({summary['world_size']} process(es)). Full list: <a href='audit.jsonl'>audit.jsonl</a>.</p>"]
    parts += _truth_html(summary.get("ground_truth"))
    parts += _bad_html(summary)
    for pair in PAIRS:
        parts.append(f"<h2>Top {len(tops[pair])} suspects: {_TITLE[pair]}</h2>")
        parts.append(f"<img src='hist_{pair}.png' alt='histogram of the {_TITLE[pair]} loss'>")
        parts.append(_table(tops[pair], pair, have_media))
    parts.append("</body></html>")
    return "\n".join(parts)


def _truth_html(report: Optional[dict]) -> List[str]:
    if not report:
        return ["<p>The data carries no ground truth: no precision or AUC.</p>"]
    out = ["<h2>Against the ground truth</h2><table><tr><th>pair</th><th>AUC</th><th>misaligned</th>"
           "<th>precision@k</th></tr>"]
    for pair in PAIRS:
        pk = ", ".join(f"P@{k} = {v:.3f}" for k, v in report[f"precision_at_{pair}"].items())
        out.append(f"<tr><td>{_TITLE[pair]}</td><td class='num'>{records.fmt(report[f'auc_{pair}'], 4)}</td>"
                   f"<td class='num'>{report[f'misaligned_{pair}']}</td><td class='num'>{pk}</td></tr>")
    out.append("</table>")
    out.append(f"<p>{_e(records.report_lines(report)[-1])}</p>")
    return out


def _bad_html(summary: dict) -> List[str]:
    bad = summary["bad_media"]
    if not bad and not summary["unscored"]:
        return ["<p class='ok'>Bad media: none.</p>"]
    out = ["<h2>Bad media</h2><table><tr><th>kind</th><th>count</th><th>which</th></tr>"]
    for kind, count in bad.items():
        names = summary["bad_media_names"].get(kind, [])
        out.append(f"<tr><td class='bad'>{_e(kind)}</td><td class='num'>{count}</td>"
                   f"<td>{_e(', '.join(names[:20]))}{' …' if len(names) > 20 else ''}</td></tr>")
    for u in summary["unscored"]:
        out.append(f"<tr><td class='bad'>unscored</td><td class='num'>1</td><td>item {u['index']}: {_e(u['why'])}"
                   "</td></tr>")
    out.append("</table>")
    return out


def _table(rows, pair, have_media) -> str:
    head = ("<table><tr><th>#</th><th>item</th><th>keyframes</th><th>caption</th><th>audio</th><th>scores</th>"
            "<th>most likely caption for this clip</th></tr>")
    body = []
    for n, r in enumerate(rows, 1):
        idx = r["index"]
        frames = f"<img src='media/{idx}_frames.png' alt='frames'>" if idx in have_media else "(not decodable)"
        audio = f"<img src='media/{idx}_audio.png' alt='audio'>" if idx in have_media else ""
        truth = ""
        if "noisy_text" in r:
            truth = (f"<br>truth: caption {'<b>swapped</b>' if r['noisy_text'] else 'ok'}, "
                     f"audio {'<b>swapped</b>' if r['noisy_audio'] else 'ok'}")
        where = f"<br><small>{_e(r.get('path') or '')}</small>" if r.get("path") else ""
        scores = (f"suspect: <b>{_e(r['suspect'])}</b><br>"
                  + "<br>".join(f"{_TITLE[p]}: loss {_fmt(r[f'loss_{p}'])}, rank {_fmt(r[f'rank_{p}'])}, "
                                f"z {_fmt(r[f'suspect_{p}'], 2)}, p {_fmt(r[f'p_misaligned_{p}'], 2)}"
                                for p in PAIRS) + truth)
        best = "(its own caption)" if r.get("best_caption_is_own") else _e(r.get("best_caption"))
        body.append(f"<tr class='suspect'><td>{n}</td><td class='item'>{_e(r['id'])}{where}</td><td>{frames}</td>"
                    f"<td class='caption'>{_e(r.get('caption'))}</td><td>{audio}</td><td class='scores'>{scores}</td>"
                    f"<td class='caption'>{best}</td></tr>")
    return head + "\n".join(body) + "</table>"
