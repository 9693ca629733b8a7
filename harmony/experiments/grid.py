"""Named experiment grids as data: a grid -> the list of its runs, each with its exact ``train.py`` command.

A grid is a base (``section.key -> value`` overrides of ``configs/default.yaml``), a list of axes and a list
of seeds. An axis is either a config field swept over values (``data.noise: [0, 0.2, 0.4, 0.6]``) or a named
set of presets (``method: {baseline: {...}, realign: {...}}``). The runs are the cross product of the axes and
the seeds; a seed sets both ``train.seed`` (model init, batch order) and ``data.seed`` (which items are noisy),
so the spread over seeds covers both. Every override is written out on the command line, so a printed command
reproduces its run on its own (given the same ``configs/default.yaml``).
"""
from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harmony.config import ConfigError

# The four arms of the main comparison (docs/METHOD.md "Realignment rules", "Curriculum"): plain VATT, realignment only,
# curriculum only, both.
METHODS = {
    "baseline": {"harmony.enabled": False, "harmony.realign": "none", "harmony.curriculum": "none"},
    "realign": {"harmony.enabled": True, "harmony.realign": "pcgrad", "harmony.curriculum": "none"},
    "curriculum": {"harmony.enabled": True, "harmony.realign": "none", "harmony.curriculum": "threshold"},
    "both": {"harmony.enabled": True, "harmony.realign": "pcgrad", "harmony.curriculum": "threshold"},
}
# Measure only: the harmonizer computes every per-sample cosine but neither realigns nor reweights, so the
# update is the baseline's L_va + λ·L_vt gradient (equal up to float rounding, which is tested) at the
# harmonized step's cost. Its noise AUCs are premise (a) on the baseline's own training trajectory.
MEASURE = {"harmony.enabled": True, "harmony.realign": "none", "harmony.curriculum": "none"}

# Shared by the science grids: no progress bar; a checkpoint every 100 steps (only the newest kept) that
# train.resume=auto continues when a sweep is interrupted and relaunched.
QUIET = {"log.progress": False, "train.ckpt_every": 100, "train.keep_last": 1, "train.resume": "auto"}

# The smallest run that still exercises every part of the trainer (tests): ~10 s on 2 CPU cores.
TINY = {"train.steps": 2, "train.batch_size": 4, "train.warmup_steps": 1, "train.device": "cpu",
        "train.ckpt_every": 0, "train.keep_last": 1, "data.size": 16, "data.eval_size": 8, "data.frames": 2,
        "data.image_size": 8, "model.video_patch": [2, 8, 8], "data.sample_rate": 1000,
        "data.audio_seconds": 0.32, "data.noise_audio": 0.0, "eval.size": 8, "eval.batch_size": 8,
        "eval.every": 0, "log.every": 1, "log.plots": False, "log.progress": False, "train.resume": "auto"}

SEEDS3 = [0, 1, 2]


@dataclass
class Axis:
    """One swept dimension: a config field over ``values``, or named ``presets`` of several fields."""

    name: str
    values: Sequence[Any] = ()
    presets: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def choices(self) -> List[Tuple[str, Dict[str, Any]]]:
        """-> [(label, overrides)] in order."""
        if self.presets:
            return [(label, dict(over)) for label, over in self.presets.items()]
        return [(format_value(v), {self.name: v}) for v in self.values]


@dataclass
class Grid:
    name: str
    description: str
    base: Dict[str, Any]
    axes: List[Axis]
    seeds: Sequence[int] = tuple(SEEDS3)
    config: Optional[str] = None  # a config file (repository-relative) the overrides apply to; None: default.yaml


@dataclass
class Run:
    """One run of a grid: its folder name, axis labels, seed and full override list."""

    grid: str
    name: str
    labels: Dict[str, str]
    seed: int
    overrides: Dict[str, Any]
    config: Optional[str] = None

    def args(self, run_dir: str, extra: Optional[Dict[str, Any]] = None) -> List[str]:
        """The train.py arguments of this run writing to ``run_dir`` (``extra``: --set overrides, applied last)."""
        merged = {**self.overrides, **(extra or {})}
        merged["log.run_dir"] = run_dir
        head = ["--config", self.config] if self.config else []
        return head + [f"--{k}={format_value(v)}" for k, v in merged.items()]

    def command(self, run_dir: str, extra: Optional[Dict[str, Any]] = None) -> str:
        """The shell command, run from the repository root, that reproduces this run."""
        return " ".join(shlex.quote(a) for a in ["python", "train.py", *self.args(run_dir, extra)])


def format_value(v: Any) -> str:
    """A CLI value as harmony.cli reads it back: booleans lower-case, lists as [a,b,c]."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    return str(v)


# What the grids measured before configs/default.yaml moved to web-like noise, the per-pair filter from step 100, no
# per-window detector report and weights on the loss terms: every grid states these, so the new default's data, target,
# start, instrumentation and update do not change a grid's runs.
PINNED = {"data.noise_bias": 0.0, "data.hard": 0.0, "data.imbalance": 1.0, "eval.feature_cos": True,
          "harmony.curriculum_target": "vt", "harmony.curriculum_start": 0.25, "harmony.update": "rows"}


def _grid(name, description, base, axes, seeds=SEEDS3, config=None) -> Grid:
    return Grid(name, description, {**PINNED, **QUIET, **base} if name != "smoke" else {**PINNED, **base},
                list(axes), list(seeds), config)


NOISE_RATES = [0.0, 0.2, 0.4, 0.6]
NOISE_KINDS = ["swap", "bias", "unrelated"]
_method = Axis("method", presets=METHODS)

# The budgeted study (docs/RESULTS.md): text noise at 40% with audio clean, batch-level methods against the
# measure-only arm; the ablations share the narrator-bias setting so that its pcgrad / threshold runs are the
# "realign" / "curriculum" arms of study_text.
STUDY = {"data.noise_audio": 0.0, "data.noise": 0.4}
BIAS40 = {**STUDY, "data.noise_kind": "bias"}
_arms = Axis("method", presets={"measure": MEASURE, **{k: METHODS[k] for k in ("realign", "curriculum", "both")}})
# the score memory (ratio rule on each item's remembered score); the studies call this schedule "memory"
_MEMORY_RULE = {"harmony.score_memory": True, "harmony.curriculum": "ratio"}
_memory = {"harmony.enabled": True, "harmony.realign": "none", **_MEMORY_RULE}


def _schedules(*names: str) -> Axis:
    """The curriculum axis of the ablations: rules by name, and "memory" (the ratio rule on the score memory)."""
    return Axis("harmony.curriculum",
                presets={n: _MEMORY_RULE if n == "memory" else {"harmony.curriculum": n} for n in names})

# 2000 steps of 64 (about 16 epochs of the default 8192 items), evaluated every 250 steps, 40% noise.
LONG = {"train.steps": 2000, "train.batch_size": 64, "train.lr": 1e-3, "train.warmup_steps": 20,
        "data.noise": 0.4, "data.noise_audio": 0.0, "data.noise_kind": "swap", "data.size": 8192,
        "eval.every": 250, "eval.feature_cos": True}
NOISE40 = {"swap-0.4": {"data.noise_kind": "swap", "data.noise": 0.4, "data.noise_audio": 0.0},
           "bias-0.4": {"data.noise_kind": "bias", "data.noise": 0.4, "data.noise_audio": 0.0},
           "unrelated-0.4": {"data.noise_kind": "unrelated", "data.noise": 0.4, "data.noise_audio": 0.0},
           "audio-swap-0.4": {"data.noise_kind": "swap", "data.noise": 0.0, "data.noise_audio": 0.4}}

# The outcome arms: started after the signal emerges (25% of training), a constant kept fraction of 60% (the
# ratio schedule with an endless ramp), the cheap tiers: loss-ranked arms skip the measurement, cosine-ranked
# ones measure at the pooled feature under the own_pair definition.
_LATE = {"harmony.enabled": True, "harmony.curriculum_start": 0.25}
_RATIO60 = {**_LATE, "harmony.curriculum": "ratio", "harmony.rho0": 0.6, "harmony.ramp": 100.0, "harmony.min_keep": 0.0}
_FEATURE = {"harmony.mode": "feature", "harmony.upstream": "own_pair"}
OUTCOME_ARMS = {
    "loss-vt": {**_RATIO60, "harmony.realign": "none", "harmony.measure": False, "harmony.curriculum_score": "loss",
                "harmony.curriculum_target": "vt"},
    "gvt-vt": {**_RATIO60, **_FEATURE, "harmony.realign": "none", "harmony.curriculum_score": "gvt",
               "harmony.curriculum_target": "vt"},
    "gmm-vt": {**_LATE, "harmony.realign": "none", "harmony.measure": False, "harmony.curriculum": "threshold",
               "harmony.kappa0": 0.5, "harmony.kappa1": 0.5, "harmony.min_keep": 0.0,
               "harmony.curriculum_score": "gmm", "harmony.curriculum_target": "vt"},
    "pcgrad": {**_FEATURE, "harmony.enabled": True, "harmony.realign": "pcgrad", "harmony.curriculum": "none"},
    "cos-vt": {**_RATIO60, **_FEATURE, "harmony.realign": "none", "harmony.curriculum_score": "cos",
               "harmony.curriculum_target": "vt"},
    "loss-triplet": {**_RATIO60, "harmony.realign": "none", "harmony.measure": False,
                     "harmony.curriculum_score": "loss", "harmony.curriculum_target": "triplet"},
}

# Web-like regimes (docs/RESULTS.md "Where the loss goes blind"): 4096 items, 2000 steps, default.yaml's model and
# schedule. Narrator bias (a fixed wrong concept per concept, the loss's blind spot), a web-like mix of swapped and
# biased captions with swapped audio, hard-but-clean clips with swaps, a long tail of concepts with swaps.
REGIMES = {"bias-0.4": {"data.noise": 0.0, "data.noise_bias": 0.4, "data.noise_audio": 0.0},
           "web-mix": {"data.noise": 0.2, "data.noise_kind": "swap", "data.noise_bias": 0.2, "data.noise_audio": 0.2},
           "hard-swap": {"data.noise": 0.4, "data.noise_kind": "swap", "data.hard": 0.3, "data.noise_audio": 0.0},
           "tail-swap": {"data.noise": 0.4, "data.noise_kind": "swap", "data.imbalance": 16.0,
                         "data.noise_audio": 0.0}}
WEB = {**LONG, "data.size": 4096, "data.noise_bias": 0.0, "data.hard": 0.0, "data.imbalance": 1.0,
       "eval.feature_cos": False}
# Per-pair filters from step 500: a suspected caption loses L_vt, a suspected audio track L_va, where a mixture's
# clean posterior is below 1/2; measured at the pooled feature under own_pair (noise_auc_cos), as the default is.
_PAIR = {**_LATE, **_FEATURE, "harmony.realign": "none", "harmony.curriculum": "threshold", "harmony.kappa0": 0.5,
         "harmony.kappa1": 0.5, "harmony.min_keep": 0.0, "harmony.curriculum_target": "pair"}
WEB_ARMS = {
    # plain training with every detector measured (the update is plain's): the premise map of each regime
    "plain": {**MEASURE, **_FEATURE, "eval.feature_cos": True},
    "oracle": {**METHODS["baseline"], "data.oracle_drop": True},
    "gmm-pair": {**_PAIR, "harmony.curriculum_score": "gmm"},
    "agree-pair": {**_PAIR, "harmony.curriculum_score": "agree"},
    "comb-pair": {**_PAIR, "harmony.curriculum_score": "loss_agree"},
    "gmm-vt": {**OUTCOME_ARMS["gmm-vt"], **_FEATURE, "harmony.measure": True},
    # the same filters from step 100 (5% of training): the detectors are informative from the first windows, and
    # the oracle is ahead of plain training from the first evaluation on in the mixed regime
    "gmm-pair-early": {**_PAIR, "harmony.curriculum_score": "gmm", "harmony.curriculum_start": 0.05},
    "comb-pair-early": {**_PAIR, "harmony.curriculum_score": "loss_agree", "harmony.curriculum_start": 0.05},
    # the same two early filters with their weights on the per-sample loss terms (harmony.update=objective) instead
    # of on each sample's gradient rows: the rows update collapsed under the long tail (docs/RESULTS.md)
    "gmm-pair-early-obj": {**_PAIR, "harmony.curriculum_score": "gmm", "harmony.curriculum_start": 0.05,
                           "harmony.update": "objective"},
    "comb-pair-early-obj": {**_PAIR, "harmony.curriculum_score": "loss_agree", "harmony.curriculum_start": 0.05,
                            "harmony.update": "objective"},
    # plain training measuring the cosine exactly over the shared parameters (the ghost tier, on the kernels) under
    # own_pair, beside every feature-level detector: does parameter space carry more than the pooled feature
    "plain-exact": {**MEASURE, "harmony.mode": "ghost", "harmony.upstream": "own_pair", "eval.feature_cos": True},
    # per-sample PCGrad at the pooled feature (the cheap tier), no filter
    "pcgrad": {**_FEATURE, "harmony.enabled": True, "harmony.realign": "pcgrad", "harmony.curriculum": "none"},
}

GRIDS: Dict[str, Grid] = {g.name: g for g in [
    _grid("smoke", "tests: tiny model and data, 2 steps; 2 seeds x {baseline, pcgrad} x text noise {0, 0.4}",
          TINY, [Axis("method", presets={"baseline": METHODS["baseline"], "pcgrad": METHODS["realign"]}),
                 Axis("data.noise", [0.0, 0.4])], seeds=[0, 1]),
    _grid("noise_text", "misaligned captions: rate x kind x method (audio clean), default.yaml otherwise",
          {"data.noise_audio": 0.0}, [Axis("data.noise_kind", NOISE_KINDS), Axis("data.noise", NOISE_RATES), _method]),
    _grid("noise_audio", "misaligned audio tracks: rate x kind x method (captions clean)",
          {"data.noise": 0.0}, [Axis("data.noise_kind", NOISE_KINDS), Axis("data.noise_audio", NOISE_RATES),
                                _method]),
    _grid("ablate_rules", "realignment rules without curriculum at 40% swapped captions (+ the baseline)",
          {"data.noise": 0.4, "data.noise_audio": 0.0, "data.noise_kind": "swap", "harmony.curriculum": "none"},
          [Axis("rule", presets={"baseline": METHODS["baseline"],
                                 **{r: {"harmony.enabled": True, "harmony.realign": r}
                                    for r in ("pcgrad", "project_va", "project_vt", "gradvac")}})]),
    _grid("ablate_curriculum", "curriculum schedules (no realignment) x ramp length at 40% swapped captions",
          {"data.noise": 0.4, "data.noise_audio": 0.0, "data.noise_kind": "swap", "harmony.enabled": True,
           "harmony.realign": "none"},
          [_schedules("threshold", "ratio", "soft", "memory"),
           Axis("harmony.ramp", [0.25, 0.5, 0.75])]),
    _grid("ablate_scope", "parameters the cosine is measured on, PCGrad + threshold at 40% swapped captions",
          {"data.noise": 0.4, "data.noise_audio": 0.0, "data.noise_kind": "swap", **METHODS["both"]},
          [Axis("harmony.scope", ["shared", "backbone", "last_block"])]),
    _grid("long_finite", "many epochs over 256 items (600 steps x 32 = 75 epochs), narrator-bias caption noise",
          {"data.size": 256, "train.steps": 600, "train.batch_size": 32, "data.noise_kind": "bias",
           "data.noise_audio": 0.0,
           "eval.every": 200},
          [Axis("data.noise", [0.0, 0.4]), _method]),
    # ---- the budgeted study reported in docs/RESULTS.md
    _grid("study_text", "40% misaligned captions (swap or narrator bias), audio clean: measure-only vs the "
          "three harmonized arms", STUDY, [Axis("data.noise_kind", ["swap", "bias"]), _arms]),
    _grid("study_clean", "no misalignment at all: does harmonization cost anything on clean data",
          {"data.noise": 0.0, "data.noise_audio": 0.0},
          [Axis("method", presets={"measure": MEASURE, "both": METHODS["both"]})]),
    _grid("study_premise", "premise (a) across noise rates and kinds, measure-only (the update is the baseline's)",
          {"data.noise_audio": 0.0, **MEASURE},
          [Axis("noise", presets={"swap-0.2": {"data.noise_kind": "swap", "data.noise": 0.2},
                                  "swap-0.6": {"data.noise_kind": "swap", "data.noise": 0.6},
                                  "unrelated-0.4": {"data.noise_kind": "unrelated", "data.noise": 0.4},
                                  "audio-swap-0.4": {"data.noise_kind": "swap", "data.noise": 0.0,
                                                     "data.noise_audio": 0.4}})]),
    _grid("study_rules", "the other realignment rules, no curriculum, 40% narrator-bias captions (pcgrad: "
          "study_text's realign arm)", BIAS40,
          [Axis("rule", presets={r: {"harmony.enabled": True, "harmony.realign": r, "harmony.curriculum": "none"}
                                 for r in ("project_va", "project_vt", "gradvac")})]),
    _grid("study_curriculum", "the other curriculum schedules, no realignment, 40% narrator-bias captions "
          "(threshold: study_text's curriculum arm)", {**BIAS40, "harmony.enabled": True, "harmony.realign": "none"},
          [_schedules("ratio", "soft", "memory")]),
    _grid("study_scope", "PCGrad + threshold measured on other scopes, 40% narrator-bias captions (shared: "
          "study_text's both arm)", {**BIAS40, **METHODS["both"]},
          [Axis("harmony.scope", ["backbone", "last_block"])]),
    _grid("study_finite", "a finite set reused for 75 epochs (256 items, 600 steps x 32), 40% narrator-bias "
          "captions: per-step curriculum vs the data-level score memory as item weights or as a sampler",
          {**BIAS40, "data.size": 256, "train.steps": 600, "train.batch_size": 32, "eval.every": 200},
          [Axis("method", presets={"measure": MEASURE, "curriculum": METHODS["curriculum"],
                                   "memory-weights": {**_memory, "harmony.memory_use": "weights"},
                                   "memory-sampler": {**_memory, "harmony.memory_use": "sampler"}})]),
    _grid("study_equal_time", "plain baseline (no per-sample work) at 400 steps and at 800 steps, about the "
          "wall-clock time of a 400-step harmonized run, 40% narrator-bias captions",
          {**BIAS40, **METHODS["baseline"]}, [Axis("train.steps", [400, 800])]),
    _grid("study_oracle", "control: plain baseline that leaves the truly misaligned captions out of L_vt (an "
          "oracle curriculum, the most any filter could gain), 40% swap or narrator-bias captions",
          {**STUDY, **METHODS["baseline"], "data.oracle_drop": True}, [Axis("data.noise_kind", ["swap", "bias"])]),
    _grid("study_loss", "beyond the paper: the curriculum ranks samples by their loss (small-loss filter) or by "
          "the cosine, as a filter keeping 60% of each batch after the first 10% of training (ratio schedule, "
          "rho0=0.6, ramp=100), no realignment, 40% misaligned captions",
          {**STUDY, "harmony.enabled": True, "harmony.realign": "none", "harmony.curriculum": "ratio",
           "harmony.rho0": 0.6, "harmony.ramp": 100.0},
          [Axis("data.noise_kind", ["swap", "bias"]), Axis("harmony.curriculum_score", ["cos", "loss"])]),
    # ---- where the model learns (docs/RESULTS.md, "Where the model learns"): 2000 steps of 64, 40% swapped
    # captions unless named; every run spells out its length and evaluation so default.yaml changes leave it alone
    _grid("long_premise", "premise map: plain training for 2000 steps with the pooled-feature cosines of every "
          "per-sample definition and the own-loss detector logged per window, 8192 items, 40% narrator-bias or "
          "off-topic captions or swapped audio (swapped captions: long_headroom's plain 8192-item arm)",
          {**LONG, **METHODS["baseline"]},
          [Axis("noise", presets={k: NOISE40[k] for k in ("audio-swap-0.4", "bias-0.4", "unrelated-0.4")})]),
    _grid("long_headroom", "headroom map: plain training against the oracle (misaligned captions or audio left "
          "out of their loss) at 2000 steps, over the training-set size, 40% swapped captions",
          {**LONG, **METHODS["baseline"]},
          [Axis("data.size", [8192, 4096, 2048]),
           Axis("arm", presets={"plain": {"data.oracle_drop": False}, "oracle": {"data.oracle_drop": True}})]),
    _grid("long_headroom_kinds", "headroom map at 4096 items: plain vs oracle for 60% swapped captions, 40% "
          "narrator bias and 40% swapped audio",
          {**LONG, **METHODS["baseline"], "data.size": 4096},
          [Axis("noise", presets={k: NOISE40[k] for k in ("bias-0.4", "audio-swap-0.4")} |
                {"swap-0.6": {"data.noise_kind": "swap", "data.noise": 0.6, "data.noise_audio": 0.0}}),
           Axis("arm", presets={"plain": {"data.oracle_drop": False}, "oracle": {"data.oracle_drop": True}})]),
    _grid("long_outcome", "outcome where the signal and the headroom exist: 4096 items, 40% swapped captions, 2000 "
          "steps; curricula from 25% of training (step 500) that keep 60% of each batch (ratio) or the GMM's "
          "likely-clean samples, dropping only the caption loss (vt) or the whole triplet; PCGrad; measured at the "
          "pooled feature under the own_pair definition (about a plain step's cost); controls: long_headroom",
          {**LONG, "data.size": 4096}, [Axis("arm", presets=OUTCOME_ARMS)]),
    _grid("web", "web-like regimes (narrator bias; swapped + biased captions with swapped audio; hard-but-clean "
          "clips; a long tail of concepts) x arms: plain training measuring every detector, the oracle, and per-pair "
          "filters by the loss mixture, the cross-modal agreement or both (combined); 4096 items, 2000 steps",
          WEB, [Axis("regime", presets=REGIMES), Axis("arm", presets=WEB_ARMS)]),
    _grid("study_grid", "premise (a) on real clips: GRID (configs/grid.yaml, 450 training clips) with 30% of "
          "the training captions, or audio tracks, swapped between clips; measure-only, 300 steps of 32",
          {**MEASURE, "train.steps": 300, "eval.every": 0},
          [Axis("noise", presets={"captions-0.3": {"data.noise": 0.3}, "audio-0.3": {"data.noise_audio": 0.3}})],
          config="configs/grid.yaml"),
    _grid("grid_long", "premise on real clips, run longer: GRID (configs/grid.yaml, 450 training clips) with 30% of "
          "the training captions and, independently, 30% of the audio tracks swapped between clips; plain training "
          "measuring every detector per window (the web grid's plain arm), 2000 steps of 32 (about 140 epochs)",
          {"train.steps": 2000, "eval.every": 500},
          [Axis("regime", presets={"grid-mix": {"data.noise": 0.3, "data.noise_audio": 0.3}}),
           Axis("arm", presets={"plain": WEB_ARMS["plain"]})], config="configs/grid.yaml"),
]}


def select(runs: Sequence[Run], only: Sequence[str]) -> List[Run]:
    """The runs whose name contains every text of ``only`` (all of them when it is empty)."""
    return [r for r in runs if all(t in r.name for t in only)]


def expand(grid: Grid) -> List[Run]:
    """All runs of a grid: the cross product of its axes, then the seeds (innermost)."""
    runs = []
    for combo in itertools.product(*(axis.choices() for axis in grid.axes)):
        labels, over = {}, dict(grid.base)
        for axis, (label, values) in zip(grid.axes, combo):
            labels[short_name(axis.name)] = label
            over.update(values)
        for seed in grid.seeds:
            name = "_".join(f"{k}-{v}" for k, v in labels.items()) + f"_seed-{seed}"
            runs.append(Run(grid.name, name, dict(labels), seed,
                            {**over, "train.seed": seed, "data.seed": seed}, grid.config))
    return runs


def short_name(field_name: str) -> str:
    """'data.noise_kind' -> 'noise_kind' (folder names and table headers)."""
    return field_name.rsplit(".", 1)[-1]


def get_grid(name: str) -> Grid:
    if name not in GRIDS:
        raise ConfigError(f"unknown grid {name!r}; named grids: {sorted(GRIDS)}")
    return GRIDS[name]


def parse_sets(items: Sequence[str]) -> Dict[str, str]:
    """['train.steps=10', ...] -> {'train.steps': '10'} (values stay strings; train.py converts them)."""
    out = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        out[key.strip()] = value
    return out
