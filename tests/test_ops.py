"""gram, combine and ghost_dots on every usable backend against the float64 reference (docs/KERNELS.md).

Backends here: ref and cpu on CPU tensors; cuda, triton (compiled) and ref on CUDA tensors when a GPU is present.
The Triton interpreter on CPU tensors is tested in test_ops_triton.py (small shapes: it is slow).

The cpu backend's tests FAIL when harmony._C is not built (and the cuda backend's when a GPU is present but the
CUDA kernels are not built); set HARMONY_ALLOW_NO_EXT=1 to skip them instead.

Inputs, tolerances and the float64 expectations are shared with test_ops_triton.py: op_reference.py. The
expectations are float64 einsums of their own, so the ``ref`` backend (harmony.ops' pure-PyTorch reference) is tested
like any other backend, not against itself.
"""
from __future__ import annotations

import os

import pytest
import torch

from harmony import ops

from harmony.ops import backends
from op_reference import (DTYPES, buckets, check_close, combine_expect, ghost_expect, gram_expect, rand,
                          seeded)

HAS_GPU = torch.cuda.is_available()


def require(backend: str, device: str) -> None:
    """Fail (or skip with HARMONY_ALLOW_NO_EXT=1) when a backend that should work here does not."""
    ok, why = backends._can_run(backend, device, torch.float32, forced=True)
    if ok:
        return
    msg = f"backend {backend!r} cannot run on {device} tensors: {why}"
    if os.environ.get("HARMONY_ALLOW_NO_EXT") == "1":
        pytest.skip(msg + " (HARMONY_ALLOW_NO_EXT=1)")
    pytest.fail(msg + " (set HARMONY_ALLOW_NO_EXT=1 to skip instead)")


CASES = [("ref", "cpu"), ("cpu", "cpu")]
if HAS_GPU:
    CASES += [("cuda", "cuda"), ("triton", "cuda"), ("ref", "cuda")]
CASE_IDS = [f"{b}-{d}" for b, d in CASES]


# ---------------------------------------------------------------------------------------------- gram

@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [0, 1, 3, 32])
@pytest.mark.parametrize("P", [1, 7, 1023, 1025, 65537])
def test_gram_single_buffer(backend, device, dtype, B, P):
    require(backend, device)
    gen = seeded("gram", dtype, B, P)
    A, V = rand((B, P), dtype, device, gen), rand((B, P), dtype, device, gen)
    got = ops.gram(A, V, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (B, 3) and got.device.type == device
    check_close(f"gram {backend} {dtype} B={B} P={P}", got, *gram_expect([A], [V]), dtype)


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3, 32])
def test_gram_buckets_noncontiguous_and_out(backend, device, dtype, B):
    """Mixed tiny, empty and large buckets in one call, a non-contiguous bucket, and accumulation into out."""
    require(backend, device)
    gen = seeded("gram-buckets", dtype, B)
    A, V = buckets(B, [1, 65537, 7, 0, 1023, 3, 4099], dtype, device, gen)
    wide_a, wide_v = rand((B, 2 * 1025), dtype, device, gen), rand((B, 2 * 1025), dtype, device, gen)
    A.append(wide_a[:, ::2])  # column stride 2
    V.append(wide_v.t().contiguous().t()[:, 1::2])  # column-major storage, then strided
    assert not A[-1].is_contiguous() and not V[-1].is_contiguous()
    ref, scale = gram_expect(A, V)
    out0 = rand((B, 3), torch.float32, device, gen)
    out = out0.clone()
    res = ops.gram(A, V, out=out, backend=backend)
    assert res is out
    # The expectation is on the CPU in float64.
    check_close(f"gram buckets {backend} {dtype} B={B}", out, ref.cpu() + out0.double().cpu(),
                scale.cpu() + out0.abs().double().cpu(), dtype)


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
def test_gram_empty(backend, device):
    require(backend, device)
    assert ops.gram([], [], backend=backend).shape == (0, 3)
    out = torch.ones(4, 3, device=device)
    assert ops.gram([], [], out=out, backend=backend) is out and (out == 1).all()
    A = torch.randn(0, 100, device=device)
    assert ops.gram(A, A.clone(), backend=backend).shape == (0, 3)
    Z = torch.randn(5, 0, device=device)  # P = 0: all dots are 0
    assert (ops.gram(Z, Z.clone(), backend=backend) == 0).all()


# ------------------------------------------------------------------------------------------- combine

@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("B", [0, 1, 3, 32])
@pytest.mark.parametrize("P", [1, 7, 1023, 1025, 65537])
def test_combine_single_buffer(backend, device, B, P):
    require(backend, device)
    gen = seeded("combine", B, P)
    A, V = rand((B, P), torch.float32, device, gen), rand((B, P), torch.float32, device, gen)
    ca, cv = rand((B,), torch.float32, device, gen), rand((B,), torch.float32, device, gen)
    out = rand((P,), torch.float32, device, gen)  # overwritten: not accumulate
    assert ops.combine(A, V, ca, cv, out, backend=backend) is out
    (ref,), (scale,) = combine_expect([A], [V], ca, cv, None, False)
    check_close(f"combine {backend} B={B} P={P}", out, ref, scale, torch.float32)
    if B == 0:
        assert (out == 0).all()


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("accumulate", [False, True])
def test_combine_dtypes_buckets(backend, device, dtype, out_dtype, accumulate):
    """Every (input, out) dtype pair, with and without accumulation, over mixed buckets; ca in float64."""
    require(backend, device)
    gen = seeded("combine-dtypes", dtype, out_dtype, accumulate)
    B = 5
    A, V = buckets(B, [1, 7, 3000, 1025, 0, 9], dtype, device, gen)
    ca = rand((B,), torch.float64, device, gen)  # any float dtype; used as fp32
    cv = rand((B,), torch.bfloat16, device, gen)
    old = [rand((a.shape[1],), out_dtype, device, gen) for a in A]
    out = [o.clone() for o in old]
    assert ops.combine(A, V, ca, cv, out, accumulate=accumulate, backend=backend) is out
    ref, scale = combine_expect(A, V, ca.float(), cv.float(), old, accumulate)
    for k, (o, r, s) in enumerate(zip(out, ref, scale)):
        assert o.dtype == out_dtype
        check_close(f"combine {backend} {dtype}->{out_dtype} acc={accumulate} bucket {k}", o, r, s, dtype, out_dtype)


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
def test_combine_noncontiguous_and_empty_batch(backend, device):
    require(backend, device)
    gen = seeded("combine-nc")
    B, P = 4, 1031
    A = rand((B, 2 * P), torch.float32, device, gen)[:, 1::2]
    V = rand((P, B), torch.bfloat16, device, gen).t().float()  # column-major
    ca, cv = rand((2 * B,), torch.float32, device, gen)[::2], rand((B,), torch.float32, device, gen)
    base = rand((2 * P,), torch.float32, device, gen)
    out = base.clone()[::2]  # a strided view: written through
    ops.combine(A, V, ca, cv, out, backend=backend)
    (ref,), (scale,) = combine_expect([A], [V], ca, cv, None, False)
    check_close(f"combine non-contiguous {backend}", out, ref, scale, torch.float32)
    # B = 0: zeros, or out left unchanged when accumulating
    E = torch.randn(0, P, device=device)
    z = torch.randn(P, device=device)
    ops.combine(E, E.clone(), torch.zeros(0, device=device), torch.zeros(0, device=device), z, backend=backend)
    assert (z == 0).all()
    kept = torch.randn(P, device=device)
    before = kept.clone()
    ops.combine(E, E.clone(), torch.zeros(0, device=device), torch.zeros(0, device=device), kept, accumulate=True,
                backend=backend)
    assert torch.equal(kept, before)


# ----------------------------------------------------------------------------------------- ghost_dots

GHOST_SHAPES = [(1, 1), (3, 127), (127, 3), (40, 33)]  # (Din, Dout)


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [0, 1, 5, 33])
@pytest.mark.parametrize("dims", GHOST_SHAPES, ids=lambda d: f"{d[0]}x{d[1]}")
def test_ghost_dots_both_forms(backend, device, dtype, T, dims):
    """Both methods against the reference and against each other (they must agree to the same tolerance)."""
    require(backend, device)
    d_in, d_out = dims
    gen = seeded("ghost", dtype, T, dims)
    B = 3
    X, Ga, Gb = (rand((B, T, d), dtype, device, gen) for d in (d_in, d_out, d_out))
    ref, scale = ghost_expect(X, Ga, Gb)
    got = {m: ops.ghost_dots(X, Ga, Gb, method=m, backend=backend) for m in ("gram", "instantiate")}
    for m, g in got.items():
        assert g.dtype == torch.float32 and g.shape == (B, 3)
        check_close(f"ghost_dots {backend} {m} {dtype} T={T} {d_in}x{d_out}", g, ref, scale, dtype)
    check_close(f"ghost_dots {backend} gram vs instantiate", got["gram"], got["instantiate"].double(), 2 * scale,
                dtype)


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
def test_ghost_dots_auto_out_noncontiguous_empty(backend, device):
    require(backend, device)
    gen = seeded("ghost-misc")
    B, T, d_in, d_out = 4, 9, 20, 6
    X = rand((B, d_in, T), torch.float32, device, gen).transpose(1, 2)  # non-contiguous [B, T, Din]
    Ga = rand((B, T, 2 * d_out), torch.float32, device, gen)[:, :, ::2]
    Gb = rand((B, T, d_out), torch.float32, device, gen)
    ref, scale = ghost_expect(X, Ga, Gb)
    out0 = rand((B, 3), torch.float32, device, gen)
    out = out0.clone()
    assert ops.ghost_dots(X, Ga, Gb, out=out, backend=backend) is out
    check_close(f"ghost_dots auto+out {backend}", out, ref + out0.double().cpu(), scale + out0.abs().cpu(),
                torch.float32)
    E = torch.randn(0, T, d_in, device=device)
    assert ops.ghost_dots(E, torch.randn(0, T, 3, device=device), torch.randn(0, T, 3, device=device),
                          backend=backend).shape == (0, 3)


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
def test_awkward_layouts_against_float64_einsum(backend, device):
    """Layouts the shape tests do not make: rows broadcast from one (stride 0), views at a storage offset, an empty
    bucket between others, a bucket of one column, P prime; ghost_dots with Din = 1, T = 2 and a transposed Gb."""
    require(backend, device)
    gen = seeded("awkward")
    B = 3
    row = rand((1, 257), torch.float32, device, gen).expand(B, 257)          # stride 0 over the batch
    big = rand((B + 1, 9001), torch.float32, device, gen)
    offset = big[1:, 5:5 + 4999]                                            # storage offset, row stride 9001
    A = [row, offset, rand((B, 0), torch.float32, device, gen), rand((B, 1), torch.float32, device, gen)]
    V = [rand((B, 257), torch.float32, device, gen), rand((B, 4999), torch.float32, device, gen).flip(1),
         rand((B, 0), torch.float32, device, gen), rand((1, 1), torch.float32, device, gen).expand(B, 1)]
    check_close(f"gram awkward {backend}", ops.gram(A, V, backend=backend), *gram_expect(A, V), torch.float32)
    ca = rand((2 * B,), torch.float32, device, gen)[1::2]
    cv = rand((1,), torch.float32, device, gen).expand(B)
    old = [rand((a.shape[1],), torch.float32, device, gen) for a in A]
    out = [o.clone() for o in old]
    ops.combine(A, V, ca, cv, out, accumulate=True, backend=backend)
    ref, scale = combine_expect(A, V, ca, cv, old, True)
    for k, (o, r, sc) in enumerate(zip(out, ref, scale)):
        check_close(f"combine awkward {backend} bucket {k}", o, r, sc, torch.float32)
    X = rand((B, 1, 1), torch.float32, device, gen).expand(B, 2, 1)        # Din = 1, the same token twice
    Ga = rand((B, 2, 300), torch.float32, device, gen)[:, :, 7:7 + 211]
    Gb = rand((B, 211, 2), torch.float32, device, gen).transpose(1, 2)
    for method in ("gram", "instantiate"):
        check_close(f"ghost_dots awkward {backend} {method}", ops.ghost_dots(X, Ga, Gb, method=method, backend=backend),
                    *ghost_expect(X, Ga, Gb), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_reference_upcast_matches_float64_einsum(dtype):
    """The pure-PyTorch reference with upcast=True (what the benchmarks and test_harmonizer_tiers take as exact)
    against the float64 einsums to float64 rounding, on buckets with empty and one-column members."""
    gen = seeded("upcast", dtype)
    B = 5
    A, V = buckets(B, [1, 0, 1031, 17], torch.float32, "cpu", gen)
    A, V = [a.to(dtype) for a in A], [v.to(dtype) for v in V]
    ref, scale = gram_expect(A, V)
    got = ops.gram_ref(A, V, upcast=True)
    assert got.dtype == torch.float64
    assert ((got - ref).abs() <= 1e-13 * scale).all(), (got - ref).abs().max()
    ca, cv = rand((B,), torch.float32, "cpu", gen).to(dtype), rand((B,), torch.float32, "cpu", gen).to(dtype)
    out = [torch.zeros(a.shape[1], dtype=torch.float64) for a in A]
    ops.combine_ref(A, V, ca, cv, out, upcast=True)
    for o, r, sc in zip(out, *combine_expect(A, V, ca, cv, None, False)):
        assert ((o - r).abs() <= 1e-13 * sc).all(), (o - r).abs().max()
    X, Ga, Gb = (rand((B, 7, d), torch.float32, "cpu", gen).to(dtype) for d in (1, 13, 13))
    ref, scale = ghost_expect(X, Ga, Gb)
    got = ops.ghost_dots_ref(X, Ga, Gb, upcast=True)
    assert ((got - ref).abs() <= 1e-13 * scale).all(), (got - ref).abs().max()


def test_use_gram_form_rule():
    assert ops.use_gram_form(4, 8, 4) and ops.use_gram_form(0, 1, 1)
    assert not ops.use_gram_form(33, 40, 33) and not ops.use_gram_form(5, 3, 1)


# ------------------------------------------------------------------------------------------ determinism

@pytest.mark.parametrize("backend,device", [c for c in CASES if c[0] != "ref"],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[0] != "ref"])
def test_repeat_calls_bitwise_equal(backend, device):
    require(backend, device)
    gen = seeded("determinism")
    A, V = buckets(8, [100003, 5, 4096], torch.bfloat16, device, gen)
    ca, cv = rand((8,), torch.float32, device, gen), rand((8,), torch.float32, device, gen)
    X, Ga, Gb = (rand((3, 37, d), torch.float32, device, gen) for d in (50, 41, 41))

    def run():
        out = [torch.zeros(a.shape[1], dtype=torch.float32, device=device) for a in A]
        ops.combine(A, V, ca, cv, out, backend=backend)
        return [ops.gram(A, V, backend=backend), *out,
                ops.ghost_dots(X, Ga, Gb, method="gram", backend=backend),
                ops.ghost_dots(X, Ga, Gb, method="instantiate", backend=backend)]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_cpu_result_independent_of_thread_count():
    """The CPU kernels split work into fixed items and reduce them in a fixed order: 1 or 2 threads, same bits."""
    require("cpu", "cpu")
    gen = seeded("threads")
    A, V = buckets(6, [200001, 3, 17000], torch.float16, "cpu", gen)
    ca, cv = rand((6,), torch.float32, "cpu", gen), rand((6,), torch.float32, "cpu", gen)
    X, Ga, Gb = (rand((2, 40, d), torch.bfloat16, "cpu", gen) for d in (64, 48, 48))
    before = torch.get_num_threads()

    def run(n):
        torch.set_num_threads(n)
        out = [torch.zeros(a.shape[1], dtype=torch.bfloat16) for a in A]
        ops.combine(A, V, ca, cv, out, backend="cpu")
        return [ops.gram(A, V, backend="cpu"), *out, ops.ghost_dots(X, Ga, Gb, method="gram", backend="cpu"),
                ops.ghost_dots(X, Ga, Gb, method="instantiate", backend="cpu")]

    try:
        one, two = run(1), run(2)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


# ------------------------------------------------------------------------------------------ dispatch

def test_dispatch_picks_and_explains(monkeypatch):
    require("cpu", "cpu")
    assert backends.backend_for("gram", "cpu", torch.float32) == "cpu"
    assert backends.backend_for("gram", "cpu", torch.float64) == "ref"  # kernels take fp32/bf16/fp16 only
    monkeypatch.setenv("HARMONY_BACKEND", "ref")
    assert backends.backend_for("combine", "cpu", torch.bfloat16) == "ref"
    monkeypatch.delenv("HARMONY_BACKEND")
    table = backends.explain()
    assert set(table) == set(backends.BACKENDS)
    assert table["ref"][0] and table["cpu"][0]
    if not HAS_GPU:
        assert not table["cuda"][0] and table["cuda"][1]  # says why


def test_info_report():
    """python -m harmony.ops.info: what was built, where the Triton kernels' package is, which backends are usable."""
    from harmony.ops import info
    text = info.report()
    print(text)
    assert "kernels    harmony.kernels at " in text and "backend  usable" in text and "automatic choice" in text


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    A = torch.randn(2, 5)
    if not HAS_GPU:
        with pytest.raises(RuntimeError, match=r"harmony.ops.gram: backend 'cuda' was forced .*CUDA tensors"):
            ops.gram(A, A, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        ops.gram(A, A, backend="bogus")
    monkeypatch.setenv("HARMONY_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="float64"):
        ops.gram(A.double(), A.double())


# -------------------------------------------------------------------------------------------- errors

def test_gram_errors():
    a, b = torch.randn(3, 5), torch.randn(3, 6)
    bad = [
        (([a], [b]), r"A\[0\] has shape \(3, 5\) but V\[0\] has \(3, 6\)"),
        (([a, torch.randn(4, 5)], [a, torch.randn(4, 5)]), r"A\[1\] has B=4 rows .* A\[0\] has B=3"),
        (([a], [a.bfloat16()]), r"V\[0\] is torch.bfloat16 but A\[0\] is torch.float32"),
        (([a], [a, a]), "A has 1 buckets but V has 2"),
        (([a], [a.to("meta")]), "V\\[0\\] is on meta"),
        (([torch.randn(5)], [torch.randn(5)]), r"must be \[B, P\]"),
        (([a.int()], [a.int()]), "dtype torch.int32 is not supported"),
    ]
    for (A, V), pattern in bad:
        with pytest.raises(ValueError, match=r"harmony.ops.gram: .*" + pattern):
            ops.gram(A, V)
    with pytest.raises(ValueError, match=r"harmony.ops.gram: out must be \[B, 3\] = \[3, 3\] float32"):
        ops.gram(a, a, out=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="out must be"):
        ops.gram(a, a, out=torch.zeros(3, 3, dtype=torch.float64))


def test_combine_errors():
    A, ca = torch.randn(3, 5), torch.randn(3)
    with pytest.raises(ValueError, match=r"harmony.ops.combine: out\[0\] must be \[P\] = \[5\]"):
        ops.combine(A, A, ca, ca, torch.zeros(6))
    with pytest.raises(ValueError, match=r"harmony.ops.combine: ca must be \[B\] = \[3\], got \(4,\)"):
        ops.combine(A, A, torch.randn(4), ca, torch.zeros(5))
    with pytest.raises(ValueError, match="cv must be a float tensor"):
        ops.combine(A, A, ca, torch.ones(3, dtype=torch.int64), torch.zeros(5))
    with pytest.raises(ValueError, match="out must be one tensor when A is one tensor"):
        ops.combine(A, A, ca, ca, [torch.zeros(5)])
    with pytest.raises(ValueError, match="out has 1 buckets but A has 2"):
        ops.combine([A, A], [A, A], ca, ca, [torch.zeros(5)])
    with pytest.raises(ValueError, match=r"out\[0\] dtype torch.int32 is not supported"):
        ops.combine(A, A, ca, ca, torch.zeros(5, dtype=torch.int32))


def test_ghost_dots_errors():
    X, G = torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match=r"harmony.ops.ghost_dots: X \(2, 4, 3\), Ga \(2, 5, 5\)"):
        ops.ghost_dots(X, torch.randn(2, 5, 5), torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="Ga and Gb must have one shape"):
        ops.ghost_dots(X, G, torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match=r"must be \[B, T, Din\]"):
        ops.ghost_dots(X[0], G, G)
    with pytest.raises(ValueError, match="Gb is torch.float16 but X is torch.float32"):
        ops.ghost_dots(X, G, G.half())
    with pytest.raises(ValueError, match="method must be one of"):
        ops.ghost_dots(X, G, G, method="fast")
    with pytest.raises(ValueError, match=r"out must be \[B, 3\] = \[2, 3\] float32"):
        ops.ghost_dots(X, G, G, out=torch.zeros(3, 3))


def test_registered_ops_check_their_inputs():
    """Direct torch.ops calls (no Python checks in front) fail in TORCH_CHECK with the op name and shapes."""
    require("cpu", "cpu")
    a = torch.randn(3, 5)
    out = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match=r"harmony::gram: A\[0\] has shape \[3, 5\] but V\[0\] has shape \[3, 6\]"):
        torch.ops.harmony.gram([a], [torch.randn(3, 6)], out)
    with pytest.raises(RuntimeError, match=r"harmony::gram: out must be \[B, 3\] = \[3, 3\] float32"):
        torch.ops.harmony.gram([a], [a], torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"harmony::combine: out\[0\] must be \[P\] = \[5\]"):
        torch.ops.harmony.combine([a], [a], torch.randn(3), torch.randn(3), [torch.zeros(4)], False)
    with pytest.raises(RuntimeError, match=r"harmony::combine: out\[0\] must be contiguous"):
        torch.ops.harmony.combine([a], [a], torch.randn(3), torch.randn(3), [torch.zeros(10)[::2]], False)
    X, G = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(RuntimeError, match='harmony::ghost_dots: method must be "gram" or "instantiate", got "fast"'):
        torch.ops.harmony.ghost_dots(X, G, G, torch.zeros(2, 3), "fast")
    with pytest.raises(RuntimeError, match=r"harmony::ghost_dots: out must be \[B, 3\] = \[2, 3\] float32"):
        torch.ops.harmony.ghost_dots(X, G, G, torch.zeros(3, 3), "gram")
    with pytest.raises(RuntimeError, match="harmony::gram: dtype Double is not supported"):
        torch.ops.harmony.gram([a.double()], [a.double()], out)


def signature(schema) -> list:
    """(name, type, written to) per argument of an op schema."""
    return [(a.name, str(a.type), bool(a.alias_info and a.alias_info.is_write)) for a in schema.arguments]


def test_one_signature_for_every_backend():
    """The C++ op and the Triton op of each op share one schema (the Triton ops register when triton loads)."""
    require("cpu", "cpu")
    ok, why, _ = backends._triton_status()
    if not ok:
        pytest.skip(f"Triton backend unavailable: {why}")
    for op in ("gram", "combine", "ghost_dots"):
        cpp = getattr(torch.ops.harmony, op).default._schema
        triton = getattr(torch.ops.harmony, f"{op}_triton").default._schema
        assert signature(cpp) == signature(triton), f"{op}: {cpp} vs {triton}"
        assert not cpp.returns and not triton.returns, f"{op}: out= ops return nothing"


# --------------------------------------------------------------------------------- opcheck, compile

def test_opcheck_cpu_ops():
    require("cpu", "cpu")
    gen = seeded("opcheck")
    A, V = buckets(3, [33, 1], torch.float32, "cpu", gen)
    torch.library.opcheck(torch.ops.harmony.gram.default, (A, V, torch.randn(3, 3, generator=gen)))
    out = [torch.zeros(33), torch.zeros(1)]
    torch.library.opcheck(torch.ops.harmony.combine.default, (A, V, torch.randn(3), torch.randn(3), out, True))
    X, Ga, Gb = (torch.randn(2, 5, d, generator=gen) for d in (4, 3, 3))
    for method in ("gram", "instantiate"):
        torch.library.opcheck(torch.ops.harmony.ghost_dots.default, (X, Ga, Gb, torch.zeros(2, 3), method))


COMPILE_CASES = [("cpu", "cpu", "aot_eager")] + ([("cuda", "cuda", "inductor"), ("triton", "cuda", "inductor")]
                                                    if HAS_GPU else [])


@pytest.mark.parametrize("backend,device,compiler", COMPILE_CASES, ids=[f"{b}-{c}" for b, _, c in COMPILE_CASES])
def test_compile_fullgraph_all_ops(backend, device, compiler):
    """gram, combine and ghost_dots inside one torch.compile(fullgraph=True) graph give the eager bits. On the CPU,
    aot_eager: AOT autograd traces the fake impls and functionalises the in-place ops without generating code,
    which keeps this quick; on a GPU, inductor (which also compiles the Triton ops' kernels into the graph). The
    Triton interpreter's compile test is in test_ops_triton.py."""
    require(backend, device)

    def harmonized_update(A, V, X, Ga, Gb, out):
        d = ops.gram(A, V, backend=backend)
        cos = d[:, 0] / (d[:, 1] * d[:, 2]).sqrt()
        ops.combine(A, V, 1.0 - cos, torch.ones_like(cos), out, backend=backend)
        return d, ops.ghost_dots(X, Ga, Gb, method="gram", backend=backend), \
            ops.ghost_dots(X, Ga, Gb, method="instantiate", backend=backend)

    gen = seeded("compile")
    A, V = buckets(4, [300, 7], torch.float32, device, gen)
    X, Ga, Gb = (rand((4, 9, d), torch.float32, device, gen) for d in (20, 6, 6))
    out_eager = [torch.zeros(300, device=device), torch.zeros(7, device=device)]
    eager = harmonized_update(A, V, X, Ga, Gb, out_eager)
    torch._dynamo.reset()
    compiled = torch.compile(harmonized_update, fullgraph=True, backend=compiler)
    out_c = [torch.zeros(300, device=device), torch.zeros(7, device=device)]
    got = compiled(A, V, X, Ga, Gb, out_c)
    assert all(torch.equal(a, b) for a, b in zip(got, eager))
    assert all(torch.equal(a, b) for a, b in zip(out_c, out_eager))
