"""GradientHarmonizer: per-sample cross-modality gradient harmonization of one training step (docs/HARMONIZER.md;
docs/METHOD.md "Which gradient is sample i's", "Realignment rules", "Curriculum").

    harmonizer = GradientHarmonizer(model, HarmonyConfig(realign="pcgrad", mode="ghost", scope="shared"))
    l_va = nce(z_v, z_a); l_vt = mil_nce(z_vt, z_t)                      # per-sample losses [B]
    stats = harmonizer.backward(l_va, l_vt, va_inputs=(z_v, z_a), vt_inputs=(z_vt, z_t),
                                mask_va=m_a, mask_vt=m_t, step=step, total_steps=total, ids=index)
    optimizer.step()                                                     # .grad holds the harmonized G

Construction registers forward hooks on every module that owns trainable parameters; in train mode with
grad enabled each call keeps (inputs X, output Y) until the next ``backward``. ``backward``:

1. L_va = Σ m^a ℓ^va / max(Σ m^a, 1), likewise L_vt; upstream gradients u_va = ∂L_va/∂va_inputs and
   u_vt = ∂L_vt/∂vt_inputs, each loss at its own inputs (a head from z_v to z_vt is never counted twice).
2.–5. The step's tier is a strategy (harmony.method.strategies: ghost, sketch, materialize, feature, unmeasured)
   with one interface — measure, dots, apply — and this class coordinates the phases around it:
2. measure (``harmonize/measure``): output gradients (G^va, G^vt) at the kept Y of the scoped layers
   (feature: the two columns at the shared representation).
3. dots (``harmonize/dots``): ghost — per layer from (X, G) by its sampler; sketch — the same with the
   Linear weights' dots estimated from k×k sketches; materialize — per-sample gradients into flat buffers,
   then ``gram``; feature — row dot products at the representation.
4. coefficients (``harmonize/coefficients``): cosines → curriculum weights → realignment →
   (ca, cv) = w·(α, β)/norm (harmony.realign, harmony.curriculum); under data parallelism on the global
   batch (B·3 scalars per rank are all-gathered), so every rank agrees with a single-process run.
5. update (``harmonize/update``): ghost, sketch, feature — one weighted ordinary backward; materialize —
   ``combine`` into the scoped parameters' .grad plus a weighted backward restricted to the other parameters. With
   bookkeeping (single process, chosen on the first step) no second backward runs: every parameter's
   gradient is formed from its layer's kept X and the combined output gradient ca·G^va + cv·G^vt.

Under DDP / FSDP2 each rank differentiates its share of the global masked mean, and the reported dots are
those of the averaged objective (divided by W²); see docs/HARMONIZER.md.

Scope: a name asks ``model.scope_parameters(name)`` when the (unwrapped) model has it; otherwise ``all``
is every trainable parameter and ``shared`` the parameters reachable from BOTH losses' inputs in the
autograd graph of the first step (found by walking grad_fn.next_functions to the AccumulateGrad nodes).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from harmony import distributed as hd
from harmony.method import strategies
from harmony.config import ConfigError, HarmonyConfig
from harmony.method.agreement import AgreementBank
from harmony.method.curriculum import (AGREEMENT_SCORES, LossMixture, ScoreMemory, curriculum_weights, mixture_names,
                                pair_scores, sample_scores, update_coefficients)
from harmony.model.losses import plain_backward
from harmony.nvtx import nvtx_range
from harmony.method.realign import RealignState, realign
from harmony.method.recorder import ActivationRecorder
from harmony.method.stats import HarmonyStats

SCOPE_NAMES = ("shared", "backbone", "last_block", "all")


class GradientHarmonizer:
    """Per-sample gradient harmonization for ``model`` (plain, DDP-wrapped or FSDP2-sharded); see the module doc."""

    def __init__(self, model: nn.Module, cfg: Optional[HarmonyConfig] = None, bookkeeping: Optional[bool] = None):
        """``bookkeeping``: form the update's parameter gradients from the kept X and measured G instead of a
        second backward (docs/HARMONIZER.md "3. The measurement tiers"); None picks it on the first step (single
        process, every layer has a sampler, and the scope holds at least half of the layers' work), True requires
        it, False never uses it."""
        self.cfg = (cfg if cfg is not None else HarmonyConfig()).validate()
        if self.cfg.update == "objective":   # its update is a second (weighted) backward, never the bookkeeping
            if bookkeeping:
                raise ConfigError("bookkeeping=True forms the update from the measured per-sample gradients' rows: "
                                  "it needs harmony.update=rows")
            bookkeeping = False
        self.model = model
        self.inner = hd.unwrap(model)
        self.ddp, self.fsdp = hd.is_ddp(model), hd.is_fsdp(model)
        #: the ranks the wrapper averages gradients over (1 for a plain module, even in a process group)
        self.world = hd.data_parallel_world(model)
        if self.fsdp and self.cfg.mode == "materialize":
            raise ConfigError("harmony.mode=materialize is not supported under FSDP2 (fully_shard): its [B, P] buffers "
                              "would hold whole unsharded layers; use harmony.mode=ghost (or auto)")
        self.memory = ScoreMemory(self.cfg.memory_decay)
        self.gmm = LossMixture(self.cfg.gmm_window) if self.cfg.curriculum_score == "gmm" else None
        #: the per-pair and agreement mixtures (curriculum_target=pair, curriculum_score agree / loss_agree)
        self.mixtures = {name: LossMixture(self.cfg.gmm_window) for name in
                         mixture_names(self.cfg.curriculum_score, self.cfg.curriculum_target)}
        if self.gmm is not None:
            self.mixtures["loss_vt"] = self.gmm
        self.agreement = AgreementBank(self.cfg.agree_bank, self.cfg.agree_k, self.cfg.agree_kernel) \
            if self.cfg.curriculum_score in AGREEMENT_SCORES else None
        self.realign_state = RealignState(self.cfg)
        self._late: List[Tuple[str, torch.Tensor]] = []
        self._strategies: Dict[str, strategies.Strategy] = {}
        #: hooks, kept activations, scope and first-step checks (feature mode: no hooks, no parameter scope)
        self.rec = ActivationRecorder(self.inner, self.cfg, self.ddp, self.fsdp, bookkeeping,
                                      hooks=self.cfg.mode != "feature")

    # ------------------------------------------------------------------ the recorder's public face
    @property
    def recording(self) -> bool:
        """Set False to pause recording (e.g. a train-mode forward that is not followed by ``backward``)."""
        return self.rec.recording

    @recording.setter
    def recording(self, value: bool) -> None:
        self.rec.recording = value

    @property
    def bookkeeping(self) -> Optional[bool]:
        """Whether the update is formed from the kept activations (decided at the first backward)."""
        return self.rec.bookkeeping

    @property
    def scope(self) -> Optional[set]:
        return self.rec.scope

    @property
    def mode(self) -> Optional[str]:
        return self.rec.mode

    def scope_names(self) -> List[str]:
        """Canonical names of the scoped parameters (resolved at construction or at the first backward)."""
        return self.rec.scope_names()

    def remove(self) -> None:
        """Remove the forward hooks (the harmonizer is unusable afterwards)."""
        self.rec.remove()

    def reset(self) -> None:
        """Drop what the hooks kept (e.g. after a forward that is not followed by ``backward``)."""
        self.rec.reset()

    def param_of(self, q: str) -> nn.Parameter:
        """The scoped parameter named q (canonical name) as the model holds it now."""
        return self.rec.param_of(q)

    # ------------------------------------------------------------------ the step
    def backward(self, l_va: torch.Tensor, l_vt: torch.Tensor, va_inputs: Sequence[torch.Tensor],
                 vt_inputs: Sequence[torch.Tensor], mask_va: Optional[torch.Tensor] = None,
                 mask_vt: Optional[torch.Tensor] = None, step: int = 0, total_steps: int = 1,
                 ids: Optional[torch.Tensor] = None, feature: Optional[torch.Tensor] = None,
                 measure_losses: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> HarmonyStats:
        """Fill (accumulate into) the .grad of every trainable parameter with the harmonized update G.

        l_va, l_vt [B]: per-sample losses; va_inputs / vt_inputs: the tensors each loss was computed from
        (rows = samples, [B, ...]); mask_va, mask_vt [B] bool (None: all valid); ids [B]: the items' stable
        dataset indices (score memory). measure_losses: (l̃_va, l̃_vt) [B] computed from the same inputs with
        ``definition=harmony.upstream`` (harmony.model.losses), required when ``harmony.upstream`` is not ``path``:
        their gradients define the MEASURED per-sample gradients, while the update stays built from the path
        gradients of (l_va, l_vt). feature [B, ...]: mode=feature only, the shared representation both losses
        read (VATT: the pooled video feature ``feat_v``). Returns the step's HarmonyStats.
        """
        if (measure_losses is None) != (self.cfg.upstream == "path"):
            raise ValueError(f"harmony.upstream={self.cfg.upstream}: pass measure_losses=(l_va, l_vt) computed with "
                             f"definition={self.cfg.upstream!r} (harmony.model.losses.nce / mil_nce)"
                             if measure_losses is None else
                             "measure_losses is for harmony.upstream=own_row|own_pair; with upstream=path the "
                             "measured gradient is the path gradient of (l_va, l_vt)")
        self._late = []
        try:
            with self.rec.backward_pass():  # the samplers' own forwards (generic) are not recorded
                with hd.unsharded_through_backward(self.model):
                    stats = self._backward(l_va, l_vt, tuple(va_inputs), tuple(vt_inputs), mask_va, mask_vt, step,
                                           total_steps, ids, measure_losses, feature)
                for q, g in self._late:  # FSDP2: gradients formed here go to the sharded parameters, once resharded
                    self.add_grad(self.param_of(q), g)
            return stats
        finally:
            self._late = []

    def _backward(self, l_va, l_vt, va_inputs, vt_inputs, mask_va, mask_vt, step, total_steps, ids, measure_losses,
                  feature=None):
        cfg = self.cfg
        B = l_va.shape[0]
        dev = l_va.device
        m_va = torch.ones(B, dtype=torch.bool, device=dev) if mask_va is None else mask_va.to(dev, torch.bool)
        m_vt = torch.ones(B, dtype=torch.bool, device=dev) if mask_vt is None else mask_vt.to(dev, torch.bool)
        for z in va_inputs + vt_inputs:
            if z.shape[0] != B:
                raise ValueError(f"loss inputs must have the batch in dim 0: got {tuple(z.shape)} for B={B}")
        if not cfg.enabled:
            mean_va, mean_vt = plain_backward(l_va, m_va, l_vt, m_vt, cfg.lam, world=self.world)
            return self._plain_stats(B, dev, mean_va, mean_vt, m_va & m_vt)
        L_va, L_vt, mean_va, mean_vt = self._losses(l_va, l_vt, m_va, m_vt)
        with nvtx_range("harmonize/measure"):
            # the path upstream: what the rows update scales, and what is measured when no other definition is
            # given; the objective update with another measured definition (the default) needs none
            path_used = cfg.update == "rows" or (cfg.measure and measure_losses is None)
            u_va = self._upstream(L_va, va_inputs) if path_used else None
            u_vt = self._upstream(L_vt, vt_inputs) if path_used else None
            mu_va, mu_vt = u_va, u_vt                     # the measured upstream: the path one, or by definition
            if measure_losses is not None and cfg.measure:
                Lm_va, Lm_vt, _, _ = self._losses(measure_losses[0], measure_losses[1], m_va, m_vt)
                mu_va, mu_vt = self._upstream(Lm_va, va_inputs), self._upstream(Lm_vt, vt_inputs)
            strategy = self._strategy(B, va_inputs, vt_inputs)
            s = strategies.Step(va_inputs, vt_inputs, u_va, u_vt, mu_va, mu_vt, B, step, dev,
                                path_measured=measure_losses is None, feature=feature,
                                rec=self.rec.view() if strategy.recorded else None)
            strategy.measure(s)
        with nvtx_range("harmonize/dots"):
            # per-sample gradients of the data-parallel objective (1/W)·Σ_r L_r: each rank's upstream gradient is
            # W times that (DDP/FSDP2 average, the gathered losses sum), so the dots are W² too large
            dots = strategy.dots(s) / float(self.world) ** 2
        with nvtx_range("harmonize/coefficients"):
            zero = torch.zeros((), dtype=l_va.dtype, device=dev)
            losses = torch.stack([torch.where(m_va, l_va.detach(), zero), torch.where(m_vt, l_vt.detach(), zero)], 1)
            emb = (va_inputs[0], va_inputs[1], vt_inputs[0], vt_inputs[1], m_va, m_vt) \
                if self.agreement is not None else None
            co = self._coefficients(dots, m_va & m_vt, step, total_steps, ids, losses, emb)
        with nvtx_range("harmonize/update"):
            if cfg.update == "objective":
                self._objective_backward(l_va, l_vt, m_va, m_vt, co)
            else:
                strategy.apply(s, co)
        return self._stats(dots, co, mean_va, mean_vt, strategy.name)

    def _strategy(self, B: int, va_inputs, vt_inputs) -> strategies.Strategy:
        """The step's tier: unmeasured, feature, or (after the first step's checks) ghost / sketch / materialize."""
        if not self.cfg.measure:
            name = "unmeasured"
        elif self.cfg.mode == "feature":
            name = "feature"
        else:
            name = self.rec.prepare(va_inputs, vt_inputs, B)
        if name not in self._strategies:
            self._strategies[name] = strategies.STRATEGIES[name](self)
        return self._strategies[name]

    @staticmethod
    def _stats(dots, co, mean_va, mean_vt, mode: str) -> HarmonyStats:
        return HarmonyStats(dots=dots.detach(), cos=co["cos"], weights=co["w"], alpha=co["alpha"], beta=co["beta"],
                            coef_va=co["ca"], coef_vt=co["cv"], valid=co["valid"], conflict=co["conflict"],
                            loss_va=mean_va, loss_vt=mean_vt, kept=co["kept"], mode=mode, score=co["score"],
                            score_audio=co["score_audio"])

    def _losses(self, l_va, l_vt, m_va, m_vt):
        """(L_va, L_vt) to differentiate: this rank's share of each GLOBAL masked mean (one process: the masked
        mean), and the global masked means (detached) for the stats; ``hd.global_masked_means``."""
        (L_va, L_vt), (mean_va, mean_vt) = hd.global_masked_means((l_va, m_va), (l_vt, m_vt), world=self.world)
        return L_va, L_vt, mean_va, mean_vt

    def _objective_backward(self, l_va, l_vt, m_va, m_vt, co: dict) -> None:
        """harmony.update=objective: one backward of Σ_i ca_i·ℓ^va_i and Σ_i cv_i·ℓ^vt_i, each over the global
        masked count as L_va and L_vt are. With every coefficient equal it is the rows update; otherwise a sample's
        coefficient scales its own loss term only, while its embeddings stay negatives of the others' terms."""
        L_va, L_vt, _, _ = self._losses(co["ca"].to(l_va.dtype) * l_va, co["cv"].to(l_vt.dtype) * l_vt, m_va, m_vt)
        if L_va.requires_grad or L_vt.requires_grad:
            (L_va + L_vt).backward()

    def _upstream(self, L: torch.Tensor, inputs) -> List[torch.Tensor]:
        """∂L/∂input for each input (zeros where L does not depend on it)."""
        live = [z for z in inputs if z.requires_grad]
        got = iter(torch.autograd.grad(L, live, retain_graph=True, allow_unused=True) if live and L.requires_grad
                   else [None] * len(live))
        out = []
        for z in inputs:
            g = next(got) if z.requires_grad else None
            out.append(torch.zeros_like(z) if g is None else g)
        return out

    def _coefficients(self, dots, valid, step, total_steps, ids, losses, emb=None) -> dict:
        """Cosines → weights → realignment → (ca, cv), on the global batch under data parallelism.
        ``losses`` [B, 2]: (ℓ^va, ℓ^vt), 0 where masked, for the curriculum scores other than the cosine;
        ``emb``: (z_va_v, z_va_a, z_vt_v, z_vt_t, mask_va, mask_vt) for the agreement scores."""
        cfg = self.cfg
        B = dots.shape[0]
        g_dots, off = self._gather(dots)
        g_valid = self._gather(valid.to(torch.uint8))[0].bool()
        g_ids = self._gather(ids.to(dots.device).long().reshape(-1))[0] if ids is not None else None
        ra = realign(g_dots, g_valid, cfg, self.realign_state)
        g_score, g_audio = ra.cos, None
        per_pair = cfg.curriculum_target == "pair" or cfg.curriculum_score in AGREEMENT_SCORES
        if cfg.curriculum_score != "cos" or per_pair:
            g_loss = self._gather(losses.to(ra.cos.device, torch.float32))[0]
            if per_pair:
                g_score, g_audio = self._pair_scores(ra.cos, g_dots, g_loss, g_valid, g_ids, emb)
            else:
                if self.gmm is not None:
                    self.gmm.add(g_loss[:, 1], g_valid)
                    self.gmm.fit()
                g_score = sample_scores(cfg.curriculum_score, ra.cos, g_dots, g_loss[:, 0], g_loss[:, 1], g_valid,
                                        cfg.lam, self.gmm)
        w = curriculum_weights(g_score, g_valid, step, total_steps, cfg, ids=g_ids, memory=self.memory)
        ones = torch.ones_like(w)
        plain_a = torch.ones_like(ra.alpha)
        if cfg.curriculum_target == "pair":       # each pair by its own score: w (caption) on L_vt, w_a on L_va
            w_a = curriculum_weights(g_audio, g_valid, step, total_steps, cfg)
            ca = update_coefficients(ra.alpha, ra.beta, w_a, cfg.renormalize)[0]
            cv = update_coefficients(ra.alpha, ra.beta, w, cfg.renormalize)[1]
            pa = update_coefficients(plain_a, torch.full_like(ra.beta, cfg.lam), w_a, cfg.renormalize)[0]
            pv = update_coefficients(plain_a, torch.full_like(ra.beta, cfg.lam), w, cfg.renormalize)[1]
        elif cfg.curriculum_target == "vt":          # the weights scale only the video–text loss of each sample
            ca = update_coefficients(ra.alpha, ra.beta, ones, cfg.renormalize)[0]
            cv = update_coefficients(ra.alpha, ra.beta, w, cfg.renormalize)[1]
            pa = update_coefficients(plain_a, torch.full_like(ra.beta, cfg.lam), ones, cfg.renormalize)[0]
            pv = update_coefficients(plain_a, torch.full_like(ra.beta, cfg.lam), w, cfg.renormalize)[1]
        else:
            ca, cv = update_coefficients(ra.alpha, ra.beta, w, cfg.renormalize)
            pa, pv = update_coefficients(plain_a, torch.full_like(ra.beta, cfg.lam), w, cfg.renormalize)
        if g_ids is not None and step < cfg.memory_until * total_steps:
            self.memory.update(g_ids, g_score, g_valid)
        sl = slice(off, off + B)
        n_valid = int(ra.valid[sl].sum())
        kept = float(((w[sl] > 0) & ra.valid[sl]).sum()) / n_valid if n_valid else 1.0
        return dict(cos=ra.cos[sl], alpha=ra.alpha[sl], beta=ra.beta[sl], conflict=ra.conflict[sl], valid=ra.valid[sl],
                    w=w[sl], ca=ca[sl], cv=cv[sl], pa=pa[sl], pv=pv[sl], kept=kept, score=g_score[sl].float(),
                    score_audio=None if g_audio is None else g_audio[sl].float())

    def _pair_scores(self, cos, g_dots, g_loss, g_valid, g_ids, emb):
        """(caption score, audio score) of the global batch (curriculum.pair_scores), the mixtures refitted and the
        agreement bank updated first."""
        cfg = self.cfg
        agree = None
        if self.agreement is not None:
            if g_ids is None:
                raise ValueError(f"harmony.curriculum_score={cfg.curriculum_score} needs the items' ids (backward's "
                                 "ids=): a sample must not be its own neighbour")
            g_emb = [self._gather(e.detach() if e.dtype == torch.bool else e.detach().float())[0] for e in emb]
            agree = self.agreement.score(g_ids, (g_emb[2], g_emb[3]), (g_emb[0], g_emb[1]), g_emb[5].bool(),
                                         g_emb[4].bool())
        values = {"loss_vt": g_loss[:, 1], "loss_va": g_loss[:, 0]}
        if agree is not None:
            values.update(agree_vt=-agree[0].to(g_loss.device), agree_va=-agree[1].to(g_loss.device))
        for name, mix in self.mixtures.items():
            mix.add(values[name], g_valid)
            mix.fit()
        return pair_scores(cfg.curriculum_score, cos, g_dots, g_loss[:, 0], g_loss[:, 1], g_valid, cfg.lam,
                           self.mixtures, agree)

    def _gather(self, x: torch.Tensor):
        """Rows x [b, ...] of every rank the wrapper averages over -> ([Σb, ...], offset of this rank's rows)."""
        return hd.gather_rows(x) if self.world > 1 else (x, 0)

    def add_named(self, q: str, g: torch.Tensor) -> None:
        """Add g to parameter q's gradient; under FSDP2 after the step's units are resharded."""
        if self.fsdp:
            self._late.append((q, g))
        else:
            self.add_grad(self.param_of(q), g)

    def add_grad(self, p: torch.Tensor, g: torch.Tensor) -> None:
        """p.grad (+)= g, in p's dtype; a sharded (DTensor) parameter takes its local shard of g."""
        if hasattr(p, "device_mesh") and hasattr(p, "placements"):
            from torch.distributed.tensor import distribute_tensor
            g = distribute_tensor(g.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        elif g.dtype != p.dtype:
            g = g.to(p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)

    def _plain_stats(self, B, dev, L_va, L_vt, valid) -> HarmonyStats:
        z = torch.zeros(B, device=dev)
        one = torch.ones(B, device=dev)
        return HarmonyStats(dots=torch.zeros(B, 3, device=dev), cos=z, weights=one, alpha=one,
                            beta=one * self.cfg.lam, coef_va=one, coef_vt=one * self.cfg.lam, valid=valid,
                            conflict=torch.zeros(B, dtype=torch.bool, device=dev), loss_va=L_va.detach(),
                            loss_vt=L_vt.detach(), kept=1.0, mode="plain")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Score memory and realignment state (plain tensors and ints: safe for weights_only loading)."""
        d = {"memory": self.memory.state_dict(), "realign": self.realign_state.state_dict()}
        if self.gmm is not None:
            d["gmm"] = self.gmm.state_dict()
        d["mixtures"] = {name: mix.state_dict() for name, mix in self.mixtures.items() if mix is not self.gmm}
        if self.agreement is not None:
            d["agreement"] = self.agreement.state_dict()
        return d

    def load_state_dict(self, d: dict) -> None:
        self.memory.load_state_dict(d["memory"])
        self.realign_state.load_state_dict(d["realign"])
        if self.gmm is not None and "gmm" in d:
            self.gmm.load_state_dict(d["gmm"])
        for name, state in d.get("mixtures", {}).items():
            if name in self.mixtures:
                self.mixtures[name].load_state_dict(state)
        if self.agreement is not None and d.get("agreement") is not None:
            self.agreement.load_state_dict(d["agreement"])
