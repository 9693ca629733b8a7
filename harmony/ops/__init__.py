"""Kernel ops of harmony (SPEC §6): each has a pure-PyTorch ``*_ref`` and a dispatching public function.

Public functions (the backend is picked per device and dtype by harmony.backends; ``backend=`` or
HARMONY_BACKEND=cuda|triton|cpu|ref forces one):
  gram(A, V, out=None, backend=None) -> [B, 3] fp32
  combine(A, V, ca, cv, out, accumulate=False, backend=None) -> out
  ghost_dots(X, Ga, Gb, out=None, method="auto", backend=None) -> [B, 3] fp32
Registered ops behind them: torch.ops.harmony.{gram, combine, ghost_dots} (C++/CUDA, harmony._C) and
torch.ops.harmony.{gram, combine, ghost_dots}_triton (kernels/, see harmony.ops._triton).
"""
from harmony import _ext  # noqa: F401  (loads harmony._C when built: torch.ops.harmony.* exist after this import)
from harmony.ops.combine import combine, combine_ref
from harmony.ops.ghost_dots import ghost_dots, ghost_dots_ref, use_gram_form
from harmony.ops.gram import gram, gram_ref

__all__ = ["gram", "combine", "ghost_dots", "gram_ref", "combine_ref", "ghost_dots_ref", "use_gram_form"]
