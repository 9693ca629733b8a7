"""harmony: VATT-style pre-training with per-sample cross-modality gradient harmonization."""
from harmony.config import HarmonyConfig
from harmony.method.harmonizer import GradientHarmonizer
from harmony.method.stats import HarmonyStats

__all__ = ["HarmonyConfig", "GradientHarmonizer", "HarmonyStats"]
