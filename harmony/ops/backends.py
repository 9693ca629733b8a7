"""Which kernel backend runs an op, and why the others do not (docs/KERNELS.md "Backends and dispatch").

Backends, in order of preference: ``cuda`` (harmony._C built with CUDA, CUDA tensors), ``triton`` (harmony.kernels,
compiled on CUDA tensors; on CPU tensors only under TRITON_INTERPRET=1 and only when forced — the interpreter is
for tests, not speed), ``cpu`` (harmony._C, CPU tensors), ``ref`` (pure PyTorch, anything).

``HARMONY_BACKEND=cpu|cuda|triton|ref`` or an op's ``backend=`` argument forces one backend; if it cannot run the
given inputs the op raises a RuntimeError that says why. Decisions are cached per (op, device type, dtype,
forced backend), so dispatch costs a dict lookup per call. Under torch.compile the decision is taken once, at
trace time, and baked into the graph (changing HARMONY_BACKEND later does not re-trace).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Tuple

import torch

BACKENDS = ("cuda", "triton", "cpu", "ref")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ENV_VAR = "HARMONY_BACKEND"

_DECISIONS: Dict[tuple, str] = {}


@functools.lru_cache(maxsize=None)
def _ext_status() -> Tuple[bool, str]:
    """(loaded, why not) for harmony._C on this CPU."""
    from harmony.ops import _ext
    if _ext.C is None:
        return False, _ext.ERROR
    ok, why = _ext.C.cpu_runs_build()
    return bool(ok), why


@functools.lru_cache(maxsize=None)
def _cuda_status() -> Tuple[bool, str]:
    """(usable, why not) for the CUDA kernels in harmony._C."""
    loaded, why = _ext_status()
    if not loaded:
        return False, why
    from harmony.ops import _ext
    info = _ext.build_info()
    if not info.get("with_cuda"):
        return False, f"harmony._C was built without CUDA ({info.get('reason', 'unknown reason')})"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is available to this process"
    return True, f"built for archs {info.get('cuda_archs')}"


@functools.lru_cache(maxsize=None)
def _triton_status() -> Tuple[bool, str, bool]:
    """(importable, why not, interpreting): Triton and harmony.kernels, as imported by this process; registers the
    Triton ops (torch.ops.harmony.<op>_triton) on the first call."""
    try:
        import triton  # noqa: F401
    except Exception as e:
        return False, f"triton is not importable ({type(e).__name__}: {e})", False
    try:
        from harmony.ops import _dispatch, _triton
        _dispatch.register_triton_ops()
    except Exception as e:
        return False, f"the Triton kernels (harmony.kernels) do not load ({type(e).__name__}: {e})", False
    return True, "", _triton.interpreting()


def _can_run(backend: str, device_type: str, dtype: torch.dtype, forced: bool) -> Tuple[bool, str]:
    """(ok, why not) for one backend on tensors of this device type and dtype."""
    if backend == "ref":
        return True, ""
    if dtype not in KERNEL_DTYPES:
        return False, f"{dtype} is not a kernel dtype (float32, bfloat16, float16); only ref handles it"
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, these are on {device_type}"
        return _ext_status()
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, these are on {device_type}"
        return _cuda_status()
    if backend == "triton":
        ok, why, interpreting = _triton_status()
        if not ok:
            return False, why
        if device_type == "cuda":
            if interpreting:
                return False, "TRITON_INTERPRET=1 is set, and the interpreter runs on CPU tensors only"
            return True, ""
        if device_type == "cpu":
            if not interpreting:
                return False, ("Triton on CPU tensors needs its interpreter: set TRITON_INTERPRET=1 before triton "
                               "is first imported")
            if not forced:
                return False, "the interpreter is used only when forced (HARMONY_BACKEND=triton or backend='triton')"
            return True, ""
        return False, f"Triton runs on CUDA tensors (or CPU ones under its interpreter), not {device_type}"
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _decide(op: str, device_type: str, dtype: torch.dtype, forced: Optional[str]) -> str:
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"harmony.ops.{op}: unknown backend {forced!r} (from backend= or {ENV_VAR}); "
                             f"choose one of {', '.join(BACKENDS)}")
        ok, why = _can_run(forced, device_type, dtype, forced=True)
        if not ok:
            raise RuntimeError(f"harmony.ops.{op}: backend {forced!r} was forced but cannot run {dtype} tensors on "
                               f"{device_type}: {why}")
        return forced
    for backend in BACKENDS:
        if _can_run(backend, device_type, dtype, forced=False)[0]:
            return backend
    raise AssertionError("unreachable: ref runs everything")


@torch.compiler.assume_constant_result
def backend_for(op: str, device_type: str, dtype: torch.dtype, backend: Optional[str] = None) -> str:
    """The backend that runs ``op`` on ``device_type`` tensors of ``dtype``; ``backend`` (else HARMONY_BACKEND)
    forces one and raises if it cannot run them."""
    forced = backend or os.environ.get(ENV_VAR) or None
    key = (op, device_type, dtype, forced)
    name = _DECISIONS.get(key)
    if name is None:
        name = _DECISIONS[key] = _decide(op, device_type, dtype, forced)
    return name


def explain() -> Dict[str, Tuple[bool, str]]:
    """Per backend: (usable here, why / what for). Usable means it runs on some tensors of this process."""
    out = {}
    ok, why = _cuda_status()
    out["cuda"] = (ok, why if not ok else f"CUDA tensors ({why})")
    ok, why, interpreting = _triton_status()
    if not ok:
        out["triton"] = (False, why)
    elif interpreting:
        out["triton"] = (True, "CPU tensors under TRITON_INTERPRET=1, only when forced (tests); no compiled kernels")
    elif torch.cuda.is_available():
        out["triton"] = (True, "CUDA tensors (compiled kernels)")
    else:
        out["triton"] = (False, "no CUDA GPU for compiled kernels, and TRITON_INTERPRET=1 was not set for the "
                                "interpreter")
    ok, why = _ext_status()
    out["cpu"] = (ok, why if not ok else "CPU tensors")
    out["ref"] = (True, "pure PyTorch: any device and dtype (the oracle and the fallback)")
    return out


def picks() -> Dict[str, str]:
    """The backend chosen automatically for fp32 tensors per device type (cuda only when a GPU is present)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {d: _decide("gram", d, torch.float32, None) for d in devices}
