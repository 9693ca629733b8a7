"""The cheaper measurement tiers against independent float64 references.

sketch: the layer-level estimator's unbiasedness (the mean over many draws within a few standard errors of
the exact dots, the standard error taken from the draws' own spread) and its 1/√k error, then through the
harmonizer: reproducible per step, unbiased over steps, the update exact for the coefficients it chose.

feature: the per-sample dots at the pooled video feature against a per-sample loop in which each sample's
feature is a leaf of its own (tests/brute_force.py: feature_path_grads); the update with the chosen
coefficients against the parameter-space brute force (it is exact whatever measured the coefficients).
"""
from __future__ import annotations

import pytest
import torch

from brute_force import cmaloss, dots_of, feature_path_grads, toy_batch
from harmony import HarmonyConfig
from harmony.config import ConfigError
from harmony.method.harmonizer import GradientHarmonizer
from harmony.model.losses import mil_nce, nce
from helpers import MASKS, SEED, TOL, check_dots, check_grads, expected_update, fresh_model, reference, method_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_feature(cfg: HarmonyConfig, B: int, **kw):
    """One feature-mode step on a fresh toy model: (model, harmonizer, stats, inputs)."""
    model = fresh_model()
    h = GradientHarmonizer(model, cfg)
    x = toy_batch(B, seed=SEED + B)
    m_va, m_vt = MASKS[B]
    z_v, z_a, z_vt, z_t = model(*x)
    st = h.backward(nce(z_v, z_a, mask=m_va), mil_nce(z_vt, z_t, mask=m_vt), va_inputs=(z_v, z_a),
                    vt_inputs=(z_vt, z_t), mask_va=m_va, mask_vt=m_vt, feature=model.feat_v, **kw)
    return model, h, st, x


@pytest.mark.parametrize("B", [1, 2, 7])
def test_feature_dots_and_update_match_brute_force(B):
    """Dots = the per-sample loop's at the representation; .grad = Σ_i ca_i g^va_i + cv_i g^vt_i over every
    parameter (parameter-space brute force) with the coefficients the step chose; no hook was registered."""
    cfg = method_cfg(realign="pcgrad", curriculum="threshold", mode="feature", curriculum_start=0.0,
                        kappa0=0.0, kappa1=0.0, min_keep=0.25)
    model, h, st, x = run_feature(cfg, B, step=5, total_steps=10)
    assert st.mode == "feature" and h.rec._hooks == [] and h.scope_names() == []
    f_va, f_vt = feature_path_grads(fresh_model(), x, cmaloss(*MASKS[B]))
    ref = dots_of(f_va, f_vt)
    check_dots(st.dots, ref)
    if B == 7:
        d = ref[:, 0]
        conflict = st.valid & (d < 0)
        print("conflicting at the feature:", conflict.tolist())
        assert conflict.any() and (st.valid & ~conflict).any(), "the batch must mix conflicting and agreeing samples"
        assert torch.equal(st.conflict, conflict)
        assert (st.weights == 0).any()
    g_va, g_vt = reference(B)
    check_grads(model, expected_update(model, g_va, g_vt, st.coef_va, st.coef_vt), TOL["grad_fp32_coef"])


def test_feature_without_realignment_is_plain_training():
    B, lam = 7, 0.5
    model, _, st, x = run_feature(method_cfg(realign="none", mode="feature", lam=lam), B)
    plain = fresh_model()
    L_va, L_vt = cmaloss(*MASKS[B])(plain(*x))
    (L_va + lam * L_vt).backward()
    check_grads(model, {n: p.grad for n, p in plain.named_parameters()}, TOL["grad_exact"])
    assert torch.isfinite(st.cos).all()


def test_feature_mode_needs_the_feature_and_refuses_apply_to_scope():
    model = fresh_model()
    h = GradientHarmonizer(model, method_cfg(mode="feature"))
    z_v, z_a, z_vt, z_t = model(*toy_batch(3))
    with pytest.raises(ValueError, match="feature=f"):
        h.backward(nce(z_v, z_a), mil_nce(z_vt, z_t), va_inputs=(z_v, z_a), vt_inputs=(z_vt, z_t))
    with pytest.raises(ConfigError, match="apply_to"):
        method_cfg(mode="feature", apply_to="scope").validate()


# ------------------------------------------------------------------------------------------------ sketch
def _sketches(X, Ga, Gb, k, seeds, kind="gaussian"):
    """[len(seeds), B, 3] float64 sketched dots of one layer, one draw of (R, S) per seed."""
    from harmony.method.sketch import projections, sketch_dots_ref
    out = []
    for s in seeds:
        R, S = projections(X.shape[2], Ga.shape[2], k, s, kind, dtype=torch.float64)
        out.append(sketch_dots_ref(X, Ga, Gb, R, S).double())
    return torch.stack(out)


def _layer(B, T, d_in, d_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, T, d_in, generator=g, dtype=torch.float64)
    Ga = torch.randn(B, T, d_out, generator=g, dtype=torch.float64)
    Gb = 0.5 * Ga + torch.randn(B, T, d_out, generator=g, dtype=torch.float64)   # correlated: dots away from 0
    return X, Ga, Gb


@pytest.mark.parametrize("kind", ["gaussian", "sign"])
def test_sketch_dots_are_unbiased(kind):
    """The mean of the sketched dots over N independent draws converges to the exact dots: every entry within
    4.5 standard errors (the empirical standard deviation of the draws over √N)."""
    from harmony.ops.ghost_dots import ghost_dots_ref
    X, Ga, Gb = _layer(3, 5, 7, 6)
    exact = ghost_dots_ref(X, Ga, Gb, upcast=True)
    est = _sketches(X, Ga, Gb, 4, range(400), kind)
    mean, se = est.mean(0), est.std(0) / 400 ** 0.5
    z = (mean - exact).abs() / se
    print("exact", exact.tolist(), "\nmean", mean.tolist(), "\nmax z", z.max().item())
    assert (se > 0).all() and z.max() <= 4.5


def test_sketch_error_falls_as_one_over_sqrt_k():
    """The RMS error of the sketched dot, relative to ‖g^a‖‖g^b‖ (the scale of a cosine), halves for every 4x k
    once k is past the layer's widths (the two-sided sketch's variance is c1/k + c2/k²: below, it falls faster)."""
    from harmony.ops.ghost_dots import ghost_dots_ref
    X, Ga, Gb = _layer(2, 20, 48, 40, seed=1)
    exact = ghost_dots_ref(X, Ga, Gb, upcast=True)
    scale = (exact[:, 1] * exact[:, 2]).sqrt()
    rms = {}
    for k in (16, 64, 256, 1024):
        est = _sketches(X, Ga, Gb, k, range(1000, 1200))
        rms[k] = (((est[:, :, 0] - exact[:, 0]) / scale) ** 2).mean().sqrt().item()
    print("relative RMS error by k:", rms)
    assert 1.7 <= rms[16] / rms[64] <= 4.4                 # between 1/√k and 1/k
    for small, big in ((64, 256), (256, 1024)):
        assert 1.7 <= rms[small] / rms[big] <= 2.35, (small, big)


def _sketch_step(step, k=4, B=7, **cfg):
    model = fresh_model()
    h = GradientHarmonizer(model, method_cfg(mode="sketch", scope="all", sketch_dim=k, **cfg))
    x = toy_batch(B, seed=SEED + B)
    m_va, m_vt = MASKS[B]
    z_v, z_a, z_vt, z_t = model(*x)
    st = h.backward(nce(z_v, z_a, mask=m_va), mil_nce(z_vt, z_t, mask=m_vt), va_inputs=(z_v, z_a),
                    vt_inputs=(z_vt, z_t), mask_va=m_va, mask_vt=m_vt, step=step, total_steps=100)
    return model, h, st


def test_sketch_mode_is_reproducible_unbiased_and_updates_exactly():
    """mode=sketch through the harmonizer: the projections follow the step (same step, same dots; another step,
    other dots); over 60 steps the mean dots are within 4.5 standard errors of the brute force's; the update is
    exactly Σ_i ca_i g^va_i + cv_i g^vt_i for the coefficients it chose."""
    from brute_force import flat
    B = 7
    g_va, g_vt = reference(B)
    model, h, st = _sketch_step(3, realign="pcgrad")
    assert st.mode == "sketch"
    check_grads(model, expected_update(model, g_va, g_vt, st.coef_va, st.coef_vt), TOL["grad_fp32_coef"])
    names = h.scope_names()
    exact = dots_of(flat(g_va, names), flat(g_vt, names))
    assert torch.equal(_sketch_step(3)[2].dots, st.dots) and not torch.equal(_sketch_step(4)[2].dots, st.dots)
    est = torch.stack([_sketch_step(s)[2].dots.double() for s in range(60)])
    mean, se = est.mean(0), est.std(0) / 60 ** 0.5
    live = se > 0                       # a sample masked out of a loss has exact zeros there
    z = (mean - exact).abs()[live] / se[live]
    print("max z over the batch's dots:", z.max().item())
    assert live.any() and z.max() <= 4.5
