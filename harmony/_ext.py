"""Loads the compiled kernels, ``harmony._C``, and gives its ops fake (meta) implementations.

Importing ``harmony._C`` registers ``torch.ops.harmony.{gram, combine, ghost_dots}`` (CPU, plus CUDA when it was
built with CUDA). When it cannot be imported (not built yet, built for another torch), ``C`` is None and
``ERROR`` says why and how to build it; the ``cpu`` and ``cuda`` backends are then unusable and
``harmony.backends.explain()`` reports that reason.
"""
from __future__ import annotations

from typing import Optional

import torch

C = None
ERROR: Optional[str] = None

try:
    from harmony import _C as C  # noqa: N811
except Exception as e:  # ImportError when absent, also undefined symbols when built against another torch
    ERROR = (f"harmony._C is not built or does not load ({type(e).__name__}: {e}); build it with "
             "`pip install -e . --no-build-isolation` or `python setup.py build_ext --inplace`")

if C is not None:
    # Shapes only, so torch.compile and opcheck can trace the ops without running them.
    @torch.library.register_fake("harmony::gram")
    def _gram_fake(A, V):
        return A[0].new_empty((A[0].shape[0], 3), dtype=torch.float32)

    @torch.library.register_fake("harmony::combine")
    def _combine_fake(A, V, ca, cv, out, accumulate):
        return None

    @torch.library.register_fake("harmony::ghost_dots")
    def _ghost_dots_fake(X, Ga, Gb, method):
        return X.new_empty((X.shape[0], 3), dtype=torch.float32)


def build_info() -> dict:
    """How harmony._C was built (with_cuda, cuda_archs, cxx_flags, simd, ...); empty when it is not loaded."""
    return dict(C.build_info()) if C is not None else {}
