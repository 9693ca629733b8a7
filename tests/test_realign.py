"""Realignment rules (docs/METHOD.md "Realignment rules"): coefficients applied to actual per-sample gradient vectors,
checked against an independent float64 computation on the vectors and against the rules' stated properties."""
import io
import math
import zlib

import pytest
import torch

from helpers import method_cfg
from harmony.config import ConfigError
from harmony.method.realign import Realignment, RealignState, cosines, realign

U32 = 2.0 ** -24  # unit round-off of fp32: α, β are returned in fp32
RULES = ["none", "pcgrad", "project_va", "project_vt", "gradvac"]


def make_pairs(B, P, seed, avoid=(0.0,), margin=1e-3, conflict_frac=0.6):
    """Random gradient pairs g_va, g_vt [B, P] float64 with cosines spread over (-1, 1), most of them
    negative, norms over three orders of magnitude, and no cosine within ``margin`` of the values in
    ``avoid`` (the threshold, ±1) so that fp32 dots cannot flip a conflict decision."""
    g = torch.Generator().manual_seed(seed)
    ga = torch.randn(B, P, generator=g, dtype=torch.float64)
    gv = torch.empty_like(ga)
    for i in range(B):
        while True:
            target = -torch.rand((), generator=g).item() if torch.rand((), generator=g) < conflict_frac \
                else torch.rand((), generator=g).item()
            other = torch.randn(P, generator=g, dtype=torch.float64)
            other -= (other @ ga[i]) / (ga[i] @ ga[i]) * ga[i]  # orthogonal to ga[i]
            u, w = ga[i] / ga[i].norm(), other / other.norm()
            v = target * u + math.sqrt(max(0.0, 1 - target ** 2)) * w
            c = float(v @ ga[i] / (v.norm() * ga[i].norm()))
            if all(abs(c - a) > margin for a in tuple(avoid) + (-1.0, 1.0)):
                gv[i] = v
                break
    ga *= 10.0 ** (3 * torch.rand(B, 1, generator=g, dtype=torch.float64) - 1.5)
    gv *= 10.0 ** (3 * torch.rand(B, 1, generator=g, dtype=torch.float64) - 1.5)
    return ga, gv


def dots_of(ga, gv):
    """[B, 3] float64 (d, na, nt) from the vectors."""
    return torch.stack([(ga * gv).sum(1), (ga * ga).sum(1), (gv * gv).sum(1)], 1)


def ref_update(ga, gv, rule, lam, threshold, phi):
    """Independent float64 reference: the harmonized per-sample update G_i built from the vectors.
    Returns (G [B, P], conflict [B])."""
    d, na, nt = dots_of(ga, gv).unbind(1)
    c = d / (na * nt).sqrt()
    thr = phi if rule == "gradvac" else threshold
    conflict = c < thr
    ta, tv = ga.clone(), gv.clone()
    if rule in ("pcgrad", "project_va"):  # g_va loses its component along g_vt
        ta = ga - (d / nt)[:, None] * gv
    if rule in ("pcgrad", "project_vt"):
        tv = gv - (d / na)[:, None] * ga
    if rule == "gradvac":  # GradVac: move each gradient along the other until their cosine is φ
        s, sp = (1 - c * c).sqrt(), math.sqrt(1 - phi * phi)
        ta = ga + (ga.norm(dim=1) * (phi * s - c * sp) / (gv.norm(dim=1) * sp))[:, None] * gv
        tv = gv + (gv.norm(dim=1) * (phi * s - c * sp) / (ga.norm(dim=1) * sp))[:, None] * ga
    new = ta + lam * tv
    plain = ga + lam * gv
    return torch.where(conflict[:, None], new, plain), conflict


def apply(r: Realignment, ga, gv):
    """G_i = α_i g_va_i + β_i g_vt_i in float64 [B, P]."""
    return r.alpha.double()[:, None] * ga + r.beta.double()[:, None] * gv


def cos64(x, y):
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("lam", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_rules_match_vector_reference(rule, lam, threshold):
    phi = 0.25 if rule == "gradvac" else 0.0
    ga, gv = make_pairs(B=37, P=129, seed=zlib.crc32(repr((rule, lam, threshold)).encode()), avoid=(threshold, phi))
    cfg = method_cfg(realign=rule, lam=lam, conflict_threshold=threshold, gradvac_target=phi)
    r = realign(dots_of(ga, gv), torch.ones(37, dtype=torch.bool), cfg)
    G_ref, conflict_ref = ref_update(ga, gv, rule, lam, threshold, phi)
    G = apply(r, ga, gv)
    scale = r.alpha.double().abs() * ga.norm(dim=1) + r.beta.double().abs() * gv.norm(dim=1)
    err = ((G - G_ref).norm(dim=1) / scale).max().item()
    print(f"{rule} lam={lam} thr={threshold}: max relative error of G {err:.2e}, "
          f"conflicts {int(conflict_ref.sum())}/37")
    assert torch.equal(r.conflict, conflict_ref)
    assert 0 < int(conflict_ref.sum()) < 37
    assert err <= 8 * U32
    assert r.cos.dtype == r.alpha.dtype == r.beta.dtype == torch.float32
    assert r.alpha.shape == r.beta.shape == r.cos.shape == (37,)


def test_cosines_against_float64():
    ga, gv = make_pairs(B=64, P=1025, seed=1)
    ga[3] = 0.0
    gv[7] = 0.0
    dots = dots_of(ga, gv)
    c = cosines(dots.float(), eps=1e-12)
    ref = torch.nan_to_num(cos64(ga, gv), nan=0.0)
    err = (c.double() - ref).abs().max().item()
    print(f"cosine max abs error from fp32 dots: {err:.2e}")
    assert c.dtype == torch.float32 and c.shape == (64,)
    assert err <= 4 * U32
    assert c[3] == 0 and c[7] == 0
    # ε enters the denominator as written: c = d / (sqrt(na·nt) + ε)
    big_eps = cosines(dots, eps=0.5).double()
    ref_eps = dots[:, 0] / ((dots[:, 1] * dots[:, 2]).sqrt() + 0.5)
    print(f"cosine with eps=0.5 max abs error: {(big_eps - ref_eps).abs().max().item():.2e}")
    assert torch.allclose(big_eps, ref_eps, rtol=4 * U32, atol=0)


def test_cosines_clamped_and_nan_visible():
    dots = torch.tensor([[1.0000001, 1.0, 1.0], [-1.0000001, 1.0, 1.0], [float("nan"), 1.0, 1.0]])
    c = cosines(dots, eps=0.0)
    assert c[0] == 1.0 and c[1] == -1.0
    assert torch.isnan(c[2])  # a non-finite gradient must not be hidden as cosine 0


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_pcgrad_properties(lam):
    """⟨G, g_va⟩ = na(1−c²) ≥ 0 for any λ; ⟨G, g_vt⟩ = λ·nt(1−c²) ≥ 0 for λ ≥ 0;
    ⟨g̃va, g̃vt⟩ = −d(1−c²) ≥ 0, with fp32 dots as the kernels produce them."""
    ga, gv = make_pairs(B=200, P=67, seed=int(lam * 10) + 5, conflict_frac=0.9)
    d, na, nt = dots_of(ga, gv).unbind(1)
    r = realign(dots_of(ga, gv).float(), torch.ones(200, dtype=torch.bool), method_cfg(realign="pcgrad", lam=lam))
    conf = r.conflict
    G = apply(r, ga, gv)
    a, b = r.alpha.double(), r.beta.double()
    # rounding bound of fp32 dots in and fp32 α, β out (derived in the module docs), per sample
    tol = 4 * U32 * (a.abs() * na + b.abs() * d.abs() + na + lam * d.abs() + b.abs() * nt + a.abs() * d.abs())
    c = d / (na * nt).sqrt()
    on_va, on_vt = (G * ga).sum(1), (G * gv).sum(1)
    err_va = ((on_va - na * (1 - c * c)).abs() / tol)[conf].max().item()
    err_vt = ((on_vt - lam * nt * (1 - c * c)).abs() / tol)[conf].max().item()
    print(f"lam={lam}: {int(conf.sum())} conflicts; <G,g_va>, <G,g_vt> errors vs closed form "
          f"{err_va:.2f}, {err_vt:.2f} (units of the rounding bound); min <G,g_va>/tol "
          f"{(on_va / tol)[conf].min().item():.2e}")
    assert int(conf.sum()) > 150
    assert err_va <= 1 and err_vt <= 1
    assert bool((on_va[conf] >= -tol[conf]).all()) and bool((on_vt[conf] >= -tol[conf]).all())
    if lam > 0:  # the projected pair, read back from the coefficients
        ta = ga + (b - lam)[:, None] * gv  # β − λ = −d/nt
        tv = gv + ((a - 1) / lam)[:, None] * ga  # (α − 1)/λ = −d/na
        pair = (ta * tv).sum(1)
        pair_ref = -d * (1 - c * c)
        # reading g~vt back divides the fp32 rounding of α by λ and carries it on g_va (whose norm may be
        # 1000× that of g_vt): bound that, per sample, instead of a flat relative tolerance
        ta_n, tv_n = ta.norm(dim=1), tv.norm(dim=1)
        tol_pair = 4 * U32 * (ta_n * a.abs() * ga.norm(dim=1) / lam + tv_n * b.abs() * gv.norm(dim=1)
                              + ta_n * tv_n)
        err = ((pair - pair_ref).abs() / tol_pair)[conf].max().item()
        print(f"lam={lam}: projected pair <g~va,g~vt> max error {err:.2f} (units of the rounding bound)")
        assert err <= 1
        assert bool((pair[conf] >= -tol_pair[conf]).all())


def test_pcgrad_negative_lambda_breaks_vt_property():
    """For λ < 0 (refused by the config) ⟨G, g_vt⟩ = λ·nt(1−c²) < 0: the property needs λ ≥ 0."""
    ga, gv = make_pairs(B=50, P=33, seed=9, conflict_frac=1.0)
    r = realign(dots_of(ga, gv), torch.ones(50, dtype=torch.bool), method_cfg(realign="pcgrad", lam=-0.5))
    on_vt = (apply(r, ga, gv) * gv).sum(1)
    assert bool(r.conflict.all()) and bool((on_vt < 0).all())


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_project_rules_make_moved_gradient_orthogonal(lam):
    ga, gv = make_pairs(B=80, P=101, seed=11, conflict_frac=0.8)
    valid = torch.ones(80, dtype=torch.bool)
    ra = realign(dots_of(ga, gv).float(), valid, method_cfg(realign="project_va", lam=lam))
    rt = realign(dots_of(ga, gv).float(), valid, method_cfg(realign="project_vt", lam=lam))
    moved_va = apply(ra, ga, gv) - lam * gv  # update = g̃va + λ g_vt
    moved_vt = (apply(rt, ga, gv) - ga) / lam  # update = g_va + λ g̃vt
    d, na, nt = dots_of(ga, gv).unbind(1)
    # per-sample rounding bound: fp32 dots in (2u on d/n) and fp32 α or β out (u), carried on the other gradient
    bound_a = 4 * U32 * (ra.beta.double().abs() * nt + d.abs())
    bound_t = 4 * U32 * (rt.alpha.double().abs() * na / lam + d.abs())
    ca = ((moved_va * gv).sum(1).abs() / bound_a)[ra.conflict].max().item()
    ct = ((moved_vt * ga).sum(1).abs() / bound_t)[rt.conflict].max().item()
    print(f"lam={lam}: |<g~va, g_vt>|, |<g~vt, g_va>| max {ca:.2f}, {ct:.2f} (units of the rounding bound); "
          f"max |cos(g~va, g_vt)| {cos64(moved_va, gv)[ra.conflict].abs().max().item():.1e}")
    assert int(ra.conflict.sum()) > 40 and torch.equal(ra.conflict, rt.conflict)
    assert ca <= 1 and ct <= 1
    assert bool((ra.alpha == 1).all()) and bool((rt.beta == lam).all())  # the other gradient is untouched
    # project_va moves only g_va: its coefficient on g_va stays 1, the correction sits on g_vt
    assert bool((ra.beta[ra.conflict] != lam).all()) and bool((rt.alpha[rt.conflict] != 1).all())


@pytest.mark.parametrize("phi", [0.0, 0.3, -0.4])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_gradvac_reaches_target(phi, lam):
    ga, gv = make_pairs(B=90, P=77, seed=int(100 * phi) + 1000, avoid=(phi,))
    cfg = method_cfg(realign="gradvac", lam=lam, gradvac_target=phi)
    # float64 dots: near c = -1 the GradVac correction is ill-conditioned in c, so fp32 dots would test
    # the input's rounding, not the formula; what remains is the fp32 rounding of α, β
    r = realign(dots_of(ga, gv), torch.ones(90, dtype=torch.bool), cfg)
    c = cos64(ga, gv)
    assert torch.equal(r.conflict, c < phi)
    a, b = r.alpha.double(), r.beta.double()
    ta = ga + (b - lam)[:, None] * gv  # g̃va = g_va + k_at g_vt
    tv = gv + ((a - 1) / lam)[:, None] * ga  # g̃vt = g_vt + k_ta g_va
    got_a, got_t = cos64(ta, gv), cos64(tv, ga)
    # cosine error of one fp32 rounding of β (on g_vt) or of α (on g_va, divided by λ)
    bound_a = 2 * U32 * b.abs() * gv.norm(dim=1) / ta.norm(dim=1)
    bound_t = 2 * U32 * a.abs() * ga.norm(dim=1) / (lam * tv.norm(dim=1))
    err_a = ((got_a - phi).abs() / bound_a)[r.conflict].max().item()
    err_t = ((got_t - phi).abs() / bound_t)[r.conflict].max().item()
    print(f"phi={phi} lam={lam}: {int(r.conflict.sum())} conflicts, |cos(realigned, other) - phi| max "
          f"{max((got_a - phi).abs()[r.conflict].max().item(), (got_t - phi).abs()[r.conflict].max().item()):.1e}, "
          f"{err_a:.2f} and {err_t:.2f} units of the rounding bound")
    assert int(r.conflict.sum()) > 10
    assert err_a <= 1 and err_t <= 1
    assert bool((r.alpha[~r.conflict] == 1).all()) and bool((r.beta[~r.conflict] == lam).all())


@pytest.mark.parametrize("rule", RULES)
def test_non_conflicting_untouched_and_masks(rule):
    lam = 0.7
    ga, gv = make_pairs(B=41, P=50, seed=3, avoid=(-0.1,))
    valid = torch.rand(41, generator=torch.Generator().manual_seed(4)) > 0.3
    cfg = method_cfg(realign=rule, lam=lam, conflict_threshold=-0.1, gradvac_target=-0.1)
    r = realign(dots_of(ga, gv).float(), valid, cfg)
    c = cos64(ga, gv)
    calm = (c >= -0.1) | ~valid
    assert torch.equal(r.valid, valid)
    assert torch.equal(r.conflict, valid & (c < -0.1))
    assert bool((r.alpha[calm] == 1).all()) and bool((r.beta[calm] == torch.tensor(lam)).all())
    assert bool((r.cos[~valid] == 0).all())
    err = (r.cos.double() - c)[valid].abs().max().item()
    print(f"{rule}: cos error on valid samples {err:.2e}; {int((~valid).sum())} invalid samples")
    assert err <= 4 * U32


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("eps", [0.0, 1e-12])
def test_zero_gradients_finite(rule, eps):
    """na = 0 or nt = 0: cosine 0, never conflicting (even with a threshold above 0), finite α = 1, β = λ."""
    ga, gv = make_pairs(B=6, P=20, seed=21)
    ga[0] = 0.0
    gv[1] = 0.0
    ga[2] = gv[2] = 0.0
    cfg = method_cfg(realign=rule, lam=1.5, conflict_threshold=0.5, gradvac_target=0.5, eps=eps)
    r = realign(dots_of(ga, gv).float(), torch.ones(6, dtype=torch.bool), cfg)
    for t in (r.cos, r.alpha, r.beta):
        assert bool(torch.isfinite(t).all())
    assert bool((r.cos[:3] == 0).all()) and not bool(r.conflict[:3].any())
    assert bool((r.alpha[:3] == 1).all()) and bool((r.beta[:3] == 1.5).all())


@pytest.mark.parametrize("rule", RULES)
def test_extreme_cosines_finite(rule):
    """Exactly opposite and exactly parallel pairs, and the most extreme GradVac targets."""
    g = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ga = g
    gv = torch.stack([-2.0 * g[0], 3.0 * g[1], -1e-3 * g[2]])
    for phi in (-1.0, 0.999999):
        cfg = method_cfg(realign=rule, gradvac_target=phi, eps=0.0)
        r = realign(dots_of(ga, gv).float(), torch.ones(3, dtype=torch.bool), cfg)
        for t in (r.cos, r.alpha, r.beta):
            assert bool(torch.isfinite(t).all()), (rule, phi, t)
        assert r.cos[0] == -1 and r.cos[1] == 1
    if rule == "pcgrad":  # opposite pair: both projections vanish, the update is 0
        G = apply(r, ga, gv)
        assert G[0].abs().max().item() <= 8 * U32 * (ga[0].norm() + gv[0].norm()).item()


def test_empty_batch():
    for rule in RULES:
        r = realign(torch.zeros(0, 3), torch.zeros(0, dtype=torch.bool), method_cfg(realign=rule))
        assert r.cos.shape == r.alpha.shape == r.beta.shape == r.conflict.shape == (0,)


def test_gradvac_target_one_is_refused_and_ema_needs_state():
    dots = torch.tensor([[-1.0, 1.0, 1.0]])
    valid = torch.ones(1, dtype=torch.bool)
    with pytest.raises(ConfigError, match="gradvac_target"):
        realign(dots, valid, method_cfg(realign="gradvac", gradvac_target=1.0))
    with pytest.raises(ValueError, match="RealignState"):
        realign(dots, valid, method_cfg(realign="gradvac", gradvac_ema=0.1))
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        realign(torch.zeros(4, 2), torch.ones(4, dtype=torch.bool), method_cfg())


def test_gradvac_ema_uses_previous_target_then_updates():
    """Step t uses φ̂_{t−1}; then φ̂_t = (1 − r)·φ̂_{t−1} + r·mean(valid c_t). Hand computation over 3 steps."""
    rate, phi0 = 0.25, 0.1
    cfg = method_cfg(realign="gradvac", gradvac_target=phi0, gradvac_ema=rate)
    state = RealignState(cfg)
    assert state.target == pytest.approx(phi0)
    gen = torch.Generator().manual_seed(8)
    phi = phi0
    for step in range(3):
        ga, gv = make_pairs(B=12, P=30, seed=50 + step, avoid=(phi,))
        valid = torch.rand(12, generator=gen) > 0.25
        r = realign(dots_of(ga, gv).float(), valid, cfg, state)
        c = cos64(ga, gv)
        assert torch.equal(r.conflict, valid & (c < phi)), step  # the target from before this batch
        if bool(r.conflict.any()):  # and the realigned pair reaches that target
            ta = ga + (r.beta.double() - 1)[:, None] * gv
            assert (cos64(ta, gv)[r.conflict] - phi).abs().max().item() <= 1e-5
        phi = (1 - rate) * phi + rate * c[valid].mean().item()
        print(f"step {step}: phi_hat {state.target:.9f}, hand {phi:.9f}")
        assert state.target == pytest.approx(phi, abs=1e-6)
    assert state.updates == 3
    # a batch with no valid cosine leaves φ̂ as it is
    realign(torch.tensor([[0.5, 1.0, 1.0]]), torch.zeros(1, dtype=torch.bool), cfg, state)
    assert state.target == pytest.approx(phi, abs=1e-6)
    # fixed target: the state is not touched
    fixed = RealignState(0.3)
    realign(dots_of(ga, gv), torch.ones(12, dtype=torch.bool), method_cfg(realign="gradvac", gradvac_target=0.3),
            fixed)
    assert fixed.target == 0.3 and fixed.updates == 0


def test_realign_state_round_trip():
    state = RealignState(method_cfg(gradvac_target=-0.25))  # values exact in binary floating point
    state.observe(torch.tensor([0.5, -0.25, 0.75]), torch.tensor([True, True, False]), rate=0.5)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    back = RealignState(0.0)
    back.load_state_dict(torch.load(buf, weights_only=True))
    print(f"phi_hat saved {state.target!r}, loaded {back.target!r}")
    assert back.target == state.target == 0.5 * -0.25 + 0.5 * 0.125
    assert back.updates == 1


@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
def test_cuda_matches_cpu(rule):
    ga, gv = make_pairs(B=33, P=40, seed=77)
    dots = dots_of(ga, gv).float()
    valid = torch.rand(33, generator=torch.Generator().manual_seed(1)) > 0.2
    cfg = method_cfg(realign=rule, lam=0.6, gradvac_ema=0.3)
    s_cpu, s_gpu = RealignState(cfg), RealignState(cfg)
    for _ in range(2):
        a = realign(dots, valid, cfg, s_cpu)
        b = realign(dots.cuda(), valid.cuda(), cfg, s_gpu)
    assert b.alpha.is_cuda and b.conflict.is_cuda
    for x, y in zip((a.cos, a.alpha, a.beta, a.conflict), (b.cos, b.alpha, b.beta, b.conflict)):
        assert torch.equal(x, y.cpu())
    assert s_cpu.target == s_gpu.target


def test_gradvac_at_zero_target_is_pcgrad():
    """φ = 0 gives k_at = −d/nt, k_ta = −d/na: the PCGrad coefficients."""
    ga, gv = make_pairs(B=60, P=45, seed=31)
    valid = torch.ones(60, dtype=torch.bool)
    pc = realign(dots_of(ga, gv), valid, method_cfg(realign="pcgrad", lam=0.8))
    gv0 = realign(dots_of(ga, gv), valid, method_cfg(realign="gradvac", lam=0.8, gradvac_target=0.0))
    err = max((pc.alpha - gv0.alpha).abs().max().item(), (pc.beta - gv0.beta).abs().max().item())
    print(f"gradvac(phi=0) vs pcgrad max coefficient difference {err:.2e}")
    assert torch.equal(pc.conflict, gv0.conflict) and int(pc.conflict.sum()) > 10
    assert torch.allclose(pc.alpha, gv0.alpha, rtol=4 * U32, atol=0)
    assert torch.allclose(pc.beta, gv0.beta, rtol=4 * U32, atol=0)
