"""Gradient-based curriculum (docs/METHOD.md "Curriculum"): per-sample weights from cosines, a per-item score
memory, and a sampler driven by that memory (``memory_sampler``: the trainer's, following its step).

Conventions this module fixes (docs/METHOD.md explains them):
* Progress starts at the curriculum's start: p = (step − curriculum_start·T) / (ramp·T), clipped to
  [0, 1]; before curriculum_start·T every weight is 1. The curriculum is therefore strictest (κ0, ρ0)
  the step it switches on and admits everything ramp·T steps later (or never fully, when
  curriculum_start + ramp > 1).
* Batch statistics (the ratio ranking, the soft normalisation, the guard, the norm of
  ``update_coefficients``) are taken over the tensors passed in. Under data parallelism pass the
  global batch (B scalars per rank, all-gathered) and take this rank's rows afterwards; otherwise
  each rank applies the rule to its own shard and the result differs from a single-process run.
* Ties between equal cosines go to the lower batch position (stable sort); a threshold keeps all
  samples tied at the threshold.

The parts, one module each: ``schedule`` (when and how strict), ``sources`` (what is compared: per-sample and
per-pair scores), ``mixture`` (the loss / agreement mixture behind gmm and agree), ``memory`` (a source over
epochs), ``rules`` (threshold, ratio, soft, the guard), ``target`` (weights into the update's coefficients),
``compose`` (source + rule + schedule, what the harmonizer calls) and ``sampler`` (the memory-driven sampler).
Which combinations mean something is checked in one place, ``HarmonyConfig.validate``.
"""
from harmony.method.curriculum.compose import curriculum_weights
from harmony.method.curriculum.memory import ScoreMemory
from harmony.method.curriculum.mixture import LossMixture
from harmony.method.curriculum.rules import HARD_RULES, RULES, rule_weights
from harmony.method.curriculum.sampler import PrioritizedSampler, StepAwareSampler, memory_sampler
from harmony.method.curriculum.schedule import is_active, kappa, keep_ratio, progress
from harmony.method.curriculum.sources import (AGREEMENT_SCORES, SCORES, magnitude_score, mixture_names, pair_scores,
                                        sample_scores, standardize)
from harmony.method.curriculum.target import update_coefficients

__all__ = ["AGREEMENT_SCORES", "HARD_RULES", "RULES", "SCORES", "LossMixture", "PrioritizedSampler", "ScoreMemory",
           "StepAwareSampler", "curriculum_weights", "is_active", "kappa", "keep_ratio", "magnitude_score",
           "memory_sampler", "mixture_names", "pair_scores", "progress", "rule_weights", "sample_scores",
           "standardize", "update_coefficients"]
