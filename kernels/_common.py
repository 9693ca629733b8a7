"""Pieces shared by the Triton launchers: interpreter detection (`interpreting`, `usable`), bucket pointer tables
and the fixed-order reduction of per-program partials.

The kernels/ folder has no __init__.py on purpose: it is installed as harmony.kernels (setup.py; in a checkout
harmony/kernels links to it), and as a namespace folder it can never shadow another package named ``kernels``
(PyPI's, which transformers uses) when the repository root is on sys.path (`python train.py`, pytest, setup.py):
a regular package anywhere on sys.path wins over a namespace folder. docs/KERNELS.md "The installed package name".

Launchers trust their arguments: harmony.ops validates every call once, before any backend runs
(harmony/ops/_checks.py), and harmony.ops.backends sends CUDA tensors here, or CPU tensors under the interpreter.
Every launch goes through ``torch.library.wrap_triton``, so tracing (torch.compile, make_fx) can record it; inside
the registered ops in eager mode, and always under the interpreter, that is the plain kernel.

Pointer tables (multi-bucket, one launch): a list of buckets (A_k, V_k, ... each [B, P_k] with unit column stride)
is described by an int64 table [K, F] built on the host, one row per non-empty bucket holding raw data addresses,
row strides (in elements), P_k and the bucket's first chunk; a second int32 array maps every chunk to its bucket
row. A program reads its chunk's bucket row and casts the int64 address to a typed pointer.

Launch plans (device tables, launch list) are cached by the signature of every tensor (address, dtype, shape,
strides, device), so a training loop that reuses its buffers pays the table building and the host-to-device copy
once; a hit costs about 1-2 µs of host time per tensor (the signature). A plan
stays correct after its tensors are freed: it holds numbers only and is found again only by tensors with those same
numbers.

Partials: stage-1 kernels write [B, N, 3] fp32 partial sums (one per program, no atomics); stage 2
(`reduce_partials`) adds the N partials of each row in one fixed order into out [B, 3]. Same inputs at the same
addresses therefore give bitwise-same results.
"""
from __future__ import annotations

import collections
import itertools
import os
from typing import Hashable, Sequence

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
VEC_BYTES = 16  # widest global load (ld.global.v4.b32): the alignment the ALIGNED kernel variants assume


@triton.jit(do_not_specialize=["B", "N"])
def _reduce_partials_kernel(ws_ptr, out_ptr, B, N, out_s0, out_s1,
                            ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[i, j] += Σ_n ws[i, n, j] for ws [B, N, 3] fp32, n visited in one fixed order."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    base = rows.to(tl.int64)[:, None] * N * 3
    acc0 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        m = rmask[:, None] & (n < N)[None, :]
        p = ws_ptr + base + n[None, :] * 3
        acc0 += tl.load(p, mask=m, other=0.0)
        acc1 += tl.load(p + 1, mask=m, other=0.0)
        acc2 += tl.load(p + 2, mask=m, other=0.0)
    o = out_ptr + rows.to(tl.int64) * out_s0
    tl.store(o, tl.load(o, mask=rmask) + tl.sum(acc0, 1), mask=rmask)
    tl.store(o + out_s1, tl.load(o + out_s1, mask=rmask) + tl.sum(acc1, 1), mask=rmask)
    tl.store(o + 2 * out_s1, tl.load(o + 2 * out_s1, mask=rmask) + tl.sum(acc2, 1), mask=rmask)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 x rounded to nearest-even in DTYPE. bf16 goes through the bits because the interpreter's own fp32 ->
    bf16 conversion truncates (and its "rtne" mode mis-rounds); on a GPU the bit form compiles to a few integer ops."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)  # ties to even; a carry correctly bumps the exponent
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


def interpreting() -> bool:
    """True when triton.jit hands out interpreted functions (TRITON_INTERPRET=1 was set before import)."""
    return isinstance(_reduce_partials_kernel, InterpretedFunction)


def usable(device: torch.device | str) -> tuple[bool, str]:
    """(True, how) when the Triton launchers can run on ``device``, else (False, why not)."""
    device = torch.device(device)
    if interpreting():
        if device.type == "cpu":
            return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1) on CPU tensors"
        return False, "TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only"
    if device.type != "cuda":
        hint = "" if os.environ.get("TRITON_INTERPRET") else " (set TRITON_INTERPRET=1 before importing triton)"
        return False, f"compiled Triton kernels need a CUDA device, not {device.type}{hint}"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    return True, f"triton {triton.__version__} compiled for {torch.cuda.get_device_name(device)}"


def is_aligned(t: torch.Tensor, row_stride: int) -> bool:
    """Every row of t starts on a VEC_BYTES boundary, so the kernel may promise vectorised loads."""
    es = t.element_size()
    return t.data_ptr() % VEC_BYTES == 0 and (row_stride * es) % VEC_BYTES == 0


def row_stride(t: torch.Tensor) -> int:
    """Row stride in elements. A single row is never stepped over and may report any stride: call it 0 there,
    which keeps an aligned single-row bucket on the aligned path."""
    return t.stride(0) if t.shape[0] > 1 else 0


def group_buckets(keys: Sequence[Hashable]) -> "collections.OrderedDict[Hashable, list[int]]":
    """Bucket indices grouped by key (launch variant), groups in order of first appearance."""
    groups: "collections.OrderedDict[Hashable, list[int]]" = collections.OrderedDict()
    for k, key in enumerate(keys):
        groups.setdefault(key, []).append(k)
    return groups


class LRU:
    """A small least-recently-used map (launch plans keyed by tensor signatures)."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.entries: "collections.OrderedDict[Hashable, object]" = collections.OrderedDict()

    def get(self, key):
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
        return hit

    def put(self, key, value) -> None:
        self.entries[key] = value
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def signature(t: torch.Tensor) -> tuple:
    """Everything a launch plan depends on: address, dtype, shape, strides, device index."""
    return t.data_ptr(), t.dtype, t.shape, t.stride(), t.get_device()


def bucket_table(rows: Sequence[Sequence[int]], sizes: Sequence[int], global_starts: Sequence[int],
                 chunk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Device tables for one launch over buckets k (all P_k > 0).

    rows[k]: the bucket's addresses and row strides; global_starts[k]: its first chunk among all chunks of the
    call (the workspace slot), which differs from its first chunk in this launch when buckets are split over
    launches by alignment or dtype.
    Returns (table int64 [K, len(rows[k]) + 3] = rows[k] + (P_k, first local chunk, first global chunk),
             chunk_bucket int32 [Σ_k cdiv(P_k, chunk)]: local chunk -> bucket row).
    """
    nchunks = [triton.cdiv(p, chunk) for p in sizes]
    local_starts = [0, *itertools.accumulate(nchunks)][:-1]
    table = torch.tensor([list(r) + [p, lc, gc] for r, p, lc, gc in zip(rows, sizes, local_starts, global_starts)],
                         dtype=torch.int64)
    chunk_bucket = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32),
                                           torch.tensor(nchunks, dtype=torch.int64))
    return table.to(device), chunk_bucket.to(device)


def reduce_partials(ws: torch.Tensor, out: torch.Tensor) -> None:
    """out [B, 3] fp32 += ws [B, N, 3] fp32 summed over N in a fixed order (stage 2 of every reduction)."""
    B, N, _ = ws.shape
    if B == 0:
        return
    if interpreting():  # few programs, wide blocks: the interpreter pays per program and per loop step
        rows, block_n, warps = min(64, triton.next_power_of_2(B)), min(1024, triton.next_power_of_2(max(N, 1))), 4
    else:
        rows, block_n, warps = 1, 512, 4
    wrap_triton(_reduce_partials_kernel)[(triton.cdiv(B, rows),)](ws, out, B, N, out.stride(0), out.stride(1),
                                                                  ROWS=rows, BLOCK_N=block_n, num_warps=warps)
