"""NVTX ranges for Nsight Systems: torch.cuda.nvtx on a CUDA build with a GPU, the ``nvtx`` package otherwise,
a no-op when neither is usable. ``with nvtx_range("harmonize/dots"): ...`` or ``@nvtx_range("gram")``."""
from __future__ import annotations

import contextlib

import torch


def _pick():
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    try:
        import nvtx  # the PyPI package works without a GPU
        return nvtx.push_range, nvtx.pop_range
    except Exception:  # not installed or no libnvToolsExt: ranges become no-ops
        return None, None


_PUSH, _POP = _pick()


class nvtx_range(contextlib.ContextDecorator):
    """Context manager / decorator opening one NVTX range named ``name``."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        if _PUSH is not None:
            _PUSH(self.name)
        return self

    def __exit__(self, *exc):
        if _POP is not None:
            _POP()
        return False
