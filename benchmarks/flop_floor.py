"""Counted FLOPs of one training step, for the floor column of the step benchmark.

``count_flops(fn)`` runs fn once under torch's FlopCounterMode (matrix products, convolutions, attention;
elementwise work is not counted) with formulas added for the ops it does not know: the CPU flash attention
forward and backward and this project's ``harmony::ghost_dots`` / ``gram`` / ``combine``.

The floor of a variant (``floor_ratio``): the plain step as measured plus the variant's EXTRA counted FLOPs
(activation backward, weight gradients, per-sample dots, whatever it adds) at the machine's fp32 matrix-
product rate measured in the same run, over the plain step. Counting extra work only, at full GEMM speed,
makes it a floor even for a small model whose plain step is dominated by uncounted elementwise work.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

import harmony.ops  # noqa: F401  (registers torch.ops.harmony.*)

_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    aten = torch.ops.aten

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_flash(q, k, v, *args, out_shape=None, **kw) -> int:
        return sdpa_flop_count(q, k, v)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_flash_bw(grad_out, q, k, v, *args, out_shape=None, **kw) -> int:
        return sdpa_backward_flop_count(grad_out, q, k, v)

    @register_flop_formula(torch.ops.harmony.ghost_dots)
    def _ghost_dots(x, ga, gb, out, method, *args, out_shape=None, **kw) -> int:
        B, T, d_in = x
        d_out = ga[-1]
        if method == "gram":  # Gram form: X Xᵀ and the three G Gᵀ products, then three [T, T] contractions
            return 2 * B * T * T * (d_in + 3 * d_out) + 6 * B * T * T
        return 2 * 2 * B * T * d_in * d_out + 6 * B * d_in * d_out     # GaᵀX, GbᵀX, three Frobenius products

    @register_flop_formula(torch.ops.harmony.gram)
    def _gram(A, V, *args, out_shape=None, **kw) -> int:
        return sum(6 * a[0] * (a[1] if len(a) > 1 else 1) for a in A)

    @register_flop_formula(torch.ops.harmony.combine)
    def _combine(A, V, ca, cv, out, *args, out_shape=None, **kw) -> int:
        return sum(4 * a[0] * (a[1] if len(a) > 1 else 1) for a in A)


def count_flops(fn: Callable[[], None]) -> int:
    """Counted FLOPs of one call of fn."""
    _register()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def gemm_timer(device: torch.device, n: int = 768):
    """A callable timing one fp32 [n, n] @ [n, n] product -> FLOP/s (run it between the variants, so it sees
    the same machine load; take the median)."""
    import time

    from benchmarks.common import sync

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b

    def rate() -> float:
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        return 2 * n ** 3 / (time.perf_counter() - t0)
    return rate


def floor_ratio(flops: int, plain_flops: int, plain_s: float, rate: float) -> float:
    """The plain step as measured plus the variant's extra counted FLOPs at the machine's GEMM rate, over the
    plain step: the ratio the variant reaches if its extra work ran at full matrix-product speed."""
    return 1.0 + (flops - plain_flops) / (rate * plain_s)
