"""ghost_dots in Triton: per-sample gradient dots of a linear layer straight from activations
(docs/KERNELS.md; where they are used: docs/HARMONIZER.md "3. The measurement tiers").

For X [B, T, Din] (the layer's inputs) and output gradients Ga, Gb [B, T, Dout] of two losses, per sample i the
weight gradients are Ga_iᵀX_i and Gb_iᵀX_i [Dout, Din]. This ADDS into out [B, 3] fp32
    out[i] += (⟨Ga_iᵀX_i, Gb_iᵀX_i⟩_F, ‖Ga_iᵀX_i‖²_F, ‖Gb_iᵀX_i‖²_F)
and never writes Ga_iᵀX_i to memory. Two methods (the caller picks, e.g. by harmony.ops.use_gram_form):

* "gram": ⟨Gaᵀ X, Gbᵀ X⟩ = Σ_{t,s} (X Xᵀ)_{ts} (Ga Gbᵀ)_{ts}. One program per sample and (t, s) tile pair of
  BT×BT token blocks with t ≤ s: it forms the tile of X Xᵀ (tl.dot over Din chunks) and of Ga Gbᵀ + Gb Gaᵀ,
  Ga Gaᵀ, Gb Gbᵀ (over Dout chunks) in registers and reduces the elementwise products. Both Gram matrices of the
  norms are symmetric and Σ (XXᵀ)∘(GaGbᵀ) = ½ Σ (XXᵀ)∘(GaGbᵀ + GbGaᵀ), so only the upper triangle of tile pairs is
  visited, off-diagonal tiles counted twice (exact factors 2 and ½). Cost ~T²(Din + 2·Dout) per sample.
* "instantiate": one program per sample and [BO, BI] tile of the [Dout, Din] weight gradient: it accumulates
  Ga_iᵀX_i and Gb_iᵀX_i for that tile with tl.dot over T chunks in registers and reduces the three dots.
  Cost ~2·T·Din·Dout per sample.

Precision. fp32 accumulation throughout. On a GPU, bf16/fp16 inputs go to tl.dot as they are (exact products,
fp32 accumulator); fp32 inputs use input_precision="tf32x3" (three TF32 products, close to fp32 accuracy, where
plain TF32 would lose ~3 decimal digits). Under TRITON_INTERPRET=1 inputs are upcast to fp32 first (the interpreter's
tl.dot on bf16 returns garbage) and products use plain fp32 ("ieee").

Determinism. Stage 1 writes one fp32 partial triple per program into ws [B, tiles, 3]; stage 2 (`reduce_partials`)
adds them into out in one fixed order. No atomics, fixed block sizes from `_config` (no autotuning), so the same
inputs give bitwise-same output.

Requirements (not checked here: harmony.ops validates every call before it reaches a backend): X, Ga, Gb 3-D with
the same B and T and one dtype (fp32/bf16/fp16), any strides (no copies are made); out [B, 3] fp32 (any strides);
one device (CUDA compiled, CPU under the interpreter). Empty B, T, Din or Dout add nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from harmony.nvtx import nvtx_range
from torch.library import wrap_triton

from ._common import TL_DTYPE, interpreting, reduce_partials


# sizes and batch strides vary from layer to layer: specialising on them would recompile per layer shape
@triton.jit(do_not_specialize=["T", "DIN", "DOUT", "n_pairs", "sxb", "sab", "sbb"])
def _ghost_gram_kernel(x_ptr, ga_ptr, gb_ptr, pairs_ptr, ws_ptr, T, DIN, DOUT, n_pairs,
                       sxb, sxt, sxd, sab, sat, sad, sbb, sbt, sbd,
                       BT: tl.constexpr, BK: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr):
    """ws[i, pair, :] = this tile pair's share of (⟨GaᵀX, GbᵀX⟩, ‖GaᵀX‖², ‖GbᵀX‖²) for sample i.
    Row-side tiles load as [BT, BK], column-side tiles straight as [BK, BT] (no tl.trans). CDT: dot input dtype."""
    pid = tl.program_id(0)
    i = (pid // n_pairs).to(tl.int64)
    pair = pid % n_pairs
    t1 = tl.load(pairs_ptr + 2 * pair)
    t2 = tl.load(pairs_ptr + 2 * pair + 1)
    r = (t1 * BT + tl.arange(0, BT)).to(tl.int64)
    s = (t2 * BT + tl.arange(0, BT)).to(tl.int64)
    k = tl.arange(0, BK)
    rm = (r < T)[:, None]
    sm = (s < T)[None, :]
    x_r = x_ptr + i * sxb + r[:, None] * sxt
    x_s = x_ptr + i * sxb + s[None, :] * sxt
    sx = tl.zeros([BT, BT], dtype=tl.float32)  # (X Xᵀ)[r, s]
    for k0 in range(0, DIN, BK):
        kk = (k0 + k).to(tl.int64)
        km = kk < DIN
        xr = tl.load(x_r + kk[None, :] * sxd, mask=rm & km[None, :], other=0.0).to(CDT)
        xs = tl.load(x_s + kk[:, None] * sxd, mask=sm & km[:, None], other=0.0).to(CDT)
        sx = tl.dot(xr, xs, sx, input_precision=PREC)
    a_r = ga_ptr + i * sab + r[:, None] * sat
    a_s = ga_ptr + i * sab + s[None, :] * sat
    b_r = gb_ptr + i * sbb + r[:, None] * sbt
    b_s = gb_ptr + i * sbb + s[None, :] * sbt
    s_ab = tl.zeros([BT, BT], dtype=tl.float32)  # (Ga Gbᵀ + Gb Gaᵀ)[r, s]
    s_aa = tl.zeros([BT, BT], dtype=tl.float32)
    s_bb = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, DOUT, BK):
        kk = (k0 + k).to(tl.int64)
        mr = rm & (kk < DOUT)[None, :]
        ms = sm & (kk < DOUT)[:, None]
        ar = tl.load(a_r + kk[None, :] * sad, mask=mr, other=0.0).to(CDT)
        br = tl.load(b_r + kk[None, :] * sbd, mask=mr, other=0.0).to(CDT)
        as_ = tl.load(a_s + kk[:, None] * sad, mask=ms, other=0.0).to(CDT)
        bs = tl.load(b_s + kk[:, None] * sbd, mask=ms, other=0.0).to(CDT)
        s_ab = tl.dot(ar, bs, s_ab, input_precision=PREC)
        s_ab = tl.dot(br, as_, s_ab, input_precision=PREC)
        s_aa = tl.dot(ar, as_, s_aa, input_precision=PREC)
        s_bb = tl.dot(br, bs, s_bb, input_precision=PREC)
    w = tl.where(t1 == t2, 1.0, 2.0)  # the lower-triangle twin of an off-diagonal tile is not visited
    out = ws_ptr + pid.to(tl.int64) * 3
    tl.store(out, 0.5 * w * tl.sum(tl.sum(sx * s_ab, 1), 0))
    tl.store(out + 1, w * tl.sum(tl.sum(sx * s_aa, 1), 0))
    tl.store(out + 2, w * tl.sum(tl.sum(sx * s_bb, 1), 0))


@triton.jit(do_not_specialize=["T", "DIN", "DOUT", "n_o", "n_d", "sxb", "sab", "sbb"])
def _ghost_instantiate_kernel(x_ptr, ga_ptr, gb_ptr, ws_ptr, T, DIN, DOUT, n_o, n_d,
                              sxb, sxt, sxd, sab, sat, sad, sbb, sbt, sbd,
                              BO: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr,
                              CDT: tl.constexpr, PREC: tl.constexpr):
    """ws[i, tile, :] = the three dots over one [BO, BI] tile of Ga_iᵀX_i and Gb_iᵀX_i, formed in registers.
    Ga and Gb chunks load straight as [BO, BT] (transposed by the addressing, no tl.trans)."""
    pid = tl.program_id(0)
    per_sample = n_o * n_d
    i = (pid // per_sample).to(tl.int64)
    tile = pid % per_sample
    o = ((tile // n_d) * BO + tl.arange(0, BO)).to(tl.int64)
    d = ((tile % n_d) * BI + tl.arange(0, BI)).to(tl.int64)
    t = tl.arange(0, BT)
    om = (o < DOUT)[:, None]
    dm = (d < DIN)[None, :]
    a_o = ga_ptr + i * sab + o[:, None] * sad
    b_o = gb_ptr + i * sbb + o[:, None] * sbd
    x_d = x_ptr + i * sxb + d[None, :] * sxd
    ga_x = tl.zeros([BO, BI], dtype=tl.float32)
    gb_x = tl.zeros([BO, BI], dtype=tl.float32)
    for t0 in range(0, T, BT):
        tt = (t0 + t).to(tl.int64)
        tm = tt < T
        gat = tl.load(a_o + tt[None, :] * sat, mask=om & tm[None, :], other=0.0).to(CDT)  # [BO, BT]
        gbt = tl.load(b_o + tt[None, :] * sbt, mask=om & tm[None, :], other=0.0).to(CDT)
        xc = tl.load(x_d + tt[:, None] * sxt, mask=tm[:, None] & dm, other=0.0).to(CDT)    # [BT, BI]
        ga_x = tl.dot(gat, xc, ga_x, input_precision=PREC)
        gb_x = tl.dot(gbt, xc, gb_x, input_precision=PREC)
    out = ws_ptr + pid.to(tl.int64) * 3
    tl.store(out, tl.sum(tl.sum(ga_x * gb_x, 1), 0))
    tl.store(out + 1, tl.sum(tl.sum(ga_x * ga_x, 1), 0))
    tl.store(out + 2, tl.sum(tl.sum(gb_x * gb_x, 1), 0))


def _block(n: int, lo: int, hi: int) -> int:
    """A power of two covering n, clamped to [lo, hi] (tl.dot wants every dimension ≥ 16)."""
    return min(hi, max(lo, triton.next_power_of_2(max(n, 1))))


def _config(method: str, T: int, d_in: int, d_out: int, dtype: torch.dtype) -> dict:
    """Tile sizes and dot precision. GPU: 64×64 tiles over 32-wide reduction chunks (gram: four [64, 64] fp32
    accumulators, so 8 warps; instantiate: two, 4 warps). Interpreter: tiles as large as the problem up to 64, to
    keep programs and loop steps few; beyond 64 numpy's matmul may go multi-threaded and, next to torch's thread
    pool on a small machine, slow down a hundredfold."""
    interp = interpreting()
    cdt = tl.float32 if interp else TL_DTYPE[dtype]  # the interpreter's tl.dot cannot take bf16
    prec = "ieee" if interp else ("tf32x3" if dtype == torch.float32 else "tf32")  # tf32: ignored for 16-bit
    if method == "gram":
        if interp:
            return dict(BT=_block(T, 16, 64), BK=_block(max(d_in, d_out), 16, 64), CDT=cdt, PREC=prec,
                        num_warps=4)
        return dict(BT=64, BK=32, CDT=cdt, PREC=prec, num_warps=8)
    if interp:
        return dict(BO=_block(d_out, 16, 64), BI=_block(d_in, 16, 64), BT=_block(T, 16, 64), CDT=cdt,
                    PREC=prec, num_warps=4)
    return dict(BO=64, BI=64, BT=32, CDT=cdt, PREC=prec, num_warps=4)


_PAIRS: dict = {}


def _tile_pairs(n: int, like: torch.Tensor) -> torch.Tensor:
    """int32 [n(n+1)/2, 2] upper-triangle tile pairs (t1 ≤ t2) on like's device; cached per (n, device) for plain
    tensors, built in the graph when ``like`` is a traced one (torch.compile), which cannot hold a real tensor."""
    if type(like) is not torch.Tensor:
        t1, t2 = torch.triu_indices(n, n, device=like.device)
        return torch.stack([t1, t2], 1).to(torch.int32).contiguous()
    key = (n, str(like.device))
    if key not in _PAIRS:
        t1, t2 = torch.triu_indices(n, n)
        _PAIRS[key] = torch.stack([t1, t2], 1).to(torch.int32).contiguous().to(like.device)
    return _PAIRS[key]


def ghost_dots(X: torch.Tensor, Ga: torch.Tensor, Gb: torch.Tensor, out: torch.Tensor, method: str) -> None:
    """out [B, 3] fp32 += per sample (⟨Gaᵀ X, Gbᵀ X⟩_F, ‖Gaᵀ X‖², ‖Gbᵀ X‖²) from X [B, T, Din], Ga/Gb [B, T, Dout],
    without writing Gaᵀ X; method "gram" (cost ~T²) or "instantiate" (cost ~Din·Dout)."""
    with nvtx_range("ghost_dots"):
        B, T, d_in = X.shape
        d_out = Ga.shape[2]
        if B == 0 or T == 0 or d_in == 0 or d_out == 0:
            return
        cfg = _config(method, T, d_in, d_out, X.dtype)
        strides = (*X.stride(), *Ga.stride(), *Gb.stride())
        consts = dict(CDT=cfg["CDT"], PREC=cfg["PREC"], num_warps=cfg["num_warps"])
        if method == "gram":
            pairs = _tile_pairs(triton.cdiv(T, cfg["BT"]), X)
            n = pairs.shape[0]
            ws = torch.empty(B, n, 3, dtype=torch.float32, device=X.device)
            wrap_triton(_ghost_gram_kernel)[(B * n,)](X, Ga, Gb, pairs, ws, T, d_in, d_out, n, *strides,
                                                      BT=cfg["BT"], BK=cfg["BK"], **consts)
        else:
            n_o, n_d = triton.cdiv(d_out, cfg["BO"]), triton.cdiv(d_in, cfg["BI"])
            n = n_o * n_d
            ws = torch.empty(B, n, 3, dtype=torch.float32, device=X.device)
            wrap_triton(_ghost_instantiate_kernel)[(B * n,)](X, Ga, Gb, ws, T, d_in, d_out, n_o, n_d, *strides,
                                                             BO=cfg["BO"], BI=cfg["BI"], BT=cfg["BT"], **consts)
        reduce_partials(ws, out)
