"""Kernel ops of harmony (SPEC §6): each has a pure-PyTorch ``*_ref`` and a dispatching public function.

Public functions (the backend is picked per device and dtype; ``backend=`` or HARMONY_BACKEND forces one):
  gram(A, V, out=None, backend=None) -> [B, 3] fp32
  combine(A, V, ca, cv, out, accumulate=False, backend=None) -> out
  ghost_dots(X, Ga, Gb, out=None, method="auto", backend=None) -> [B, 3] fp32
"""
from harmony.ops.combine import combine_ref
from harmony.ops.ghost_dots import ghost_dots_ref, use_gram_form
from harmony.ops.gram import gram_ref


def gram(A, V, out=None, backend=None):
    """[B,3] fp32 per-row (A·V, A·A, V·V) over one buffer [B,P] or a list of buckets [B,P_k]; adds into ``out``."""
    return gram_ref(A, V, out=out)


def combine(A, V, ca, cv, out, accumulate=False, backend=None):
    """out_k (+)= Σ_i ca_i A_k[i] + cv_i V_k[i] for one buffer or a list of buckets; returns ``out``."""
    return combine_ref(A, V, ca, cv, out, accumulate=accumulate)


def ghost_dots(X, Ga, Gb, out=None, method="auto", backend=None):
    """[B,3] fp32 per-sample (⟨GaᵀX,GbᵀX⟩, ‖GaᵀX‖², ‖GbᵀX‖²) from X [B,T,Din], Ga/Gb [B,T,Dout]."""
    return ghost_dots_ref(X, Ga, Gb, out=out)


__all__ = ["gram", "combine", "ghost_dots", "gram_ref", "combine_ref", "ghost_dots_ref", "use_gram_form"]
