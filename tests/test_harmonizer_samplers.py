"""Each per-sample sampler against a per-sample autograd reference, on awkward layer configurations.

The reference gives sample i private parameters and runs the layer on sample i's rows alone (k rows per
sample when a call sees k·B rows, several calls per step), then takes autograd's VJP with that sample's
output-gradient rows, per column. Everything in float64; dots are fp32 by contract.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from brute_force import Gate
from harmony.method.grad_sample import Call, GradSampler, PerSampleError, find_sampler, register_grad_sampler
from harmony.model.layers import AddEmbedding, PrependToken


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(module, calls, grads, B):
    """{param: [C, B, *shape]}: Σ over calls and over sample i's rows of the VJP with G, per column."""
    params = {n: p for n, p in module.named_parameters(recurse=False)}
    C = grads[0].shape[0]
    out = {n: torch.zeros(C, B, *p.shape, dtype=torch.float64) for n, p in params.items()}
    for i in range(B):
        for c in range(C):
            theta = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
            total = 0.0
            for (args, kwargs), g in zip(calls, grads):
                k = args[0].shape[0] // B
                rows = slice(i * k, (i + 1) * k)
                sub = tuple(a[rows] if torch.is_tensor(a) and a.dim() and a.shape[0] == B * k else a for a in args)
                kw = {key: v[rows] if torch.is_tensor(v) and v.shape[0] == B * k else v for key, v in kwargs.items()}
                total = total + (functional_call(module, theta, sub, kw) * g[c][rows]).sum()
            got = torch.autograd.grad(total, list(theta.values()), allow_unused=True)
            for (n, _), gr in zip(theta.items(), got):
                if gr is not None:
                    out[n][c, i] = gr
    return out


def record(module, inputs, B, seed=0):
    """Run the calls; random output gradients with 2 columns; the Call records a hook would keep."""
    g = torch.Generator().manual_seed(seed)
    calls, grads, recs = [], [], []
    for args, kwargs in inputs:
        y = module(*args, **kwargs)
        G = torch.randn((2,) + tuple(y.shape), generator=g, dtype=torch.float64)
        calls.append((args, kwargs))
        grads.append(G)
        recs.append(Call(args, kwargs, y.detach(), {n: p.detach() for n, p in module.named_parameters(recurse=False)}))
    return calls, grads, recs


def dots_of(per_sample, B):
    a = torch.cat([v[0].reshape(B, -1) for v in per_sample.values()], 1)
    b = torch.cat([v[1].reshape(B, -1) for v in per_sample.values()], 1)
    return torch.stack([(a * b).sum(1), (a * a).sum(1), (b * b).sum(1)], 1)


def r(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


B = 3
CASES = {
    # name: (module factory, list of calls as (args, kwargs)), calls may see k·B rows
    "linear_two_calls_k_rows": (lambda: nn.Linear(5, 3), [((r(B, 4, 5),), {}), ((r(2 * B, 5, seed=2),), {})]),
    "linear_no_bias": (lambda: nn.Linear(7, 2, bias=False), [((r(B, 2, 3, 7),), {})]),
    "conv1d_groups_dilation": (lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=3, groups=2),
                               [((r(B, 4, 11),), {}), ((r(2 * B, 4, 8, seed=3),), {})]),
    "conv1d_reflect": (lambda: nn.Conv1d(3, 2, 4, padding=2, padding_mode="reflect"), [((r(B, 3, 9),), {})]),
    "conv2d_same": (lambda: nn.Conv2d(3, 4, (2, 3), padding="same", dilation=(1, 2)), [((r(B, 3, 5, 7),), {})]),
    "conv2d_circular_stride": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="circular"),
                               [((r(B, 2, 6, 5),), {})]),
    "conv3d_groups": (lambda: nn.Conv3d(2, 4, (1, 2, 3), stride=(1, 2, 1), padding=(0, 1, 1), groups=2),
                      [((r(B, 2, 3, 4, 5),), {})]),
    "layernorm_2d_shape": (lambda: nn.LayerNorm((3, 5)), [((r(B, 2, 3, 5),), {}), ((r(2 * B, 3, 5, seed=4),), {})]),
    "layernorm_no_bias": (lambda: nn.LayerNorm(5, bias=False), [((r(B, 4, 5),), {})]),
    "embedding_padding": (lambda: nn.Embedding(7, 3, padding_idx=2),
                          [((torch.randint(0, 7, (B, 6), generator=torch.Generator().manual_seed(5)),), {}),
                           ((torch.randint(0, 7, (2 * B, 4), generator=torch.Generator().manual_seed(6)),), {})]),
    "add_embedding_repeated_rows": (lambda: AddEmbedding(4, 3, index=torch.tensor([0, 1, 1, 3, 2])),
                                    [((r(B, 5, 3),), {}), ((r(2 * B, 3, 3, seed=7),), {})]),
    "add_embedding": (lambda: AddEmbedding(6, 3), [((r(B, 4, 3),), {})]),
    "prepend_token": (lambda: PrependToken(3), [((r(B, 4, 3),), {}), ((r(2 * B, 2, 3, seed=8),), {})]),
    "generic_gate": (lambda: Gate(4), [((r(B, 3, 4),), {}), ((r(2 * B, 4, seed=9),), {})]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_matches_per_sample_autograd(case):
    factory, inputs = CASES[case]
    torch.manual_seed(0)
    module = factory().double()
    with torch.no_grad():                       # nonzero LayerNorm affine / embedding rows everywhere
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    calls, grads, recs = record(module, inputs, B)
    ref = reference(module, calls, grads, B)
    names = [n for n, _ in module.named_parameters(recurse=False)]
    sampler = find_sampler(module, case)
    got = sampler.per_sample(module, case, recs, grads, B, names)
    assert set(got) == set(ref)
    for n in ref:
        err = (got[n] - ref[n]).abs().max().item()
        print(f"{case}.{n}: per-sample max err {err:.3e}")
        assert err <= 1e-12 * max(1.0, ref[n].abs().max().item())
    for method in ("auto", "gram", "instantiate"):
        d = sampler.dots(module, case, recs, grads, B, names, method)
        rd = dots_of(ref, B)
        err = ((d.double() - rd).abs() / (rd[:, 1:].sum(1, keepdim=True) + 1e-30)).max().item()
        print(f"{case}: dots ({method}) relative err {err:.3e}")
        assert d.dtype == torch.float32 and err <= 2e-6
    comb = [g[0] * 0.7 - g[1] * 1.3 for g in grads]
    w = sampler.weighted(module, case, recs, comb, B, names)
    for n in ref:
        want = (0.7 * ref[n][0] - 1.3 * ref[n][1]).sum(0)
        err = (w[n] - want).abs().max().item()
        print(f"{case}.{n}: weighted max err {err:.3e}")
        assert err <= 1e-12 * max(1.0, want.abs().max().item())


def test_subset_of_names():
    module = nn.Linear(4, 3).double()
    calls, grads, recs = record(module, [((r(B, 2, 4),), {})], B)
    ref = reference(module, calls, grads, B)
    d = find_sampler(module, "lin").dots(module, "lin", recs, grads, B, ["bias"])
    torch.testing.assert_close(d.double(), dots_of({"bias": ref["bias"]}, B), rtol=2e-6, atol=0)


def test_rows_not_a_multiple_of_batch_raise():
    module = nn.Linear(4, 3).double()
    _, grads, recs = record(module, [((r(4, 4),), {})], 4)
    with pytest.raises(PerSampleError, match="not a multiple of the batch size 3"):
        find_sampler(module, "lin").dots(module, "lin", recs, grads, 3, ["weight"])


def test_embedding_scale_grad_by_freq_raises():
    module = nn.Embedding(5, 2, scale_grad_by_freq=True).double()
    _, grads, recs = record(module, [((torch.tensor([[1, 2], [2, 2], [0, 4]]),), {})], 3)
    with pytest.raises(PerSampleError, match="scale_grad_by_freq"):
        find_sampler(module, "emb").dots(module, "emb", recs, grads, 3, ["weight"])


class _Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_registry_lookup():
    class Plain(nn.Linear):
        pass
    assert find_sampler(Plain(2, 2), "p") is find_sampler(nn.Linear(2, 2), "l")
    assert type(find_sampler(_Scaled(2, 2), "s")).__name__ == "GenericSampler"   # own forward: not the Linear rule

    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

    @register_grad_sampler(Mine)
    class MineSampler(GradSampler):
        pass
    assert isinstance(find_sampler(Mine(), "m"), MineSampler)
    with pytest.raises(PerSampleError, match=r"'bn' \(SyncBatchNorm\) mixes samples"):
        find_sampler(nn.SyncBatchNorm(3), "bn")


class ScaleShift(nn.Module):
    """y = x * scale + shift: the example of docs/HARMONIZER.md."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.scale + self.shift


def test_documented_sampler_example():
    from harmony.method.grad_sample.base import fold_rows, live

    @register_grad_sampler(ScaleShift)
    class ScaleShiftSampler(GradSampler):
        def per_sample(self, module, name, calls, grads, B, names):
            out = {}
            for call, G in live(calls, grads):
                X = fold_rows(call.args[0], B, 0, name)            # [B, k, T, d]
                G = fold_rows(G, B, 1, name)                      # [C, B, k, T, d]
                part = {"scale": (G * X).sum((2, 3)), "shift": G.sum((2, 3))}
                for n in names:
                    out[n] = part[n] if n not in out else out[n] + part[n]
            return out

    module = ScaleShift(4).double()
    calls, grads, recs = record(module, [((r(B, 3, 4),), {}), ((r(2 * B, 5, 4, seed=3),), {})], B)
    ref = reference(module, calls, grads, B)
    sampler = find_sampler(module, "ss")
    assert isinstance(sampler, ScaleShiftSampler)
    got = sampler.per_sample(module, "ss", recs, grads, B, ["scale", "shift"])
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sampler.dots(module, "ss", recs, grads, B, ["scale", "shift"]).double(),
                               dots_of(ref, B), rtol=2e-6, atol=0)
