"""Loads the compiled kernels, ``harmony._C``.

Importing ``harmony._C`` registers ``torch.ops.harmony.{gram, combine, ghost_dots}`` (CPU, plus CUDA when it was
built with CUDA); their fakes are registered next to their references, in harmony/ops/<op>.py. When it cannot be
imported (not built yet, built for another torch), ``C`` is None and ``ERROR`` says why and how to build it; the
``cpu`` and ``cuda`` backends are then unusable and ``harmony.ops.backends.explain()`` reports that reason.
"""
from __future__ import annotations

from typing import Optional

C = None
ERROR: Optional[str] = None

try:
    from harmony import _C as C  # noqa: N811
except Exception as e:  # ImportError when absent, also undefined symbols when built against another torch
    ERROR = (f"harmony._C is not built or does not load ({type(e).__name__}: {e}); build it with "
             "`pip install -e . --no-build-isolation` or `python setup.py build_ext --inplace`")


def build_info() -> dict:
    """How harmony._C was built (with_cuda, cuda_archs, cxx_flags, simd, ...); empty when it is not loaded."""
    return dict(C.build_info()) if C is not None else {}
