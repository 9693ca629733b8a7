"""What a run reports as it goes (docs/DESIGN.md "The trainer and its observers"): the metrics window between two
metrics.jsonl lines, the bad-input ledger, the throughput and the summary line.

Each rank sums its micro-steps into a ``MetricsWindow``; ``row`` gathers the ranks' bad-input kinds and item
names (``all_gather_object``), reduces the sums over the ranks in one dict-based all-reduce
(``harmony.distributed.reduce_dict``) and turns them into one metrics.jsonl row. The ``BadLedger`` keeps what
summary.json reports about bad inputs over the whole run (checkpointed).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import torch

from harmony import distributed as hd
from harmony.trainer.contracts import Batch, HarmonyStats
from harmony.data.batch import BadCounts
from harmony.trainer.evaluate import flatten_metrics

_BAD_EXAMPLES = 5  # offending clips / lines of each kind named in summary.json


class BadLedger:
    """Bad inputs over the run: draws per kind (an item met in every epoch counts every time), summed over all
    ranks, and the distinct offending items per kind in the order first met (the same on every rank)."""

    def __init__(self):
        self.total: Dict[str, float] = {}
        self.seen: Dict[str, List[str]] = {}

    def add_names(self, names: Dict[str, List[str]]) -> None:
        for k, ns in names.items():
            seen = self.seen.setdefault(k, [])
            known = set(seen)
            for n in ns:
                if n not in known:
                    known.add(n)
                    seen.append(n)

    def report(self) -> dict:
        """summary.json's bad-input report: bad_draws (also under the older names bad / bad_samples), bad_items
        (distinct clips or manifest lines) and bad_examples (the first few of each kind)."""
        draws = {k: int(v) for k, v in self.total.items()}
        return {"bad_samples": int(sum(draws.values())), "bad": draws, "bad_draws": draws,
                "bad_items": {k: len(v) for k, v in self.seen.items()},
                "bad_examples": {k: v[:_BAD_EXAMPLES] for k, v in self.seen.items() if v}}

    def state_dict(self) -> dict:
        return {"bad_total": dict(self.total), "bad_seen": {k: list(v) for k, v in self.seen.items()}}

    def load_state_dict(self, d: dict) -> None:
        self.total = dict(d.get("bad_total", {}))
        self.seen = {k: list(v) for k, v in d.get("bad_seen", {}).items()}


class MetricsWindow:
    """Sums over the steps since the last log line, local to this rank until ``row`` reduces them."""

    def __init__(self, bins: int, lam: float):
        self.bins, self.lam = bins, lam
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(("cos_sum", "cos_n", "conflict_n", "kept_n", "samples", "skipped", "grad_norm",
                                   "grad_norm_n", "time"), 0.0)
        self.loss_parts: List[float] = []  # per micro-step: Σ m ℓ^va, Σ m^a, Σ m ℓ^vt, Σ m^t (local)
        self.bad: Dict[str, float] = {}
        self.bad_names: Dict[str, List[str]] = {}
        self.hist = torch.zeros(self.bins, dtype=torch.float64)
        self.has_cos = False
        self.lr: Optional[float] = None

    def add_bad(self, counts: Mapping[str, int]) -> None:
        """Bad-input counts {kind: n} (and, for a BadCounts, their offending items) met by the data."""
        counts = BadCounts.of(counts)
        for k, v in counts.items():
            self.bad[k] = self.bad.get(k, 0.0) + float(v)
        for k, ns in counts.names.items():
            self.bad_names.setdefault(k, []).extend(ns)

    def add_micro_step(self, batch: Batch, l_va: torch.Tensor, l_vt: torch.Tensor,
                       stats: Optional[HarmonyStats]) -> None:
        """One micro-step's losses, data counters and (with stats) cosine statistics."""
        for l, m in ((l_va, batch["mask_va"]), (l_vt, batch["mask_vt"])):
            m = m.bool()
            self.loss_parts += [float(torch.where(m, l.detach(), torch.zeros_like(l)).double().sum()), float(m.sum())]
        self.sums["samples"] += int(batch["index"].shape[0])
        if batch.get("bad") is not None:
            self.add_bad(batch["bad"])
        if stats is None:
            return
        valid = stats.valid.bool() & torch.isfinite(stats.cos)
        cos_v = stats.cos[valid].double().cpu()
        self.has_cos = True
        self.sums["cos_sum"] += float(cos_v.sum())
        self.sums["cos_n"] += cos_v.numel()
        self.sums["conflict_n"] += float(stats.conflict.bool()[valid].sum())
        self.sums["kept_n"] += float((stats.weights[valid] > 0).sum())
        self.hist += torch.histc(cos_v.clamp(-1, 1), bins=self.bins, min=-1.0, max=1.0)

    def add_step(self, info: Dict[str, float], seconds: float) -> None:
        """One optimizer step's outcome (``Trainer.optimizer_step``) and its wall time."""
        self.sums["time"] += seconds
        self.sums["skipped"] += info["skipped"]
        if math.isfinite(info["grad_norm"]):
            self.sums["grad_norm"] += info["grad_norm"]
            self.sums["grad_norm_n"] += 1
        self.lr = info["lr"]

    def row(self, step: int, skipped_total: int, ledger: BadLedger, device=None) -> dict:
        """Reduce the window over ranks (collective: every rank calls it) into one metrics.jsonl row; the
        window's bad inputs go into ``ledger``."""
        gathered = hd.all_gather_object((sorted(self.bad), self.bad_names))
        bad_keys = sorted(set().union(*(g[0] for g in gathered)))
        for _, names in gathered:  # every rank keeps the same union of distinct offending items
            ledger.add_names(names)
        red = hd.reduce_dict({**self.sums, "loss_parts": self.loss_parts, "hist": self.hist.tolist(),
                              "has_cos": float(self.has_cos), "bad": [self.bad.get(k, 0.0) for k in bad_keys]},
                             device=device)
        world = hd.get_world_size()
        # per micro-step global masked means, then their average over the window
        parts = torch.tensor(red["loss_parts"], dtype=torch.float64).reshape(-1, 4)
        l_va = parts[:, 0] / parts[:, 1].clamp_min(1)
        l_vt = parts[:, 2] / parts[:, 3].clamp_min(1)
        bad = dict(zip(bad_keys, red["bad"]))
        for k, v in bad.items():
            ledger.total[k] = ledger.total.get(k, 0.0) + v
        has_cos, n = red["has_cos"] > 0, red["cos_n"]
        row = {"step": step, "loss_va": l_va.mean().item(), "loss_vt": l_vt.mean().item(),
               "loss": (l_va + self.lam * l_vt).mean().item(),
               "cos_mean": red["cos_sum"] / n if has_cos and n else None,
               "frac_conflict": red["conflict_n"] / n if has_cos and n else None,
               "kept": red["kept_n"] / n if has_cos and n else None,
               "lr": self.lr,
               "grad_norm": red["grad_norm"] / red["grad_norm_n"] if red["grad_norm_n"] else None,
               "samples_per_s": red["samples"] / (red["time"] / world) if red["time"] > 0 else None,
               "skipped": int(round(red["skipped"] / world)), "skipped_steps": skipped_total,
               "bad_samples": sum(bad.values()), "bad_samples_total": sum(ledger.total.values()),
               "bad": {k: int(v) for k, v in bad.items()},
               "bad_items_total": {k: len(v) for k, v in ledger.seen.items()}}
        if has_cos:
            row["cos_hist"] = [int(round(h)) for h in red["hist"]]
        return row


@dataclass
class Throughput:
    """Training samples and seconds (data, forward, backward, step; not evaluation or checkpoints) since
    ``start``."""

    start: float = field(default_factory=time.perf_counter)
    samples: int = 0
    seconds: float = 0.0

    def samples_per_s(self) -> Optional[float]:
        return self.samples / self.seconds if self.seconds > 0 else None


def summary_line(summary: dict) -> str:
    """The one line a run prints at its end: steps, samples/s, R@1 per direction, probe accuracies, noise AUCs."""
    flat = flatten_metrics({k: v for k, v in summary.items() if k not in ("bad", "run_dir")})
    keys = [k for k in flat if k.endswith("/r1") or k.startswith(("probe_acc", "noise_auc", "steps", "samples"))]
    return "summary: " + ", ".join(f"{k}={flat[k]:.4g}" for k in keys) + f"  ({summary['run_dir']})"
