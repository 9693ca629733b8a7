"""harmony: VATT-style pre-training with per-sample cross-modality gradient harmonization."""
from harmony.config import HarmonyConfig

__all__ = ["HarmonyConfig"]
