"""Independent reference for per-sample gradients (path decomposition: docs/HARMONIZER.md "1. Per-sample gradients of
coupled losses"), and a small test model.

``path_grads`` gives every sample i a private copy θ_i of all parameters (B stacked copies), runs
sample i's forward alone (a batch of one) with θ_i, evaluates the coupled losses on the stacked outputs
and takes autograd's gradient with respect to the copies: g^k_i = ∂L_k/∂θ_i. Nothing of the harmonizer
is used. The per-sample forwards run in a Python loop rather than under torch.func.vmap: vmap's batching
rule for an embedding with a per-sample weight drops ``padding_idx`` (the padding row gets gradient),
which would make the reference, not the code under test, wrong.

``ToyVATT`` mixes every layer type the harmonizer supports: Conv3d (video patches), Conv2d (audio
spectrogram patches), Conv1d (a grouped token mixer), Linear, LayerNorm, Embedding (with padding),
AddEmbedding (one table with repeated rows), PrependToken, a module holding raw parameters (generic
sampler), one block shared by three modalities (text with L candidates runs on B·L rows) and a head
that computes z_vt from z_v.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import torch
from torch import nn
from torch.func import functional_call

from harmony.model.layers import AddEmbedding, PrependToken
from harmony.model.losses import masked_mean, mil_nce, nce


def path_grads(model: nn.Module, inputs: Sequence[torch.Tensor], losses: Callable, names=None):
    """Per-sample gradients by private parameter copies.

    inputs: tensors [B, ...]; losses(outputs) -> (L_va, L_vt) scalars from the stacked outputs.
    Returns {param name: [B, *shape]} for L_va and for L_vt (zeros where a loss does not reach a parameter).
    """
    B = inputs[0].shape[0]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)}
    theta = {n: p.detach().unsqueeze(0).expand(B, *p.shape).clone().requires_grad_(True) for n, p in params.items()}

    per_sample = []
    for i in range(B):
        theta_i = {n: t[i] for n, t in theta.items()}
        per_sample.append(functional_call(model, theta_i, tuple(x[i:i + 1] for x in inputs)))
    outs = tuple(torch.cat(o) for o in zip(*per_sample))
    L_va, L_vt = losses(outs)
    keys = list(theta)
    g_va = torch.autograd.grad(L_va, [theta[k] for k in keys], retain_graph=True, allow_unused=True)
    g_vt = torch.autograd.grad(L_vt, [theta[k] for k in keys], allow_unused=True)
    fix = lambda g, k: torch.zeros_like(theta[k]) if g is None else g  # noqa: E731
    return {k: fix(g, k) for k, g in zip(keys, g_va)}, {k: fix(g, k) for k, g in zip(keys, g_vt)}


def feature_path_grads(model: "ToyVATT", inputs: Sequence[torch.Tensor], losses: Callable):
    """Per-sample gradients at the pooled video feature, by a per-sample loop: sample i's feature f_i is a leaf
    of its own, computed from sample i alone, and read only by sample i's heads; the coupled losses run on the
    stacked outputs. Returns (g_va, g_vt) [B, d] with g^k_i = ∂L_k/∂f_i."""
    video, audio, text = inputs
    with torch.no_grad():
        _, z_a, _, z_t = model(video, audio, text)            # the audio / text side does not read the feature
    leaves = [model.video_feature(video[i:i + 1]).detach().requires_grad_(True) for i in range(video.shape[0])]
    z_v = [model.v_head(f) for f in leaves]
    z_vt = [model.vt_head(z) for z in z_v]
    L_va, L_vt = losses((torch.cat(z_v), z_a, torch.cat(z_vt), z_t))
    g_va = torch.autograd.grad(L_va, leaves, retain_graph=True, allow_unused=True)
    g_vt = torch.autograd.grad(L_vt, leaves, allow_unused=True)
    fix = lambda gs: torch.cat([torch.zeros_like(f) if g is None else g for g, f in zip(gs, leaves)])  # noqa: E731
    return fix(g_va), fix(g_vt)


def flat(grads: Dict[str, torch.Tensor], names) -> torch.Tensor:
    """[B, P] concatenation of the per-sample gradients of ``names``."""
    return torch.cat([grads[n].flatten(1) for n in sorted(names)], 1)


def dots_of(g_va: torch.Tensor, g_vt: torch.Tensor) -> torch.Tensor:
    """[B, 3] (g_va·g_vt, |g_va|², |g_vt|²) of [B, P] per-sample gradients."""
    return torch.stack([(g_va * g_vt).sum(1), (g_va * g_va).sum(1), (g_vt * g_vt).sum(1)], 1)


def cmaloss(mask_va=None, mask_vt=None, lam: float = 1.0):
    """The coupled CMA losses on the model outputs: (L_va, L_vt) as masked means of per-sample NCE / MIL-NCE."""
    def losses(outs):
        z_v, z_a, z_vt, z_t = outs
        return (masked_mean(nce(z_v, z_a, mask=mask_va), mask_va),
                masked_mean(mil_nce(z_vt, z_t, mask=mask_vt), mask_vt))
    return losses


class Gate(nn.Module):
    """Raw parameters used directly in a nonlinear per-token formula: only the generic sampler knows it."""

    def __init__(self, dim: int):
        super().__init__()
        self.a = nn.Parameter(torch.randn(dim) * 0.5)
        self.b = nn.Parameter(torch.randn(dim) * 0.5)

    def forward(self, x):
        return x * torch.sigmoid(self.a) + torch.tanh(x) * self.b


class Block(nn.Module):
    """Pre-LN attention + grouped Conv1d token mixer + gated MLP; per-sample; used for every modality."""

    def __init__(self, d: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mix = nn.Conv1d(d, d, kernel_size=3, padding=1, groups=d // 2)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.gate = Gate(2 * d)
        self.fc2 = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):                                     # x [N, T, d]
        q, k, v = self.qkv(self.ln1(x)).chunk(3, -1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
        x = x + self.proj(att @ v)
        x = x + self.mix(x.transpose(1, 2)).transpose(1, 2)
        return x + self.fc2(self.gate(torch.nn.functional.gelu(self.fc1(self.ln2(x)))))


class ToyVATT(nn.Module):
    """video [B, 3, 4, 6, 6], audio [B, 1, 6, 10], text [B, L, N] ids -> (z_v, z_a, z_vt [B, e], z_t [B, L, e])."""

    def __init__(self, d: int = 8, e: int = 6, vocab: int = 11, n_words: int = 5):
        super().__init__()
        self.v_tok = nn.Conv3d(3, d, kernel_size=(2, 3, 3), stride=(2, 3, 3))
        self.v_pos = AddEmbedding(8, d)
        self.v_agg = PrependToken(d)
        self.a_tok = nn.Conv2d(1, d, kernel_size=3, stride=2, padding=1)
        self.a_pos = AddEmbedding(5, d, index=torch.arange(15) % 5)     # repeated rows: a scatter, not a copy
        self.a_agg = PrependToken(d)
        self.t_emb = nn.Embedding(vocab, d, padding_idx=0)
        self.t_pos = AddEmbedding(n_words, d)
        self.t_agg = PrependToken(d)
        self.block = Block(d)
        self.norm = nn.LayerNorm(d)
        self.v_head = nn.Sequential(nn.Linear(d, e), nn.LayerNorm(e))
        self.vt_head = nn.Linear(e, e)                                   # z_vt from z_v
        self.a_head = nn.Linear(d, e)
        self.t_head = nn.Linear(d, e)

    def encode(self, tokens):                                             # [N, T, d] -> pooled AGG [N, d]
        return self.norm(self.block(tokens))[:, 0]

    def video_feature(self, video):                                       # [B, 3, 4, 6, 6] -> pooled [B, d]
        return self.encode(self.v_agg(self.v_pos(self.v_tok(video).flatten(2).transpose(1, 2))))

    def forward(self, video, audio, text):
        """-> (z_v, z_a, z_vt, z_t); the pooled video feature both losses read is kept as ``self.feat_v``."""
        a = self.a_agg(self.a_pos(self.a_tok(audio).flatten(2).transpose(1, 2)))
        B, L, N = text.shape
        t = self.t_agg(self.t_pos(self.t_emb(text.reshape(B * L, N))))
        self.feat_v = self.video_feature(video)
        z_v = self.v_head(self.feat_v)
        z_a = self.a_head(self.encode(a))
        z_t = self.t_head(self.encode(t)).reshape(B, L, -1)
        return z_v, z_a, self.vt_head(z_v), z_t

    # parameters both losses reach (scope 'shared', docs/HARMONIZER.md "Scope"): the block, the final norm, the video
    # path up to S_va
    SHARED_PREFIXES = ("block.", "norm.", "v_tok.", "v_pos.", "v_agg.", "v_head.")


def toy_batch(B: int, L: int = 3, n_words: int = 5, vocab: int = 11, dtype=torch.float64, seed: int = 0):
    """Random inputs for ToyVATT: video, audio, text (with padding at the end of some captions)."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, 3, 4, 6, 6, generator=g, dtype=dtype)
    audio = torch.randn(B, 1, 6, 10, generator=g, dtype=dtype)
    text = torch.randint(1, vocab, (B, L, n_words), generator=g)
    lengths = torch.randint(1, n_words + 1, (B, L), generator=g)
    text = torch.where(torch.arange(n_words) < lengths[..., None], text, 0)
    return video, audio, text


def logits_loss(S: torch.Tensor, valid: torch.Tensor, cand_valid=None) -> torch.Tensor:
    """Per-sample asymmetric (MIL-)NCE written out from the logits, for the own-pair reference.

    S [B, B, L]: S[j, k, l] = s(e_j, c_{k,l}); valid [B] bool (sample masks); cand_valid [B, L] bool (None: all).
    With V(k, l) = valid_k and cand_valid[k, l]: ℓ_i = logsumexp({S[i, j, l] : V(j, l)} ∪ {S[j, i, l] : all j,
    V(i, l)}) − logsumexp({S[i, i, l] : V(i, l)}); 0 if i is masked or has no valid candidate.
    """
    B, _, L = S.shape
    V = valid[:, None].expand(B, L) & (torch.ones(B, L, dtype=torch.bool) if cand_valid is None else cand_valid)
    out = []
    for i in range(B):
        if not bool(V[i].any()):
            out.append(S.new_zeros(()))
            continue
        row = S[i][V]                          # s(e_i, c_{j,l}) for valid candidates (j, l)
        col = S[:, i][:, V[i]].reshape(-1)     # s(e_j, c_{i,l}) for every anchor j, valid l
        out.append(torch.logsumexp(torch.cat([row, col]), 0) - torch.logsumexp(S[i, i][V[i]], 0))
    return torch.stack(out)


def own_grads(model: nn.Module, inputs: Sequence[torch.Tensor], definition: str, mask_va: torch.Tensor,
              mask_vt: torch.Tensor, temperature: float = 0.07):
    """Per-sample gradients under the ``own_row`` / ``own_pair`` definitions, by private parameter copies.

    own_row: g^k_i = ∂(m_i ℓ^k_i / n_k)/∂θ_i — sample i's own loss row, through its own copy only (the other
    samples' outputs, made from their copies, are constants for θ_i). own_pair: the chain-rule term through the
    positive logits only, Σ_l (∂ℓ^k_i/∂s_{ii,l}) ∂s_{ii,l}/∂θ_i · m_i / n_k, with ∂ℓ/∂s taken by autograd on a loss
    written out from the logit matrix (``_logits_loss``), not on the library's. Returns ({name: [B, ...]}, same).
    """
    B = inputs[0].shape[0]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theta = {n: p.detach().unsqueeze(0).expand(B, *p.shape).clone().requires_grad_(True) for n, p in params.items()}
    per_sample = [functional_call(model, {n: t[i] for n, t in theta.items()}, tuple(x[i:i + 1] for x in inputs))
                  for i in range(B)]
    z_v, z_a, z_vt, z_t = (torch.cat(o) for o in zip(*per_sample))
    keys = list(theta)
    out = []
    for anchor, cands, mask, fn in ((z_v, z_a[:, None], mask_va, nce), (z_vt, z_t, mask_vt, mil_nce)):
        n = mask.sum().clamp(min=1).to(anchor.dtype)
        if definition == "own_row":
            losses = fn(anchor, cands[:, 0] if fn is nce else cands, mask=mask) * mask.to(anchor.dtype) / n
            rows = [torch.autograd.grad(losses[i], [theta[k] for k in keys], retain_graph=True, allow_unused=True)
                    for i in range(B)]
        elif definition == "own_pair":
            e = torch.nn.functional.normalize(anchor, dim=-1)
            c = torch.nn.functional.normalize(cands, dim=-1)
            S = (torch.einsum("jd,kld->jkl", e, c) / temperature).detach().requires_grad_(True)
            w = torch.autograd.grad(logits_loss(S, mask).sum(), S)[0]              # w[i, i, l] = ∂ℓ_i/∂S[i,i,l]
            rows = []
            for i in range(B):
                pos = (e[i][None, :] * c[i]).sum(-1) / temperature                   # s(e_i, c_{i,l}) from θ_i
                term = (w[i, i] * pos).sum() * mask[i].to(anchor.dtype) / n
                rows.append(torch.autograd.grad(term, [theta[k] for k in keys], retain_graph=True, allow_unused=True))
        else:
            raise ValueError(definition)
        grads = {}
        for j, k in enumerate(keys):
            grads[k] = torch.stack([torch.zeros_like(theta[k][i]) if rows[i][j] is None else rows[i][j][i]
                                    for i in range(B)])
        out.append(grads)
    return out[0], out[1]
