"""CMA losses (docs/HARMONIZER.md "1. Per-sample gradients of coupled losses") against a direct float64
evaluation of the formula written with explicit loops."""
import math

import pytest
import torch

from harmony.model.losses import asymmetric_nce, masked_mean, mil_nce, nce

# Tolerances by dtype (max abs error after scaling by max(1, |reference|)).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _lse(values):
    """log Σ exp over a Python list of 0-d tensors, written out (independent of torch.logsumexp)."""
    top = max(float(v.detach()) for v in values)
    return top + torch.log(sum(torch.exp(v - top) for v in values))


def reference_nce(anchor, cands, mask=None, cand_mask=None, temperature=0.07):
    """ℓ [B] of the harmony.model.losses formula by loops in float64, differentiable by autograd."""
    e = anchor.double()
    c = cands.double()
    b, n_cand, _ = c.shape
    mask = [True] * b if mask is None else [bool(m) for m in mask]
    cmask = [[True] * n_cand for _ in range(b)] if cand_mask is None else [[bool(x) for x in row] for row in cand_mask]
    e = e / e.norm(dim=-1, keepdim=True)
    c = c / c.norm(dim=-1, keepdim=True)

    def s(x, y):
        return (x * y).sum() / temperature

    def ok(j, l):
        return mask[j] and cmask[j][l]

    out = []
    for i in range(b):
        pos = [s(e[i], c[i, l]) for l in range(n_cand) if ok(i, l)]
        if not pos:
            out.append(torch.zeros((), dtype=torch.float64))
            continue
        all_ = [s(e[i], c[j, l]) for j in range(b) for l in range(n_cand) if ok(j, l)]
        all_ += [s(e[j], c[i, l]) for j in range(b) for l in range(n_cand) if ok(i, l)]
        out.append(_lse(all_) - _lse(pos))
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def _masks(kind, b, n_cand, gen):
    mask = cand_mask = None
    if kind in ("sample", "both"):
        mask = torch.rand(b, generator=gen) > 0.3
        mask[0] = True  # keep at least one valid sample so the test exercises real values
    if kind in ("cand", "both"):
        cand_mask = torch.rand(b, n_cand, generator=gen) > 0.3
        cand_mask[0, 0] = True
    return mask, cand_mask


def _err(x, ref):
    return ((x.double() - ref.double()).abs() / ref.double().abs().clamp_min(1.0)).max().item() if x.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masks", ["none", "sample", "cand", "both"])
@pytest.mark.parametrize("n_cand", [1, 3])
@pytest.mark.parametrize("b", [1, 2, 7])
def test_asymmetric_nce_matches_loops(b, n_cand, masks, dtype):
    gen = torch.Generator().manual_seed(1000 * b + 10 * n_cand + len(masks))
    d = 5
    anchor = (torch.randn(b, d, generator=gen) * 3).to(dtype).requires_grad_()
    cands = torch.randn(b, n_cand, d, generator=gen).to(dtype).requires_grad_()
    mask, cand_mask = _masks(masks, b, n_cand, gen)
    weights = torch.rand(b, generator=gen, dtype=torch.float64) + 0.5

    loss = asymmetric_nce(anchor, cands, mask, cand_mask, temperature=0.07, gather=False)
    (loss.double() * weights).sum().backward()
    a_ref = anchor.detach().double().requires_grad_()
    c_ref = cands.detach().double().requires_grad_()
    ref = reference_nce(a_ref, c_ref, mask, cand_mask, temperature=0.07)
    (ref * weights).sum().backward()

    errs = [_err(loss, ref), _err(anchor.grad, a_ref.grad), _err(cands.grad, c_ref.grad)]
    print(f"b={b} L={n_cand} masks={masks} {dtype}: max err loss/grad_anchor/grad_cands = {errs}")
    assert loss.shape == (b,)
    assert max(errs) < TOL[dtype]


def test_temperature_is_used():
    gen = torch.Generator().manual_seed(3)
    anchor, cands = torch.randn(4, 6, generator=gen), torch.randn(4, 2, 6, generator=gen)
    loss = asymmetric_nce(anchor.double(), cands.double(), temperature=0.5, gather=False)
    ref = reference_nce(anchor, cands, temperature=0.5)
    err = _err(loss, ref)
    print("tau=0.5 max err", err)
    assert err < TOL[torch.float64]


def test_invalid_samples_zero_loss_finite_gradient():
    """Masked samples give ℓ = 0; garbage (non-finite) embeddings of invalid candidates never leak."""
    gen = torch.Generator().manual_seed(7)
    b, n_cand, d = 6, 3, 4
    anchor = torch.randn(b, d, generator=gen, requires_grad=True)
    raw = torch.randn(b, n_cand, d, generator=gen)
    mask = torch.tensor([True, False, True, True, False, True])
    cand_mask = torch.ones(b, n_cand, dtype=torch.bool)
    cand_mask[2] = False          # valid sample without any valid candidate: also invalid
    cand_mask[3, 1] = False
    raw[1] = float("nan")          # masked sample with a NaN embedding
    raw[3, 1] = float("inf")       # masked candidate with an inf embedding
    cands = raw.clone().requires_grad_()
    loss = asymmetric_nce(anchor, cands, mask, cand_mask, gather=False)
    print("losses", loss.tolist())
    assert torch.isfinite(loss).all()
    assert loss[1] == 0 and loss[4] == 0 and loss[2] == 0
    assert (loss[[0, 3, 5]] > 0).all()
    total = masked_mean(loss, mask & cand_mask.any(1))
    total.backward()
    assert torch.isfinite(anchor.grad).all() and torch.isfinite(cands.grad).all()
    assert (cands.grad[1] == 0).all() and (cands.grad[2] == 0).all() and (cands.grad[3, 1] == 0).all()
    # A masked sample's video still acts as a negative for the others, so its anchor gets gradient.
    assert anchor.grad[1].abs().sum() > 0
    clean = raw.clone()
    clean[1] = 0.3
    clean[3, 1] = 0.7
    ref = reference_nce(anchor.detach(), clean, mask, cand_mask)
    err = _err(loss.detach(), ref)
    print("max err vs loops", err)
    assert err < TOL[torch.float32]


def test_nothing_valid():
    anchor = torch.randn(3, 4, requires_grad=True)
    cands = torch.randn(3, 2, 4, requires_grad=True)
    mask = torch.zeros(3, dtype=torch.bool)
    loss = asymmetric_nce(anchor, cands, mask, gather=False)
    total = masked_mean(loss, mask)
    total.backward()
    print("loss", loss.tolist(), "mean", total.item())
    assert (loss == 0).all() and total.item() == 0.0
    assert torch.isfinite(anchor.grad).all() and (anchor.grad == 0).all() and (cands.grad == 0).all()


def test_empty_batch():
    anchor = torch.randn(0, 4, requires_grad=True)
    loss = nce(anchor, torch.randn(0, 4), gather=False)
    total = masked_mean(loss)
    total.backward()
    assert loss.shape == (0,) and total.item() == 0.0 and anchor.grad.shape == (0, 4)


def test_wrappers():
    gen = torch.Generator().manual_seed(11)
    z_v, z_a = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    z_t = torch.randn(5, 3, 8, generator=gen)
    mask = torch.tensor([True, True, False, True, True])
    cand_mask = torch.rand(5, 3, generator=gen) > 0.4
    err_nce = _err(nce(z_v, z_a, mask, gather=False), reference_nce(z_v, z_a[:, None], mask))
    err_mil = _err(mil_nce(z_v, z_t, mask, cand_mask, gather=False), reference_nce(z_v, z_t, mask, cand_mask))
    err_2d = _err(mil_nce(z_v, z_a, gather=False), reference_nce(z_v, z_a[:, None]))
    print("nce / mil_nce / mil_nce 2-D max err", err_nce, err_mil, err_2d)
    assert max(err_nce, err_mil, err_2d) < TOL[torch.float32]


def test_masked_mean():
    gen = torch.Generator().manual_seed(5)
    losses = torch.rand(9, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(9, generator=gen) > 0.5
    mask[0] = True
    expected = sum(float(losses[i].detach()) for i in range(9) if mask[i]) / int(mask.sum())
    got = masked_mean(losses, mask)
    got.backward()
    print("masked_mean", got.item(), expected)
    assert abs(got.item() - expected) < 1e-12
    assert abs(masked_mean(losses).item() - float(losses.detach().sum()) / 9) < 1e-12
    assert torch.equal(losses.grad, mask.double() / int(mask.sum()))
    # A NaN in a masked-out entry must not reach the mean or the gradient.
    bad = losses.detach().clone()
    bad[~mask] = float("nan")
    bad.requires_grad_()
    out = masked_mean(bad, mask)
    out.backward()
    assert math.isfinite(out.item()) and torch.isfinite(bad.grad).all()


def test_fp32_under_autocast():
    """Inside a bf16 autocast region the loss still computes in fp32 (bf16 similarities would be off by ~1e-2)."""
    gen = torch.Generator().manual_seed(13)
    anchor, cands = torch.randn(6, 32, generator=gen), torch.randn(6, 3, 32, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = asymmetric_nce(anchor, cands, gather=False)
    err = _err(loss, reference_nce(anchor, cands))
    print("autocast bf16: dtype", loss.dtype, "max err", err)
    assert loss.dtype == torch.float32 and err < TOL[torch.float32]


def test_shape_errors():
    with pytest.raises(ValueError, match="anchor"):
        asymmetric_nce(torch.randn(3, 4), torch.randn(3, 4), gather=False)
