"""The harmonizer's activation recorder: forward hooks, kept activations, the scope and the first step's checks.

Construction registers forward hooks on every module that owns trainable parameters; in train mode with
grad enabled each call keeps (inputs X, output Y) until the next ``backward``. The first backward resolves
scope 'shared' (parameters reachable from BOTH losses' inputs), checks that every scoped parameter is seen
by a sampler, decides bookkeeping, and from then on keeps only what is needed.

Its interface to the harmonizer: ``prepare`` (the step's checks and tier), ``view`` (a ``Records``: what the
strategies read, carried in the step), ``measure`` (the measured output gradients at the kept outputs),
``param_of``, ``backward_pass`` (no recording inside) and ``release``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_map

from harmony.method import ghost

from harmony.method import materialize
from harmony.config import ConfigError, HarmonyConfig
from harmony.method.grad_sample import Call, PerSampleError, find_sampler


def _reachable_leaves(roots: Sequence[torch.Tensor]) -> set:
    """ids of the leaf tensors (parameters) whose AccumulateGrad node is reachable from ``roots``."""
    ids, seen, stack = set(), set(), []
    for t in roots:
        if t.grad_fn is not None:
            stack.append(t.grad_fn)
        elif t.requires_grad:
            ids.add(id(t))
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            ids.add(id(var))
        stack.extend(n for n, _ in fn.next_functions if n is not None and n not in seen)
    return ids


@dataclass(frozen=True)
class Records:
    """One step's kept activations and the scope, as the strategies read them (``ActivationRecorder.view``).

    modules: module name -> module (those that own trainable parameters); records: module name -> its kept
    forward calls; scoped: module name -> its scoped direct parameter names; direct: module name -> its trainable
    direct parameter names; canonical: (module, parameter) -> canonical qualified name; plan: the materialize
    tier's buffer layout (None for the other tiers)."""

    modules: Dict[str, nn.Module]
    records: Dict[str, List[Call]]
    scoped: Dict[str, List[str]]
    direct: Dict[str, List[str]]
    canonical: Dict[Tuple[str, str], str]
    plan: Optional[materialize.BufferPlan]


class ActivationRecorder:
    """Hooks, records, scope and first-step checks of one GradientHarmonizer (see the module doc)."""

    def __init__(self, inner: nn.Module, cfg: HarmonyConfig, ddp: bool, fsdp: bool, bookkeeping: Optional[bool],
                 hooks: bool = True):
        self.cfg, self.inner, self.ddp, self.fsdp = cfg, inner, ddp, fsdp
        self._bookkeeping_pref = bookkeeping
        self.bookkeeping: Optional[bool] = None                 # decided at the first backward
        self._modules: Dict[str, nn.Module] = {}
        self._direct: Dict[str, List[str]] = {}                 # module name -> its trainable direct params
        self._canonical: Dict[Tuple[str, str], str] = {}        # (module, param) -> canonical qualified name
        self._owner: Dict[str, Tuple[str, str]] = {}            # canonical name -> its first (module, param)
        self._records: Dict[str, List[Call]] = {}
        #: set False to pause recording (e.g. a forward that is not followed by ``backward``)
        self.recording = True
        self._in_backward = False
        # the two measurement columns: one batched backward (GPU), or two plain passes (the CPU, where
        # they measured a few % faster: same multiply-adds, without the batching layer's copies)
        self._batched: Optional[bool] = None
        self._fwd_ids: Dict[int, str] = {}                      # id of a parameter seen in forward -> canonical name
        self._hooks = []
        self._sampler_needs_params: Dict[str, bool] = {}
        self._checked = False
        self._tied = False
        self._with_hooks = hooks
        self._index_modules()
        self.scope: Optional[set] = None                        # canonical names; None until resolved
        self._scoped: Dict[str, List[str]] = {}                 # module name -> scoped direct param names
        self._recorded: Optional[set] = None                    # module names the hooks keep; None: all
        self.mode: Optional[str] = None
        self._plan: Optional[materialize.BufferPlan] = None
        if not hooks:                       # measured at a representation: no hooks, no parameter scope
            self._checked = True
            self.scope = set()
        else:
            self._resolve_static_scope()

    def _index_modules(self) -> None:
        first: Dict[int, str] = {}
        for mname, m in self.inner.named_modules(remove_duplicate=False):
            direct = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
            if not direct or mname in self._modules:
                continue
            if any(m is other for other in self._modules.values()):
                continue                        # the same module reached under two names: hook it once
            self._modules[mname] = m
            self._direct[mname] = direct
            for n in direct:
                p = getattr(m, n)
                q = first.setdefault(id(p), f"{mname}.{n}" if mname else n)
                self._canonical[(mname, n)] = q
                self._owner.setdefault(q, (mname, n))
            if self._with_hooks:
                self._hooks.append(m.register_forward_hook(self._hook(mname), with_kwargs=True))

    def _hook(self, mname: str):
        def record(module, args, kwargs, output):
            if not (self.recording and self.cfg.measure and not self._in_backward and module.training
                    and torch.is_grad_enabled()):
                return
            if self._recorded is not None and mname not in self._recorded:
                return
            det = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731
            params = None
            if self._needs_params(mname):
                params = {n: getattr(module, n).detach().clone() for n in self._direct[mname]}
            if not self._checked:                                           # first step: map forward-time params
                for n in self._direct[mname]:
                    self._fwd_ids[id(getattr(module, n))] = self._canonical[(mname, n)]
            self._records.setdefault(mname, []).append(
                Call(tree_map(det, args), tree_map(det, kwargs), output, params).stamp())
        return record

    def _needs_params(self, mname: str) -> bool:
        if mname not in self._sampler_needs_params:
            try:
                self._sampler_needs_params[mname] = find_sampler(self._modules[mname], mname).needs_params
            except PerSampleError:
                self._sampler_needs_params[mname] = False
        return self._sampler_needs_params[mname]

    def _resolve_static_scope(self) -> None:
        scope = self.cfg.scope
        if isinstance(scope, (list, tuple)):
            self._set_scope(self._names_of(scope, "harmony.scope"))
        elif hasattr(self.inner, "scope_parameters"):
            self._set_scope(self._names_of(self.inner.scope_parameters(scope), f"scope_parameters({scope!r})"))
        elif scope == "all":
            self._set_scope(set(self._canonical.values()))
        elif scope != "shared":
            raise ConfigError(f"harmony.scope={scope!r} needs a model with scope_parameters(name); "
                              f"{type(self.inner).__name__} has none: use 'shared', 'all' or a list of parameters")

    def _names_of(self, params, where: str) -> set:
        by_id = {}
        for (mname, n), q in self._canonical.items():
            by_id[id(getattr(self._modules[mname], n))] = q
        names = set()
        for p in params:
            if id(p) not in by_id:
                raise ConfigError(f"{where}: a parameter of shape {tuple(p.shape)} is not a trainable parameter "
                                  "of the model")
            names.add(by_id[id(p)])
        return names

    def _set_scope(self, names: set) -> None:
        self.scope = set(names)
        self._scoped = {}
        for (mname, n), q in self._canonical.items():
            if q in self.scope:
                self._scoped.setdefault(mname, []).append(n)
        for mname in self._scoped:
            find_sampler(self._modules[mname], mname)       # raises for sample-mixing modules in scope
        owners: Dict[str, List[str]] = {}
        for mname, names_ in self._scoped.items():
            for n in names_:
                owners.setdefault(self._canonical[(mname, n)], []).append(f"{mname}.{n}")
        tied = {q: o for q, o in owners.items() if len(o) > 1}
        if tied and self.cfg.mode in ("ghost", "sketch"):
            q, o = next(iter(tied.items()))
            raise PerSampleError(f"parameter {q} is shared by {o}; per-layer ghost dots cannot add the cross terms "
                                 "of a tied parameter: use harmony.mode=materialize or leave it out of the scope")
        self._tied = bool(tied)

    def _resolve_shared(self, va_inputs, vt_inputs) -> None:
        """scope 'shared' without model.scope_parameters: parameters reachable from both losses' inputs."""
        ids_va = _reachable_leaves(va_inputs)
        ids_vt = _reachable_leaves(vt_inputs)
        known = self._known_ids()
        self._set_scope({known[i] for i in ids_va & ids_vt if i in known})

    def _first_step(self, va_inputs, vt_inputs) -> None:
        """Resolve 'shared', check that every scoped parameter is seen by a sampler, decide bookkeeping, and
        from now on keep only what is needed (all layers when bookkeeping, else the scoped ones)."""
        if self.scope is None:
            self._resolve_shared(va_inputs, vt_inputs)
        ids = _reachable_leaves(va_inputs + vt_inputs)
        known = self._known_ids()
        self._check_owned(ids, known)
        self.bookkeeping = self._decide_bookkeeping(ids, known)
        self._recorded = set(self._modules) if self.bookkeeping else set(self._scoped)
        self._records = {k: v for k, v in self._records.items() if k in self._recorded}
        self._checked = True

    def _decide_bookkeeping(self, ids: set, known: Dict[int, str]) -> bool:
        """Bookkeeping needs a single process (the parallel wrappers reduce inside their backward), a sampler
        for every layer that reaches the losses and no parameter used outside its module's calls; by default
        it is used when the scoped layers do at least half of the layers' forward work (then the second
        backward costs more than forming the parameter gradients from the kept X and G)."""
        why = None
        if self.ddp or self.fsdp:
            why = "the model is wrapped in DDP/FSDP2"
        called = {self._canonical[(m, n)] for m in self._records if self._records[m] for n in self._direct[m]}
        missing = [known[i] for i in ids if i in known and known[i] not in called]
        if why is None and missing:
            why = f"parameter {missing[0]} is used outside its module's forward"
        for mname, calls in self._records.items():
            if why is not None:
                break
            try:
                find_sampler(self._modules[mname], mname)
            except PerSampleError:
                why = f"module '{mname}' has no per-sample sampler"
            if any(not isinstance(c.output, torch.Tensor) for c in calls):
                why = f"module '{mname}' does not return one tensor"
        if why is None and self.cfg.upstream != "path":
            why = f"harmony.upstream={self.cfg.upstream} measures other gradients than the update's path ones"
        if self._bookkeeping_pref is False:
            return False
        if why is not None:
            if self._bookkeeping_pref:
                raise PerSampleError(f"bookkeeping=True is not possible: {why}")
            return False
        return bool(self._bookkeeping_pref) or self._scoped_work_share() >= 0.5

    def _scoped_work_share(self) -> float:
        """Share of the recorded layers' forward work (multiply-adds, ~ output size × fan-in) in scoped layers."""
        total = scoped = 0.0
        for mname, calls in self._records.items():
            m = self._modules[mname]
            fan_in = 1
            if isinstance(m, nn.Linear):
                fan_in = m.in_features
            elif isinstance(m, nn.modules.conv._ConvNd):
                fan_in = m.weight[0].numel()
            work = float(sum(c.output.numel() for c in calls if isinstance(c.output, torch.Tensor)) * fan_in)
            total += work
            if mname in self._scoped:
                scoped += work
        return scoped / total if total else 0.0

    def _known_ids(self) -> Dict[int, str]:
        """id of each parameter object (as seen in forward, and as registered now) -> canonical name."""
        known = dict(self._fwd_ids)
        for (mname, n), q in self._canonical.items():
            known.setdefault(id(getattr(self._modules[mname], n)), q)
        return known

    def _check_owned(self, ids: set, known: Dict[int, str]) -> None:
        """A parameter in the graph whose module was never called is used outside its module: no sampler sees it.

        Checked for the recorded (scoped, or on the first step all) parameters only."""
        called = {self._canonical[(m, n)] for m in self._records if self._records[m] for n in self._direct[m]}
        for i in ids:
            q = known.get(i)
            if q is not None and q not in called and (self.scope is None or q in self.scope):
                raise PerSampleError(f"parameter {q} reaches the losses but its module was never called in forward: it "
                                     "is used directly by another module's code. Move it into a small module of its "
                                     "own (see harmony.model.layers) so a per-sample sampler sees it")

    def scope_names(self) -> List[str]:
        """Canonical names of the scoped parameters (resolved at construction or at the first backward)."""
        return sorted(self.scope) if self.scope is not None else []

    def remove(self) -> None:
        """Remove the forward hooks (the harmonizer is unusable afterwards)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._records.clear()

    def reset(self) -> None:
        """Drop what the hooks kept (e.g. after a forward that is not followed by ``backward``)."""
        self._records.clear()

    # ------------------------------------------------------------------ the harmonizer's interface
    def prepare(self, va_inputs, vt_inputs, B: int) -> str:
        """The step's checks (on the first step: the shared scope, samplers, bookkeeping) -> the tier to run."""
        if not self._checked:
            self._first_step(va_inputs, vt_inputs)
        self._check_recorded()
        return self._pick_mode(B)

    def view(self) -> Records:
        """What the strategies read this step (the same dicts, not copies)."""
        return Records(self._modules, self._records, self._scoped, self._direct, self._canonical, self._plan)

    @contextlib.contextmanager
    def backward_pass(self):
        """Inside: nothing is recorded (the samplers' own forwards); on leaving, the step's records are released."""
        self._in_backward = True
        try:
            yield
        finally:
            self._records = {}
            self._in_backward = False

    @property
    def holds_records(self) -> bool:
        """Whether forward calls are kept (until the next backward releases them)."""
        return any(self._records.values())

    def _check_recorded(self) -> None:
        if self._scoped and not any(self._records.get(m) for m in self._scoped):
            raise RuntimeError("GradientHarmonizer.backward: no forward call of a scoped layer was recorded; run the "
                               "model's forward in train mode with grad enabled right before backward")

    def _pick_mode(self, B: int) -> str:
        if self.mode is None or self.cfg.mode == "auto":
            mode = self.cfg.mode
            if mode == "auto":
                nbytes = torch.finfo(getattr(torch, self.cfg.buffer_dtype)).bits // 8
                fits = 2 * B * self._scope_numel() * nbytes <= self.cfg.memory_budget_mb * 2 ** 20
                mode = "materialize" if fits and not self.fsdp else "ghost"
            if self._tied and mode in ("ghost", "sketch"):
                raise PerSampleError("the scope holds a tied parameter: ghost dots cannot add its cross terms; "
                                     "use harmony.mode=materialize")
            self.mode = mode
        if self.mode == "materialize" and self._plan is None:
            self._plan = materialize.BufferPlan(self._scope_params())
        return self.mode

    def _scope_params(self):
        out, seen = [], set()
        for mname, names in self._scoped.items():
            for n in names:
                q = self._canonical[(mname, n)]
                if q not in seen:
                    seen.add(q)
                    p = getattr(self._modules[mname], n)
                    out.append((q, p.numel(), tuple(p.shape), p.device))
        return out

    def _scope_numel(self) -> int:
        return sum(n for _, n, _, _ in self._scope_params())

    def measure(self, va_inputs, u_va, vt_inputs, u_vt) -> Dict[str, List[Optional[torch.Tensor]]]:
        """Measured output gradients [2, *Y] per recorded call of every kept layer (scoped, or all when bookkeeping)."""
        ys, where = [], []
        for mname in self._records:
            for j, call in enumerate(self._records.get(mname, [])):
                if call.modified():
                    raise PerSampleError(f"the input or output of module '{mname}' was modified in place after its "
                                         "forward call, so its kept activations are stale; use out-of-place ops "
                                         "there (e.g. x = x + y, not x += y; inplace=False)")
                if isinstance(call.output, torch.Tensor) and call.output.requires_grad:
                    ys.append(call.output)
                    where.append((mname, j))
        if self._batched is None and ys:
            self._batched = ys[0].device.type != "cpu"
        grads, self._batched = ghost.output_grads(va_inputs, u_va, vt_inputs, u_vt, ys, bool(self._batched))
        out = {m: [None] * len(calls) for m, calls in self._records.items()}
        for (mname, j), g in zip(where, grads):
            out[mname][j] = g
        return out

    def param_of(self, q: str) -> nn.Parameter:
        """The parameter named q as the module holds it now (FSDP2 swaps sharded/unsharded objects)."""
        mname, n = self._owner[q]
        return getattr(self._modules[mname], n)
