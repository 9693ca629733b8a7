"""The harmonizer on the project's VATT model (tiny, small inputs, float64): every scope it names, both modes,
against the private-copy brute force; and with DropToken on (one permutation shared by the batch)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from brute_force import cmaloss, dots_of, flat, path_grads
from harmony import GradientHarmonizer
from helpers import method_cfg
from harmony.config import DataConfig, ModelConfig
from harmony.model.losses import mil_nce, nce

VATT = pytest.importorskip("harmony.model").VATT


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class AsTuple(nn.Module):
    """VATT with tuple outputs (z_va_v, z_va_a, z_vt_v, z_vt_t), as the brute force needs."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, video, audio, text, generator=None):
        o = self.m(video, audio, text, generator=generator)
        return o.z_va_v, o.z_va_a, o.z_vt_v, o.z_vt_t

    def scope_parameters(self, name):
        return self.m.scope_parameters(name)


def small_vatt(droptoken: float):
    mc = ModelConfig(size="tiny", droptoken=droptoken, audio_patch=20, vocab_buckets=64)
    dc = DataConfig(frames=4, image_size=16, sample_rate=1000, audio_seconds=0.1, max_words=4, candidates=2)
    torch.manual_seed(0)
    return AsTuple(VATT(mc, dc)).double()


def batch(B: int):
    g = torch.Generator().manual_seed(1)
    video = torch.rand(B, 3, 4, 16, 16, generator=g, dtype=torch.float64)
    audio = torch.rand(B, 100, generator=g, dtype=torch.float64) * 2 - 1
    text = torch.randint(0, 64, (B, 2, 4), generator=g)
    text[:, :, 0] = torch.randint(1, 64, (B, 2), generator=g)      # no empty caption
    return video, audio, text


@pytest.fixture(scope="module")
def reference():
    model = small_vatt(droptoken=1.0)
    return path_grads(model, batch(4), cmaloss())


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("scope", ["shared", "backbone", "last_block"])
def test_vatt_scopes_match_brute_force(reference, mode, scope):
    g_va, g_vt = reference
    model = small_vatt(droptoken=1.0)
    h = GradientHarmonizer(model, method_cfg(realign="pcgrad", mode=mode, scope=scope))
    z = model(*batch(4))
    st = h.backward(nce(z[0], z[1]), mil_nce(z[2], z[3]), va_inputs=z[:2], vt_inputs=z[2:])
    names = h.scope_names()
    assert set(names) == {"m." + n for n, p in model.m.named_parameters()
                          if any(p is q for q in model.m.scope_parameters(scope))}
    ref = dots_of(flat(g_va, names), flat(g_vt, names))
    rel = ((st.dots.double() - ref).abs() / ref[:, 1:].sum(1, keepdim=True)).max().item()
    print(f"{scope}/{mode}: dots relative err {rel:.3e}; cos {st.cos.tolist()}")
    assert rel <= 2e-5
    ca, cv = st.coef_va.double(), st.coef_vt.double()
    worst = 0.0
    for n, p in model.named_parameters():
        shape = (-1,) + (1,) * p.dim()
        want = (ca.view(shape) * g_va[n] + cv.view(shape) * g_vt[n]).sum(0)
        worst = max(worst, ((p.grad - want).abs().max() / want.abs().max().clamp(min=1e-30)).item())
    print(f"{scope}/{mode}: grad relative err {worst:.3e}")
    assert worst <= (2e-6 if mode == "ghost" else 2e-5)


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_vatt_droptoken_plain_gradient(mode):
    """DropToken in training (one permutation for the batch): realign none gives ∇(L_va + L_vt) exactly."""
    x = batch(5)
    model = small_vatt(droptoken=0.5)
    h = GradientHarmonizer(model, method_cfg(realign="none", mode=mode, scope="shared"))
    z = model(*x, generator=torch.Generator().manual_seed(3))
    st = h.backward(nce(z[0], z[1]), mil_nce(z[2], z[3]), va_inputs=z[:2], vt_inputs=z[2:])
    assert torch.isfinite(st.dots).all() and (st.dots[:, 1] > 0).all()
    plain = small_vatt(droptoken=0.5)
    L_va, L_vt = cmaloss()(plain(*x, generator=torch.Generator().manual_seed(3)))
    (L_va + L_vt).backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        err = ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp(min=1e-30)).item()
        assert err <= (1e-11 if mode == "ghost" else 2e-5), (n, err)
