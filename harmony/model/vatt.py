"""VATT: video–audio–text Transformer with fine-to-coarse heads (docs/DESIGN.md "The model (VATT)").

Per modality: token embedder (tokenizer, pre-projection, positional embeddings, DropToken, AGG token) ->
Transformer (one shared by all modalities in the ``agnostic`` variant, one per modality in ``specific``) ->
final-normed AGG token (the pooled feature) -> post-projection -> FAC heads into S_va / S_vt.

Per-sample independence (docs/METHOD.md "Which gradient is sample i's"): no layer mixes samples. DropToken draws ONE
permutation per step (on the CPU generator, so it does not depend on batch size or device) and keeps the same token
positions for every sample. Text with L candidates runs as B·L sequences with the rows of sample i contiguous
(i·L ... i·L+L−1): per-layer activations of a text call reshape to [B, L·T, d] as a view.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import torch
from torch import nn

from harmony.config import ConfigError, DataConfig, ModelConfig
from harmony.model.layers import AddEmbedding, PrependToken
from harmony.model.heads import FACHead
from harmony.model.tokenizers import AudioEmbed, TextEmbed, VideoEmbed
from harmony.model.transformer import Transformer
from harmony.nvtx import nvtx_range

# layers, width, heads, MLP hidden, default d_va, default d_vt
SIZES: Dict[str, tuple] = {
    "tiny": (2, 64, 4, 256, 64, 32),
    "small": (6, 512, 8, 2048, 512, 256),
    "base": (12, 768, 12, 3072, 512, 256),
    "medium": (12, 1024, 16, 4096, 512, 256),
}
MODALITIES = ("video", "audio", "text")
SCOPES = ("shared", "backbone", "last_block", "all")
INIT_STD = 0.02


@dataclasses.dataclass
class VATTOutput:
    """Model outputs; a field is None when its modality was not given.

    z_va_v [B, d_va], z_va_a [B, d_va], z_vt_v [B, d_vt] (computed from z_va_v), z_vt_t [B, L, d_vt]: the
    embeddings for the CMA losses, not normalised (the loss normalises). feat_v / feat_a / feat_t [B, d]: pooled
    features (final-normed AGG token; text: mean over the non-empty candidates) for the linear probe.
    cand_mask [B, L] bool: candidate l of sample i has at least one word (use it as the MIL-NCE cand_mask).
    """

    z_va_v: Optional[torch.Tensor] = None
    z_va_a: Optional[torch.Tensor] = None
    z_vt_v: Optional[torch.Tensor] = None
    z_vt_t: Optional[torch.Tensor] = None
    feat_v: Optional[torch.Tensor] = None
    feat_a: Optional[torch.Tensor] = None
    feat_t: Optional[torch.Tensor] = None
    cand_mask: Optional[torch.Tensor] = None


def model_dims(cfg: ModelConfig) -> dict:
    """Sizes of a model config: layers, width, heads, mlp, d_va, d_vt (0 in the config = the size's default)."""
    layers, width, heads, mlp, d_va, d_vt = SIZES[cfg.size]
    return dict(layers=layers, width=width, heads=heads, mlp=mlp,
                d_va=cfg.d_va or d_va, d_vt=cfg.d_vt or d_vt)


def video_grid(model_cfg: ModelConfig, data_cfg: DataConfig) -> tuple:
    """(T/pt, H/ph, W/pw) patch grid; raises ConfigError naming the fields when a patch does not divide the clip."""
    patch = list(model_cfg.video_patch)
    if len(patch) != 3 or any(int(p) < 1 for p in patch):
        raise ConfigError(f"model.video_patch={patch!r} must be three positive ints [t, h, w]")
    sizes = (("data.frames", data_cfg.frames), ("data.image_size", data_cfg.image_size),
             ("data.image_size", data_cfg.image_size))
    grid = []
    for (name, size), p in zip(sizes, patch):
        if size % int(p):
            raise ConfigError(f"{name}={size} is not a multiple of the video patch {int(p)} "
                              f"(model.video_patch={patch})")
        grid.append(size // int(p))
    return tuple(grid)


def audio_tokens(model_cfg: ModelConfig, data_cfg: DataConfig) -> int:
    """Number of audio patches: the window of data.sample_rate·data.audio_seconds samples, padded up to whole
    patches."""
    samples = int(round(data_cfg.sample_rate * data_cfg.audio_seconds))
    return max(1, math.ceil(samples / model_cfg.audio_patch))


def droptoken_keep(num_tokens: int, keep_rate: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[N'] sorted token indices kept by DropToken, one draw shared by the whole batch (CPU RNG)."""
    keep = max(1, int(round(num_tokens * keep_rate)))
    return torch.randperm(num_tokens, generator=generator)[:keep].sort().values


def _init_weights(module: nn.Module) -> None:
    """Unit-gain layers for content, small tables for what every sample shares.

    * Linear: Glorot/Xavier uniform weights (the Keras/Flax default that VATT and ViT use), zero bias: each
      layer keeps the scale of its input, so a token's content reaches the Transformer at O(1).
    * Word embedding: rows ~ N(0, 1/d) (unit norm), padding row zero: words are content like patches.
    * Positional tables and the AGG token: truncated normal(0.02), small offsets next to the content.

    Why: with truncated normal(0.02) everywhere, the tokenizer and pre-projection shrink the content by ~0.4 and
    ~0.16 each (text: 0.02 · 0.16), to 10–40x below the shared tables; the pooled outputs of different samples
    then had cosines 0.86–0.99 at initialisation and the contrastive loss collapsed them within a few steps
    (cos 0.999, gradient norm ~0.05) to its chance value 2·log(2B), where training sat for ~100 steps.
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=module.embedding_dim ** -0.5)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, AddEmbedding):
        nn.init.trunc_normal_(module.table, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
    elif isinstance(module, PrependToken):
        nn.init.trunc_normal_(module.token, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)


class VATT(nn.Module):
    """VATT model: ``VATT(model_cfg, data_cfg)(video, audio, text) -> VATTOutput``.

    video [B, 3, T, H, W] float in [0, 1] (T = data.frames, H = W = data.image_size); audio [B, S] float in
    [-1, 1] (S = data.sample_rate·data.audio_seconds; padded / cropped to whole patches); text [B, L, N] int64
    hashed word ids, 0 = padding, N <= data.max_words ([B, N] is read as L = 1).
    """

    def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig):
        super().__init__()
        self.cfg = model_cfg.validate()
        data_cfg.validate()
        dims = model_dims(model_cfg)
        self.dims = dims
        width = dims["width"]
        self.video_embed = VideoEmbed(model_cfg.video_patch, video_grid(model_cfg, data_cfg), width)
        self.audio_embed = AudioEmbed(model_cfg.audio_patch, audio_tokens(model_cfg, data_cfg), width)
        self.text_embed = TextEmbed(model_cfg.vocab_buckets, data_cfg.max_words, width)
        names = ("shared",) if model_cfg.variant == "agnostic" else MODALITIES
        self.transformers = nn.ModuleDict({
            name: Transformer(dims["layers"], width, dims["heads"], dims["mlp"], model_cfg.dropout) for name in names})
        self.video_post = nn.Linear(width, width)
        self.audio_post = nn.Linear(width, width)
        self.text_post = nn.Linear(width, width)
        self.head_va_v = FACHead(width, dims["d_va"], model_cfg.head_norm)        # video -> S_va
        self.head_vt_v = FACHead(dims["d_va"], dims["d_vt"], model_cfg.head_norm)  # S_va -> S_vt
        self.head_va_a = nn.Linear(width, dims["d_va"])                          # audio -> S_va
        self.head_vt_t = nn.Linear(width, dims["d_vt"])                          # text -> S_vt
        self.apply(_init_weights)

    # ----------------------------------------------------------------------------------------- forward
    def transformer(self, modality: str) -> Transformer:
        """The Transformer that encodes ``modality`` (the shared one in the agnostic variant)."""
        return self.transformers["shared" if "shared" in self.transformers else modality]

    def _keep(self, num_tokens: int, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
        """DropToken indices in training (keep rate model.droptoken < 1), else None (all tokens)."""
        if not self.training or self.cfg.droptoken >= 1.0:
            return None
        return droptoken_keep(num_tokens, self.cfg.droptoken, generator)

    def encode_video(self, video: torch.Tensor, generator: Optional[torch.Generator] = None) -> VATTOutput:
        """video [B, 3, T, H, W] -> z_va_v [B, d_va], z_vt_v [B, d_vt], feat_v [B, d]."""
        with nvtx_range("vatt/video"):
            tokens = self.video_embed(video, self._keep(self.video_embed.num_tokens, generator))
            feat = self.transformer("video")(tokens)
            z_va = self.head_va_v(self.video_post(feat))
            return VATTOutput(z_va_v=z_va, z_vt_v=self.head_vt_v(z_va), feat_v=feat)

    def encode_audio(self, audio: torch.Tensor, generator: Optional[torch.Generator] = None) -> VATTOutput:
        """audio [B, S] -> z_va_a [B, d_va], feat_a [B, d]."""
        with nvtx_range("vatt/audio"):
            tokens = self.audio_embed(audio, self._keep(self.audio_embed.num_tokens, generator))
            feat = self.transformer("audio")(tokens)
            return VATTOutput(z_va_a=self.head_va_a(self.audio_post(feat)), feat_a=feat)

    def encode_text(self, text: torch.Tensor) -> VATTOutput:
        """text [B, L, N] (or [B, N]) -> z_vt_t [B, L, d_vt], feat_t [B, d], cand_mask [B, L]."""
        with nvtx_range("vatt/text"):
            if text.dim() == 2:
                text = text[:, None]
            if text.dim() != 3:
                raise ValueError(f"text must be [B, L, N] word ids, got {list(text.shape)}")
            b, cands, words = text.shape
            tokens, key_mask = self.text_embed(text.reshape(b * cands, words))
            feat = self.transformer("text")(tokens, key_mask).view(b, cands, -1)  # [B, L, d]
            z_vt = self.head_vt_t(self.text_post(feat))                           # [B, L, d_vt]
            cand_mask = (text != 0).any(-1)                                       # [B, L]
            return VATTOutput(z_vt_t=z_vt, feat_t=_mean_over_candidates(feat, cand_mask), cand_mask=cand_mask)

    def forward(self, video: Optional[torch.Tensor] = None, audio: Optional[torch.Tensor] = None,
                text: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> VATTOutput:
        """Encode the modalities given; ``generator`` (CPU) fixes the DropToken draws (video first, then audio)."""
        out = VATTOutput()
        parts = []
        if video is not None:
            parts.append(self.encode_video(video, generator))
        if audio is not None:
            parts.append(self.encode_audio(audio, generator))
        if text is not None:
            parts.append(self.encode_text(text))
        for part in parts:
            for f in dataclasses.fields(part):
                if getattr(part, f.name) is not None:
                    setattr(out, f.name, getattr(part, f.name))
        return out

    # ----------------------------------------------------------------------------------------- scopes
    def scope_parameters(self, name: str) -> List[nn.Parameter]:
        """Trainable parameters of a harmonization scope (docs/HARMONIZER.md "Scope"), in module order, without
        duplicates.

        * ``shared``: every parameter that receives gradient from both L_va and L_vt: the video embedder
          (tokenizer, pre-projection, positional tables, AGG token), the Transformer that encodes video (the
          shared one in the agnostic variant: audio and text pass through it too), the video post-projection
          and the video head into S_va (through which L_vt reaches the video path). With
          model.head_norm="batchnorm" the head is left out: BatchNorm mixes the samples of the batch, so
          per-sample gradients (docs/HARMONIZER.md "1. Per-sample gradients of coupled losses") are only defined up to
          the head's input.
        * ``backbone``: the Transformer that encodes video (shared one / video one), final norm included.
        * ``last_block``: its last block and its final norm.
        * ``all``: every trainable parameter.
        """
        video_tf = self.transformer("video")
        if name == "all":
            modules = [self]
        elif name == "backbone":
            modules = [video_tf]
        elif name == "last_block":
            modules = [video_tf.blocks[-1], video_tf.norm]
        elif name == "shared":
            modules = [self.video_embed, video_tf, self.video_post]
            if self.cfg.head_norm != "batchnorm":
                modules.append(self.head_va_v)
        else:
            raise ConfigError(f"harmony.scope={name!r} is not allowed; choose one of {list(SCOPES)}")
        seen, params = set(), []
        for module in modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Number of parameters (trainable ones by default)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def describe(self) -> str:
        """One line for logs: size, variant, shapes, parameter counts per scope."""
        d = self.dims
        shared = sum(p.numel() for p in self.scope_parameters("shared"))
        grid = "x".join(map(str, self.video_embed.grid))
        return (f"VATT-{self.cfg.size} {self.cfg.variant}: {d['layers']} layers, d={d['width']}, {d['heads']} heads, "
                f"MLP {d['mlp']}, d_va={d['d_va']}, d_vt={d['d_vt']}, head_norm={self.cfg.head_norm}; tokens "
                f"video {grid}={self.video_embed.num_tokens}, audio {self.audio_embed.num_tokens}, text "
                f"<={self.text_embed.max_words}; DropToken keep {self.cfg.droptoken}; params "
                f"{self.num_parameters() / 1e6:.2f}M (shared scope {shared / 1e6:.2f}M)")


def _mean_over_candidates(feat: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    """feat [B, L, d], cand_mask [B, L] -> [B, d]: mean over non-empty candidates (all of them if none is)."""
    weight = cand_mask.to(feat.dtype)
    weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))
    return (feat * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)
