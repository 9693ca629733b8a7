"""harmony's kernel ops (docs/KERNELS.md): each has a pure-PyTorch ``*_ref`` and a public function that validates
its arguments once and dispatches to a backend.

Public functions (the backend is picked per device and dtype by harmony.ops.backends; ``backend=`` or
HARMONY_BACKEND=cuda|triton|cpu|ref forces one):
  gram(A, V, out=None, backend=None) -> [B, 3] fp32
  combine(A, V, ca, cv, out, accumulate=False, backend=None) -> out
  ghost_dots(X, Ga, Gb, out=None, method="auto", backend=None) -> [B, 3] fp32
Registered ops behind them, one out= schema per op (csrc/register.cpp): torch.ops.harmony.{gram, combine,
ghost_dots} (C++ CPU/CUDA kernels, harmony._C) and torch.ops.harmony.{gram, combine, ghost_dots}_triton (the Triton
kernels of harmony.kernels, registered with torch.library.triton_op on first use). The table from backend to op is
harmony/ops/_dispatch.py; each op's reference, fake and registrations are in harmony/ops/<op>.py.
"""
from harmony.ops import _ext  # noqa: F401  (loads harmony._C when built: torch.ops.harmony.* exist after this import)
from harmony.ops.combine import combine, combine_ref
from harmony.ops.ghost_dots import ghost_dots, ghost_dots_ref, use_gram_form
from harmony.ops.gram import gram, gram_ref

__all__ = ["gram", "combine", "ghost_dots", "gram_ref", "combine_ref", "ghost_dots_ref", "use_gram_form"]
