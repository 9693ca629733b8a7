"""combine in Triton: weighted sum of per-sample gradient rows into flat gradient buffers
(docs/KERNELS.md; where they are used: docs/HARMONIZER.md "3. The measurement tiers").

For buckets A_k, V_k [B, P_k] (one dtype: fp32, bf16 or fp16), coefficients ca, cv [B] fp32 and outputs
out_k [P_k] (fp32, bf16 or fp16, may differ from A's dtype):
    out_k = Σ_i ca_i·A_k[i] + cv_i·V_k[i]          (+ the old out_k when accumulate)
accumulated in fp32 and rounded once, at the store. B = 0 writes zeros (leaves out unchanged when accumulate).

Layout. Every bucket is cut into column blocks of BLOCK; one program owns one column block of one bucket and walks
all B rows, ROWS at a time, keeping a [ROWS, BLOCK] fp32 accumulator that it reduces over rows at the end. Each
output element is therefore produced by exactly one program, in a fixed order: no workspace, no atomics, and the
same inputs at the same addresses give bitwise-same output. (Parallelism is Σ_k P_k / BLOCK programs; a tiny P with
a huge B would want a split over rows with a second stage, which this kernel does not do.)

Multi-bucket. One launch per (output dtype, alignment class), whatever the number of buckets: a host-built int64
table holds, per bucket, the addresses of A_k, V_k and out_k, the row strides of A_k and V_k, P_k and its first
column block; an int32 array maps each block to its table row; the kernel casts the addresses to typed pointers.
Works compiled and under TRITON_INTERPRET=1 (host addresses: CPU tensors there). Launch plans are cached by the
signatures of A, V and out (not of ca and cv, which may change every step); see _common.

Traced launches. Under torch.compile the tensors have no address, so the launcher (`_combine_per_bucket`) launches
the same kernel once per bucket with A_k, V_k and out_k as arguments (FROM_TABLE=False): the same blocks, the same
bits.

Alignment. Buckets whose A_k, V_k rows and out_k start on 16-byte boundaries take the ALIGNED variant
(`tl.multiple_of` hints, 16-byte vector loads and stores on full blocks); the rest run the same code unhinted.
Block sizes come from `_config` (fixed, no autotuning: it would re-run an accumulating kernel and change the
summation order between runs).

Requirements (not checked here: harmony.ops validates every call before it reaches a backend): A_k, V_k 2-D with
unit column stride (any row stride), same shape per k; out_k 1-D contiguous [P_k]; ca, cv [B] float32 with unit
stride; all on one device (CUDA compiled, CPU under the interpreter).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import triton
import triton.language as tl

from harmony.nvtx import nvtx_range
from torch.library import wrap_triton

from ._common import (LRU, TL_DTYPE, VEC_BYTES, bucket_table, group_buckets, interpreting, is_aligned, round_to,
                      row_stride, signature)

Buffers = Union[torch.Tensor, Sequence[torch.Tensor]]


@triton.jit
def _weighted_rows(a, v, a_rs, v_rs, ca_ptr, cv_ptr, B, cols, P,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """[BLOCK] fp32 Σ_i ca_i·a[i, cols] + cv_i·v[i, cols] over all B rows, ROWS at a time.
    FULL: every column lies inside P, so no column mask and aligned loads can vectorise."""
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for r0 in range(0, B, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < B
        wa = tl.load(ca_ptr + rows, mask=rmask, other=0.0)
        wv = tl.load(cv_ptr + rows, mask=rmask, other=0.0)
        r64 = rows.to(tl.int64)[:, None]
        if FULL:
            m = rmask[:, None]
        else:
            m = rmask[:, None] & (cols < P)[None, :]
        x = tl.load(a + r64 * a_rs + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(v + r64 * v_rs + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += wa[:, None] * x + wv[:, None] * y
    return tl.sum(acc, 0)


@triton.jit(do_not_specialize=["B"])  # the batch size must not trigger recompiles
def _combine_kernel(tab_ptr, chunk_bucket_ptr, a_ptr, v_ptr, o_ptr, ca_ptr, cv_ptr, B,
                    IN_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, ACCUMULATE: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
                    FROM_TABLE: tl.constexpr):
    """out[cols] (+)= Σ_i ca_i·a[i, cols] + cv_i·v[i, cols] for one BLOCK of columns of one bucket.
    FROM_TABLE: the buckets' addresses come from the table (eager: one launch, many buckets); else the launch is
    for one bucket, passed as a_ptr, v_ptr, o_ptr (traced launches: a traced tensor has no address)."""
    chunk = tl.program_id(0)
    # table row (8 int64): a_addr, v_addr, out_addr, a_row_stride, v_row_stride, P, first local block, (unused)
    entry = tab_ptr + tl.load(chunk_bucket_ptr + chunk).to(tl.int64) * 8
    if FROM_TABLE:
        a = tl.load(entry).to(tl.pointer_type(IN_DTYPE))
        v = tl.load(entry + 1).to(tl.pointer_type(IN_DTYPE))
        o = tl.load(entry + 2).to(tl.pointer_type(OUT_DTYPE))
    else:
        a = a_ptr
        v = v_ptr
        o = o_ptr
    a_rs = tl.load(entry + 3)
    v_rs = tl.load(entry + 4)
    P = tl.load(entry + 5)
    start = (chunk - tl.load(entry + 6)) * BLOCK
    if ALIGNED:  # promised by the host: every row and out start on 16-byte boundaries
        a = tl.multiple_of(a, 16)
        v = tl.multiple_of(v, 16)
        o = tl.multiple_of(o, 16)
        a_rs = tl.multiple_of(a_rs, VEC)
        v_rs = tl.multiple_of(v_rs, VEC)
    cols = start + tl.arange(0, BLOCK)
    if start + BLOCK <= P:
        res = _weighted_rows(a, v, a_rs, v_rs, ca_ptr, cv_ptr, B, cols, P, ROWS, BLOCK, True)
        if ACCUMULATE:
            res += tl.load(o + cols).to(tl.float32)
        tl.store(o + cols, round_to(res, OUT_DTYPE))
    else:  # the bucket's last, partial block
        res = _weighted_rows(a, v, a_rs, v_rs, ca_ptr, cv_ptr, B, cols, P, ROWS, BLOCK, False)
        if ACCUMULATE:
            res += tl.load(o + cols, mask=cols < P, other=0.0).to(tl.float32)
        tl.store(o + cols, round_to(res, OUT_DTYPE), mask=cols < P)


def _config(B: int, p_max: int) -> dict:
    """Block sizes. GPU: 512 columns x 8 rows a step with 4 warps (32 elements a thread per buffer, 16-byte
    vectors in fp32) so enough loads are in flight. Interpreter: wide tiles, few programs, few loop steps."""
    if interpreting():
        rows = min(64, max(1, triton.next_power_of_2(max(B, 1))))
        block = min(1 << 13, max(16, triton.next_power_of_2(p_max)), max(16, (1 << 17) // rows))
        return dict(ROWS=rows, BLOCK=block, num_warps=4)
    return dict(ROWS=8, BLOCK=512, num_warps=4)


def _as_list(x: Buffers) -> list:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _consts(In: torch.Tensor, out_dtype: torch.dtype, cfg: dict, aligned: bool) -> dict:
    return dict(IN_DTYPE=TL_DTYPE[In.dtype], OUT_DTYPE=TL_DTYPE[out_dtype], ROWS=cfg["ROWS"], BLOCK=cfg["BLOCK"],
                ALIGNED=aligned, VEC=VEC_BYTES // In.element_size(), num_warps=cfg["num_warps"])


def _plan(As: list, Vs: list, ca: torch.Tensor, cv: torch.Tensor, outs: list) -> tuple:
    """Launch plan: (B, [(table, chunk_bucket, kernel constants)]); no launches when every bucket is empty."""
    B = ca.shape[0]
    live = [k for k in range(len(As)) if As[k].shape[1] > 0]
    if not live:
        return B, []
    cfg = _config(B, max(As[k].shape[1] for k in live))
    keys = []
    for k in live:
        aligned = (is_aligned(As[k], row_stride(As[k])) and is_aligned(Vs[k], row_stride(Vs[k]))
                   and outs[k].data_ptr() % VEC_BYTES == 0)
        keys.append((outs[k].dtype, aligned))
    launches = []
    for (out_dtype, aligned), members in group_buckets(keys).items():
        ks = [live[j] for j in members]
        rows = [[As[k].data_ptr(), Vs[k].data_ptr(), outs[k].data_ptr(), row_stride(As[k]), row_stride(Vs[k])]
                for k in ks]
        # the table's workspace-slot column is unused here: combine needs no workspace
        table, chunk_bucket = bucket_table(rows, [As[k].shape[1] for k in ks], [0] * len(ks), cfg["BLOCK"],
                                           ca.device)
        launches.append((table, chunk_bucket, _consts(As[ks[0]], out_dtype, cfg, aligned)))
    return B, launches


_PLANS = LRU()


def _combine_per_bucket(As: list, Vs: list, ca: torch.Tensor, cv: torch.Tensor, outs: list, accumulate: bool) -> None:
    """combine with one launch per bucket, its tensors passed as kernel arguments: what torch.compile traces (the
    table of addresses cannot be built from traced tensors). Same blocks and the same per-element arithmetic as
    the table path, so the same bits."""
    B = ca.shape[0]
    live = [k for k in range(len(As)) if As[k].shape[1] > 0]
    if not live:
        return
    cfg = _config(B, max(As[k].shape[1] for k in live))
    for k in live:
        n = triton.cdiv(As[k].shape[1], cfg["BLOCK"])
        # one table row, addresses unused: (0, 0, 0, a_row_stride, v_row_stride, P, first local block, unused)
        table = torch.tensor([[0, 0, 0, row_stride(As[k]), row_stride(Vs[k]), As[k].shape[1], 0, 0]],
                             dtype=torch.int64, device=ca.device)
        chunk_bucket = torch.zeros(n, dtype=torch.int32, device=ca.device)
        wrap_triton(_combine_kernel)[(n,)](table, chunk_bucket, As[k], Vs[k], outs[k], ca, cv, B,
                                           ACCUMULATE=bool(accumulate), FROM_TABLE=False,
                                           **_consts(As[k], outs[k].dtype, cfg, False))


def combine(A: Buffers, V: Buffers, ca: torch.Tensor, cv: torch.Tensor, out: Buffers, accumulate: bool) -> None:
    """out_k (+)= Σ_i ca_i·A_k[i] + cv_i·V_k[i] for buckets A_k, V_k [B, P_k] into out_k [P_k], fp32 accumulation.

    A, V and out are lists of buckets (a single tensor each is taken as one bucket).
    """
    with nvtx_range("combine"):
        As, Vs, outs = _as_list(A), _as_list(V), _as_list(out)
        if type(ca) is not torch.Tensor:  # traced by torch.compile: no addresses to put in a table
            _combine_per_bucket(As, Vs, ca, cv, outs, accumulate)
            return
        # ca and cv are read only at call time, so fresh coefficients each step still find the plan
        key = ((ca.dtype, ca.shape, ca.stride(), ca.get_device()), (cv.dtype, cv.shape, cv.stride(), cv.get_device()),
               *map(signature, As), None, *map(signature, Vs), None, *map(signature, outs))
        plan = _PLANS.get(key)
        if plan is None:
            plan = _plan(As, Vs, ca, cv, outs)
            _PLANS.put(key, plan)
        B, launches = plan
        for table, chunk_bucket, consts in launches:
            wrap_triton(_combine_kernel)[(chunk_bucket.numel(),)](table, chunk_bucket, ca, ca, ca, ca, cv, B,
                                                                  ACCUMULATE=bool(accumulate), FROM_TABLE=True,
                                                                  **consts)
