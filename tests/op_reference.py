"""The ops' tests' shared inputs, tolerances and float64 expectations (test_ops.py: every backend on CPU and CUDA
tensors; test_ops_triton.py: the Triton interpreter on CPU tensors).

The expectations are float64 einsums written here, not harmony.ops' pure-PyTorch reference (the ``ref`` backend is
one of the backends under test); ghost_dots' expectation takes the gram form Σ_{t,s}(x_t·x_s)(ga_t·gb_s), not the
reference's instantiated per-sample gradients.

Tolerances (one table, TOL): kernels and reference see the same inputs, and bf16/fp16 products are exact in fp32,
so what remains is fp32 accumulation, bounded relative to the magnitude scale Σ|terms| (the reference evaluated
on absolute values), plus for combine one final rounding to the out dtype, bounded relative to the value.
"""
from __future__ import annotations

import zlib

import torch

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


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().double()


def _gram64(A, V) -> torch.Tensor:
    """[B, 3] float64: (Σ_k a_k·v_k, Σ_k |a_k|², Σ_k |v_k|²) per row, one einsum per bucket and term."""
    B = A[0].shape[0]
    res = torch.zeros(B, 3, dtype=torch.float64)
    for a, v in zip(A, V):
        a, v = _f64(a), _f64(v)
        res += torch.stack([torch.einsum("bp,bp->b", a, v), torch.einsum("bp,bp->b", a, a),
                            torch.einsum("bp,bp->b", v, v)], 1)
    return res


def gram_expect(A, V):
    """(float64 einsum reference, magnitude scale: the same on absolute values), on the CPU."""
    return _gram64(A, V), _gram64([a.abs() for a in A], [v.abs() for v in V])


def _combine64(A, V, ca, cv):
    ca, cv = _f64(ca), _f64(cv)
    return [torch.einsum("b,bp->p", ca, _f64(a)) + torch.einsum("b,bp->p", cv, _f64(v)) for a, v in zip(A, V)]


def combine_expect(A, V, ca, cv, old, accumulate):
    """(float64 einsum reference per bucket, magnitude scale per bucket), on the CPU: Σ_b ca_b·a_b + cv_b·v_b
    (+ old with ``accumulate``)."""
    ref = _combine64(A, V, ca, cv)
    scale = _combine64([a.abs() for a in A], [v.abs() for v in V], ca.abs(), cv.abs())
    if accumulate:
        ref = [r + _f64(o) for r, o in zip(ref, old)]
        scale = [s + _f64(o).abs() for s, o in zip(scale, old)]
    return ref, scale


def _ghost64(X, Ga, Gb) -> torch.Tensor:
    """[B, 3] float64 (g^a·g^b, |g^a|², |g^b|²) of g = Gᵀ X, in the gram form: with K = X Xᵀ [B, T, T],
    g^a·g^b = Σ_{t,s} K_ts (Ga Gbᵀ)_ts."""
    X, Ga, Gb = _f64(X), _f64(Ga), _f64(Gb)
    K = torch.einsum("bti,bsi->bts", X, X)
    return torch.stack([torch.einsum("bts,bto,bso->b", K, Ga, Gb), torch.einsum("bts,bto,bso->b", K, Ga, Ga),
                        torch.einsum("bts,bto,bso->b", K, Gb, Gb)], 1)


def ghost_expect(X, Ga, Gb):
    """(float64 einsum reference, magnitude scale: the same on absolute values), on the CPU."""
    return _ghost64(X, Ga, Gb), _ghost64(X.abs(), Ga.abs(), Gb.abs())
