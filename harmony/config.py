"""Typed configuration: one dataclass per section of the CLI (docs/DESIGN.md "Command line and outputs").

Every field's default is the default job's (configs/default.yaml repeats them, and a test keeps the two equal: no
file, that file and a YAML of your own that sets nothing run the same job). Every field has a docstring-like
``help``; fields with a closed set of values carry
``choices`` in their metadata, and ``validate()`` checks them before any work is done, raising an
error that names the field and the allowed values. Each section is the single place its fields
live: the model reads ``ModelConfig``, the data code ``DataConfig``, the harmonizer
``HarmonyConfig``, the trainer ``TrainConfig`` / ``EvalConfig`` / ``LogConfig`` / ``ProfileConfig``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is allowed."""


def _f(default, help: str, choices=None, lo=None, hi=None):
    """A dataclass field with help text and optional allowed values / numeric bounds."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if lo is not None:
        meta["lo"] = lo
    if hi is not None:
        meta["hi"] = hi
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def validate_section(obj, section: str) -> None:
    """Check every field of a section dataclass against its ``choices`` and bounds."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{section}.{f.name}" if section else f.name
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(choices)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} is not a finite number")
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        if lo is not None and value is not None and value < lo:
            raise ConfigError(f"{name}={value!r} must be >= {lo}")
        if hi is not None and value is not None and value > hi:
            raise ConfigError(f"{name}={value!r} must be <= {hi}")


@dataclass
class HarmonyConfig:
    """Per-sample gradient harmonization (docs/HARMONIZER.md, docs/METHOD.md)."""

    realign: str = _f("none", "realignment rule on conflicting samples (docs/METHOD.md: Realignment rules)",
                      choices=("none", "pcgrad", "project_va", "project_vt", "gradvac"))
    curriculum: str = _f("threshold", "per-sample weighting schedule (docs/METHOD.md: Curriculum)",
                         choices=("none", "threshold", "ratio", "soft"))
    mode: str = _f("feature", "how per-sample dots are computed: exact over the scope's parameters (ghost, "
                   "materialize; auto picks between them by memory_budget_mb) or the cheaper tiers: sketch (unbiased "
                   "estimates from sketch_dim x sketch_dim projections of each Linear's per-sample gradient), "
                   "feature (at the shared representation the model returns, e.g. VATT's pooled video feature)",
                   choices=("auto", "ghost", "materialize", "sketch", "feature"))
    sketch_dim: int = _f(16, "sketch mode: k of the k x k per-layer, per-sample sketches (error ~ 1/sqrt(k))", lo=1)
    sketch_kind: str = _f("gaussian", "sketch mode: projection entries, Gaussian or random signs",
                          choices=("gaussian", "sign"))
    sketch_seed: int = _f(0, "sketch mode: projections are drawn per step and layer from (this seed, step, layer)",
                          lo=0)
    upstream: str = _f("own_pair", "which gradient is sample i's MEASURED gradient (cosine, norms, memory, curriculum "
                       "score): path (∂L_k/∂z_i, incl. i's role as a negative in other rows), own_row (i's own loss "
                       "row through its own embeddings) or own_pair (its positive-pair logits only); the update is "
                       "built from the path gradients as harmony.update says (docs/METHOD.md)",
                       choices=("path", "own_row", "own_pair"))
    scope: Any = _f("shared", "parameters the cosine is measured on: shared|backbone|last_block|all "
                    "or an explicit list of parameters (Python API only)")
    lam: float = _f(1.0, "weight λ of the video–text loss: L = L_va + λ·L_vt", lo=0.0)
    conflict_threshold: float = _f(0.0, "a sample conflicts when its cosine is below this", lo=-1.0, hi=1.0)
    gradvac_target: float = _f(0.0, "GradVac target cosine φ (fixed, or the EMA's start)", lo=-1.0, hi=1.0)
    gradvac_ema: float = _f(0.0, "GradVac EMA rate of the target φ (0 keeps φ fixed)", lo=0.0, hi=1.0)
    renormalize: bool = _f(True, "divide the update by Σw_i/B so curriculum weights keep the step size")
    apply_to: str = _f("all", "parameters the realignment coefficients scale (docs/METHOD.md: Realignment rules)",
                       choices=("all", "scope"))
    update: str = _f("objective", "how the per-sample coefficients (curriculum weight x realignment coefficient) "
                     "enter the update: objective (one backward of the coefficient-weighted per-sample losses: a "
                     "dropped pair's loss term is gone, its embeddings still serve as negatives of the kept ones) or "
                     "rows (each sample's path gradient at its own loss inputs is scaled: the other rows' terms "
                     "through it stay; docs/METHOD.md \"How the coefficients enter the update\")",
                     choices=("objective", "rows"))
    eps: float = _f(1e-12, "ε in c_i = d_i / (sqrt(n^a n^t) + ε)", lo=0.0)
    curriculum_score: str = _f("gmm", "what the curriculum ranks samples by (higher = kept): cos (the per-sample "
                               "gradient cosine), gvt (−‖g^vt‖·(1 − cos), magnitude-aware), loss (−(ℓ^va + λ·ℓ^vt): "
                               "the small-loss detector), gmm (clean posterior of a two-Gaussian mixture fitted to "
                               "recent ℓ^vt), combo (mean of the batch-standardized loss and gvt scores), agree (clean "
                               "posterior of a two-Gaussian mixture fitted to the recent cross-modal neighbourhood "
                               "disagreements), loss_agree (the mean of the gmm and agree posteriors); gvt, loss "
                               "and combo have no fixed scale: ratio schedule only (docs/METHOD.md)",
                               choices=("cos", "gvt", "loss", "gmm", "combo", "agree", "loss_agree"))
    measure: bool = _f(True, "measure the per-sample gradients; false (realign=none with a loss-based curriculum "
                       "score, loss or gmm, only) skips them: the step costs about a plain one and no cosine is "
                       "reported")
    curriculum_target: str = _f("pair", "what a curriculum weight scales: the whole triplet (both losses), only "
                                "the sample's video–text loss (vt), keeping its video–audio pair, or each pair by its "
                                "own score (pair: a suspected caption loses L_vt, a suspected audio track L_va)",
                                choices=("triplet", "vt", "pair"))
    gmm_window: int = _f(4096, "curriculum_score=gmm, agree, loss_agree: how many recent per-sample values each "
                         "mixture is fitted to", lo=8)
    agree_bank: int = _f(2048, "curriculum_score=agree, loss_agree: how many recent samples' embeddings are the "
                         "neighbour candidates of the cross-modal agreement", lo=1)
    agree_k: int = _f(32, "curriculum_score=agree, loss_agree: neighbours per sample", lo=1)
    agree_kernel: float = _f(0.1, "curriculum_score=agree, loss_agree: τ of the agreement kernel exp((cos − 1)/τ) "
                             "on the neighbours' caption (audio) similarity; 0: their plain mean cosine", lo=0.0)
    curriculum_start: float = _f(0.05, "fraction of training before which no curriculum applies", lo=0.0, hi=1.0)
    ramp: float = _f(0.5, "fraction of training over which the curriculum admits all samples", lo=1e-9)
    kappa0: float = _f(0.5, "threshold/soft curriculum: threshold on the score at the start (cos: the cosine; "
                       "gmm, agree, loss_agree: the clean posterior)", lo=-1.0, hi=1.0)
    kappa1: float = _f(0.5, "threshold/soft curriculum: threshold on the score at the end", lo=-1.0, hi=1.0)
    rho0: float = _f(0.5, "ratio curriculum: kept fraction at the start", lo=0.0, hi=1.0)
    temperature: float = _f(0.1, "soft curriculum: sigmoid temperature", lo=1e-9)
    min_keep: float = _f(0.0, "guard: never keep fewer than this fraction of valid samples", lo=0.0, hi=1.0)
    memory_decay: float = _f(0.9, "score memory: EMA decay of each item's cosine across epochs", lo=0.0, hi=1.0)
    memory_until: float = _f(1.0, "score memory: fraction of training after which it stops updating (its scores "
                             "are frozen from then on, e.g. before the noisy items are memorized)", lo=0.0, hi=1.0)
    score_memory: bool = _f(False, "a score source over epochs: fold each item's curriculum score into an EMA across "
                            "its visits (memory_decay, memory_until) and let the rule compare the items' remembered "
                            "scores (an item not yet remembered uses its current one); with memory_use=sampler they "
                            "drive a prioritized sampler instead of weights. (Written curriculum=memory with "
                            "memory_schedule=RULE before; configs in that form are read as score_memory=true and "
                            "curriculum=RULE.)")
    memory_use: str = _f("weights", "score_memory: item weights or a prioritized sampler",
                         choices=("weights", "sampler"))
    buffer_dtype: str = _f("float32", "materialize mode: dtype of the per-sample gradient buffers",
                           choices=("float32", "bfloat16"))
    memory_budget_mb: float = _f(1024.0, "auto mode: materialize when 2·B·P_S buffers fit in this", lo=0.0)
    ghost_method: str = _f("auto", "ghost dots: Gram form, tile instantiation, or pick by shape",
                           choices=("auto", "gram", "instantiate"))
    enabled: bool = _f(True, "False: plain training (one backward of L_va + λ·L_vt), no per-sample work")

    def validate(self) -> "HarmonyConfig":
        validate_section(self, "harmony")
        if not (isinstance(self.scope, str) and self.scope in ("shared", "backbone", "last_block", "all")) \
                and not isinstance(self.scope, (list, tuple)):
            raise ConfigError(f"harmony.scope={self.scope!r} is not allowed; choose one of "
                              "['shared', 'backbone', 'last_block', 'all'] or pass a list of parameters")
        if self.upstream != "path" and self.apply_to != "all":
            raise ConfigError(f"harmony.upstream={self.upstream} with harmony.apply_to=scope is not supported: the "
                              "scope-only correction needs the path per-sample gradients, which only "
                              "upstream=path measures; use apply_to=all")
        self._check_curriculum()
        if not self.measure and not (self.realign == "none"
                                     and self.curriculum_score in ("loss", "gmm", "agree", "loss_agree")
                                     and self.apply_to == "all"):
            raise ConfigError("harmony.measure=false leaves nothing to decide by: it needs harmony.realign=none and "
                              "harmony.curriculum_score=loss, gmm, agree or loss_agree, with apply_to=all (got "
                              f"realign={self.realign}, curriculum_score={self.curriculum_score}, "
                              f"apply_to={self.apply_to})")
        if self.update == "objective" and self.apply_to != "all":
            raise ConfigError("harmony.update=objective weights the per-sample losses of the whole objective: "
                              "harmony.apply_to=scope (plain weights outside a parameter scope) needs update=rows")
        if self.mode == "feature" and self.apply_to != "all":
            raise ConfigError("harmony.mode=feature measures at a representation, not over a parameter scope: "
                              "harmony.apply_to=scope has no scope to restrict to; use apply_to=all")
        return self

    # The curriculum is composed of parts: a score source (curriculum_score; score_memory folds it into a per-item
    # memory across epochs), a rule (curriculum: threshold, ratio, soft) and a target (curriculum_target: triplet,
    # vt, pair). The combinations that mean nothing are refused here, and only here:
    #: rules that can act on each source's scores (a threshold needs a fixed scale)
    SOURCE_RULES = {"cos": ("threshold", "ratio", "soft"), "gmm": ("threshold", "ratio", "soft"),
                    "agree": ("threshold", "ratio", "soft"), "loss_agree": ("threshold", "ratio", "soft"),
                    "gvt": ("ratio",), "loss": ("ratio",), "combo": ("ratio",)}
    #: targets the per-item memory can serve (it keeps one score per item, not one per pair)
    MEMORY_TARGETS = ("triplet", "vt")

    def _check_curriculum(self) -> None:
        if self.curriculum == "none":
            if self.score_memory:
                raise ConfigError("harmony.score_memory=true is a score source; it needs a rule to act by: "
                                  "harmony.curriculum=threshold, ratio or soft")
            return
        memory = self.score_memory
        if self.curriculum not in self.SOURCE_RULES[self.curriculum_score]:
            allowed = " or ".join(self.SOURCE_RULES[self.curriculum_score])
            raise ConfigError(f"harmony.curriculum_score={self.curriculum_score} ranks samples by a score with no "
                              f"fixed scale for a threshold: use harmony.curriculum={allowed}, not "
                              f"{self.curriculum!r}")
        if memory and self.curriculum_target not in self.MEMORY_TARGETS:
            raise ConfigError(f"harmony.curriculum_target={self.curriculum_target} needs a score per pair; the "
                              "score memory keeps one per item: use curriculum=threshold, ratio or soft")


@dataclass
class ModelConfig:
    """The VATT model (docs/DESIGN.md "The model (VATT)")."""

    size: str = _f("tiny", "tiny (CPU: 2 layers, d=64) | small | base | medium (VATT-MA)",
                   choices=("tiny", "small", "base", "medium"))
    variant: str = _f("agnostic", "one shared Transformer (agnostic) or one per modality (specific)",
                      choices=("agnostic", "specific"))
    video_patch: list = _f([2, 4, 4], "video 3D patch size [t, h, w]")
    audio_patch: int = _f(160, "audio waveform patch length (samples)", lo=1)
    vocab_buckets: int = _f(65536, "hashed word vocabulary size", lo=2)
    d_va: int = _f(0, "dimension of the video–audio space S_va (0: size default, 512 at VATT size)", lo=0)
    d_vt: int = _f(0, "dimension of the video–text space S_vt (0: size default, 256 at VATT size)", lo=0)
    droptoken: float = _f(0.5, "DropToken keep rate for video and audio tokens in training (1: off)", lo=0.0, hi=1.0)
    dropout: float = _f(0.0, "dropout inside the Transformer", lo=0.0, hi=1.0)
    head_norm: str = _f("layernorm", "norm inside the FAC heads; batchnorm mixes samples (harmony scope then "
                        "excludes the heads)", choices=("layernorm", "none", "batchnorm"))

    def validate(self) -> "ModelConfig":
        validate_section(self, "model")
        return self


# The synthetic benchmark's knobs (injected misalignment, hard items, concept imbalance) at their values for real
# clips: the defaults are the benchmark's web-like mix, which real data does not get unless asked for.
REAL_DATA_VALUES = {"noise": 0.0, "noise_audio": 0.0, "noise_bias": 0.0, "hard": 0.0, "imbalance": 1.0}


@dataclass
class DataConfig:
    """Data sources (docs/DATA.md)."""

    kind: str = _f("synthetic", "synthetic (built in) | manifest (JSONL of real clips) | shards (WebDataset tars)",
                   choices=("synthetic", "manifest", "shards"))
    size: int = _f(4096, "synthetic: number of items in the finite training set", lo=1)
    eval_size: int = _f(256, "held-out evaluation items (synthetic: a clean split)", lo=0)
    seed: int = _f(0, "data seed: item i is generated from (seed, i)")
    concepts: int = _f(16, "synthetic: number of concepts (shapes × colours: 16 = 4 × 4; at most 8 × 8)",
                       lo=2, hi=64)
    noise: float = _f(0.2, "rate of misaligned captions (synthetic; manifest: training captions swapped "
                      "between clips, only when set on the command line or in your own config)", lo=0.0, hi=1.0)
    noise_audio: float = _f(0.2, "rate of misaligned audio (synthetic; manifest: training audio tracks swapped "
                            "between clips, only when set on the command line or in your own config)",
                            lo=0.0, hi=1.0)
    noise_kind: str = _f("swap", "kind of misalignment (manifest: swap only)", choices=("swap", "bias", "unrelated"))
    noise_bias: float = _f(0.2, "synthetic: rate of captions with narrator bias (a fixed wrong concept per concept), "
                           "on top of data.noise's captions of data.noise_kind; noise + noise_bias <= 1",
                           lo=0.0, hi=1.0)
    hard: float = _f(0.0, "synthetic: fraction of training items whose video and audio carry a weaker concept "
                     "signal (smaller, dimmer sprite; quieter concept tones), whatever their noise", lo=0.0, hi=1.0)
    imbalance: float = _f(1.0, "synthetic: frequency of the most common concept over the least common one in the "
                          "training split (frequencies ∝ rank^-a); 1 = uniform; the eval split stays uniform", lo=1.0)
    frames: int = _f(4, "video frames per clip", lo=1)
    image_size: int = _f(32, "video frame height and width after resize/crop", lo=8)
    fps: float = _f(8.0, "manifest/shards: frame sampling rate", lo=0.1)
    sample_rate: int = _f(8000, "audio sample rate (mono)", lo=1000)
    audio_seconds: float = _f(1.0, "audio window length", lo=0.01)
    max_words: int = _f(16, "words per text candidate", lo=1)
    candidates: int = _f(1, "text candidates per clip (L; MIL-NCE when > 1)", lo=1)
    manifest: str = _f("", "manifest: path to the JSONL manifest (paths inside are relative to its folder)")
    eval_manifest: str = _f("", "manifest: held-out manifest (empty: split off the training manifest)")
    shards: str = _f("", "shards: brace pattern or glob of .tar shards")
    eval_shards: str = _f("", "shards: held-out shards (empty: hold out items of data.shards by a stable hash)")
    shuffle_buffer: int = _f(256, "shards: per-shard shuffle buffer, in raw samples held in memory (<= 1: off)",
                             lo=0)
    workers: int = _f(0, "DataLoader worker processes", lo=0)
    oracle_drop: bool = _f(False, "oracle control: leave samples flagged misaligned out of that loss (their "
                           "caption's ℓ^vt, their audio's ℓ^va), the best any curriculum could do; needs flags")

    @classmethod
    def clips(cls, **values) -> "DataConfig":
        """A config for real clips (manifest, shards): the defaults with no injected misalignment, no hard items
        and uniform concepts (``REAL_DATA_VALUES``), then ``values``; what the command line does for real data."""
        return cls(**{**REAL_DATA_VALUES, **values})

    def validate(self) -> "DataConfig":
        validate_section(self, "data")
        noisy = self.noise > 0 or self.noise_audio > 0
        if noisy and self.kind == "shards":
            raise ConfigError("data.noise / data.noise_audio are not supported for data.kind=shards; use "
                              "data.kind=synthetic or manifest")
        if self.noise + self.noise_bias > 1.0:
            raise ConfigError(f"data.noise + data.noise_bias = {self.noise + self.noise_bias:g} exceeds 1 (they are "
                              "rates of disjoint sets of captions)")
        synthetic_only = {k: v for k, v in (("noise_bias", self.noise_bias > 0), ("hard", self.hard > 0),
                                            ("imbalance", self.imbalance != 1.0)) if v}
        if synthetic_only and self.kind != "synthetic":
            raise ConfigError(f"data.{', data.'.join(synthetic_only)} need the synthetic benchmark's concepts "
                              f"(data.kind=synthetic), not data.kind={self.kind}")
        if noisy and self.kind == "manifest" and self.noise_kind != "swap":
            raise ConfigError(f"data.noise_kind={self.noise_kind!r} needs concepts, which real clips do not have; "
                              "data.kind=manifest supports only noise_kind=swap")
        return self


def _parse_step_range(text: str, name: str):
    """A step range 'start:stop' -> (start, stop) with 0 <= start < stop; '' -> None."""
    if not text:
        return None
    parts = text.split(":")
    try:
        start, stop = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not allowed; give a step range 'start:stop' (e.g. '10:20') or ''")
    if not 0 <= start < stop:
        raise ConfigError(f"{name}={text!r} must satisfy 0 <= start < stop")
    return start, stop


@dataclass
class TrainConfig:
    """The optimisation loop (docs/HARMONIZER.md "4. Data parallelism"; bad input: docs/DATA.md).

    ``batch_size`` is the GLOBAL batch of one optimizer step: every rank takes
    batch_size / (world_size · grad_accum) samples per micro-step, so a run means the same thing on
    any number of GPUs (it must divide evenly; the trainer says so before any work otherwise).
    """

    steps: int = _f(2000, "optimizer steps of the run", lo=1)
    batch_size: int = _f(64, "GLOBAL batch per optimizer step (split over ranks and grad_accum micro-steps)", lo=1)
    lr: float = _f(1e-3, "peak learning rate (AdamW) after the warm-up", lo=0.0)
    min_lr_ratio: float = _f(0.0, "learning rate at the end of the cosine decay, as a fraction of lr", lo=0.0, hi=1.0)
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay on matrices (biases, norms, 1-D tables: none)",
                             lo=0.0)
    beta1: float = _f(0.9, "AdamW β1", lo=0.0, hi=1.0)
    beta2: float = _f(0.999, "AdamW β2", lo=0.0, hi=1.0)
    warmup_steps: int = _f(20, "linear warm-up steps before the cosine decay (VATT schedule)", lo=0)
    grad_accum: int = _f(1, "micro-steps per optimizer step (DDP: no gradient sync on all but the last)", lo=1)
    clip_norm: float = _f(1.0, "clip the global gradient norm to this (0: no clipping, the norm is still logged)",
                          lo=0.0)
    precision: str = _f("fp32", "fp32, or bf16 autocast (FSDP: a bf16 MixedPrecisionPolicy)",
                        choices=("fp32", "bf16"))
    parallel: str = _f("none", "none (one process), ddp, or fsdp (FSDP2 fully_shard per Transformer block)",
                       choices=("none", "ddp", "fsdp"))
    device: str = _f("auto", "auto (cuda when available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    optimizer: str = _f("adamw", "adamw (torch, fused where supported) or apex (apex FusedAdam; only if "
                        "apex is installed)", choices=("adamw", "apex"))
    seed: int = _f(0, "seed of model init (same on every rank) and of per-rank randomness (seed + rank)")
    resume: str = _f("", "'' (fresh run), 'auto' (latest checkpoint of the run dir, if any) or a checkpoint path")
    ckpt_every: int = _f(250, "save a checkpoint every this many steps (0: only at the end)", lo=0)
    keep_last: int = _f(2, "checkpoints kept in run_dir/checkpoints (older ones are deleted)", lo=1)
    max_bad_steps: int = _f(20, "abort after this many CONSECUTIVE skipped (non-finite) steps (0: never)", lo=0)
    dist_timeout_s: float = _f(600.0, "seconds the process group's rendezvous and every collective wait for a peer "
                               "before the run fails (a dead or frozen rank: torchrun --max-restarts can restart)",
                               lo=1.0)

    def validate(self) -> "TrainConfig":
        validate_section(self, "train")
        return self


@dataclass
class EvalConfig:
    """Evaluation (docs/DESIGN.md "Evaluation"): retrieval, linear probe, noise-detection AUC."""

    every: int = _f(250, "evaluate every this many steps (0: only the final evaluation)", lo=0)
    size: int = _f(256, "held-out items embedded per evaluation (0: the whole eval split)", lo=0)
    batch_size: int = _f(64, "GLOBAL batch of the evaluation loader", lo=1)
    probe: bool = _f(True, "fit a linear probe (closed-form ridge) on frozen pooled features")
    probe_ridge: float = _f(1.0, "ridge penalty of the linear probe (on standardised features)", lo=0.0)
    final: bool = _f(True, "evaluate at the end of training and write summary.json")
    noise_window: int = _f(50, "noise AUC: the last this many TRAINING steps' cosines are scored", lo=1)
    feature_cos: bool = _f(False, "the side-by-side detector report: every detector (losses, mixtures, agreement, "
                           "cosines and magnitudes at the pooled video feature under each per-sample definition) "
                           "per log window, split by noise kind, hardness and concept frequency (metrics.jsonl), when "
                           "the data carries misalignment flags; extra backward passes per step; not under FSDP2")

    def validate(self) -> "EvalConfig":
        validate_section(self, "eval")
        return self


@dataclass
class LogConfig:
    """Outputs of a run (docs/DESIGN.md "Command line and outputs")."""

    run_dir: str = _f("", "output folder ('': runs/<config name>-<UTC time>; with train.resume=auto, the newest "
                      "such folder that holds a checkpoint)")
    every: int = _f(10, "write one metrics.jsonl line every this many steps", lo=1)
    progress: bool = _f(True, "rank-0 progress bar on a TTY (otherwise one log line per logged step)")
    tensorboard: bool = _f(False, "also write TensorBoard scalars (only when tensorboard is installed)")
    plots: bool = _f(True, "write PNG plots to run_dir/plots at the end")
    hist_bins: int = _f(20, "bins of the per-step cosine histogram over [-1, 1]", lo=2)

    def validate(self) -> "LogConfig":
        validate_section(self, "log")
        return self


@dataclass
class ProfileConfig:
    """Profiling hooks (Nsight Systems, torch.profiler, NVTX)."""

    nsys: str = _f("", "step range 'start:stop' bracketed by torch.cuda.profiler.start/stop "
                   "(for nsys --capture-range=cudaProfilerApi); '' off")
    torch: str = _f("", "step range 'start:stop' traced by torch.profiler into run_dir/profile; '' off")
    nvtx: bool = _f(True, "open an NVTX range around every trainer phase")

    def validate(self) -> "ProfileConfig":
        validate_section(self, "profile")
        _parse_step_range(self.nsys, "profile.nsys")
        _parse_step_range(self.torch, "profile.torch")
        return self


@dataclass
class Config:
    """The whole run: one section per CLI prefix (``--train.steps=...``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    harmony: HarmonyConfig = field(default_factory=HarmonyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self


def sections(cfg: Config) -> Dict[str, Any]:
    """{section name: section dataclass} of a Config, in field order."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def config_to_dict(cfg: Config) -> Dict[str, Dict[str, Any]]:
    """{section: {key: value}} of plain YAML types (a non-plain value, e.g. a parameter list, becomes its repr)."""
    out = {}
    for section, obj in sections(cfg).items():
        out[section] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            plain = isinstance(value, (str, int, float, bool, type(None))) or (
                isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value))
            out[section][f.name] = (list(value) if isinstance(value, tuple) else value) if plain else repr(value)
    return out


def dump_yaml(cfg: Config) -> str:
    """The config as YAML, sections and keys in field order (a run folder's config.yaml)."""
    import yaml  # here, not at the top: ``import harmony`` (e.g. the CUDA build check's load test) needs no YAML

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
