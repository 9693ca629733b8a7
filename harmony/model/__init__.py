"""The VATT model (docs/DESIGN.md "The model (VATT)"): ``VATT(model_cfg, data_cfg)``, its outputs and size table."""
from harmony.model.vatt import SIZES, VATT, VATTOutput, audio_tokens, droptoken_keep, model_dims, video_grid

__all__ = ["VATT", "VATTOutput", "SIZES", "model_dims", "video_grid", "audio_tokens", "droptoken_keep"]
