"""The Triton backend (harmony.kernels) on CPU tensors under TRITON_INTERPRET=1, forced with backend="triton", against
the float64 reference; plus opcheck of its ops (torch.library.triton_op), torch.compile, and the package name.
Shapes stay small: the interpreter's cost grows with programs x loop steps. (With a GPU, test_ops.py runs the
compiled kernels on CUDA tensors instead.) Tolerances come from op_reference.TOL.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harmony import ops

from harmony.ops import backends
from op_reference import DTYPES, buckets, check_close, combine_expect, ghost_expect, gram_expect, rand, seeded

TRITON = "triton"


@pytest.fixture(autouse=True)
def _interpreter():
    ok, why, interpreting = backends._triton_status()
    if not ok:
        pytest.skip(f"Triton backend unavailable: {why}")
    if not interpreting:
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported (tests/conftest.py sets it when "
                    "there is no GPU); compiled Triton is tested on CUDA tensors in test_ops.py")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,P", [(0, 7), (1, 1), (3, 7), (3, 1023), (2, 1025), (1, 65537)])
def test_gram_triton_interpreter(dtype, B, P):
    gen = seeded("tgram", dtype, B, P)
    A, V = rand((B, P), dtype, "cpu", gen), rand((B, P), dtype, "cpu", gen)
    got = ops.gram(A, V, backend=TRITON)
    check_close(f"gram triton {dtype} B={B} P={P}", got, *gram_expect([A], [V]), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_triton_buckets_out_noncontiguous(dtype):
    gen = seeded("tgram-buckets", dtype)
    B = 3
    A, V = buckets(B, [1, 3000, 7, 0, 1025], dtype, "cpu", gen)
    A.append(rand((B, 2 * 33), dtype, "cpu", gen)[:, ::2])
    V.append(rand((33, B), dtype, "cpu", gen).t())
    ref, scale = gram_expect(A, V)
    out0 = rand((B, 3), torch.float32, "cpu", gen)
    out = out0.clone()
    assert ops.gram(A, V, out=out, backend=TRITON) is out
    check_close(f"gram triton buckets {dtype}", out, ref + out0.double(), scale + out0.abs(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("accumulate", [False, True])
def test_combine_triton_interpreter(dtype, out_dtype, accumulate):
    gen = seeded("tcombine", dtype, out_dtype, accumulate)
    B = 3
    A, V = buckets(B, [1, 1025, 7, 0, 200], dtype, "cpu", gen)
    ca, cv = rand((B,), torch.float64, "cpu", gen), rand((B,), torch.float16, "cpu", gen)
    old = [rand((a.shape[1],), out_dtype, "cpu", gen) for a in A]
    out = [o.clone() for o in old]
    ops.combine(A, V, ca, cv, out, accumulate=accumulate, backend=TRITON)
    ref, scale = combine_expect(A, V, ca.float(), cv.float(), old, accumulate)
    for k, (o, r, s) in enumerate(zip(out, ref, scale)):
        check_close(f"combine triton {dtype}->{out_dtype} acc={accumulate} bucket {k}", o, r, s, dtype, out_dtype)


def test_combine_triton_empty_batch_and_strided_out():
    E = torch.randn(0, 9)
    z = torch.randn(9)
    ops.combine(E, E.clone(), torch.zeros(0), torch.zeros(0), z, backend=TRITON)
    assert (z == 0).all()
    gen = seeded("tcombine-nc")
    A, V = rand((4, 30), torch.float32, "cpu", gen), rand((4, 30), torch.float32, "cpu", gen)
    ca, cv = rand((4,), torch.float32, "cpu", gen), rand((4,), torch.float32, "cpu", gen)
    out = torch.zeros(60)[::2]
    ops.combine(A, V, ca, cv, out, backend=TRITON)
    (ref,), (scale,) = combine_expect([A], [V], ca, cv, None, False)
    check_close("combine triton strided out", out, ref, scale, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [0, 1, 5, 33])
@pytest.mark.parametrize("dims", [(1, 1), (3, 127), (40, 33)], ids=lambda d: f"{d[0]}x{d[1]}")
def test_ghost_dots_triton_interpreter(dtype, T, dims):
    gen = seeded("tghost", dtype, T, dims)
    X, Ga, Gb = (rand((2, T, d), dtype, "cpu", gen) for d in (dims[0], dims[1], dims[1]))
    ref, scale = ghost_expect(X, Ga, Gb)
    got = {m: ops.ghost_dots(X, Ga, Gb, method=m, backend=TRITON) for m in ("gram", "instantiate")}
    for m, g in got.items():
        check_close(f"ghost_dots triton {m} {dtype} T={T} {dims[0]}x{dims[1]}", g, ref, scale, dtype)


def test_triton_repeat_calls_bitwise_equal():
    gen = seeded("tdet")
    A, V = buckets(2, [5000, 3], torch.bfloat16, "cpu", gen)
    X, Ga, Gb = (rand((2, 20, d), torch.float32, "cpu", gen) for d in (17, 9, 9))
    ca, cv = torch.randn(2, generator=gen), torch.randn(2, generator=gen)

    def run():
        out = [torch.zeros(a.shape[1]) for a in A]
        ops.combine(A, V, ca, cv, out, backend=TRITON)
        return [ops.gram(A, V, backend=TRITON), *out, ops.ghost_dots(X, Ga, Gb, method="gram", backend=TRITON)]

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


def test_triton_not_picked_automatically_on_cpu():
    assert backends.backend_for("gram", "cpu", torch.float32) != TRITON


def test_opcheck_triton_ops():
    """The Triton ops are triton_ops with the C++ ops' schemas. Under the interpreter they are registered opaque
    (harmony/ops/_triton.py), so every opcheck test applies, AOT dispatch included."""
    gen = seeded("topcheck")
    A, V = buckets(2, [40, 3], torch.float32, "cpu", gen)
    torch.library.opcheck(torch.ops.harmony.gram_triton.default, (A, V, torch.zeros(2, 3)))
    out = [torch.zeros(40), torch.zeros(3)]
    torch.library.opcheck(torch.ops.harmony.combine_triton.default, (A, V, torch.randn(2), torch.randn(2), out, True))
    X, Ga, Gb = (torch.randn(2, 5, d, generator=gen) for d in (4, 3, 3))
    for method in ("gram", "instantiate"):
        torch.library.opcheck(torch.ops.harmony.ghost_dots_triton.default, (X, Ga, Gb, torch.zeros(2, 3), method))


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compile_fullgraph_triton_interpreter(compiler):
    """All three Triton ops in one torch.compile(fullgraph=True) graph on CPU tensors give the eager bits. Dynamo
    ("eager") and AOT autograd ("aot_eager": fakes, functionalisation) are what the interpreter can reach; inductor
    would compile the kernels for a GPU (test_ops.py runs it there)."""
    gen = seeded("tcompile")
    A, V = buckets(3, [300, 7], torch.float32, "cpu", gen)
    X, Ga, Gb = (rand((3, 9, d), torch.float32, "cpu", gen) for d in (20, 6, 6))

    def update(A, V, X, Ga, Gb, out):
        d = ops.gram(A, V, backend=TRITON)
        ops.combine(A, V, d[:, 0], d[:, 1], out, backend=TRITON)
        return d, ops.ghost_dots(X, Ga, Gb, method="gram", backend=TRITON), \
            ops.ghost_dots(X, Ga, Gb, method="instantiate", backend=TRITON)

    out_eager = [torch.zeros(300), torch.zeros(7)]
    eager = update(A, V, X, Ga, Gb, out_eager)
    torch._dynamo.reset()
    out_c = [torch.zeros(300), torch.zeros(7)]
    got = torch.compile(update, fullgraph=True, backend=compiler)(A, V, X, Ga, Gb, out_c)
    assert all(torch.equal(a, b) for a, b in zip(got, eager))
    assert all(torch.equal(a, b) for a, b in zip(out_c, out_eager))


_AOT_TRACE = textwrap.dedent("""
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._subclasses.fake_tensor import FakeTensorMode
    from harmony import ops
    from harmony.ops import backends
    ok, why, interpreting = backends._triton_status()
    assert ok and not interpreting, why
    graphs = []
    def capture(gm, inputs):
        graphs.append(gm.code)
        return gm
    with FakeTensorMode():  # CUDA tensors without a GPU: shapes only, nothing runs
        X, Ga, Gb = (torch.empty(2, 9, d, device="cuda") for d in (20, 6, 6))
        A, V = ([torch.empty(2, p, device="cuda") for p in (300, 7)] for _ in range(2))
        ca, cv = torch.empty(2, device="cuda"), torch.empty(2, device="cuda")
        outs = [torch.empty(300, device="cuda"), torch.empty(7, device="cuda", dtype=torch.bfloat16)]
    calls = {
        "ghost_dots": lambda: ops.ghost_dots(X, Ga, Gb, method="gram", backend="triton"),
        "gram": lambda: ops.gram(A, V, backend="triton"),
        "combine": lambda: ops.combine(A, V, ca, cv, outs, backend="triton"),
    }
    for name, call in calls.items():
        torch._dynamo.reset()
        try:
            torch.compile(call, backend=aot_autograd(fw_compiler=capture), fullgraph=True)()
        except Exception:  # running the captured graph needs a GPU
            pass
        graph = graphs[-1]
        kernels = graph.count("triton_kernel_wrapper_functional(")
        assert kernels >= 2 and f"harmony.{name}_triton" not in graph, graph
        print(name, "->", kernels, "Triton kernel nodes")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, test_ops.py compiles the ops with inductor")
def test_compiled_triton_ops_decompose_under_aot_autograd():
    """Without the interpreter, AOT autograd (torch.compile's step before inductor) traces each Triton op's body into
    its Triton kernels (wrap_triton nodes, one launch per bucket for gram and combine) instead of keeping an opaque
    op. Checked on fake CUDA tensors in a subprocess, so no GPU is needed: the graphs are captured, not run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _AOT_TRACE], env=env, capture_output=True, text=True, timeout=300)
    print(res.stdout)
    assert res.returncode == 0, res.stderr[-3000:]


def test_another_kernels_package_coexists(tmp_path):
    """harmony's Triton kernels are harmony.kernels, and the repository's kernels/ folder (no __init__.py) never
    shadows another top-level ``kernels`` (PyPI's, which transformers uses), even with the repository root first on
    sys.path, as under pytest or `python train.py`. harmony itself never imports a top-level ``kernels``."""
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("WHOSE = 'another project'\n")
    repo = Path(__file__).resolve().parents[1]
    code = textwrap.dedent("""
        import sys, torch
        from harmony import ops
        A = torch.randn(2, 40)
        torch.testing.assert_close(ops.gram(A, A, backend="triton"), ops.gram(A, A, backend="ref"))
        assert "kernels" not in sys.modules, "harmony imported a top-level kernels"
        import harmony.kernels.gram, kernels
        assert kernels.WHOSE == "another project", kernels
        print("harmony.kernels:", list(harmony.kernels.__path__), "| kernels:", kernels.__file__)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(repo), str(tmp_path / "site"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=repo)
    print(res.stdout)
    assert res.returncode == 0, res.stderr[-3000:]
