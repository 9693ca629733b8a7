"""The ops' tests' shared inputs, tolerances and float64 expectations (test_ops.py: every backend on CPU and CUDA
tensors; test_ops_triton.py: the Triton interpreter on CPU tensors).

Tolerances (one table, TOL): kernels and reference see the same inputs, and bf16/fp16 products are exact in fp32,
so what remains is fp32 accumulation, bounded relative to the magnitude scale Σ|terms| (the reference evaluated
on absolute values), plus for combine one final rounding to the out dtype, bounded relative to the value.
"""
from __future__ import annotations

import zlib

import torch

from harmony.ops import combine_ref, ghost_dots_ref, gram_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {
    # acc: fp32 accumulation error relative to the scale; out: final rounding to this dtype (half an ulp,
    # relative to the value); tiny: absolute floor for the smallest subnormal step of this dtype.
    torch.float32: dict(acc=1e-5, out=2.0 ** -24, tiny=1e-30),
    torch.bfloat16: dict(acc=1e-5, out=2.0 ** -8, tiny=1e-30),
    torch.float16: dict(acc=1e-5, out=2.0 ** -11, tiny=2.0 ** -24),
}


def rand(shape, dtype, device, gen: torch.Generator) -> torch.Tensor:
    """Standard normal values (never zeros), drawn in fp32 on the CPU and rounded to dtype."""
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def seeded(*key) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh values per case, reproducible run to run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def check_close(name: str, got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                out_dtype: torch.dtype = torch.float32) -> None:
    """|got - ref| <= acc * scale + out * |ref| + tiny, elementwise; prints the max error first."""
    got, ref, scale = got.detach().double().cpu(), ref.double().cpu(), scale.double().cpu()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    err = (got - ref).abs()
    allowed = TOL[dtype]["acc"] * scale + TOL[out_dtype]["out"] * ref.abs() + TOL[out_dtype]["tiny"]
    rel = (err / allowed).max().item() if err.numel() else 0.0
    print(f"{name}: max abs err {err.max().item() if err.numel() else 0.0:.3e}, max err/allowed {rel:.3f}")
    assert torch.isfinite(got).all(), f"{name}: non-finite output"
    assert (err <= allowed).all(), f"{name}: error exceeds tolerance (max err/allowed {rel:.3f})"


def buckets(B, sizes, dtype, device, gen):
    A = [rand((B, p), dtype, device, gen) for p in sizes]
    V = [rand((B, p), dtype, device, gen) for p in sizes]
    return A, V


def gram_expect(A, V):
    """(float64 reference, magnitude scale)."""
    return gram_ref(A, V, upcast=True), gram_ref([a.abs() for a in A], [v.abs() for v in V], upcast=True)


def combine_expect(A, V, ca, cv, old, accumulate):
    """(float64 reference per bucket, magnitude scale per bucket)."""
    ref = [torch.zeros(a.shape[1], dtype=torch.float64) for a in A]
    combine_ref([a.cpu() for a in A], [v.cpu() for v in V], ca.cpu(), cv.cpu(), ref, accumulate=False, upcast=True)
    scale = [torch.zeros(a.shape[1], dtype=torch.float64) for a in A]
    combine_ref([a.abs().cpu() for a in A], [v.abs().cpu() for v in V], ca.abs().cpu(), cv.abs().cpu(), scale,
                upcast=True)
    if accumulate:
        ref = [r + o.double().cpu() for r, o in zip(ref, old)]
        scale = [s + o.double().abs().cpu() for s, o in zip(scale, old)]
    return ref, scale


def ghost_expect(X, Ga, Gb):
    return ghost_dots_ref(X.cpu(), Ga.cpu(), Gb.cpu(), upcast=True), \
        ghost_dots_ref(X.abs().cpu(), Ga.abs().cpu(), Gb.abs().cpu(), upcast=True)
