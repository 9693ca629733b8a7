"""Small stand-ins with the interfaces of the model, data loader and harmonizer, for testing the trainer on
its own (they live only in the tests; their own contract is tested in test_standins.py).

* ``TinyVATT``: shared blocks (an nn.ModuleList called once per modality, like the modality-agnostic VATT),
  heads to S_va / S_vt with z_vt_v computed from z_va_v, outputs in a dataclass, an optional CPU
  ``generator`` that draws one input-feature drop mask per call (like DropToken's shared permutation).
* ``standin_loader``: items generated from (data seed, split, index) with K concepts, misaligned text/audio
  at the configured rates, some empty captions; the global batch of position p is items p·G ... p·G+G−1
  and rank r takes its r-th slice, so any number of ranks sees the same global batch; resumable by
  start_step; a finite, clean eval split.
* ``ProbeHarmonizer``: per-sample cosine of the two losses' gradients with respect to each sample's pooled
  video feature (a real per-sample quantity, simpler than the project's harmonizer), an EMA score memory,
  then a plain backward of L_va + λ·L_vt (global masked means, as the trainer's baseline).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from harmony import HarmonyStats
from harmony.distributed import global_masked_mean
from harmony.model.losses import mil_nce, nce
from harmony.trainer.loop import Parts

K = 4                 # concepts
FRAMES, HW = 2, 4     # video [3, 2, 4, 4]
SAMPLES = 16          # audio [16]
CANDS, WORDS = 2, 5   # text [2, 5]
VOCAB = 1 + K * 5
WIDTH = 16


# ------------------------------------------------------------------------------------------------ model

@dataclasses.dataclass
class TinyOutput:
    z_va_v: torch.Tensor
    z_va_a: torch.Tensor
    z_vt_v: torch.Tensor
    z_vt_t: torch.Tensor
    feat_v: torch.Tensor
    feat_a: torch.Tensor
    feat_t: torch.Tensor
    cand_mask: Optional[torch.Tensor] = None  # every candidate counts (the trainer's ModelOutput contract)


class Block(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(torch.nn.functional.gelu(self.fc(self.norm(x))))


class TinyVATT(nn.Module):
    def __init__(self, dropout: float = 0.0, d_va: int = 8, d_vt: int = 6, feature_keep: float = 1.0):
        super().__init__()
        self.video_in = nn.Linear(3 * FRAMES * HW * HW, WIDTH)
        self.audio_in = nn.Linear(SAMPLES, WIDTH)
        self.text_in = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block(WIDTH, dropout) for _ in range(2))
        self.head_va_v = nn.Linear(WIDTH, d_va)
        self.head_vt_v = nn.Linear(d_va, d_vt)
        self.head_va_a = nn.Linear(WIDTH, d_va)
        self.head_vt_t = nn.Linear(WIDTH, d_vt)
        self.feature_keep = feature_keep
        self.last_feat_v = None

    def encode(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, video, audio, text, generator: Optional[torch.Generator] = None):
        v = video.flatten(1)
        if self.training and self.feature_keep < 1.0:
            # one mask for the whole batch, drawn from the (rank-independent) generator
            keep = (torch.rand(v.shape[1], generator=generator) < self.feature_keep).to(v)
            v = v * keep / self.feature_keep
        feat_v = self.encode(self.video_in(v))
        feat_a = self.encode(self.audio_in(audio))
        b, cands, words = text.shape
        emb = self.text_in(text.reshape(b * cands, words))
        present = (text.reshape(b * cands, words) != 0).to(emb.dtype)[..., None]
        pooled = (emb * present).sum(1) / present.sum(1).clamp_min(1)
        feat_t = self.encode(pooled).reshape(b, cands, WIDTH)
        z_va_v = self.head_va_v(feat_v)
        self.last_feat_v = feat_v
        return TinyOutput(z_va_v=z_va_v, z_va_a=self.head_va_a(feat_a), z_vt_v=self.head_vt_v(z_va_v),
                          z_vt_t=self.head_vt_t(feat_t), feat_v=feat_v, feat_a=feat_a, feat_t=feat_t.mean(1))


# ------------------------------------------------------------------------------------------------- data

def _prototypes(seed: int):
    g = torch.Generator().manual_seed(10_007 + seed)
    return (torch.randn(K, 3 * FRAMES * HW * HW, generator=g), torch.randn(K, SAMPLES, generator=g))


def make_item(data_cfg, split: str, index: int) -> dict:
    """Item ``index`` of ``split``, a function of (data seed, split, index) only."""
    split_id = 0 if split == "train" else 1
    g = torch.Generator().manual_seed(data_cfg.seed * 1_000_003 + split_id * 7_919_000_003 + index)
    proto_v, proto_a = _prototypes(data_cfg.seed)
    concept = int(torch.randint(K, (1,), generator=g))
    noisy = torch.rand(2, generator=g)
    noisy_text = split == "train" and bool(noisy[0] < data_cfg.noise)
    noisy_audio = split == "train" and bool(noisy[1] < data_cfg.noise_audio)
    other = (concept + 1 + int(torch.randint(K - 1, (1,), generator=g))) % K
    t_concept = other if noisy_text else concept
    a_concept = other if noisy_audio else concept
    video = (proto_v[concept] + 0.7 * torch.randn(proto_v.shape[1], generator=g)).reshape(3, FRAMES, HW, HW)
    audio = proto_a[a_concept] + 0.7 * torch.randn(SAMPLES, generator=g)
    text = 1 + t_concept * 5 + torch.randint(5, (CANDS, WORDS), generator=g)
    text[:, -1] = 0  # padding
    empty = split == "train" and index % 17 == 5
    if empty:
        text.zero_()
    return {"video": video.float(), "audio": audio.float(), "text": text.long(), "mask_va": True,
            "mask_vt": not empty, "index": index, "source": "standin", "concept": concept,
            "text_concept": t_concept, "audio_concept": a_concept, "noisy_text": noisy_text,
            "noisy_audio": noisy_audio, "bad": {"empty_caption": int(empty)}}


def collate(items):
    batch = {k: torch.stack([it[k] for it in items]) for k in ("video", "audio", "text")}
    for k, dt in (("mask_va", torch.bool), ("mask_vt", torch.bool), ("index", torch.long), ("concept", torch.long),
                  ("text_concept", torch.long), ("audio_concept", torch.long), ("noisy_text", torch.bool),
                  ("noisy_audio", torch.bool)):
        batch[k] = torch.tensor([it[k] for it in items], dtype=dt)
    batch["source"] = [it["source"] for it in items]
    batch["bad"] = {"empty_caption": sum(it["bad"]["empty_caption"] for it in items)}
    return batch


def standin_loader(data_cfg, split, batch_size, rank, world_size, seed, start_step, drop_last=True, sampler=None):
    """The loader contract: train is infinite and resumable by start_step; eval is finite and clean."""
    g = batch_size * world_size
    if split == "train":
        pos = start_step
        while True:
            ids = [(pos * g + rank * batch_size + j) % data_cfg.size for j in range(batch_size)]
            yield collate([make_item(data_cfg, "train", i) for i in ids])
            pos += 1
    else:
        n = data_cfg.eval_size
        for start in range(0, n, g):
            ids = list(range(start + rank * batch_size, min(start + (rank + 1) * batch_size, n)))
            if not ids:
                return
            yield collate([make_item(data_cfg, "eval", i) for i in ids])


# ------------------------------------------------------------------------------------------- harmonizer

class EmaMemory:
    def __init__(self, decay: float):
        self.decay = decay
        self.score = torch.zeros(0)
        self.seen = torch.zeros(0, dtype=torch.bool)

    def update(self, ids, cos, valid):
        ids, cos, valid = ids.cpu(), cos.detach().cpu().float(), valid.cpu()
        n = int(ids.max()) + 1 if ids.numel() else 0
        if n > self.score.numel():
            self.score = torch.cat([self.score, torch.zeros(n - self.score.numel())])
            self.seen = torch.cat([self.seen, torch.zeros(n - self.seen.numel(), dtype=torch.bool)])
        for i, c, v in zip(ids.tolist(), cos.tolist(), valid.tolist()):
            if v:
                self.score[i] = c if not self.seen[i] else self.decay * self.score[i] + (1 - self.decay) * c
                self.seen[i] = True

    def scores(self, ids):
        ids = ids.cpu().long()
        inside = ids < self.score.numel()
        safe = torch.where(inside, ids, 0)
        if self.score.numel() == 0:
            return torch.zeros(ids.numel()), torch.zeros(ids.numel(), dtype=torch.bool)
        seen = inside & self.seen[safe]
        return torch.where(seen, self.score[safe], 0.0), seen

    def state_dict(self):
        return {"score": self.score.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, d):
        self.score, self.seen = d["score"].clone(), d["seen"].clone()


class ProbeHarmonizer:
    def __init__(self, model, harmony_cfg):
        from harmony.distributed import unwrap

        self.model = unwrap(model)  # the trainer hands over the (DDP-)wrapped model
        self.cfg = harmony_cfg
        self.memory = EmaMemory(harmony_cfg.memory_decay)

    def backward(self, l_va, l_vt, va_inputs, vt_inputs, mask_va, mask_vt, step, total_steps, ids,
                 measure_losses=None, feature=None):  # the probe measures at its own feature, by path
        big_va, big_vt = global_masked_mean(l_va, mask_va), global_masked_mean(l_vt, mask_vt)
        feat = self.model.last_feat_v
        g_va, = torch.autograd.grad(big_va, feat, retain_graph=True)
        g_vt, = torch.autograd.grad(big_vt, feat, retain_graph=True)
        dots = torch.stack([(g_va * g_vt).sum(1), (g_va * g_va).sum(1), (g_vt * g_vt).sum(1)], 1).float()
        cos = dots[:, 0] / ((dots[:, 1] * dots[:, 2]).sqrt() + self.cfg.eps)
        valid = mask_va.bool() & mask_vt.bool()
        (big_va + self.cfg.lam * big_vt).backward()
        self.memory.update(ids, cos, valid)
        ones = torch.ones_like(cos)
        return HarmonyStats(dots=dots, cos=cos, valid=valid, conflict=(cos < self.cfg.conflict_threshold) & valid,
                            weights=ones, alpha=ones, beta=ones * self.cfg.lam, coef_va=ones,
                            coef_vt=ones * self.cfg.lam, loss_va=big_va.detach(), loss_vt=big_vt.detach(), kept=1.0,
                            mode="probe")

    def state_dict(self):
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, d):
        self.memory.load_state_dict(d["memory"])


def standin_parts(feature_keep: float = 1.0, loader=standin_loader) -> Parts:
    return Parts(build_model=lambda cfg: TinyVATT(cfg.model.dropout, feature_keep=feature_keep),
                 build_loader=loader, nce=nce, mil_nce=mil_nce, build_harmonizer=ProbeHarmonizer)


def tiny_args(run_dir, steps: int = 6, *extra: str) -> list:
    """CLI arguments of a fast stand-in run."""
    return [f"--log.run_dir={run_dir}", f"--train.steps={steps}", "--train.batch_size=8", "--train.warmup_steps=2",
            "--train.lr=0.01", "--train.device=cpu", "--data.size=64", "--data.eval_size=24", "--data.noise=0.3",
            "--data.noise_audio=0.2", "--eval.size=0", "--eval.batch_size=8", "--log.every=1", "--log.progress=false",
            "--eval.noise_window=4", "--train.ckpt_every=3", *extra]
