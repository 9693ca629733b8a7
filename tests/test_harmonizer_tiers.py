"""The cheaper measurement tiers against independent float64 references.

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
from harmony.harmonizer import GradientHarmonizer
from harmony.losses import mil_nce, nce
from test_harmonizer import MASKS, SEED, TOL, check_dots, check_grads, expected_update, fresh_model, reference

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
    cfg = HarmonyConfig(realign="pcgrad", curriculum="threshold", mode="feature", curriculum_start=0.0,
                        kappa0=0.0, kappa1=0.0, min_keep=0.25)
    model, h, st, x = run_feature(cfg, B, step=5, total_steps=10)
    assert st.mode == "feature" and h._hooks == [] and h.scope_names() == []
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
    model, _, st, x = run_feature(HarmonyConfig(realign="none", mode="feature", lam=lam), B)
    plain = fresh_model()
    L_va, L_vt = cmaloss(*MASKS[B])(plain(*x))
    (L_va + lam * L_vt).backward()
    check_grads(model, {n: p.grad for n, p in plain.named_parameters()}, TOL["grad_exact"])
    assert torch.isfinite(st.cos).all()


def test_feature_mode_needs_the_feature_and_refuses_apply_to_scope():
    model = fresh_model()
    h = GradientHarmonizer(model, HarmonyConfig(mode="feature"))
    z_v, z_a, z_vt, z_t = model(*toy_batch(3))
    with pytest.raises(ValueError, match="feature=f"):
        h.backward(nce(z_v, z_a), mil_nce(z_vt, z_t), va_inputs=(z_v, z_a), vt_inputs=(z_vt, z_t))
    with pytest.raises(ConfigError, match="apply_to"):
        HarmonyConfig(mode="feature", apply_to="scope").validate()
