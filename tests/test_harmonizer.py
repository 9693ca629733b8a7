"""GradientHarmonizer against the private-copy brute force (tests/brute_force.py), in float64.

The model and the reference run in float64; the harmonizer's dots are fp32 by contract (docs/HARMONIZER.md "3. The
measurement tiers"), so dots are compared to fp32 tolerance, relative to each sample's gradient norms. Gradients from
the ordinary backward (ghost mode) are float64 up to the fp32 coefficients; materialize mode's buffers are fp32.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from brute_force import ToyVATT, cmaloss, dots_of, flat, toy_batch
from harmony import HarmonyConfig
from harmony.config import ConfigError
from harmony.method.grad_sample import PerSampleError
from harmony.method.harmonizer import GradientHarmonizer
from harmony.model.losses import mil_nce, nce
from helpers import (MASKS, SEED, TOL, check, check_dots, check_grads, expected_update, fresh_model, method_cfg,
                     reference)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(cfg: HarmonyConfig, B: int, seed: int = SEED, model=None, masks=None, bookkeeping=None, **kw):
    """One harmonized step on a fresh toy model; returns (model, harmonizer, stats)."""
    model = model if model is not None else fresh_model(seed)
    h = GradientHarmonizer(model, cfg, bookkeeping=bookkeeping)
    x = toy_batch(B, seed=seed + B)
    m_va, m_vt = masks if masks is not None else MASKS[B]
    z_v, z_a, z_vt, z_t = model(*x)
    stats = h.backward(nce(z_v, z_a, mask=m_va), mil_nce(z_vt, z_t, mask=m_vt), va_inputs=(z_v, z_a),
                       vt_inputs=(z_vt, z_t), mask_va=m_va, mask_vt=m_vt, **kw)
    return model, h, stats


@pytest.mark.parametrize("B", [1, 2, 7])
@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("scope", ["shared", "all"])
@pytest.mark.parametrize("bookkeeping", [False, True])
def test_dots_and_plain_grad_match_brute_force(B, mode, scope, bookkeeping):
    """realign=none, curriculum=none: dots = brute force; .grad = Σ_i g^va_i + λ g^vt_i = ∇(L_va + λ L_vt).
    bookkeeping: the update from the kept X and G; else by a second (weighted) backward."""
    lam = 0.5
    g_va, g_vt = reference(B)
    model, h, stats = run(method_cfg(realign="none", curriculum="none", mode=mode, scope=scope, lam=lam), B,
                          bookkeeping=bookkeeping)
    assert stats.mode == mode and h.bookkeeping == bookkeeping
    names = h.scope_names()
    check_dots(stats.dots, dots_of(flat(g_va, names), flat(g_vt, names)))
    ones = torch.ones(B)
    expected = expected_update(model, g_va, g_vt, ones, lam * ones)
    check_grads(model, expected, TOL["grad_exact"] if mode == "ghost" else TOL["grad_fp32_buffers"])
    # the same, by autograd on the batch loss (Σ_i g_i = ∇L: the path decomposition sums to the batch gradient)
    plain = fresh_model()
    x = toy_batch(B, seed=SEED + B)
    L_va, L_vt = cmaloss(*MASKS[B])(plain(*x))
    (L_va + lam * L_vt).backward()
    check_grads(model, {n: p.grad for n, p in plain.named_parameters()},
                TOL["grad_exact"] if mode == "ghost" else TOL["grad_fp32_buffers"])
    for f in ("cos", "weights", "alpha", "beta", "coef_va", "coef_vt"):
        assert torch.isfinite(getattr(stats, f)).all(), f


def test_shared_scope_is_what_both_losses_reach():
    """Without model.scope_parameters, 'shared' = parameters reachable from both losses' inputs."""
    g_va, g_vt = reference(7)
    model, h, _ = run(method_cfg(realign="none", mode="ghost", scope="shared"), 7)
    expected = {n for n, _ in model.named_parameters() if n.startswith(ToyVATT.SHARED_PREFIXES)}
    print(sorted(expected ^ set(h.scope_names())))
    assert set(h.scope_names()) == expected
    # and by the brute force: exactly the parameters with a nonzero per-sample gradient from both losses
    both = {n for n in g_va if g_va[n].abs().sum() > 0 and g_vt[n].abs().sum() > 0}
    assert both == expected


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("bookkeeping", [False, True])
def test_pcgrad_with_curriculum_on_actual_gradients(mode, bookkeeping):
    """pcgrad + a threshold curriculum: α, β follow docs/METHOD.md "Realignment rules" on the brute-force dots, the
    PCGrad properties hold on the actual per-sample gradients, and .grad = Σ_i ca_i g^va_i + cv_i g^vt_i for every
    parameter."""
    B, lam = 7, 1.0
    g_va, g_vt = reference(B)
    cfg = method_cfg(realign="pcgrad", curriculum="threshold", mode=mode, scope="shared", lam=lam,
                        curriculum_start=0.0, kappa0=0.0, kappa1=0.0, min_keep=0.25)
    model, h, st = run(cfg, B, step=5, total_steps=10, bookkeeping=bookkeeping)
    names = h.scope_names()
    A, V = flat(g_va, names), flat(g_vt, names)
    ref = dots_of(A, V)
    check_dots(st.dots, ref)
    d, na, nt = ref.unbind(1)
    conflict = st.valid & (d < 0)
    print("conflicting samples:", conflict.tolist(), "cos:", st.cos.tolist())
    assert conflict.any() and (~conflict & st.valid).any(), "the test batch must mix conflicting and agreeing samples"
    assert torch.equal(st.conflict, conflict)
    alpha = torch.where(conflict, 1 - lam * d / na, torch.ones_like(d))
    beta = torch.where(conflict, lam - d / nt, lam * torch.ones_like(d))
    check("alpha", st.alpha, alpha, TOL["dots"] * 10, scale=alpha.abs() + 1)
    check("beta", st.beta, beta, TOL["dots"] * 10, scale=beta.abs() + 1)
    # PCGrad properties on the actual gradients (docs/METHOD.md "Realignment rules")
    Gi = st.alpha.double()[:, None] * A + st.beta.double()[:, None] * V
    tol = 1e-5 * (A.norm(dim=1) * V.norm(dim=1) + A.norm(dim=1) ** 2 + V.norm(dim=1) ** 2)
    assert ((Gi * A).sum(1)[conflict] >= -tol[conflict]).all()
    assert ((Gi * V).sum(1)[conflict] >= -tol[conflict]).all()
    ta = A - (d / nt)[:, None] * V
    tv = V - (d / na)[:, None] * A
    assert ((ta * tv).sum(1)[conflict] >= -tol[conflict]).all()
    # curriculum: threshold κ = 0 on the cosine, guard ceil(0.25·n_valid), invalid samples weight 1
    # (some valid cosine is ≥ 0, so the guard does not lower κ)
    assert torch.equal(st.weights, torch.where(st.valid, (st.cos >= 0).float(), 1.0))
    assert (st.weights == 0).any()
    norm = st.weights.double().sum() / B
    check("coef_va", st.coef_va, st.weights.double() * st.alpha.double() / norm, TOL["grad_fp32_coef"])
    check("coef_vt", st.coef_vt, st.weights.double() * st.beta.double() / norm, TOL["grad_fp32_coef"])
    expected = expected_update(model, g_va, g_vt, st.coef_va, st.coef_vt)
    check_grads(model, expected, TOL["grad_fp32_coef"] if mode == "ghost" else TOL["grad_fp32_buffers"])


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("bookkeeping", [False, True])
def test_apply_to_scope(mode, bookkeeping):
    """apply_to=scope: scoped parameters get the realigned update, the others w-weighted plain gradients."""
    B, lam = 7, 1.0
    g_va, g_vt = reference(B)
    cfg = method_cfg(realign="pcgrad", mode=mode, scope="shared", lam=lam, apply_to="scope")
    model, h, st = run(cfg, B, bookkeeping=bookkeeping)
    assert not torch.allclose(st.alpha, torch.ones(B)), "needs a conflicting sample"
    inside = set(h.scope_names())
    outside = {n for n, _ in model.named_parameters()} - inside
    tol = TOL["grad_fp32_coef"] if mode == "ghost" else TOL["grad_fp32_buffers"]
    check_grads(model, expected_update(model, g_va, g_vt, st.coef_va, st.coef_vt), tol, names=inside)
    w = st.weights.double() / (st.weights.double().sum() / B)
    check_grads(model, expected_update(model, g_va, g_vt, w, lam * w), tol, names=outside)


def test_modes_agree():
    """ghost and materialize give the same stats and .grad (fp32 tolerance) under realignment and curriculum."""
    cfg = dict(realign="pcgrad", curriculum="ratio", scope="all", curriculum_start=0.0, rho0=0.5)
    mg, _, sg = run(method_cfg(mode="ghost", **cfg), 7, step=1, total_steps=10)
    mm, _, sm = run(method_cfg(mode="materialize", **cfg), 7, step=1, total_steps=10)
    check_dots(sm.dots, sg.dots.double())
    assert torch.equal(sg.weights, sm.weights)
    assert (sg.weights == 0).any()
    check_grads(mm, {n: p.grad for n, p in mg.named_parameters()}, TOL["grad_fp32_buffers"])


def test_empty_mask_and_zero_gradient_give_no_nan():
    """All of L_vt masked: G = ∇L_va, cos 0, nothing NaN. B = 1: NCE is the constant log 2, every gradient is 0."""
    B = 7
    masks = (torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool))
    for mode, bk in (("ghost", False), ("ghost", True), ("materialize", False), ("materialize", True)):
        model, _, st = run(method_cfg(realign="pcgrad", curriculum="threshold", curriculum_start=0.0, mode=mode),
                           B, masks=masks, step=3, total_steps=4, bookkeeping=bk)
        assert not st.valid.any() and st.kept == 1.0
        assert torch.equal(st.dots[:, 2], torch.zeros(B))
        assert torch.isfinite(st.cos).all() and torch.isfinite(st.coef_va).all() and torch.isfinite(st.coef_vt).all()
        plain = fresh_model()
        L_va, L_vt = cmaloss(*masks)(plain(*toy_batch(B, seed=SEED + B)))
        assert L_vt.item() == 0.0
        L_va.backward()
        check_grads(model, {n: p.grad for n, p in plain.named_parameters()},
                    TOL["grad_exact"] if mode == "ghost" else TOL["grad_fp32_buffers"])
    for mode in ("ghost", "materialize"):     # B = 1: ℓ = log 2 up to rounding, gradients ~1e-14
        model, _, st = run(method_cfg(realign="pcgrad", mode=mode), 1)
        print("B=1 dots", st.dots.tolist(), "cos", st.cos.tolist())
        assert st.dots.abs().max() < 1e-20
        assert all(torch.isfinite(p.grad).all() and p.grad.abs().max() < 1e-12 for p in model.parameters())
        assert torch.isfinite(st.cos).all() and torch.isfinite(st.coef_va).all() and torch.isfinite(st.coef_vt).all()
    for mode in ("ghost", "materialize"):     # an exactly zero L_vt gradient for every sample: nt = 0, cos 0, α = 1
        model = fresh_model()
        h = GradientHarmonizer(model, method_cfg(realign="pcgrad", mode=mode))
        z = model(*toy_batch(B, seed=SEED + B))
        st = h.backward(nce(z[0], z[1]), 0.0 * mil_nce(z[2], z[3]), va_inputs=z[:2], vt_inputs=z[2:])
        assert torch.equal(st.dots[:, 0], torch.zeros(B)) and torch.equal(st.dots[:, 2], torch.zeros(B))
        assert (st.dots[:, 1] > 0).all() and torch.equal(st.cos, torch.zeros(B))
        assert torch.equal(st.alpha, torch.ones(B)) and not st.conflict.any()


class _BNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        z = self.bn(self.lin(x))
        return z, z.flip(1), z, z


def test_batchnorm_in_scope_raises_a_clear_error():
    with pytest.raises(PerSampleError, match=r"'bn' \(BatchNorm1d\) mixes samples.*register_grad_sampler"):
        GradientHarmonizer(_BNModel(), method_cfg(scope="all"))
    model = _BNModel()
    h = GradientHarmonizer(model, method_cfg(scope="shared", mode="ghost"))
    z = model(torch.randn(5, 4))
    with pytest.raises(PerSampleError, match="BatchNorm1d"):
        h.backward(nce(z[0], z[1]), mil_nce(z[2], z[3]), va_inputs=z[:2], vt_inputs=z[2:])


class _DirectUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.lin.weight)         # the weight used outside self.lin
        return self.out(h), h, self.out(h).flip(1), h


def test_parameter_used_outside_its_module_raises():
    model = _DirectUse()
    h = GradientHarmonizer(model, method_cfg(scope="all", mode="ghost"))
    z = model(torch.randn(5, 4))
    with pytest.raises(PerSampleError, match="lin.weight.*never called"):
        h.backward(nce(z[0], z[1]), mil_nce(z[2], z[3]), va_inputs=z[:2], vt_inputs=z[2:])


def test_explicit_scope_list_and_auto_mode():
    model = fresh_model()
    params = [model.block.fc1.weight, model.norm.bias, model.v_agg.token]
    cfg = method_cfg(realign="none", mode="auto", scope=params, memory_budget_mb=1e-3)
    _, h, st = run(cfg, 7, model=model)
    assert h.scope_names() == ["block.fc1.weight", "norm.bias", "v_agg.token"]
    assert st.mode == "ghost"              # 2·B·P_S·4 bytes > 1 kB
    g_va, g_vt = reference(7)
    check_dots(st.dots, dots_of(flat(g_va, h.scope_names()), flat(g_vt, h.scope_names())))
    _, _, st = run(method_cfg(realign="none", mode="auto", scope="all", memory_budget_mb=64.0), 7)
    assert st.mode == "materialize"


def test_disabled_is_plain_training():
    model, _, st = run(method_cfg(enabled=False, lam=0.5), 7)
    assert st.mode == "plain"
    plain = fresh_model()
    L_va, L_vt = cmaloss(*MASKS[7])(plain(*toy_batch(7, seed=SEED + 7)))
    (L_va + 0.5 * L_vt).backward()
    check_grads(model, {n: p.grad for n, p in plain.named_parameters()}, TOL["grad_exact"])


def test_state_dict_round_trip_and_memory():
    cfg = method_cfg(realign="gradvac", gradvac_ema=0.5, curriculum="ratio", score_memory=True, curriculum_start=0.0)
    model = fresh_model()
    h = GradientHarmonizer(model, cfg)
    ids = torch.tensor([3, 9, 4, 0, 12, 7, 5])
    for step in range(2):
        model.zero_grad()
        z = model(*toy_batch(7, seed=SEED + 7))
        st = h.backward(nce(z[0], z[1]), mil_nce(z[2], z[3]), va_inputs=z[:2], vt_inputs=z[2:], step=step,
                        total_steps=4, ids=ids)
    score, seen = h.memory.scores(ids)
    assert seen.all()
    torch.testing.assert_close(score, st.cos)          # the same items twice: the EMA of equal cosines
    buf = io.BytesIO()
    torch.save(h.state_dict(), buf)
    buf.seek(0)
    h2 = GradientHarmonizer(fresh_model(), cfg)
    h2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(h2.memory.scores(ids)[0], score)
    assert h2.realign_state.target == h.realign_state.target and h.realign_state.updates == 2


def test_records_are_released_and_eval_is_not_recorded():
    model = fresh_model()
    h = GradientHarmonizer(model, method_cfg(mode="ghost"))
    with torch.no_grad():
        model(*toy_batch(2))
    model.eval()
    model(*toy_batch(2))
    assert not h.rec.holds_records
    model.train()
    z = model(*toy_batch(2))
    assert h.rec.holds_records
    h.backward(nce(z[0], z[1]), mil_nce(z[2], z[3]), va_inputs=z[:2], vt_inputs=z[2:])
    assert not h.rec.holds_records


def test_batched_and_plain_measurement_give_the_same():
    """The two measurement columns by one batched backward (the GPU default) = by two plain passes (the CPU
    default, and the fallback when an op cannot be batched); the plain passes match the brute force above."""
    cfg = method_cfg(realign="pcgrad", mode="ghost", scope="all")
    out = []
    for batched in (True, False):
        model = fresh_model()
        h = GradientHarmonizer(model, cfg)
        h.rec._batched = batched
        z = model(*toy_batch(7, seed=SEED + 7))
        m_va, m_vt = MASKS[7]
        st = h.backward(nce(z[0], z[1], mask=m_va), mil_nce(z[2], z[3], mask=m_vt), va_inputs=z[:2],
                        vt_inputs=z[2:], mask_va=m_va, mask_vt=m_vt)
        assert h.rec._batched == batched
        out.append((model, st))
    (m1, s1), (m2, s2) = out
    check_dots(s2.dots, s1.dots.double())
    check_grads(m2, {n: p.grad for n, p in m1.named_parameters()}, TOL["grad_fp32_coef"])


def test_bookkeeping_choice():
    """Default: bookkeeping when the scoped layers do at least half of the work; never when impossible."""
    _, h, _ = run(method_cfg(mode="ghost", scope="shared"), 2)
    assert h.bookkeeping is True
    model = fresh_model()
    _, h, _ = run(method_cfg(mode="ghost", scope=[model.norm.weight, model.v_head[0].weight]), 2, model=model)
    assert h.bookkeeping is False
    model = _DirectUse()
    h = GradientHarmonizer(model, method_cfg(scope=[model.out.weight], mode="ghost"), bookkeeping=True)
    z = model(torch.randn(5, 4))
    with pytest.raises(PerSampleError, match="bookkeeping=True is not possible: parameter lin.weight"):
        h.backward(nce(z[0], z[1]), mil_nce(z[2], z[3]), va_inputs=z[:2], vt_inputs=z[2:])
    model = _DirectUse()                      # the same model, default: falls back to the second backward
    h = GradientHarmonizer(model, method_cfg(scope=[model.out.weight], mode="ghost"))
    z = model(torch.randn(5, 4))
    h.backward(nce(z[0], z[1]), mil_nce(z[2], z[3]), va_inputs=z[:2], vt_inputs=z[2:])
    assert h.bookkeeping is False and model.lin.weight.grad is not None


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_autocast_bf16_accumulates_in_fp32(mode):
    """Under CPU autocast (bf16 activations and output gradients) dots stay fp32 and the cosines follow the fp32
    run to bf16 accuracy (8-bit mantissa: a few 1e-3 per layer)."""
    x = toy_batch(7, dtype=torch.float32, seed=SEED + 7)

    def step(autocast):
        torch.manual_seed(SEED)
        model = ToyVATT().float()
        h = GradientHarmonizer(model, method_cfg(realign="pcgrad", mode=mode, scope="shared"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = model(*x)
            st = h.backward(nce(z[0], z[1]), mil_nce(z[2], z[3]), va_inputs=z[:2], vt_inputs=z[2:])
        return st, model
    ref, _ = step(False)
    st, model = step(True)
    err = (st.cos - ref.cos).abs().max().item()
    print(f"bf16 autocast vs fp32: cos max abs err {err:.3e}")
    assert st.dots.dtype == torch.float32 and err < 0.03
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        h.mul_(2.0)                    # changes the kept output of self.lin after its call
        z = self.out(h)
        return z, h, z.flip(1), h


def test_in_place_change_of_a_kept_activation_raises():
    model = _InPlace()
    h = GradientHarmonizer(model, method_cfg(scope="all", mode="ghost"))
    z = model(torch.randn(5, 4))
    with pytest.raises(PerSampleError, match="'lin' was modified in place"):
        h.backward(nce(z[0], z[1]), mil_nce(z[2], z[3]), va_inputs=z[:2], vt_inputs=z[2:])


def step_with_losses(cfg: HarmonyConfig, B: int, vt_offset=None):
    """One harmonized step at step 0 of 10 with item ids: (model, harmonizer, stats, l_va, l_vt). ``vt_offset``
    [B]: constants added to the per-sample ℓ^vt (planted large losses: the values change, the gradients do not)."""
    model = fresh_model()
    h = GradientHarmonizer(model, cfg)
    x = toy_batch(B, seed=SEED + B)
    m_va, m_vt = MASKS[B]
    z_v, z_a, z_vt, z_t = model(*x)
    l_va, l_vt = nce(z_v, z_a, mask=m_va), mil_nce(z_vt, z_t, mask=m_vt)
    if vt_offset is not None:
        l_vt = l_vt + vt_offset.to(l_vt.dtype)
    st = h.backward(l_va, l_vt, va_inputs=(z_v, z_a), vt_inputs=(z_vt, z_t), mask_va=m_va, mask_vt=m_vt,
                    step=0, total_steps=10, ids=torch.arange(B))
    return model, h, st, l_va, l_vt


def test_loss_ranked_curriculum_keeps_the_lowest_losses():
    """harmony.curriculum_score=loss: the ratio schedule keeps the ceil(ρ·n) valid samples with the lowest
    ℓ^va + λ·ℓ^vt (float64 reference), the memory then holds those scores, and thresholds are refused."""
    B, lam = 7, 0.5
    cfg = method_cfg(realign="none", curriculum="ratio", curriculum_score="loss", lam=lam, curriculum_start=0.0,
                        rho0=0.5, ramp=1.0, min_keep=0.0).validate()
    model, h, st, l_va, l_vt = step_with_losses(cfg, B)
    m_va, m_vt = MASKS[B]
    valid = m_va & m_vt
    total = (torch.where(m_va, l_va, 0.0) + lam * torch.where(m_vt, l_vt, 0.0)).detach().double()
    k = math.ceil(0.5 * int(valid.sum()))
    order = sorted((float(total[i]), i) for i in range(B) if valid[i])
    kept = {i for _, i in order[:k]}
    want = torch.tensor([1.0 if (not valid[i] or i in kept) else 0.0 for i in range(B)])
    assert torch.equal(st.weights.cpu(), want.float()) and (want == 0).any()
    scores, seen = h.memory.scores(torch.arange(B))
    torch.testing.assert_close(scores[valid].double(), -total[valid], rtol=1e-6, atol=1e-6)
    for bad in (dict(curriculum="threshold"), dict(curriculum="soft", score_memory=True)):
        with pytest.raises(ConfigError, match="curriculum_score=loss"):
            method_cfg(curriculum_score="loss", **bad).validate()


def em_two_gaussians(x: torch.Tensor, tol: float = 1e-13, max_iter: int = 10000) -> torch.Tensor:
    """A two-component 1-D Gaussian mixture fitted by EM in float64 until the parameters stop moving, started from
    the lower and upper halves of the sorted values: [3, 2] (weights, means, variances), components by mean."""
    x = x.double().sort().values
    half = x.numel() // 2
    lo, hi = x[:half], x[half:]
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    mu = torch.stack([lo.mean(), hi.mean()])
    var = torch.stack([lo.var(unbiased=False), hi.var(unbiased=False)])
    for _ in range(max_iter):
        dens = w * torch.exp(-(x[:, None] - mu) ** 2 / (2 * var)) / torch.sqrt(2 * math.pi * var)
        r = dens / dens.sum(1, keepdim=True)
        n = r.sum(0)
        new = torch.stack([n / x.numel(), (r * x[:, None]).sum(0) / n,
                           (r * (x[:, None] - (r * x[:, None]).sum(0) / n) ** 2).sum(0) / n])
        done = bool((new - torch.stack([w, mu, var])).abs().max() < tol)
        w, mu, var = new
        if done:
            break
    order = torch.argsort(mu)
    return torch.stack([w[order], mu[order], var[order]])


@pytest.mark.parametrize("score", ["gvt", "combo", "gmm"])
def test_other_scores_and_vt_only_action_on_brute_force_gradients(score):
    """curriculum_score gvt / combo / gmm with curriculum_target=vt: the kept set follows the score computed
    in float64 from the brute-force dots and the losses, the weights scale only each sample's video–text
    coefficient, and .grad = Σ_i α_i g^va_i + w_i β_i g^vt_i / norm on the brute-force gradients. For gmm two
    valid samples (one of them the batch's lowest ℓ^vt) carry planted large caption losses: the mixture must drop
    exactly those, and its clean posterior must be that of an independent float64 EM fit."""
    B, lam = 7, 0.5
    g_va, g_vt = reference(B)
    extra = dict(curriculum="threshold", kappa0=0.5, kappa1=0.5, gmm_window=64) if score == "gmm" else \
        dict(curriculum="ratio", rho0=0.5)
    cfg = method_cfg(realign="none", curriculum_score=score, curriculum_target="vt", lam=lam, mode="ghost",
                        curriculum_start=0.0, ramp=1.0, min_keep=0.0, **extra).validate()
    planted = torch.zeros(B, dtype=torch.bool)
    planted[[1, 3]] = True
    offset = torch.where(planted, 25.0, 0.0).double() if score == "gmm" else None
    model, h, st, l_va, l_vt = step_with_losses(cfg, B, vt_offset=offset)
    m_va, m_vt = MASKS[B]
    valid = m_va & m_vt
    names = h.scope_names()
    d, na, nt = dots_of(flat(g_va, names), flat(g_vt, names)).unbind(1)
    cos = d / (na * nt).sqrt()
    lva = torch.where(m_va, l_va, 0.0).detach().double()
    lvt = torch.where(m_vt, l_vt, 0.0).detach().double()
    gvt = -nt.sqrt() * (1 - cos)
    if score == "gmm":
        vals = lvt[valid].float().double()   # the harmonizer hands the losses on in fp32, as it does the dots
        assert h.gmm.values.numel() == vals.numel()
        assert planted[valid].any() and (~planted[valid]).any()
        # the planted losses lie above every clean one; sample 1 had the batch's lowest ℓ^vt before planting
        assert float(vals[planted[valid]].min()) > float(vals[~planted[valid]].max())
        assert int(torch.argmin(torch.where(valid, lvt - offset, math.inf))) == 1
        fit = em_two_gaussians(vals)
        print("independent fit (w, mu, var)", fit.tolist(), "code's", h.gmm.params.tolist())
        assert float(fit[2].min()) > 1e-2   # well above LossMixture's variance floor: the floor plays no part
        w_, mu, var = fit
        dens = w_ * torch.exp(-(vals[:, None] - mu) ** 2 / (2 * var)) / torch.sqrt(2 * math.pi * var)
        post = dens[:, 0] / dens.sum(1)
        torch.testing.assert_close(st.score.double()[valid], post, rtol=0, atol=1e-6)
        torch.testing.assert_close(h.gmm.params, fit, rtol=1e-9, atol=0)
        want = torch.ones(B)
        want[valid] = (post >= 0.5).float()
        assert torch.equal(want, (~(planted & valid)).float())   # exactly the planted samples are dropped
    else:
        if score == "gvt":
            s = gvt
        else:
            z = lambda t: (t - t[valid].mean()) / t[valid].std()  # noqa: E731
            s = (z(-(lva + lam * lvt)) + z(gvt)) / 2
        k = math.ceil(0.5 * int(valid.sum()))
        kept = {i for _, i in sorted(((-float(s[i]), i) for i in range(B) if valid[i]))[:k]}
        want = torch.tensor([1.0 if (not valid[i] or i in kept) else 0.0 for i in range(B)])
    print(score, "weights", st.weights.tolist(), "want", want.tolist())
    assert torch.equal(st.weights.cpu(), want.float())
    norm = want.double().sum() / B
    torch.testing.assert_close(st.coef_va.double(), torch.ones(B, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(st.coef_vt.double(), lam * want.double() / norm, rtol=1e-6, atol=0)
    check_grads(model, expected_update(model, g_va, g_vt, st.coef_va, st.coef_vt), TOL["grad_fp32_coef"])
    assert (want == 0).any()
    for bad in (dict(curriculum="threshold"), dict(curriculum="soft")):
        if score != "gmm":
            with pytest.raises(ConfigError, match=f"curriculum_score={score}"):
                method_cfg(curriculum_score=score, **bad).validate()


def test_memory_stops_updating_after_memory_until():
    cfg = method_cfg(realign="none", curriculum="none", memory_until=0.5)
    model = fresh_model()
    h = GradientHarmonizer(model, cfg)
    x = toy_batch(3, seed=SEED + 3)
    m = torch.ones(3, dtype=torch.bool)
    for step in (4, 5, 6):
        z_v, z_a, z_vt, z_t = model(*x)
        h.backward(nce(z_v, z_a), mil_nce(z_vt, z_t), va_inputs=(z_v, z_a), vt_inputs=(z_vt, z_t), mask_va=m,
                   mask_vt=m, step=step, total_steps=10, ids=torch.arange(3))
    assert h.memory.count[:3].tolist() == [1, 1, 1]     # only step 4 (< 0.5·10) was folded in


@pytest.mark.parametrize("score", ["loss", "gmm"])
def test_unmeasured_loss_curriculum_equals_the_measured_one(score):
    """harmony.measure=false: the same weights and .grad as the measured run with the same loss-based score
    (which never reads the dots), no activation kept, NaN cosines; anything that needs the dots is refused."""
    B = 7
    extra = dict(curriculum="ratio", rho0=0.5) if score == "loss" else dict(curriculum="threshold", kappa0=0.5,
                                                                            kappa1=0.5)
    runs = []
    for measure in (True, False):
        cfg = method_cfg(realign="none", curriculum_score=score, measure=measure, curriculum_start=0.0, ramp=1.0,
                            min_keep=0.0, curriculum_target="vt", **extra).validate()
        model = fresh_model()
        h = GradientHarmonizer(model, cfg)
        x = toy_batch(B, seed=SEED + B)
        m_va, m_vt = MASKS[B]
        z_v, z_a, z_vt, z_t = model(*x)
        if not measure:
            assert not h.rec.holds_records
        st = h.backward(nce(z_v, z_a, mask=m_va), mil_nce(z_vt, z_t, mask=m_vt), va_inputs=(z_v, z_a),
                        vt_inputs=(z_vt, z_t), mask_va=m_va, mask_vt=m_vt, step=0, total_steps=10,
                        ids=torch.arange(B))
        runs.append((model, st))
    (m1, s1), (m2, s2) = runs
    assert s2.mode == "unmeasured" and torch.isnan(s2.cos[s2.valid]).all()
    assert torch.equal(s1.weights, s2.weights) and torch.equal(s1.coef_vt, s2.coef_vt)
    got = torch.cat([p.grad.flatten() for p in m2.parameters()])
    ref = torch.cat([p.grad.flatten() for p in m1.parameters()])
    check("grad", got, ref, TOL["grad_fp32_coef"])
    for bad in (dict(realign="pcgrad", curriculum_score="loss", curriculum="ratio"),
                dict(realign="none", curriculum_score="cos"), dict(realign="none", curriculum_score="gvt",
                                                                   curriculum="ratio")):
        with pytest.raises(ConfigError, match="measure=false"):
            method_cfg(measure=False, **bad).validate()


def test_pair_target_filters_each_pair_by_its_own_score_on_brute_force_gradients():
    """curriculum_target=pair with the loss score: the caption filter keeps the lowest ℓ^vt, the audio filter the
    lowest ℓ^va, each on its own; a sample keeps whichever pair is trusted, and .grad = Σ_i w^a_i α_i g^va_i / n_a
    + w^t_i λ g^vt_i / n_t (n_k = Σ_i w^k_i / B) on the brute-force per-sample gradients."""
    B, lam = 7, 0.5
    g_va, g_vt = reference(B)
    cfg = method_cfg(realign="none", curriculum="ratio", curriculum_score="loss", curriculum_target="pair",
                        lam=lam, mode="ghost", curriculum_start=0.0, ramp=1.0, rho0=0.5, min_keep=0.0).validate()
    model, h, st, l_va, l_vt = step_with_losses(cfg, B)
    m_va, m_vt = MASKS[B]
    valid = m_va & m_vt
    k = math.ceil(0.5 * int(valid.sum()))

    def keep_lowest(loss):
        kept = {i for _, i in sorted((float(loss[i]), i) for i in range(B) if valid[i])[:k]}
        return torch.tensor([1.0 if (not valid[i] or i in kept) else 0.0 for i in range(B)], dtype=torch.float64)

    w_t, w_a = keep_lowest(l_vt.detach().double()), keep_lowest(l_va.detach().double())
    print("caption kept", w_t.tolist(), "audio kept", w_a.tolist())
    assert not torch.equal(w_t, w_a)  # the two pairs are decided apart
    assert torch.equal(st.weights.cpu().double(), w_t)
    torch.testing.assert_close(st.coef_va.double(), w_a / (w_a.sum() / B), rtol=1e-6, atol=0)
    torch.testing.assert_close(st.coef_vt.double(), lam * w_t / (w_t.sum() / B), rtol=1e-6, atol=0)
    torch.testing.assert_close(st.score.double()[valid], -l_vt.detach().double()[valid], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.score_audio.double()[valid], -l_va.detach().double()[valid], rtol=1e-6, atol=1e-6)
    check_grads(model, expected_update(model, g_va, g_vt, st.coef_va, st.coef_vt), TOL["grad_fp32_coef"])
    with pytest.raises(ConfigError, match="curriculum_target=pair"):
        method_cfg(curriculum="ratio", score_memory=True, curriculum_target="pair").validate()


@pytest.mark.parametrize("score", ["agree", "loss_agree"])
def test_agreement_scores_fit_their_mixtures_to_the_batch_neighbourhoods(score):
    """curriculum_score=agree / loss_agree: the mixtures are fitted to −agree^k computed (here, in float64 by brute
    force) from the batch's own embeddings, each sample's neighbours being the other samples; loss_agree's caption
    score is the mean of the loss mixture's and the agreement mixture's clean posteriors; measure=false works."""
    from harmony.method.agreement import AgreementBank
    B = 9
    cfg = method_cfg(realign="none", curriculum="threshold", kappa0=0.5, kappa1=0.5, curriculum_score=score,
                        curriculum_target="pair", measure=False, curriculum_start=0.0, min_keep=0.0, agree_k=3,
                        agree_kernel=0.2, gmm_window=64).validate()
    model = fresh_model()
    h = GradientHarmonizer(model, cfg)
    x = toy_batch(B, seed=SEED + B)
    m = torch.ones(B, dtype=torch.bool)
    z_v, z_a, z_vt, z_t = model(*x)
    st = h.backward(nce(z_v, z_a), mil_nce(z_vt, z_t), va_inputs=(z_v, z_a), vt_inputs=(z_vt, z_t), mask_va=m,
                    mask_vt=m, step=0, total_steps=10, ids=torch.arange(B))
    unit = lambda z: torch.nn.functional.normalize(z.detach().double().reshape(B, -1, z.shape[-1]).mean(1), dim=1)  # noqa
    for pair, (kz, vz) in (("vt", (z_vt, z_t)), ("va", (z_v, z_a))):
        key, val = unit(kz), unit(vz)
        want = []
        for i in range(B):
            near = sorted((j for j in range(B) if j != i), key=lambda j: -float(key[i] @ key[j]))[:3]
            want.append(sum(math.exp((float(val[i] @ val[j]) - 1) / 0.2) for j in near) / 3)
        torch.testing.assert_close(h.mixtures[f"agree_{pair}"].values, -torch.tensor(want, dtype=torch.float64),
                                   rtol=0, atol=1e-5)
    assert isinstance(h.agreement, AgreementBank) and h.agreement.ids.tolist() == list(range(B))
    if score == "loss_agree":
        post_l = h.mixtures["loss_vt"].clean_posterior(mil_nce(z_vt, z_t).detach())
        post_a = h.mixtures["agree_vt"].clean_posterior(h.mixtures["agree_vt"].values)
        torch.testing.assert_close(st.score.double(), (post_l.double() + post_a.double()) / 2, rtol=1e-5, atol=1e-6)
    assert torch.equal(st.weights, (st.score >= 0.5).float())
    state = h.state_dict()
    h2 = GradientHarmonizer(fresh_model(), cfg)
    h2.load_state_dict(state)
    assert torch.equal(h2.agreement.ids, h.agreement.ids)
    assert torch.equal(h2.mixtures["agree_va"].values, h.mixtures["agree_va"].values)


def _objective_reference(model, ca, cv, temperature: float = 0.07):
    """{name: ∇_θ [Σ_i ca_i ℓ^va_i / n_va + Σ_i cv_i ℓ^vt_i / n_vt]} on a copy of ``model``, the per-sample losses
    written out from the logit matrices (brute_force.logits_loss), not the library's; n_k: the valid count."""
    from brute_force import logits_loss
    copy = fresh_model()
    copy.load_state_dict(model.state_dict())
    B = ca.shape[0]
    m_va, m_vt = MASKS[B]
    z_v, z_a, z_vt, z_t = copy(*toy_batch(B, seed=SEED + B))
    total = 0.0
    for anchor, cands, mask, coef in ((z_v, z_a[:, None], m_va, ca), (z_vt, z_t, m_vt, cv)):
        e = torch.nn.functional.normalize(anchor, dim=-1)
        c = torch.nn.functional.normalize(cands, dim=-1)
        S = torch.einsum("jd,kld->jkl", e, c) / temperature
        total = total + (coef.double() * logits_loss(S, mask)).sum() / mask.sum().clamp(min=1)
    total.backward()
    return {n: p.grad for n, p in copy.named_parameters()}


@pytest.mark.parametrize("mode", ["ghost", "materialize", "unmeasured"])
def test_objective_update_is_the_gradient_of_the_coefficient_weighted_losses(mode):
    """update=objective: .grad = ∇[Σ_i ca_i ℓ^va_i / n_va + Σ_i cv_i ℓ^vt_i / n_vt] with the step's own
    coefficients (per-pair loss filter plus PCGrad where measured), on a brute force that writes the losses out
    from the logits. The rows update of the same coefficients is Σ_i ca_i g^va_i + cv_i g^vt_i (path per-sample
    gradients), a different vector once the coefficients differ: a dropped pair's term still acts through it.
    B = 7 with masked pairs (a batch of 2 has one valid caption: nothing to drop)."""
    B = 7
    measured = mode != "unmeasured"
    kw = dict(realign="pcgrad" if measured else "none", curriculum="ratio", curriculum_score="loss",
              curriculum_target="pair", curriculum_start=0.0, ramp=1.0, rho0=0.5, min_keep=0.0, lam=0.5,
              mode=mode if measured else "auto", measure=measured)
    model, h, st, _, _ = step_with_losses(method_cfg(update="objective", **kw).validate(), B)
    assert h.bookkeeping in (None, False)
    assert not torch.all(st.coef_vt[MASKS[B][1]] == st.coef_vt[MASKS[B][1]][0])   # the filter dropped some captions
    check_grads(model, _objective_reference(model, st.coef_va, st.coef_vt), TOL["grad_fp32_coef"])
    g_va, g_vt = reference(B)
    rows = expected_update(model, g_va, g_vt, st.coef_va, st.coef_vt)
    got = torch.cat([p.grad.flatten() for _, p in model.named_parameters()])
    ref_rows = torch.cat([rows[n].flatten() for n, _ in model.named_parameters()])
    assert (got - ref_rows).norm() > 1e-3 * ref_rows.norm()


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_objective_and_rows_updates_agree_when_every_coefficient_is_one(mode):
    """curriculum=none, realign=none: every coefficient is 1 (λ on L_vt), so both updates are ∇(L_va + λ L_vt)."""
    B = 7
    grads = {}
    for update in ("objective", "rows"):
        model, _, st, _, _ = step_with_losses(method_cfg(update=update, realign="none", curriculum="none", lam=0.5,
                                                         mode=mode).validate(), B)
        grads[update] = torch.cat([p.grad.flatten() for _, p in model.named_parameters()])
    check("objective vs rows", grads["objective"], grads["rows"], TOL["grad_fp32_coef"])
    ones = torch.ones(B, dtype=torch.float64)
    check_grads(model, _objective_reference(model, ones, 0.5 * ones), TOL["grad_fp32_coef"])


def test_objective_update_refuses_what_only_the_rows_update_can_do():
    """apply_to=scope (plain weights outside a parameter scope) and the bookkeeping update (parameter gradients
    formed from the measured rows) are the rows update's; update=objective says so instead of ignoring them."""
    with pytest.raises(ConfigError, match="update=rows"):
        method_cfg(update="objective", apply_to="scope").validate()
    with pytest.raises(ConfigError, match="update=rows"):
        GradientHarmonizer(fresh_model(), method_cfg(update="objective", mode="ghost"), bookkeeping=True)
