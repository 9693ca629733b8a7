"""Typed configuration: one dataclass per section of the CLI (SPEC §11).

Every field has a default and a docstring-like ``help``; fields with a closed set of values carry
``choices`` in their metadata, and ``validate()`` checks them before any work is done, raising an
error that names the field and the allowed values. Each section is the single place its fields
live: the model reads ``ModelConfig``, the data code ``DataConfig``, the harmonizer
``HarmonyConfig``, the trainer ``TrainConfig`` / ``EvalConfig`` / ``LogConfig`` / ``ProfileConfig``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


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
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        if lo is not None and value is not None and value < lo:
            raise ConfigError(f"{name}={value!r} must be >= {lo}")
        if hi is not None and value is not None and value > hi:
            raise ConfigError(f"{name}={value!r} must be <= {hi}")


@dataclass
class HarmonyConfig:
    """Per-sample gradient harmonization (SPEC §2–5)."""

    realign: str = _f("pcgrad", "realignment rule on conflicting samples (SPEC §3)",
                      choices=("none", "pcgrad", "project_va", "project_vt", "gradvac"))
    curriculum: str = _f("none", "per-sample weighting schedule (SPEC §4)",
                         choices=("none", "threshold", "ratio", "soft", "memory"))
    mode: str = _f("auto", "how per-sample dots are computed (SPEC §5); auto picks by memory_budget_mb",
                   choices=("auto", "ghost", "materialize"))
    scope: Any = _f("shared", "parameters the cosine is measured on: shared|backbone|last_block|all "
                    "or an explicit list of parameters (Python API only)")
    lam: float = _f(1.0, "weight λ of the video–text loss: L = L_va + λ·L_vt", lo=0.0)
    conflict_threshold: float = _f(0.0, "a sample conflicts when its cosine is below this", lo=-1.0, hi=1.0)
    gradvac_target: float = _f(0.0, "GradVac target cosine φ (fixed, or the EMA's start)", lo=-1.0, hi=1.0)
    gradvac_ema: float = _f(0.0, "GradVac EMA rate of the target φ (0 keeps φ fixed)", lo=0.0, hi=1.0)
    renormalize: bool = _f(True, "divide the update by Σw_i/B so curriculum weights keep the step size")
    apply_to: str = _f("all", "parameters the realignment coefficients scale (SPEC §3)",
                       choices=("all", "scope"))
    eps: float = _f(1e-12, "ε in c_i = d_i / (sqrt(n^a n^t) + ε)", lo=0.0)
    curriculum_start: float = _f(0.1, "fraction of training before which no curriculum applies", lo=0.0, hi=1.0)
    ramp: float = _f(0.5, "fraction of training over which the curriculum admits all samples", lo=1e-9)
    kappa0: float = _f(0.0, "threshold/soft curriculum: cosine threshold at the start", lo=-1.0, hi=1.0)
    kappa1: float = _f(-1.0, "threshold/soft curriculum: cosine threshold at the end", lo=-1.0, hi=1.0)
    rho0: float = _f(0.5, "ratio curriculum: kept fraction at the start", lo=0.0, hi=1.0)
    temperature: float = _f(0.1, "soft curriculum: sigmoid temperature", lo=1e-9)
    min_keep: float = _f(0.25, "guard: never keep fewer than this fraction of valid samples", lo=0.0, hi=1.0)
    memory_decay: float = _f(0.9, "score memory: EMA decay of each item's cosine across epochs", lo=0.0, hi=1.0)
    memory_schedule: str = _f("ratio", "memory curriculum: which schedule is applied to the items' memory scores",
                              choices=("threshold", "ratio", "soft"))
    memory_use: str = _f("weights", "memory curriculum: item weights or a prioritized sampler",
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
        return self


@dataclass
class ModelConfig:
    """The VATT model (SPEC §8)."""

    size: str = _f("tiny", "tiny (CPU: 2 layers, d=64) | small | base | medium (VATT-MA)",
                   choices=("tiny", "small", "base", "medium"))
    variant: str = _f("agnostic", "one shared Transformer (agnostic) or one per modality (specific)",
                      choices=("agnostic", "specific"))
    video_patch: list = _f([2, 8, 8], "video 3D patch size [t, h, w]")
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


@dataclass
class DataConfig:
    """Data sources (SPEC §9)."""

    kind: str = _f("synthetic", "synthetic (built in) | manifest (JSONL of real clips) | shards (WebDataset tars)",
                   choices=("synthetic", "manifest", "shards"))
    size: int = _f(8192, "synthetic: number of items in the finite training set", lo=1)
    eval_size: int = _f(512, "held-out evaluation items (synthetic: a clean split)", lo=0)
    seed: int = _f(0, "data seed: item i is generated from (seed, i)")
    concepts: int = _f(16, "synthetic: number of concepts (4 shapes × 4 colours)", lo=2)
    noise: float = _f(0.0, "synthetic: rate of misaligned text", lo=0.0, hi=1.0)
    noise_audio: float = _f(0.0, "synthetic: rate of misaligned audio", lo=0.0, hi=1.0)
    noise_kind: str = _f("swap", "synthetic: kind of misalignment", choices=("swap", "bias", "unrelated"))
    frames: int = _f(8, "video frames per clip", lo=1)
    image_size: int = _f(32, "video frame height and width after resize/crop", lo=8)
    fps: float = _f(8.0, "manifest/shards: frame sampling rate", lo=0.1)
    sample_rate: int = _f(8000, "audio sample rate (mono)", lo=1000)
    audio_seconds: float = _f(1.0, "audio window length", lo=0.01)
    max_words: int = _f(16, "words per text candidate", lo=1)
    candidates: int = _f(1, "text candidates per clip (L; MIL-NCE when > 1)", lo=1)
    manifest: str = _f("", "manifest: path to the JSONL manifest (paths inside are relative to its folder)")
    eval_manifest: str = _f("", "manifest: held-out manifest (empty: split off the training manifest)")
    shards: str = _f("", "shards: brace pattern or glob of .tar shards")
    workers: int = _f(0, "DataLoader worker processes", lo=0)

    def validate(self) -> "DataConfig":
        validate_section(self, "data")
        return self
