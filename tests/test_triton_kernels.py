"""Triton kernels (kernels/, imported as harmony.kernels) against float64 references computed here, on fresh random
inputs and awkward shapes.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
with one, the same tests run compiled on CUDA tensors.

Error bounds come from one table: an output is checked against |got − exact| ≤ ACC·scale + u_out·|exact|, where
scale is the same sum taken over absolute values (the size of what fp32 accumulation may lose, ~170 fp32 roundings
of it) and u_out the unit roundoff of the output dtype (its one final rounding). Inputs of every dtype are exact
in the float64 reference, so the input dtype does not enter the bound.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from harmony import ops  # noqa: E402
from harmony.kernels._common import interpreting, usable  # noqa: E402
from harmony.kernels.combine import combine  # noqa: E402
from harmony.kernels.ghost_dots import ghost_dots  # noqa: E402
from harmony.kernels.gram import gram  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
if not usable(DEVICE)[0]:
    pytest.skip(f"Triton kernels cannot run here: {usable(DEVICE)[1]}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACC = 1e-5  # fp32 accumulation budget, relative to the absolute-value scale
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# every (B, P) but the largest product, which only costs interpreter time (B = 32 rows run through the same code)
SHAPES = [(B, P) for B in (0, 1, 3, 32) for P in (1, 7, 1023, 1025, 65537) if B * P < 32 * 65537]


def _rand(*shape, dtype, gen, device=DEVICE):
    """Standard normal values with the last index along the final dim scaled by 16, so that a lost tail element is
    far above the error bound even in long sums (16 is exact in every dtype)."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if x.shape[-1] > 1:
        x[..., -1] *= 16
    return x.to(dtype).to(device)


def _check(name, got, exact, scale, out_dtype):
    """Asserts |got − exact| ≤ ACC·scale + u_out·|exact| elementwise (all float64 on the CPU); prints the worst."""
    got, exact, scale = got.double().cpu(), exact.double().cpu(), scale.double().cpu()
    if got.numel() == 0:
        assert exact.numel() == 0
        print(f"{name}: empty")
        return
    err = (got - exact).abs()
    bound = ACC * scale + UNIT_ROUNDOFF[out_dtype] * exact.abs()
    ratio = (err / bound.clamp_min(1e-300)).max().item()
    print(f"{name}: max abs err {err.max().item():.3e}, max err/bound {ratio:.3f}")
    assert torch.isfinite(got).all(), f"{name}: non-finite output"
    assert (err <= bound).all(), f"{name}: error above bound (max ratio {ratio:.3f})"


def _gram64(As, Vs):
    """float64 [B, 3] per-row (A·V, A·A, V·V) summed over buckets, on the CPU."""
    B = As[0].shape[0]
    res = torch.zeros(B, 3, dtype=torch.float64)
    for a, v in zip(As, Vs):
        a, v = a.double().cpu(), v.double().cpu()
        res += torch.stack([(a * v).sum(1), (a * a).sum(1), (v * v).sum(1)], 1)
    return res


def _gram_case(As, Vs, gen, label):
    B = As[0].shape[0]
    out0 = _rand(B, 3, dtype=torch.float32, gen=gen)  # gram adds into out
    out = out0.clone()
    gram(As, Vs, out)
    exact = out0.double().cpu() + _gram64(As, Vs)
    scale = out0.double().cpu().abs() + _gram64([a.abs() for a in As], [v.abs() for v in Vs])
    _check(label, out, exact, scale, torch.float32)


# ---------------------------------------------------------------- gram

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,P", SHAPES)
def test_gram_one_bucket(dtype, B, P):
    gen = torch.Generator().manual_seed(1000 * B + P)
    A, V = _rand(B, P, dtype=dtype, gen=gen), _rand(B, P, dtype=dtype, gen=gen)
    _gram_case([A], [V], gen, f"gram {dtype} B={B} P={P}")


def _mixed_buckets(B, dtype, gen):
    """Tiny and big buckets, an empty one, a column slice of a wider buffer (row stride ≠ P) and a bucket whose
    base is one element off a 16-byte boundary (so both alignment variants run in one call)."""
    sizes = [1, 4096, 0, 3, 20000, 17, 1024]
    As = [_rand(B, p, dtype=dtype, gen=gen) for p in sizes]
    Vs = [_rand(B, p, dtype=dtype, gen=gen) for p in sizes]
    wide_a, wide_v = _rand(B, 3000, dtype=dtype, gen=gen), _rand(B, 3000, dtype=dtype, gen=gen)
    As.append(wide_a[:, 8:2056])   # aligned slice: offset 8 elements, row stride 3000
    Vs.append(wide_v[:, 8:2056])
    off_a, off_v = _rand(B * 1001 + 1, dtype=dtype, gen=gen), _rand(B * 1001 + 1, dtype=dtype, gen=gen)
    As.append(off_a[1:].view(B, 1001))  # base one element past the allocation's (16-byte aligned) start
    Vs.append(off_v[1:].view(B, 1001))
    return As, Vs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 4])
def test_gram_many_buckets(dtype, B):
    gen = torch.Generator().manual_seed(7 + B)
    As, Vs = _mixed_buckets(B, dtype, gen)
    _gram_case(As, Vs, gen, f"gram buckets {dtype} B={B}")


def test_gram_empty_inputs():
    out = torch.randn(4, 3, device=DEVICE)
    before = out.clone()
    gram([], [], out)
    gram([torch.empty(4, 0, device=DEVICE)], [torch.empty(4, 0, device=DEVICE)], out)
    assert torch.equal(out, before)
    empty = torch.empty(0, 3, device=DEVICE)
    gram([torch.randn(0, 9, device=DEVICE)], [torch.randn(0, 9, device=DEVICE)], empty)
    assert empty.shape == (0, 3)


# ---------------------------------------------------------------- combine

def _combine64(As, Vs, ca, cv, old=None):
    """float64 out_k = Σ_i ca_i A_k[i] + cv_i V_k[i] (+ old_k), on the CPU."""
    ca, cv = ca.double().cpu(), cv.double().cpu()
    res = [ca @ a.double().cpu() + cv @ v.double().cpu() for a, v in zip(As, Vs)]
    if old is not None:
        res = [r + o.double().cpu() for r, o in zip(res, old)]
    return res


def _combine_case(As, Vs, gen, out_dtype, accumulate, label):
    B = As[0].shape[0]
    ca, cv = _rand(B, dtype=torch.float32, gen=gen), _rand(B, dtype=torch.float32, gen=gen)
    old = [_rand(a.shape[1], dtype=out_dtype, gen=gen) for a in As]
    outs = [o.clone() for o in old]
    combine(As, Vs, ca, cv, outs, accumulate)
    exact = _combine64(As, Vs, ca, cv, old if accumulate else None)
    scale = _combine64([a.abs() for a in As], [v.abs() for v in Vs], ca.abs(), cv.abs(),
                       [o.abs() for o in old] if accumulate else None)
    for k, (o, e, s) in enumerate(zip(outs, exact, scale)):
        assert o.dtype == out_dtype and o.shape == e.shape
        _check(f"{label} bucket {k}", o, e, s, out_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,P", SHAPES)
def test_combine_one_bucket(dtype, B, P):
    gen = torch.Generator().manual_seed(2000 * B + P)
    A, V = _rand(B, P, dtype=dtype, gen=gen), _rand(B, P, dtype=dtype, gen=gen)
    _combine_case([A], [V], gen, torch.float32, False, f"combine {dtype} B={B} P={P}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_combine_many_buckets(dtype, out_dtype, accumulate):
    gen = torch.Generator().manual_seed(11)
    As, Vs = _mixed_buckets(4, dtype, gen)
    _combine_case(As, Vs, gen, out_dtype, accumulate, f"combine buckets {dtype}->{out_dtype} acc={accumulate}")


@pytest.mark.parametrize("accumulate", [False, True])
def test_combine_empty_batch(accumulate):
    """B = 0: zeros, or out unchanged when accumulating."""
    A = [torch.empty(0, n, device=DEVICE) for n in (5, 1025)]
    ca = torch.empty(0, device=DEVICE)
    outs = [torch.randn(n, device=DEVICE).to(torch.bfloat16) for n in (5, 1025)]
    before = [o.clone() for o in outs]
    combine(A, A, ca, ca, outs, accumulate)
    for o, b in zip(outs, before):
        assert torch.equal(o, b if accumulate else torch.zeros_like(b))
    combine([], [], ca, ca, [], accumulate)  # empty lists: nothing to do


# ---------------------------------------------------------------- ghost_dots

def _ghost64(X, Ga, Gb):
    """float64 [B, 3] (⟨GaᵀX, GbᵀX⟩, ‖GaᵀX‖², ‖GbᵀX‖²) by forming the per-sample gradients, on the CPU."""
    X, Ga, Gb = X.double().cpu(), Ga.double().cpu(), Gb.double().cpu()
    ga, gb = Ga.transpose(1, 2) @ X, Gb.transpose(1, 2) @ X
    return torch.stack([(ga * gb).sum((1, 2)), (ga * ga).sum((1, 2)), (gb * gb).sum((1, 2))], 1)


def _ghost_case(X, Ga, Gb, method, gen, label):
    out0 = _rand(X.shape[0], 3, dtype=torch.float32, gen=gen)
    out = out0.clone()
    ghost_dots(X, Ga, Gb, out, method)
    exact = out0.double().cpu() + _ghost64(X, Ga, Gb)
    scale = out0.double().cpu().abs() + _ghost64(X.abs(), Ga.abs(), Gb.abs())
    _check(label, out, exact, scale, torch.float32)


GHOST_DIMS = [(1, 1), (1, 64), (64, 1), (3, 17), (17, 3), (17, 64), (64, 64)]
# every dim pair in fp32; the 16-bit dtypes only change the loads, so a subset covers them
GHOST_CASES = [(dt, di, do) for dt in DTYPES for di, do in GHOST_DIMS
               if dt == torch.float32 or (di, do) in ((1, 64), (17, 3), (64, 64))]


@pytest.mark.parametrize("method", ["gram", "instantiate"])
@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("dtype,d_in,d_out", GHOST_CASES)
def test_ghost_dots(method, dtype, T, d_in, d_out):
    gen = torch.Generator().manual_seed(T * 10000 + d_in * 100 + d_out)
    B = 3
    X = _rand(B, T, d_in, dtype=dtype, gen=gen)
    Ga, Gb = _rand(B, T, d_out, dtype=dtype, gen=gen), _rand(B, T, d_out, dtype=dtype, gen=gen)
    _ghost_case(X, Ga, Gb, method, gen, f"ghost_dots {method} {dtype} T={T} Din={d_in} Dout={d_out}")


@pytest.mark.parametrize("method", ["gram", "instantiate"])
def test_ghost_dots_many_tiles_and_strides(method):
    """Several token tiles (so off-diagonal tile pairs and their factor 2 are exercised), several weight tiles
    and reduction chunks, and inputs that are transposed views (no copy is made)."""
    gen = torch.Generator().manual_seed(5)
    B, T, d_in, d_out = 2, 150, 65, 130
    X = _rand(B, d_in, T, dtype=torch.float32, gen=gen).transpose(1, 2)
    Ga = _rand(T, B, d_out, dtype=torch.float32, gen=gen).transpose(0, 1)
    Gb = _rand(B, T, d_out, dtype=torch.float32, gen=gen)
    assert not X.is_contiguous() and not Ga.is_contiguous()
    _ghost_case(X, Ga, Gb, method, gen, f"ghost_dots {method} strided B={B} T={T}")


@pytest.mark.parametrize("method", ["gram", "instantiate"])
def test_ghost_dots_empty(method):
    out = torch.randn(0, 3, device=DEVICE)
    ghost_dots(torch.randn(0, 5, 3, device=DEVICE), torch.randn(0, 5, 4, device=DEVICE),
               torch.randn(0, 5, 4, device=DEVICE), out, method)
    out = torch.randn(2, 3, device=DEVICE)
    before = out.clone()
    ghost_dots(torch.randn(2, 0, 3, device=DEVICE), torch.randn(2, 0, 4, device=DEVICE),
               torch.randn(2, 0, 4, device=DEVICE), out, method)
    assert torch.equal(out, before)


# ---------------------------------------------------------------- determinism, argument checks

def test_bitwise_deterministic():
    """Two calls on the same inputs give bitwise-equal outputs (multi-chunk rows, so stage 2 adds many partials)."""
    gen = torch.Generator().manual_seed(3)
    As, Vs = _mixed_buckets(4, torch.bfloat16, gen)
    outs = [torch.zeros(4, 3, device=DEVICE) for _ in range(2)]
    for o in outs:
        gram(As, Vs, o)
    assert torch.equal(outs[0], outs[1])
    ca, cv = _rand(4, dtype=torch.float32, gen=gen), _rand(4, dtype=torch.float32, gen=gen)
    c_outs = [[torch.zeros(a.shape[1], device=DEVICE) for a in As] for _ in range(2)]
    for o in c_outs:
        combine(As, Vs, ca, cv, o, False)
    assert all(torch.equal(a, b) for a, b in zip(*c_outs))
    X, Ga, Gb = (_rand(2, 70, d, dtype=torch.float32, gen=gen) for d in (20, 40, 40))
    for method in ("gram", "instantiate"):
        g_outs = [torch.zeros(2, 3, device=DEVICE) for _ in range(2)]
        for o in g_outs:
            ghost_dots(X, Ga, Gb, o, method)
        assert torch.equal(g_outs[0], g_outs[1])


def test_plan_reuse_with_fresh_outputs_and_coefficients():
    """Launch plans are cached by the buffers' signatures: a second call with new contents in the same buffers, a
    fresh gram out, fresh ca/cv and different combine outputs must still be exact."""
    gen = torch.Generator().manual_seed(13)
    As, Vs = _mixed_buckets(3, torch.float32, gen)
    for step in range(2):
        for a, v in zip(As, Vs):  # new values, same addresses
            a.copy_(_rand(*a.shape, dtype=a.dtype, gen=gen))
            v.copy_(_rand(*v.shape, dtype=v.dtype, gen=gen))
        _gram_case(As, Vs, gen, f"gram reuse step {step}")
        _combine_case(As, Vs, gen, torch.float32 if step == 0 else torch.bfloat16, step == 1, f"combine reuse {step}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_traced_launches_give_the_same_bits(dtype):
    """Under torch.compile, gram and combine launch once per bucket with the tensors as kernel arguments (a traced
    tensor has no address for the table). Run eagerly here, that path must give the table path's exact bits."""
    from harmony.kernels.combine import _combine_per_bucket
    from harmony.kernels.gram import _gram_per_bucket
    gen = torch.Generator().manual_seed(21)
    As, Vs = _mixed_buckets(3, dtype, gen)
    out0 = _rand(3, 3, dtype=torch.float32, gen=gen)
    table, per_bucket = out0.clone(), out0.clone()
    gram(As, Vs, table)
    _gram_per_bucket(As, Vs, per_bucket)
    assert torch.equal(table, per_bucket)
    ca, cv = _rand(3, dtype=torch.float32, gen=gen), _rand(3, dtype=torch.float32, gen=gen)
    for out_dtype, accumulate in ((torch.float32, False), (torch.bfloat16, True)):
        old = [_rand(a.shape[1], dtype=out_dtype, gen=gen) for a in As]
        table, per_bucket = [o.clone() for o in old], [o.clone() for o in old]
        combine(As, Vs, ca, cv, table, accumulate)
        _combine_per_bucket(As, Vs, ca, cv, per_bucket, accumulate)
        assert all(torch.equal(t, b) for t, b in zip(table, per_bucket))


def test_argument_errors_are_caught_before_the_launchers():
    """The launchers do not validate: harmony.ops does, once, for every backend. Bad arguments for the Triton backend
    fail there, with the public op's name, before anything is launched."""
    a = torch.randn(3, 8, device=DEVICE)
    out = torch.zeros(3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="harmony.ops.gram: A has 1 buckets but V has 0"):
        ops.gram([a], [], out=out, backend="triton")
    with pytest.raises(ValueError, match=r"harmony.ops.gram: A\[0\] has shape \(3, 8\) but V\[0\] has \(3, 9\)"):
        ops.gram([a], [torch.randn(3, 9, device=DEVICE)], out=out, backend="triton")
    with pytest.raises(ValueError, match=r"harmony.ops.gram: out must be \[B, 3\]"):
        ops.gram([a], [a], out=out.double(), backend="triton")
    with pytest.raises(ValueError, match=r"harmony.ops.gram: A\[1\] is torch.float16 but A\[0\] is torch.float32"):
        ops.gram([a, a.half()], [a, a.half()], backend="triton")
    with pytest.raises(ValueError, match=r"harmony.ops.combine: ca must be \[B\] = \[3\]"):
        ops.combine([a], [a], torch.ones(4, device=DEVICE), torch.ones(3, device=DEVICE),
                    [torch.zeros(8, device=DEVICE)], backend="triton")
    with pytest.raises(ValueError, match="harmony.ops.ghost_dots: method must be one of"):
        ops.ghost_dots(a[:, None], a[:, None], a[:, None], method="fast", backend="triton")


_COMPILE_CHECK = textwrap.dedent("""
    import re, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from harmony.kernels.combine import _combine_kernel
    from harmony.kernels.gram import _gram_kernel
    from harmony.kernels.ghost_dots import _ghost_gram_kernel, _ghost_instantiate_kernel
    from harmony.kernels._common import _reduce_partials_kernel

    def ptx(fn, sig, consts, warps=4):
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]

    vec = lambda p: len(re.findall(r"ld\\.global(\\.[a-z0-9_:]+)*\\.v4\\.b32", p))
    table = {"tab_ptr": "*i64", "chunk_bucket_ptr": "*i32"}
    # from_table: the eager launches (addresses in a table); otherwise the per-bucket launches torch.compile traces
    for aligned, from_table in ((False, True), (True, True), (False, False)):
        p = ptx(_gram_kernel, {**table, "a_ptr": "*fp32", "v_ptr": "*fp32", "ws_ptr": "*fp32", "n_chunks": "i32",
                               "ws_row": "i32"},
                dict(DTYPE=tl.float32, CHUNK=4096, BLOCK=1024, ALIGNED=aligned, FROM_TABLE=from_table))
        print("gram", aligned, from_table, vec(p)); assert (vec(p) > 0) == aligned
        p = ptx(_combine_kernel, {**table, "a_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*fp32", "ca_ptr": "*fp32",
                                  "cv_ptr": "*fp32", "B": "i32"},
                dict(IN_DTYPE=tl.bfloat16, OUT_DTYPE=tl.float32, ACCUMULATE=True, ROWS=8, BLOCK=512,
                     ALIGNED=aligned, VEC=8, FROM_TABLE=from_table))
        print("combine", aligned, from_table, vec(p)); assert (vec(p) > 0) == aligned
    ptx(_reduce_partials_kernel, {"ws_ptr": "*fp32", "out_ptr": "*fp32", "B": "i32", "N": "i32",
                                  "out_s0": "i32", "out_s1": "i32"}, dict(ROWS=1, BLOCK_N=512))
    strides = {n: "i32" for n in "sxb sxt sxd sab sat sad sbb sbt sbd".split()}
    for dt, cdt, prec in (("fp32", tl.float32, "tf32x3"), ("bf16", tl.bfloat16, "tf32")):
        io = {"x_ptr": "*" + dt, "ga_ptr": "*" + dt, "gb_ptr": "*" + dt}
        p = ptx(_ghost_gram_kernel, {**io, "pairs_ptr": "*i32", "ws_ptr": "*fp32", "T": "i32", "DIN": "i32",
                                     "DOUT": "i32", "n_pairs": "i32", **strides},
                dict(BT=64, BK=32, CDT=cdt, PREC=prec), warps=8)
        assert "mma" in p
        p = ptx(_ghost_instantiate_kernel, {**io, "ws_ptr": "*fp32", "T": "i32", "DIN": "i32", "DOUT": "i32",
                                            "n_o": "i32", "n_d": "i32", **strides},
                dict(BO=64, BI=64, BT=32, CDT=cdt, PREC=prec))
        assert "mma" in p
    print("compiled for sm_90")
""")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_sm90():
    """Without a GPU, compile every kernel for sm_90 with Triton's bundled ptxas (in a subprocess without the
    interpreter): the compiled path must build, and the aligned variants must use 16-byte loads."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="this triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    print(res.stdout)
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr.lower()):
        pytest.skip("triton's ptxas is not available: " + res.stderr.strip().splitlines()[-1])
    assert res.returncode == 0, res.stderr[-3000:]
