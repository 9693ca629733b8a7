"""harmony.upstream: the own_row and own_pair definitions of the measured per-sample gradient.

Against the private-copy brute force (tests/brute_force.py ``own_grads``) in float64: the harmonizer's dots
under each definition, in ghost and materialize modes; the update stays built from the PATH per-sample
gradients with the coefficients the measured dots give (realign=none: exactly autograd's ∇(L_va + λL_vt)).
"""
from __future__ import annotations

import functools

import pytest
import torch

from brute_force import ToyVATT, cmaloss, dots_of, flat, own_grads, path_grads, toy_batch
from harmony import HarmonyConfig
from helpers import method_cfg
from harmony.config import ConfigError
from harmony.method.grad_sample import PerSampleError
from harmony.method.harmonizer import GradientHarmonizer
from harmony.model.losses import mil_nce, nce

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 1
MASKS = {
    1: (torch.tensor([True]), torch.tensor([True])),
    2: (torch.tensor([True, True]), torch.tensor([False, True])),
    3: (torch.tensor([True, True, True]), torch.tensor([True, True, True])),
    7: (torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.bool), torch.tensor([1, 1, 1, 1, 0, 1, 0], dtype=torch.bool)),
}
TOL = {"dots": 2e-5, "grad_exact": 1e-11, "grad_fp32_coef": 2e-6}


def fresh_model() -> ToyVATT:
    torch.manual_seed(SEED)
    return ToyVATT().double()


@functools.lru_cache(maxsize=None)
def reference(B: int, definition: str):
    """(path g_va, g_vt), (measured g_va, g_vt) by the brute force."""
    model = fresh_model()
    x = toy_batch(B, seed=SEED + B)
    m_va, m_vt = MASKS[B]
    return path_grads(model, x, cmaloss(m_va, m_vt)), own_grads(model, x, definition, m_va, m_vt)


def run(cfg: HarmonyConfig, B: int, bookkeeping=None, **kw):
    model = fresh_model()
    h = GradientHarmonizer(model, cfg, bookkeeping=bookkeeping)
    x = toy_batch(B, seed=SEED + B)
    m_va, m_vt = MASKS[B]
    z_v, z_a, z_vt, z_t = model(*x)
    d = cfg.upstream
    stats = h.backward(nce(z_v, z_a, mask=m_va), mil_nce(z_vt, z_t, mask=m_vt), va_inputs=(z_v, z_a),
                       vt_inputs=(z_vt, z_t), mask_va=m_va, mask_vt=m_vt,
                       measure_losses=(nce(z_v, z_a, mask=m_va, definition=d),
                                       mil_nce(z_vt, z_t, mask=m_vt, definition=d)), **kw)
    return model, h, stats


def check(what, got, ref, rtol, scale=None):
    err = (got.double() - ref.double()).abs()
    s = (ref.double().abs().max() if scale is None else scale).clamp(min=1e-30)
    rel = (err / s).max().item() if err.numel() else 0.0
    print(f"{what}: max abs err {err.max().item() if err.numel() else 0:.3e}, relative {rel:.3e} (tol {rtol:.0e})")
    assert torch.isfinite(got).all(), what
    assert rel <= rtol, what


def check_update(model, g_va, g_vt, ca, cv, rtol):
    got, ref = [], []
    for n, p in model.named_parameters():
        shape = (-1,) + (1,) * (g_va[n].dim() - 1)
        ref.append((ca.double().view(shape) * g_va[n] + cv.double().view(shape) * g_vt[n]).sum(0).flatten())
        got.append(p.grad.flatten())
    check("grad", torch.cat(got), torch.cat(ref), rtol)


@pytest.mark.parametrize("definition", ["own_row", "own_pair"])
def test_brute_force_definitions_differ_from_path_and_from_each_other(definition):
    """The reference itself: the definitions are different vectors (else the tests below could not fail), and
    own_row contains own_pair's positive-logit term plus the negatives' (their difference is not zero)."""
    (p_va, p_vt), (o_va, o_vt) = reference(7, definition)
    names = sorted(p_va)
    for a, b in ((p_va, o_va), (p_vt, o_vt)):
        diff = (flat(a, names) - flat(b, names)).norm() / flat(a, names).norm()
        print(definition, "relative difference to path", float(diff))
        assert diff > 1e-2
    _, (r_va, _) = reference(7, "own_row")
    _, (q_va, _) = reference(7, "own_pair")
    assert (flat(r_va, names) - flat(q_va, names)).norm() > 1e-2 * flat(r_va, names).norm()


@pytest.mark.parametrize("B", [1, 2, 3, 7])
@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("definition", ["own_row", "own_pair"])
def test_measured_dots_match_brute_force_and_update_stays_plain(B, mode, definition):
    """realign=none: the dots are the definition's (brute force); .grad is still exactly ∇(L_va + λL_vt).
    B = 1: a lone sample's loss log 2 is constant, so its measured gradient is zero under every definition (the
    brute force gives ~1e-29): then the dots must be zero to within float rounding of the gradients' scale."""
    lam = 0.5
    (p_va, p_vt), (o_va, o_vt) = reference(B, definition)
    model, h, st = run(method_cfg(realign="none", curriculum="none", mode=mode, scope="shared", lam=lam,
                                     upstream=definition), B)
    assert st.mode == mode and h.bookkeeping is False
    names = h.scope_names()
    ref = dots_of(flat(o_va, names), flat(o_vt, names))
    if B == 1:
        assert ref.abs().max() < 1e-24
        print("B=1 dots", st.dots.tolist())
        assert st.dots.abs().max() < 1e-20
    else:
        check("dots", st.dots, ref, TOL["dots"], (ref[:, 1] + ref[:, 2]).unsqueeze(1) + 1e-30)
    ones = torch.ones(B)
    check_update(model, p_va, p_vt, ones, lam * ones, TOL["grad_exact"])


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("definition", ["own_row", "own_pair"])
def test_pcgrad_coefficients_from_measured_dots_applied_to_path_gradients(mode, definition):
    """PCGrad + threshold curriculum: α, β and the weights follow the MEASURED dots; the update is
    Σ_i ca_i g^va,path_i + cv_i g^vt,path_i (docs/METHOD.md)."""
    B = 7
    (p_va, p_vt), (o_va, o_vt) = reference(B, definition)
    cfg = method_cfg(realign="pcgrad", curriculum="threshold", mode=mode, scope="shared", upstream=definition,
                        curriculum_start=0.0, kappa0=0.0, kappa1=0.0, min_keep=0.25)
    model, h, st = run(cfg, B, step=5, total_steps=10)
    names = h.scope_names()
    d, na, nt = dots_of(flat(o_va, names), flat(o_vt, names)).unbind(1)
    conflict = st.valid & (d < 0)
    print("conflicting:", conflict.tolist())
    assert conflict.any() and (~conflict & st.valid).any(), "the batch must mix conflicting and agreeing samples"
    assert torch.equal(st.conflict, conflict)
    alpha = torch.where(conflict, 1 - d / na, torch.ones_like(d))
    check("alpha", st.alpha, alpha, TOL["dots"] * 10, scale=alpha.abs() + 1)
    check_update(model, p_va, p_vt, st.coef_va, st.coef_vt, TOL["grad_fp32_coef"])


def test_measure_losses_must_match_the_setting():
    model = fresh_model()
    x = toy_batch(2, seed=SEED + 2)
    for cfg, extra in ((method_cfg(upstream="own_row"), False), (method_cfg(upstream="path"), True)):
        h = GradientHarmonizer(model, cfg)
        z_v, z_a, z_vt, z_t = model(*x)
        kw = {"measure_losses": (nce(z_v, z_a), mil_nce(z_vt, z_t))} if extra else {}
        with pytest.raises(ValueError, match="measure_losses"):
            h.backward(nce(z_v, z_a), mil_nce(z_vt, z_t), va_inputs=(z_v, z_a), vt_inputs=(z_vt, z_t), **kw)
        h.remove()


def test_bookkeeping_and_scope_only_correction_are_refused():
    with pytest.raises(PerSampleError, match="upstream"):
        run(method_cfg(realign="none", mode="ghost", upstream="own_pair"), 2, bookkeeping=True)
    with pytest.raises(ConfigError, match="apply_to"):
        method_cfg(upstream="own_row", apply_to="scope").validate()


@pytest.mark.parametrize("definition", ["own_row", "own_pair"])
def test_loss_value_is_the_same_under_every_definition(definition):
    g = torch.Generator().manual_seed(0)
    zv, zt = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    m = torch.tensor([1, 0, 1, 1, 1, 1], dtype=torch.bool)
    cm = torch.rand(6, 3, generator=g) > 0.3
    a = mil_nce(zv, zt, mask=m, cand_mask=cm)
    b = mil_nce(zv, zt, mask=m, cand_mask=cm, definition=definition)
    print(float((a - b).abs().max()))
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="definition"):
        nce(zv, zt[:, 0], definition="own")


def test_feature_mode_measures_the_chosen_definition():
    """mode=feature with upstream=own_row: the dots at the pooled feature are those of ∂(m_i ℓ^k_i / n_k)/∂f_i by a
    per-sample loop with a leaf feature per sample (float64); the update stays plain (realign=none)."""
    B = 7
    m_va, m_vt = MASKS[B]
    model = fresh_model()
    x = toy_batch(B, seed=SEED + B)
    video, audio, text = x
    with torch.no_grad():
        _, z_a_ref, _, z_t_ref = model(*x)
    leaves = [model.video_feature(video[i:i + 1]).detach().requires_grad_(True) for i in range(B)]
    z_v_ref = torch.cat([model.v_head(f) for f in leaves])
    z_vt_ref = model.vt_head(z_v_ref)
    refs = []
    for loss, m in ((nce(z_v_ref, z_a_ref, mask=m_va), m_va), (mil_nce(z_vt_ref, z_t_ref, mask=m_vt), m_vt)):
        n = m.sum().clamp(min=1).double()
        refs.append(torch.cat([torch.autograd.grad(loss[i] * m[i] / n, leaves[i], retain_graph=True)[0]
                               for i in range(B)]))
    ref = dots_of(*refs)

    cfg = method_cfg(realign="none", mode="feature", upstream="own_row")
    h = GradientHarmonizer(model, cfg)
    z_v, z_a, z_vt, z_t = model(*x)
    st = h.backward(nce(z_v, z_a, mask=m_va), mil_nce(z_vt, z_t, mask=m_vt), va_inputs=(z_v, z_a),
                    vt_inputs=(z_vt, z_t), mask_va=m_va, mask_vt=m_vt, feature=model.feat_v,
                    measure_losses=(nce(z_v, z_a, mask=m_va, definition="own_row"),
                                    mil_nce(z_vt, z_t, mask=m_vt, definition="own_row")))
    check("dots", st.dots, ref, TOL["dots"], (ref[:, 1] + ref[:, 2]).unsqueeze(1) + 1e-30)
    (p_va, p_vt), _ = reference(B, "own_row")
    check_update(model, p_va, p_vt, torch.ones(B), torch.ones(B), TOL["grad_exact"])
