"""Per-modality token embedders (docs/DESIGN.md "The model (VATT)"): raw input -> [B, 1 + N', d] tokens with the AGG
token first.

Each embedder is tokenizer (a Linear on unfolded patches, or a word embedding) -> pre-projection Linear to the
Transformer width -> learned positional embeddings (``AddEmbedding``) -> optional DropToken -> AGG token
(``PrependToken``). Patches go through nn.Linear rather than a strided Conv so that the per-sample gradient of
the tokenizer is that of an ordinary Linear over the sample's patches (docs/METHOD.md "Which gradient is sample i's").
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from harmony.model.layers import AddEmbedding, PrependToken

# Per-channel RGB statistics used to normalise [0, 1] frames (the usual ImageNet values).
_RGB_MEAN = (0.485, 0.456, 0.406)
_RGB_STD = (0.229, 0.224, 0.225)


def _keep_tokens(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """x [B, N, d], keep [N'] token indices shared by the whole batch (DropToken) or None -> [B, N', d]."""
    if keep is None:
        return x
    return x.index_select(1, keep.to(x.device))


class VideoEmbed(nn.Module):
    """Video [B, 3, T, H, W] in [0, 1] -> tokens [B, 1 + N', d]; N = (T/pt)(H/ph)(W/pw) patches, ordered (t, h, w)."""

    def __init__(self, patch: Sequence[int], grid: Tuple[int, int, int], width: int):
        super().__init__()
        self.patch = tuple(int(p) for p in patch)
        self.grid = tuple(int(g) for g in grid)
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.register_buffer("mean", torch.tensor(_RGB_MEAN).view(3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_RGB_STD).view(3, 1, 1, 1), persistent=False)
        pt, ph, pw = self.patch
        self.patch_proj = nn.Linear(3 * pt * ph * pw, width)
        self.pre_proj = nn.Linear(width, width)
        # Factorised positions: token n = (t, h, w) gets table_t[t] + table_h[h] + table_w[w].
        t, h, w = torch.meshgrid(*(torch.arange(g) for g in self.grid), indexing="ij")
        self.pos_t = AddEmbedding(self.grid[0], width, t.flatten())
        self.pos_h = AddEmbedding(self.grid[1], width, h.flatten())
        self.pos_w = AddEmbedding(self.grid[2], width, w.flatten())
        self.agg = PrependToken(width)

    def patches(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> normalised patches [B, N, 3·pt·ph·pw] (channel-major inside a patch)."""
        b = video.shape[0]
        (pt, ph, pw), (gt, gh, gw) = self.patch, self.grid
        expected = (3, gt * pt, gh * ph, gw * pw)
        if video.dim() != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(f"video must be [B, {', '.join(map(str, expected))}] (data.frames, data.image_size "
                             f"with model.video_patch={list(self.patch)}), got {list(video.shape)}")
        x = (video - self.mean) / self.std
        x = x.reshape(b, 3, gt, pt, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, self.num_tokens, 3 * pt * ph * pw)

    def forward(self, video: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """video [B, 3, T, H, W], keep [N'] or None -> [B, 1 + N', d]."""
        x = self.pre_proj(self.patch_proj(self.patches(video)))
        x = self.pos_w(self.pos_h(self.pos_t(x)))
        return self.agg(_keep_tokens(x, keep))


class AudioEmbed(nn.Module):
    """Waveform [B, S] in [-1, 1] -> tokens [B, 1 + N', d]; the waveform is zero-padded / cropped to N·patch."""

    def __init__(self, patch: int, num_tokens: int, width: int):
        super().__init__()
        self.patch = int(patch)
        self.num_tokens = int(num_tokens)
        self.patch_proj = nn.Linear(self.patch, width)
        self.pre_proj = nn.Linear(width, width)
        self.pos = AddEmbedding(self.num_tokens, width)
        self.agg = PrependToken(width)

    def patches(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, N, patch]."""
        if audio.dim() != 2:
            raise ValueError(f"audio must be [B, S] mono, got {list(audio.shape)}")
        length = self.num_tokens * self.patch
        if audio.shape[1] < length:
            audio = nn.functional.pad(audio, (0, length - audio.shape[1]))
        return audio[:, :length].reshape(audio.shape[0], self.num_tokens, self.patch)

    def forward(self, audio: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """audio [B, S], keep [N'] or None -> [B, 1 + N', d]."""
        x = self.pos(self.pre_proj(self.patch_proj(self.patches(audio))))
        return self.agg(_keep_tokens(x, keep))


def fold_word_ids(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """Word ids [...] (0 = padding) -> ids in [0, vocab): 0 stays 0, any other id -> 1 + (id − 1) mod (vocab − 1).

    The data tokenizer hashes into 2^16 buckets; a model with a smaller model.vocab_buckets folds those ids
    into its own table (ids already below vocab are unchanged), so no id can index past the embedding.
    """
    return torch.where(words != 0, 1 + (words - 1).remainder(vocab - 1), torch.zeros_like(words))


class TextEmbed(nn.Module):
    """Hashed word ids [B', N] (0 = padding) -> tokens [B', 1 + N, d] and a key mask [B', 1 + N].

    Ids >= vocab are folded into the table by :func:`fold_word_ids`.
    """

    def __init__(self, vocab: int, max_words: int, width: int):
        super().__init__()
        self.max_words = int(max_words)
        self.vocab = int(vocab)
        self.word_embed = nn.Embedding(vocab, width, padding_idx=0)
        self.pre_proj = nn.Linear(width, width)
        self.pos = AddEmbedding(self.max_words, width)
        self.agg = PrependToken(width)

    def forward(self, words: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """words [B', N] int64 -> (tokens [B', 1 + N, d], key_mask [B', 1 + N] bool, True = a real token)."""
        if words.dim() != 2 or words.shape[1] > self.max_words:
            raise ValueError(f"text must be [B, L, N] with N <= data.max_words={self.max_words}, "
                             f"got words of shape {list(words.shape)}")
        x = self.agg(self.pos(self.pre_proj(self.word_embed(fold_word_ids(words, self.vocab)))))
        present = words != 0
        # Always a mask (testing for "no padding" would cost a host sync). The AGG token is always a valid
        # key, so no attention row is fully masked (SDPA would return NaN for it).
        key_mask = torch.cat([present.new_ones(words.shape[0], 1), present], dim=1)
        return x, key_mask
