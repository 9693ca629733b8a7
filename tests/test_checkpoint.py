"""Checkpoints: atomic files, weights_only loading, RNG round trip, keep-last-K, exact continuation."""
import random

import numpy as np
import pytest
import torch
from torch import nn

from harmony.trainer import checkpoint as ckpt
from harmony.trainer.schedule import WarmupCosine, build_scheduler


class _Stateful:
    """Something with state_dict/load_state_dict, like the harmonizer's score memory."""

    def __init__(self):
        self.memory = torch.zeros(5)

    def state_dict(self):
        return {"memory": self.memory.clone()}

    def load_state_dict(self, d):
        self.memory = d["memory"].clone()


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.3), nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    sched = build_scheduler(opt, 2, 10, 0.1)
    return model, opt, sched


def _train_step(model, opt, sched):
    """One step that consumes every RNG stream (torch via dropout and data, numpy, python)."""
    x = torch.randn(4, 5) + float(np.random.rand()) + random.random()
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def test_atomic_save_leaves_no_temp_and_loads_weights_only(tmp_path):
    path = tmp_path / "x.pt"
    ckpt.atomic_torch_save({"a": torch.arange(3), "b": [1, 2.5, None], "c": "text"}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    back = ckpt.load(path)
    assert torch.equal(back["a"], torch.arange(3)) and back["b"] == [1, 2.5, None]


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = ckpt.rng_state()
    want = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random(), random.gauss(0, 1))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ckpt.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random(), random.gauss(0, 1))
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2:] == want[2:]


def test_resume_continues_bitwise(tmp_path):
    """Save at step 3 of 6, reload into fresh objects: the remaining losses equal the uninterrupted run's."""
    random.seed(0), np.random.seed(0)
    model, opt, sched = _setup()
    extra = _Stateful()
    losses = []
    for step in range(6):
        if step == 3:
            extra.memory += 1.5
            saved = ckpt.save_checkpoint(tmp_path / "checkpoints", step, model, opt, sched, {"train": {"steps": 6}},
                                         harmonizer=extra, rank_extra={"counter": 4, "window": [torch.ones(2)]})
        losses.append(_train_step(model, opt, sched))

    model2, opt2, sched2 = _setup(seed=123)  # different init: everything must come from the checkpoint
    extra2 = _Stateful()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    meta = ckpt.load_checkpoint(saved, model2, opt2, sched2, harmonizer=extra2)
    assert meta["step"] == 3 and meta["config"] == {"train": {"steps": 6}}
    assert meta["extra"]["counter"] == 4 and torch.equal(meta["extra"]["window"][0], torch.ones(2))
    assert torch.equal(extra2.memory, torch.full((5,), 1.5))
    resumed = [_train_step(model2, opt2, sched2) for _ in range(3)]
    print("uninterrupted", losses[3:], "resumed", resumed)
    assert resumed == losses[3:]
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_keep_last_and_latest(tmp_path):
    model, opt, sched = _setup()
    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(root, step, model, opt, sched, {}, keep_last=2)
    assert [p.name for p in ckpt.step_dirs(root)] == ["step_00000006", "step_00000008"]
    # a folder of an interrupted save is ignored
    (root / ".tmp-step_00000010").mkdir()
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_00000008"
    assert ckpt.latest_checkpoint(root).name == "step_00000008"
    assert ckpt.latest_checkpoint(root / "step_00000006").name == "step_00000006"
    assert ckpt.latest_checkpoint(tmp_path / "nothing") is None
    # re-saving an existing step replaces it, and a stale temp folder is cleaned
    ckpt.save_checkpoint(root, 10, model, opt, sched, {}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000008", "step_00000010"]


def test_files_need_no_unsafe_globals(tmp_path):
    """Every file loads with weights_only=True (the default loader refuses arbitrary pickles)."""
    model, opt, sched = _setup()
    _train_step(model, opt, sched)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"a": {"b": [1, 2]}}, harmonizer=_Stateful())
    for f in path.iterdir():
        torch.load(f, weights_only=True)


@pytest.mark.parametrize("warmup,total,ratio", [(0, 10, 0.0), (3, 10, 0.1), (5, 5, 0.0), (4, 1000, 0.05)])
def test_warmup_cosine_schedule(warmup, total, ratio):
    f = WarmupCosine(warmup, total, ratio)
    import math

    for step in range(total + 3):
        if step < warmup:
            want = (step + 1) / warmup
        else:
            t = min(1.0, (step - warmup) / max(1, total - warmup))
            want = ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * t))
        assert abs(f(step) - want) < 1e-15
    assert warmup == 0 or f(warmup - 1) == 1.0  # peak at the end of the warm-up
    assert warmup >= total or f(total) == pytest.approx(ratio)  # decayed to the floor at the end
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, warmup, total, ratio)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * f(s) for s in range(total)])
