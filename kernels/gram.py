"""gram in Triton: per-row dots of per-sample gradient buckets
(docs/KERNELS.md; where they are used: docs/HARMONIZER.md "3. The measurement tiers").

For buckets A_k, V_k [B, P_k] (one dtype: fp32, bf16 or fp16) it ADDS into out [B, 3] fp32
    out[i] += (Σ_k A_k[i]·V_k[i], Σ_k |A_k[i]|², Σ_k |V_k[i]|²),
reading each buffer once with fp32 accumulation.

Layout. Every bucket is cut into chunks of CHUNK columns; chunks are numbered across buckets in list order
("global chunks", N in all). Stage 1 (`_gram_kernel`) runs one program per (row, chunk) on a flattened 1-D grid,
pid = row · n + local chunk, and writes the chunk's three fp32 partial sums to the workspace ws [B, N, 3] at the
chunk's global slot. Stage 2 (`reduce_partials`) adds each row's N partials into out in one fixed order.

Multi-bucket. All buckets go through one launch per alignment class (so at most two stage-1 launches and one
stage-2 launch, whatever the number of buckets): a host-built int64 table holds, per bucket, the data addresses of
A_k and V_k, their row strides, P_k and its first chunk; an int32 array maps each chunk to its table row. The
kernel casts the int64 address to a typed pointer. This works compiled and under TRITON_INTERPRET=1 (where the
addresses are host addresses, so tensors must be on the CPU there). Launch plans are cached by the signatures of
A and V (not of out, which may be fresh every step); see _common.

Traced launches. Under torch.compile the tensors have no address, so the launcher (`_gram_per_bucket`) launches
the same kernel once per bucket with A_k and V_k as arguments (FROM_TABLE=False), the same chunks writing the same
workspace slots: the same bits, one launch per bucket.

Alignment. A bucket whose A_k and V_k rows both start on 16-byte boundaries (base address and row stride) goes to
the ALIGNED variant, where `tl.multiple_of` hints let full chunks use 16-byte vector loads; the last, partial chunk
of a row is masked. Other buckets take the same code without hints (scalar loads, still coalesced).

Determinism. No atomics: each partial is written by exactly one program and stage 2 sums in a fixed order, so the
same inputs at the same addresses give bitwise-same output. Block sizes are fixed by `_config` (no autotuning,
which would change the summation order from run to run and re-run an accumulating kernel).

Requirements (not checked here: harmony.ops validates every call before it reaches a backend): A_k, V_k 2-D with
unit column stride (any row stride), same shape per k, one dtype and B for all buckets, on the CUDA device compiled
(CPU under the interpreter); out [B, 3] fp32 (any strides) on that device.
"""
from __future__ import annotations

import itertools
from typing import Sequence, Union

import torch
import triton
import triton.language as tl

from harmony.nvtx import nvtx_range
from torch.library import wrap_triton

from ._common import (LRU, TL_DTYPE, bucket_table, group_buckets, interpreting, is_aligned, reduce_partials, row_stride,
                      signature)

Buffers = Union[torch.Tensor, Sequence[torch.Tensor]]


@triton.jit(do_not_specialize=["n_chunks", "ws_row"])  # these change with every bucket layout
def _gram_kernel(tab_ptr, chunk_bucket_ptr, a_ptr, v_ptr, ws_ptr, n_chunks, ws_row,
                 DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 ALIGNED: tl.constexpr, FROM_TABLE: tl.constexpr):
    """ws[row, slot, :] = (a·v, a·a, v·v) over CHUNK columns of one row of one bucket (fp32).
    FROM_TABLE: the buckets' addresses come from the table (eager: one launch, many buckets); else the launch is
    for one bucket, passed as a_ptr, v_ptr (traced launches: a traced tensor has no address)."""
    pid = tl.program_id(0)
    row = (pid // n_chunks).to(tl.int64)
    chunk = pid % n_chunks
    # table row (7 int64): a_addr, v_addr, a_row_stride, v_row_stride, P, first local chunk, first global chunk
    entry = tab_ptr + tl.load(chunk_bucket_ptr + chunk).to(tl.int64) * 7
    a_rs = tl.load(entry + 2)
    v_rs = tl.load(entry + 3)
    P = tl.load(entry + 4)
    local = chunk - tl.load(entry + 5)  # chunk index inside the bucket
    slot = tl.load(entry + 6) + local
    if FROM_TABLE:
        a = tl.load(entry).to(tl.pointer_type(DTYPE)) + row * a_rs
        v = tl.load(entry + 1).to(tl.pointer_type(DTYPE)) + row * v_rs
    else:
        a = a_ptr + row * a_rs
        v = v_ptr + row * v_rs
    if ALIGNED:  # promised by the host: rows start on 16-byte boundaries, so full chunks load as vectors
        a = tl.multiple_of(a, 16)
        v = tl.multiple_of(v, 16)
    start = local * CHUNK
    acc_av = tl.zeros([BLOCK], dtype=tl.float32)
    acc_aa = tl.zeros([BLOCK], dtype=tl.float32)
    acc_vv = tl.zeros([BLOCK], dtype=tl.float32)
    if start + CHUNK <= P:  # full chunk: no mask, so aligned loads can vectorise
        for off in tl.static_range(0, CHUNK, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            x = tl.load(a + idx).to(tl.float32)
            y = tl.load(v + idx).to(tl.float32)
            acc_av += x * y
            acc_aa += x * x
            acc_vv += y * y
    else:  # the row's tail chunk
        for off in tl.static_range(0, CHUNK, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            m = idx < P
            x = tl.load(a + idx, mask=m, other=0.0).to(tl.float32)
            y = tl.load(v + idx, mask=m, other=0.0).to(tl.float32)
            acc_av += x * y
            acc_aa += x * x
            acc_vv += y * y
    w = ws_ptr + row * ws_row + slot * 3
    tl.store(w, tl.sum(acc_av, 0))
    tl.store(w + 1, tl.sum(acc_aa, 0))
    tl.store(w + 2, tl.sum(acc_vv, 0))


def _config(p_max: int) -> dict:
    """Chunk and block sizes. GPU: 4096-column chunks read 1024 at a time by 4 warps (8 elements a thread per
    load, two 16-byte vectors in fp32). Interpreter: one wide block per chunk, as few programs as possible."""
    if interpreting():
        block = min(1 << 14, max(16, triton.next_power_of_2(p_max)))
        return dict(CHUNK=block, BLOCK=block, num_warps=4)
    return dict(CHUNK=4096, BLOCK=1024, num_warps=4)


def _as_list(x: Buffers) -> list:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _layout(As: list, out: torch.Tensor) -> tuple | None:
    """(B, live buckets, kernel config, chunks per live bucket, their first global chunks, total chunks), or None
    when there is nothing to add (B = 0 or no non-empty bucket)."""
    B = out.shape[0]
    live = [k for k in range(len(As)) if As[k].shape[1] > 0]
    if B == 0 or not live:
        return None
    cfg = _config(max(As[k].shape[1] for k in live))
    nchunks = [triton.cdiv(As[k].shape[1], cfg["CHUNK"]) for k in live]
    starts = [0, *itertools.accumulate(nchunks)][:-1]
    n_total = sum(nchunks)
    if B * n_total >= 2 ** 31:
        raise ValueError(f"gram: {B} rows x {n_total} chunks exceeds the 2^31 grid limit")
    return B, live, cfg, nchunks, starts, n_total


def _consts(As: list, live: list, cfg: dict) -> dict:
    return dict(DTYPE=TL_DTYPE[As[live[0]].dtype], CHUNK=cfg["CHUNK"], BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])


def _plan(As: list, Vs: list, out: torch.Tensor) -> tuple | None:
    """Launch plan: (B, total chunks, kernel constants, [(table, chunk_bucket, aligned)]), or None when there is
    nothing to add (B = 0 or no non-empty bucket)."""
    layout = _layout(As, out)
    if layout is None:
        return None
    B, live, cfg, nchunks, starts, n_total = layout
    keys = [is_aligned(As[k], row_stride(As[k])) and is_aligned(Vs[k], row_stride(Vs[k])) for k in live]
    launches = []
    for aligned, members in group_buckets(keys).items():
        ks = [live[j] for j in members]
        rows = [[As[k].data_ptr(), Vs[k].data_ptr(), row_stride(As[k]), row_stride(Vs[k])] for k in ks]
        table, chunk_bucket = bucket_table(rows, [As[k].shape[1] for k in ks], [starts[j] for j in members],
                                           cfg["CHUNK"], out.device)
        launches.append((table, chunk_bucket, aligned))
    return B, n_total, _consts(As, live, cfg), launches


_PLANS = LRU()


def _gram_per_bucket(As: list, Vs: list, out: torch.Tensor) -> None:
    """gram with one launch per bucket, its tensors passed as kernel arguments: what torch.compile traces (the
    table of addresses cannot be built from traced tensors). Same chunks, same workspace slots, same reduction as
    the table path, so the same bits."""
    layout = _layout(As, out)
    if layout is None:
        return
    B, live, cfg, nchunks, starts, n_total = layout
    consts = _consts(As, live, cfg)
    ws = torch.empty(B, n_total, 3, dtype=torch.float32, device=out.device)
    for j, k in enumerate(live):
        # one table row, addresses unused: (0, 0, a_row_stride, v_row_stride, P, first local chunk, first global)
        table = torch.tensor([[0, 0, row_stride(As[k]), row_stride(Vs[k]), As[k].shape[1], 0, starts[j]]],
                             dtype=torch.int64, device=out.device)
        chunk_bucket = torch.zeros(nchunks[j], dtype=torch.int32, device=out.device)
        wrap_triton(_gram_kernel)[(B * nchunks[j],)](table, chunk_bucket, As[k], Vs[k], ws, nchunks[j], n_total * 3,
                                                     ALIGNED=False, FROM_TABLE=False, **consts)
    reduce_partials(ws, out)


def gram(A: Buffers, V: Buffers, out: torch.Tensor) -> None:
    """out [B, 3] fp32 += per-row (Σ_k A_k·V_k, Σ_k |A_k|², Σ_k |V_k|²) for buckets A_k, V_k [B, P_k].

    A and V are lists of buckets (a single [B, P] tensor is taken as one bucket). Empty lists or B = 0 leave out
    unchanged.
    """
    with nvtx_range("gram"):
        As, Vs = _as_list(A), _as_list(V)
        if type(out) is not torch.Tensor:  # traced by torch.compile: no addresses to put in a table
            _gram_per_bucket(As, Vs, out)
            return
        # out is read only at call time (reduce_partials), so a fresh out each step still finds the plan
        key = (out.dtype, out.shape, out.get_device(), *map(signature, As), None, *map(signature, Vs))
        plan = _PLANS.get(key)
        if plan is None:
            plan = _plan(As, Vs, out)
            _PLANS.put(key, plan if plan is not None else ())
        if not plan:
            return
        B, n_total, consts, launches = plan
        ws = torch.empty(B, n_total, 3, dtype=torch.float32, device=out.device)
        for table, chunk_bucket, aligned in launches:
            n = chunk_bucket.numel()
            wrap_triton(_gram_kernel)[(B * n,)](table, chunk_bucket, ws, ws, ws, n, n_total * 3, ALIGNED=aligned,
                                                FROM_TABLE=True, **consts)
        reduce_partials(ws, out)
