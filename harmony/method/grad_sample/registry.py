"""Registry of per-sample gradient samplers, keyed by module type (opacus-style, by decorator).

    from harmony.method.grad_sample import GradSampler, register_grad_sampler

    @register_grad_sampler(MyLayer)
    class MyLayerSampler(GradSampler):
        def per_sample(self, module, name, calls, grads, B, names): ...

Lookup: the exact type first; then the nearest registered base class, but only when the subclass does
not override ``forward`` (a subclass with its own forward computes something else); then the generic
sampler (vmap of the module's VJP per sample). Types registered as sample-mixing raise an error.
"""
from __future__ import annotations

from typing import Dict, Type

from torch import nn

from harmony.method.grad_sample.base import GradSampler, PerSampleError

_SAMPLERS: Dict[type, GradSampler] = {}
_MIXING: Dict[type, str] = {}


def register_grad_sampler(*module_types: Type[nn.Module]):
    """Class decorator: use this GradSampler subclass for the given module types (replaces an earlier one)."""
    def deco(cls):
        inst = cls() if isinstance(cls, type) else cls
        for t in module_types:
            _SAMPLERS[t] = inst
            _MIXING.pop(t, None)
        return cls
    return deco


def register_sample_mixing(module_type: Type[nn.Module], why: str) -> None:
    """Declare that a module type mixes samples (its parameters have no per-sample gradient)."""
    _MIXING[module_type] = why


def _forward_of(t: type):
    return t.__dict__.get("forward")


def find_sampler(module: nn.Module, name: str) -> GradSampler:
    """The sampler for ``module`` (named ``name`` in the model), or a PerSampleError for a sample-mixing one."""
    t = type(module)
    if t in _SAMPLERS:
        return _SAMPLERS[t]
    for base in t.__mro__[1:]:
        if base in _MIXING:
            break
        if base in _SAMPLERS:
            # a subclass inherits the sampler only if it computes the same forward
            own = [k for k in t.__mro__[: t.__mro__.index(base)] if _forward_of(k) is not None]
            if not own:
                return _SAMPLERS[base]
            break
    for base in t.__mro__:
        if base in _MIXING:
            raise PerSampleError(
                f"module '{name}' ({t.__name__}) mixes samples ({_MIXING[base]}), so its parameters have no "
                "per-sample gradient. Exclude its parameters from harmony.scope (pass a list of parameters, or a "
                "model whose scope_parameters() leaves them out), replace it by a per-sample layer (LayerNorm), "
                f"or, if it is per-sample after all, register a sampler: "
                f"@harmony.method.grad_sample.register_grad_sampler({t.__name__}) on a GradSampler subclass.")
    from harmony.method.grad_sample.generic import GENERIC
    return GENERIC
