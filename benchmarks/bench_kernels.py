"""Kernel benchmark (results: benchmarks/RESULTS.md): gram, combine and ghost_dots on every usable backend, against
the straightforward torch-ops composition and a plain copy of the same bytes measured in the same run.

    python benchmarks/bench_kernels.py                       # CPU here: B=32, P in {1M, 4M}, fp32 + bf16
    python benchmarks/bench_kernels.py --device cuda         # GPU defaults: P in {4M, 16M, 64M}
    python benchmarks/bench_kernels.py --sizes 16M --dtypes bf16 --ops gram,combine --csv out.csv

Every kernel result is validated against a float64 computation before it is timed. Times are medians over repeats
after warm-up. Columns: GB/s counts the bytes an op must move (gram: read A and V; combine: read A and V, write
out); "% of copy" compares it with dst.copy_(src) moving the same number of bytes (read + write counted; CPU:
torch's copy on all threads, GPU: device-to-device), timed in rounds alternating with the op so that both see
the same machine load (the median of the per-round ratios); "vs torch" is the torch composition's time over
this row's (> 1: faster). ghost_dots rows report GFLOP/s for the nominal flops of the cheaper form
(use_gram_form), the same count for every row of a shape, so the rates compare times. Rows are appended to
--csv with the device name, date and git commit.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (append_csv, copy_buffers, device_name, format_table, interleaved_ms, median_ms,  # noqa: E402
                    sync)

from harmony import ops  # noqa: E402

from harmony.ops import backends

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACC_RTOL = 1e-5  # fp32 accumulation, relative to the magnitude scale (as in tests/test_ops.py)
OUT_ROUND = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
COLUMNS = ("op", "shape", "dtype", "backend", "ms", "rate", "unit", "pct_copy", "vs_torch")
# (B, T, Din, Dout) layer shapes
GHOST_SHAPES = {"cpu": [(32, 65, 64, 256), (8, 197, 768, 768), (4, 512, 64, 192)],
                "cuda": [(32, 197, 768, 768), (32, 197, 768, 3072), (16, 1024, 64, 256), (64, 16, 512, 512)]}
DEFAULT_SIZES = {"cpu": "1M,4M", "cuda": "4M,16M,64M"}


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s[:-1]) * mult) if s[-1:] in "KMG" else int(s)


def label(p: int) -> str:
    for unit, m in (("M", 1 << 20), ("K", 1 << 10)):
        if p % m == 0:
            return f"{p // m}{unit}"
    return str(p)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float = 2.0) -> float:
    """Median ms of a warm fn; fewer repeats (at least 3) for calls so slow that ``repeats`` would exceed the
    budget."""
    first = median_ms(fn, device, warmup=0, repeats=1)
    n = max(3, min(repeats, int(budget_s * 1e3 / max(first, 1e-3))))
    return median_ms(fn, device, warmup=0, repeats=n)


def kernel_backends(device: torch.device, dtype: torch.dtype) -> List[str]:
    """Usable kernel backends for these tensors (ref is the torch composition's row)."""
    return [b for b in ("cuda", "triton", "cpu") if backends._can_run(b, device.type, dtype, forced=True)[0]]


# ---------------------------------------------------------------------------------------------- validation

def check(name: str, got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, out_dtype=torch.float32) -> None:
    err = (got.double() - ref).abs()
    allowed = ACC_RTOL * scale + OUT_ROUND[out_dtype] * ref.abs() + 1e-30
    if not bool((err <= allowed).all()):
        raise AssertionError(f"{name}: result differs from the float64 reference (max err/allowed "
                             f"{(err / allowed).max().item():.3g}); not timing a wrong kernel")


def check_gram(name: str, got: torch.Tensor, As: List[torch.Tensor], Vs: List[torch.Tensor]) -> None:
    """Row by row in float64, so the check never needs a float64 copy of the whole buffers."""
    B = got.shape[0]
    ref = torch.zeros(B, 3, dtype=torch.float64, device=got.device)
    scale = torch.zeros_like(ref)
    for a, v in zip(As, Vs):
        for i in range(B):
            x, y = a[i].double(), v[i].double()
            ref[i] += torch.stack([x @ y, x @ x, y @ y])
            scale[i] += torch.stack([x.abs() @ y.abs(), x @ x, y @ y])
    check(name, got, ref, scale)


def check_combine(name: str, outs: List[torch.Tensor], As, Vs, ca, cv) -> None:
    for k, (o, a, v) in enumerate(zip(outs, As, Vs)):
        ref = torch.zeros(a.shape[1], dtype=torch.float64, device=o.device)
        scale = torch.zeros_like(ref)
        for i in range(a.shape[0]):
            x, y = a[i].double(), v[i].double()
            ref += float(ca[i]) * x + float(cv[i]) * y
            scale += abs(float(ca[i])) * x.abs() + abs(float(cv[i])) * y.abs()
        check(f"{name} bucket {k}", o, ref, scale, o.dtype)


# -------------------------------------------------------------------------------------------- benchmarks

def torch_gram(As, Vs):
    """The straightforward composition, fp32."""
    res = 0
    for a, v in zip(As, Vs):
        a, v = a.float(), v.float()
        res = res + torch.stack([(a * v).sum(1), (a * a).sum(1), (v * v).sum(1)], 1)
    return res


def torch_combine(As, Vs, ca, cv, outs):
    for a, v, o in zip(As, Vs, outs):
        o.copy_(ca @ a.float() + cv @ v.float())


def bench_buffers(op: str, sizes: List[int], tag: str, B: int, dtype: torch.dtype, device: torch.device,
                  repeats: int) -> List[Dict[str, object]]:
    """gram or combine over buckets of the given sizes; one row per backend plus the torch composition."""
    gen = torch.Generator(device=device).manual_seed(0)
    As = [torch.randn(B, p, device=device, generator=gen).to(dtype) for p in sizes]
    Vs = [torch.randn(B, p, device=device, generator=gen).to(dtype) for p in sizes]
    ca, cv = torch.randn(B, device=device, generator=gen), torch.randn(B, device=device, generator=gen)
    outs = [torch.empty(p, dtype=dtype, device=device) for p in sizes]
    es, P = As[0].element_size(), sum(sizes)
    nbytes = 2 * B * P * es + (P * es if op == "combine" else 0)
    dst, src = copy_buffers(nbytes // 2, device)  # read + write = the op's bytes
    copy_fn = lambda: dst.copy_(src)  # noqa: E731

    def run(backend: str) -> Callable[[], object]:
        if op == "gram":
            return (lambda: torch_gram(As, Vs)) if backend == "torch" else (lambda: ops.gram(As, Vs, backend=backend))
        if backend == "torch":
            return lambda: torch_combine(As, Vs, ca, cv, outs)
        return lambda: ops.combine(As, Vs, ca, cv, outs, backend=backend)

    rows = []
    for backend in kernel_backends(device, dtype) + ["torch"]:
        name = f"{op} {backend} {dtype} {tag}"
        t0 = time.perf_counter()
        res = run(backend)()  # the warm-up call, also validated
        sync(device)
        first_ms = (time.perf_counter() - t0) * 1e3
        if backend == "torch":
            pass  # the baseline itself: plain torch ops, not validated (the reference would be the same ops)
        elif op == "gram":
            check_gram(name, res, As, Vs)
        else:
            check_combine(name, outs, As, Vs, ca, cv)
        ms, copy_ms, ratio = interleaved_ms(run(backend), copy_fn, device, repeats, first_ms=first_ms)
        rows.append(dict(bench="kernels", op=op, shape=tag, dtype=str(dtype).replace("torch.", ""), backend=backend,
                         ms=ms, rate=nbytes / (ms * 1e-3) / 1e9, unit="GB/s", pct_copy=100 * ratio,
                         copy_gbps=nbytes / (copy_ms * 1e-3) / 1e9))
    torch_ms = rows[-1]["ms"]
    for r in rows:
        r["vs_torch"] = torch_ms / r["ms"]
    return rows


def ghost_flops(B: int, T: int, d_in: int, d_out: int) -> float:
    """Nominal flops of the cheaper form (full matrices, no symmetry savings)."""
    if ops.use_gram_form(T, d_in, d_out):
        return B * (2.0 * T * T * (d_in + 3 * d_out) + 6.0 * T * T)
    return B * (4.0 * T * d_in * d_out + 6.0 * d_in * d_out)


def bench_ghost(shape, dtype: torch.dtype, device: torch.device, repeats: int) -> List[Dict[str, object]]:
    B, T, d_in, d_out = shape
    gen = torch.Generator(device=device).manual_seed(1)
    X = torch.randn(B, T, d_in, device=device, generator=gen).to(dtype)
    Ga, Gb = (torch.randn(B, T, d_out, device=device, generator=gen).to(dtype) for _ in range(2))
    ref = ops.ghost_dots_ref(X, Ga, Gb, upcast=True)
    scale = ops.ghost_dots_ref(X.abs(), Ga.abs(), Gb.abs(), upcast=True)
    flops = ghost_flops(B, T, d_in, d_out)
    auto = "gram" if ops.use_gram_form(T, d_in, d_out) else "instantiate"
    tag = f"{B}x{T}x{d_in}->{d_out}"
    rows = []
    variants = [(b, m) for b in kernel_backends(device, dtype) for m in ("gram", "instantiate")] + [("torch", "bmm")]
    for backend, method in variants:
        if backend == "torch":
            fn = lambda: ops.ghost_dots_ref(X, Ga, Gb)  # noqa: E731  (bmm forms Ga_iᵀX_i in memory)
        else:
            fn = lambda b=backend, m=method: ops.ghost_dots(X, Ga, Gb, method=m, backend=b)  # noqa: E731
        check(f"ghost_dots {backend}/{method} {tag}", fn(), ref, scale)
        ms = timed(fn, device, repeats)
        mark = "*" if method == auto else ""
        rows.append(dict(bench="kernels", op="ghost_dots", shape=tag, dtype=str(dtype).replace("torch.", ""),
                         backend=f"{backend}/{method}{mark}", ms=ms, rate=flops / (ms * 1e-3) / 1e9, unit="GFLOP/s",
                         pct_copy="", notes=f"auto picks {auto}"))
    torch_ms = rows[-1]["ms"]
    for r in rows:
        r["vs_torch"] = torch_ms / r["ms"]
    return rows


def bucket_mix(P: int) -> List[int]:
    """A bucket list summing to about P (the smallest size asked for): halving large buckets plus 60 small ones
    (1 .. 4099 elements), as a model's parameter groups give."""
    large, p = [], P // 2
    while p >= 1 << 16:
        large.append(p)
        p //= 2
    small = [1 + (k * 997) % 4099 for k in range(60)]
    return large + small


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--sizes", default=None, help="P values, e.g. 1M,4M,16M (default per device)")
    ap.add_argument("--B", type=int, default=32, help="rows (per-sample gradients) per buffer")
    ap.add_argument("--dtypes", default="fp32,bf16", help="of fp32,bf16,fp16")
    ap.add_argument("--ops", default="gram,combine,ghost_dots")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-buckets", action="store_true", help="skip the multi-bucket rows")
    ap.add_argument("--csv", default=str(Path(__file__).resolve().parent / "results.csv"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    sizes = [parse_size(s) for s in (args.sizes or DEFAULT_SIZES[device.type]).split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    wanted = args.ops.split(",")
    print(f"device: {device_name(device)}; torch threads {torch.get_num_threads()}; B={args.B}")
    print("backends: " + "; ".join(f"{k}: {'yes' if ok else 'no'} ({why})" for k, (ok, why) in
                                   backends.explain().items()))
    rows: List[Dict[str, object]] = []
    for dtype in dtypes:
        cases = [([p], f"{args.B}x{label(p)}") for p in sizes]
        if not args.no_buckets:
            mix = bucket_mix(min(sizes))
            cases.append((mix, f"{args.B}x{label(sum(mix))}~/{len(mix)} buckets"))
        for bucket_sizes, tag in cases:
            for op in ("gram", "combine"):
                if op in wanted:
                    rows += bench_buffers(op, bucket_sizes, tag, args.B, dtype, device, args.repeats)
                    print(format_table(rows[-(len(kernel_backends(device, dtype)) + 1):], COLUMNS + ("copy_gbps",)),
                          flush=True)
        if "ghost_dots" in wanted:
            for shape in GHOST_SHAPES[device.type]:
                rows += bench_ghost(shape, dtype, device, args.repeats)
    print()
    print(f"device: {device_name(device)}")
    print(format_table(rows, COLUMNS))
    append_csv(args.csv, rows, device)
    print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
