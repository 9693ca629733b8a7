"""One strategy per measurement tier, with one small interface (the harmonizer coordinates the phases).

    strategy.measure(s)        harmonize/measure   what the tier needs from the graph (output or feature gradients)
    strategy.dots(s) -> [B, 3] harmonize/dots      per-sample (⟨g^va, g^vt⟩, ‖g^va‖², ‖g^vt‖²) of this rank's samples
    strategy.apply(s, co)      harmonize/update    the update Σ_i ca_i g^va_i + cv_i g^vt_i into .grad

``s`` (``Step``) carries the step's loss inputs, the path upstream gradients u (the update always uses
them) and the measured ones (the dots use them; equal to u unless harmony.upstream says otherwise).
The recorded tiers (ghost, sketch, materialize) read the step's ``Records`` (the activation recorder's view:
kept calls, scope, buffer plan) and measure through the recorder; the feature and unmeasured tiers read only the
loss inputs. From the harmonizer a strategy uses its public surface: cfg, scope, bookkeeping, world, ddp / fsdp,
rec.measure, param_of, add_grad, add_named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from harmony.method import feature as feature_mode
from harmony import distributed as hd
from harmony.method import ghost
from harmony.method import materialize
from harmony.method import sketch as sketch_mode
from harmony.method.recorder import Records


@dataclass
class Step:
    """One harmonized step's inputs to a strategy."""

    va_inputs: Tuple[torch.Tensor, ...]
    vt_inputs: Tuple[torch.Tensor, ...]
    u_va: Optional[List[torch.Tensor]]       # path upstream gradients at the loss inputs (the rows update; None
    u_vt: Optional[List[torch.Tensor]]       # when update=objective measures another definition or nothing)
    mu_va: Optional[List[torch.Tensor]]      # measured upstream gradients (the dots; None when unmeasured)
    mu_vt: Optional[List[torch.Tensor]]
    B: int
    step: int
    device: torch.device
    path_measured: bool = True               # the measured gradients are the path ones (bookkeeping allowed)
    feature: Optional[torch.Tensor] = None
    rec: Optional[Records] = None            # the recorded tiers' kept activations and scope
    state: Dict[str, object] = field(default_factory=dict)   # what measure/dots hand to the later phases


class Strategy:
    """The interface; ``h`` is the GradientHarmonizer (records, scope, parameter and collective helpers)."""

    name = ""
    recorded = False  # reads the step's Records

    def __init__(self, h):
        self.h = h

    def measure(self, s: Step) -> None:
        raise NotImplementedError

    def dots(self, s: Step) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, s: Step, co: dict) -> None:
        raise NotImplementedError


class Ghost(Strategy):
    """Exact dots from the kept activations and measured output gradients; no per-sample gradient stored."""

    name = "ghost"
    recorded = True

    def measure(self, s: Step) -> None:
        s.state["grads"] = self.h.rec.measure(s.va_inputs, s.mu_va, s.vt_inputs, s.mu_vt)

    def dots(self, s: Step) -> torch.Tensor:
        h = self.h
        return ghost.layer_dots(s.rec.modules, s.rec.records, s.state["grads"], s.rec.scoped, s.B,
                                h.cfg.ghost_method, s.device)

    def apply(self, s: Step, co: dict) -> None:
        if self.h.bookkeeping:
            self._bookkeeping(s, co, None)
        else:
            self._second_backward(s, co, None)

    def _bookkeeping(self, s: Step, co: dict, bufs) -> None:
        """No second backward: every parameter's gradient from its layer's kept X and the combined G
        ca_i·G^va_i + cv_i·G^vt_i (materialize: the scoped ones by ``combine``). Single process only."""
        h, grads, B = self.h, s.state["grads"], s.B
        k_out = (co["ca"], co["cv"]) if h.cfg.apply_to == "all" else (co["pa"], co["pv"])
        inside = {} if bufs is not None else dict(s.rec.scoped)
        outside = {m: [n for n in names if n not in s.rec.scoped.get(m, ())] for m, names in s.rec.direct.items()}
        parts = ghost.weighted_grads(s.rec.modules, s.rec.records, grads, inside, B, co["ca"], co["cv"])
        parts.update(ghost.weighted_grads(s.rec.modules, s.rec.records, grads, outside, B, *k_out))
        if bufs is not None:
            flats = materialize.combined(s.rec.plan, bufs, co["ca"], co["cv"])
            for q, g in materialize.views(s.rec.plan, flats).items():
                h.add_grad(h.param_of(q), g)
        for (mname, n), g in parts.items():
            h.add_grad(getattr(s.rec.modules[mname], n), g)

    def _second_backward(self, s: Step, co: dict, bufs) -> None:
        """One weighted ordinary backward; apply_to=scope: plain weights there, plus the scoped correction."""
        h = self.h
        if h.cfg.apply_to == "all":
            ghost.weighted_backward(s.va_inputs, s.u_va, s.vt_inputs, s.u_vt, co["ca"], co["cv"])
            return
        ghost.weighted_backward(s.va_inputs, s.u_va, s.vt_inputs, s.u_vt, co["pa"], co["pv"])
        da, dv = co["ca"] - co["pa"], co["cv"] - co["pv"]
        if bufs is not None:
            flats = materialize.combined(s.rec.plan, bufs, da, dv)
            hd.average_across_ranks(flats, h.world)
            for q, g in materialize.views(s.rec.plan, flats).items():
                h.add_named(q, g)
            return
        delta = ghost.weighted_grads(s.rec.modules, s.rec.records, s.state["grads"], s.rec.scoped, s.B, da, dv)
        merged: Dict[str, torch.Tensor] = {}
        for (mname, n), g in delta.items():
            q = s.rec.canonical[(mname, n)]
            merged[q] = g if q not in merged else merged[q] + g
        hd.average_across_ranks(list(merged.values()), h.world)
        for q, g in merged.items():
            h.add_named(q, g)


class Sketch(Ghost):
    """Ghost's measurement and update; the Linear weights' dots estimated from k×k sketches (harmony.method.sketch)."""

    name = "sketch"

    def dots(self, s: Step) -> torch.Tensor:
        cfg = self.h.cfg
        return sketch_mode.layer_dots(s.rec.modules, s.rec.records, s.state["grads"], s.rec.scoped, s.B,
                                      cfg.sketch_dim, cfg.sketch_seed, s.step, cfg.sketch_kind, cfg.ghost_method,
                                      s.device)


class Materialize(Ghost):
    """Exact dots from per-sample gradient buffers [B, P_S] (``gram``); the scope's update by ``combine``."""

    name = "materialize"

    def dots(self, s: Step) -> torch.Tensor:
        h = self.h
        bufs = s.rec.plan.allocate(s.B, getattr(torch, h.cfg.buffer_dtype))
        materialize.fill(s.rec.plan, bufs, s.rec.modules, s.rec.records, s.state["grads"], s.rec.scoped,
                         s.rec.canonical, s.B)
        s.state["bufs"] = bufs
        return materialize.dots(bufs).to(s.device)

    def apply(self, s: Step, co: dict) -> None:
        h, bufs = self.h, s.state["bufs"]
        if h.bookkeeping:
            self._bookkeeping(s, co, bufs)
        elif not (h.ddp or h.fsdp) and s.path_measured:
            self._combine(s, co, bufs)
        else:
            self._second_backward(s, co, bufs)

    def _combine(self, s: Step, co: dict, bufs) -> None:
        """``combine`` into the scoped parameters' .grad; the others by a weighted backward restricted to them."""
        h = self.h
        flats = materialize.combined(s.rec.plan, bufs, co["ca"], co["cv"])
        for q, g in materialize.views(s.rec.plan, flats).items():
            h.add_grad(h.param_of(q), g)
        others = [h.param_of(q) for q in sorted(set(s.rec.canonical.values()) - h.scope)]
        if not others:
            return
        ka, kv = (co["ca"], co["cv"]) if h.cfg.apply_to == "all" else (co["pa"], co["pv"])
        pairs = [(z, u * ghost.row_scale(ka, u)) for z, u in zip(s.va_inputs, s.u_va) if z.requires_grad] + \
                [(z, u * ghost.row_scale(kv, u)) for z, u in zip(s.vt_inputs, s.u_vt) if z.requires_grad]
        if not pairs:
            return
        got = torch.autograd.grad([z for z, _ in pairs], others, [g for _, g in pairs], allow_unused=True)
        for p, g in zip(others, got):
            if g is not None:
                h.add_grad(p, g)


class Feature(Strategy):
    """Dots at the shared representation both losses read (harmony.method.feature); one weighted ordinary backward."""

    name = "feature"

    def measure(self, s: Step) -> None:
        if s.feature is None:
            raise ValueError("harmony.mode=feature needs backward(..., feature=f): the shared representation "
                             "[B, ...] both losses read (VATT: the model output's feat_v)")
        s.state["grads"] = feature_mode.feature_grads(s.va_inputs, s.mu_va, s.vt_inputs, s.mu_vt, s.feature)

    def dots(self, s: Step) -> torch.Tensor:
        return feature_mode.feature_dots(s.state["grads"], s.B).to(s.device)

    def apply(self, s: Step, co: dict) -> None:
        ghost.weighted_backward(s.va_inputs, s.u_va, s.vt_inputs, s.u_vt, co["ca"], co["cv"])


class Unmeasured(Feature):
    """harmony.measure=false: no dots (NaN); the curriculum ranks by the losses; one weighted backward."""

    name = "unmeasured"

    def measure(self, s: Step) -> None:
        pass

    def dots(self, s: Step) -> torch.Tensor:
        return torch.full((s.B, 3), float("nan"), dtype=torch.float32, device=s.device)


STRATEGIES = {cls.name: cls for cls in (Ghost, Sketch, Materialize, Feature, Unmeasured)}
