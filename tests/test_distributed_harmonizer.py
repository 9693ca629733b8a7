"""Two gloo ranks, DDP and FSDP2: the harmonized .grad and the per-sample dots equal a single-process run on
the same global batch (docs/HARMONIZER.md "4. Data parallelism"). The losses gather negatives across ranks with
gradient.

The ranks hold different numbers of valid samples: each rank differentiates its share of the GLOBAL masked
mean, so the wrappers' averaging gives the single process's gradient exactly.
"""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brute_force import ToyVATT, toy_batch
from harmony import GradientHarmonizer
from helpers import method_cfg
from harmony.distributed import unwrap
from harmony.model.losses import mil_nce, nce

WORLD, B_LOCAL = 2, 4
MASK_VA = torch.tensor([1, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)      # 3 + 2 valid
MASK_VT = torch.tensor([1, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool)      # 3 + 4 valid

CONFIGS = {
    "ddp_ghost_pcgrad_ratio": ("ddp", dict(realign="pcgrad", curriculum="ratio", curriculum_start=0.0, rho0=0.5,
                                           mode="ghost", scope="shared")),
    "ddp_materialize_gradvac": ("ddp", dict(realign="gradvac", gradvac_target=0.3, mode="materialize", scope="all")),
    "ddp_ghost_apply_to_scope": ("ddp", dict(realign="pcgrad", apply_to="scope", mode="ghost", scope="shared")),
    "ddp_materialize_apply_to_scope": ("ddp", dict(realign="pcgrad", apply_to="scope", mode="materialize",
                                                   scope="shared")),
    "fsdp2_ghost_pcgrad": ("fsdp2", dict(realign="pcgrad", curriculum="threshold", curriculum_start=0.0,
                                         kappa0=0.2, mode="ghost", scope="shared")),
    "fsdp2_ghost_apply_to_scope": ("fsdp2", dict(realign="pcgrad", apply_to="scope", mode="ghost", scope="all")),
    "ddp_sketch_pcgrad": ("ddp", dict(realign="pcgrad", mode="sketch", sketch_dim=4, scope="shared")),
    "fsdp2_sketch_pcgrad": ("fsdp2", dict(realign="pcgrad", mode="sketch", sketch_dim=4, scope="all")),
    "ddp_feature_pcgrad_ratio": ("ddp", dict(realign="pcgrad", curriculum="ratio", curriculum_start=0.0, rho0=0.5,
                                             mode="feature")),
    "fsdp2_feature_pcgrad": ("fsdp2", dict(realign="pcgrad", curriculum="threshold", curriculum_start=0.0,
                                           kappa0=0.2, mode="feature")),
    # the coefficients on the per-sample loss terms (update=objective): each pair filtered by its own loss
    "ddp_feature_objective_pair": ("ddp", dict(realign="pcgrad", curriculum="ratio", curriculum_score="loss",
                                               curriculum_target="pair", curriculum_start=0.0, rho0=0.5,
                                               mode="feature", update="objective")),
    "fsdp2_ghost_objective": ("fsdp2", dict(realign="pcgrad", curriculum="threshold", curriculum_start=0.0,
                                            kappa0=0.2, mode="ghost", scope="shared", update="objective")),
}
SEED = 1


pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_torch_thread")]


def _model():
    torch.manual_seed(SEED)
    return ToyVATT().double()


def _batch():
    video, audio, text = toy_batch(WORLD * B_LOCAL, seed=SEED + 10)
    # a few clearly misaligned captions so that some samples conflict
    text[1] = text[6].flip(0)
    text[4] = text[0]
    return video, audio, text, MASK_VA, MASK_VT


def _step(model, h, x, rows):
    video, audio, text, m_va, m_vt = (t[rows] for t in x)
    z_v, z_a, z_vt, z_t = model(video, audio, text)
    feature = unwrap(model).feat_v if h.cfg.mode == "feature" else None
    return h.backward(nce(z_v, z_a, mask=m_va), mil_nce(z_vt, z_t, mask=m_vt), va_inputs=(z_v, z_a),
                      vt_inputs=(z_vt, z_t), mask_va=m_va, mask_vt=m_vt, step=0, total_steps=10,
                      ids=torch.arange(rows.start, rows.stop), feature=feature)


def _grads(model):
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[n] = g.detach().clone()
    return out


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x = _batch()
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        results = {}
        for name, (wrap, cfg) in CONFIGS.items():
            model = _model()
            if wrap == "ddp":
                from torch.nn.parallel import DistributedDataParallel
                wrapped = DistributedDataParallel(model)
            else:
                from torch.distributed.fsdp import fully_shard
                fully_shard(model.block)
                wrapped = fully_shard(model)
            h = GradientHarmonizer(wrapped, method_cfg(**cfg))
            st = _step(wrapped, h, x, rows)
            results[name] = dict(grads=_grads(model), dots=st.dots, cos=st.cos, weights=st.weights,
                                 coef_va=st.coef_va, coef_vt=st.coef_vt, scope=h.scope_names(),
                                 loss_va=st.loss_va, loss_vt=st.loss_vt)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _single(cfg):
    model = _model()
    h = GradientHarmonizer(model, method_cfg(**cfg))
    st = _step(model, h, _batch(), slice(0, WORLD * B_LOCAL))
    return _grads(model), st, h.scope_names()


def _check(what, got, ref, rtol):
    err = (got.double() - ref.double()).abs().max().item()
    rel = err / max(ref.double().abs().max().item(), 1e-30)
    print(f"{what}: max abs err {err:.3e}, relative {rel:.3e}")
    assert rel <= rtol, what


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_one_process(ranks, name):
    _, cfg = CONFIGS[name]
    grads, st, scope = _single(cfg)
    res = [r[name] for r in ranks]
    assert res[0]["scope"] == res[1]["scope"] == scope
    # per-sample stats: each rank holds its rows of the global batch
    for f, tol in (("dots", 2e-5), ("cos", 2e-5), ("weights", 0.0), ("coef_va", 2e-5), ("coef_vt", 2e-5)):
        _check(f, torch.cat([r[f] for r in res]), getattr(st, f), tol)
    print("cos", st.cos.tolist(), "weights", st.weights.tolist())
    for r in res:
        _check("loss_va", r["loss_va"], st.loss_va, 1e-6)
        _check("loss_vt", r["loss_vt"], st.loss_vt, 1e-6)
    # every rank holds the same (averaged) gradient, equal to the single process's
    tol = 2e-5 if "materialize" in name else 2e-6
    for r in res:
        for n in grads:
            _check(f"grad {n}", r["grads"][n], grads[n], tol)
