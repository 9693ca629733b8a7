"""Two gloo ranks on the CPU with DDP: the cross-rank helpers (any-non-finite flag, gathers of unequal sizes,
global masked mean), a run equal to one process on the same global batch, and an exact resume from a
2-rank checkpoint. Both ranks are spawned ONCE and do everything in turn (spawning is the slow part).
The FSDP2 counterpart is test_trainer_fsdp.py; the hard-kill resume is tested in test_trainer.py."""
import os

import pytest
import torch

from harmony.trainer import checkpoint as ckpt
from harmony import distributed as hd
from harmony.trainer.loop import main
from helpers import (COMMON, FEATURE_KEEP, WORLD, compare_resumed, compare_runs, free_ports, max_weight_diff, spawn,
                     train_worker)
from standins import standin_parts, tiny_args

pytestmark = pytest.mark.distributed


def test_ddp_two_ranks(tmp_path):
    single, full, resumed = tmp_path / "single", tmp_path / "ddp", tmp_path / "ddp_resumed"
    single_ga, ddp_ga = tmp_path / "single_ga", tmp_path / "ddp_ga"
    main(tiny_args(single, 4, *COMMON), parts=standin_parts(feature_keep=FEATURE_KEEP))
    main(tiny_args(single_ga, 2, *COMMON, "--train.grad_accum=2"), parts=standin_parts(feature_keep=FEATURE_KEEP))
    runs = [tiny_args(full, 4, *COMMON, "--train.parallel=ddp"),
            tiny_args(resumed, 4, *COMMON, "--train.parallel=ddp",
                      f"--train.resume={full / 'checkpoints' / 'step_00000002'}"),
            # gradient accumulation: no_sync on the first micro-step, one reduction on the second
            tiny_args(ddp_ga, 2, *COMMON, "--train.parallel=ddp", "--train.grad_accum=2")]
    spawn(train_worker, (free_ports(4), runs, str(tmp_path), _check_collectives))

    _check_collective_results(tmp_path)
    compare_runs(single, full)
    compare_runs(single_ga, ddp_ga)
    w1 = ckpt.load(single / "checkpoints" / "step_00000004" / "state.pt")["model"]
    w2 = ckpt.load(full / "checkpoints" / "step_00000004" / "state.pt")["model"]
    err = max_weight_diff(w1, w2)
    print("max weight difference after 4 steps, DDP vs one process:", err)
    assert err < 1e-5
    assert {p.name for p in (full / "checkpoints" / "step_00000004").iterdir()} == \
        {"state.pt", "meta.pt", "rank_00000.pt", "rank_00001.pt"}
    compare_resumed(full, resumed, first_step=3)
    w3 = ckpt.load(resumed / "checkpoints" / "step_00000004" / "state.pt")["model"]
    assert all(torch.equal(w2[k], w3[k]) for k in w2)


# ------------------------------------------------------------------------------------------- helpers

def _check_collectives(rank, out_dir):
    hd.init_distributed("cpu")
    try:
        res = {}
        # a NaN only on rank 1 must stop every rank
        local = torch.tensor([1.0, float("nan") if rank == 1 else 2.0])
        res["any_nonfinite"] = hd.any_nonfinite(local, None)
        res["all_finite"] = hd.any_nonfinite(torch.ones(2), torch.zeros(1))
        rows = torch.arange(3 * (rank + 1) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * rank
        res["gathered"] = hd.all_gather_rows(rows)
        res["broadcast"] = hd.broadcast_object({"dir": f"from-{rank}"})
        # global masked mean: rank 0 holds 3 samples (1 masked), rank 1 holds 2 (both valid)
        g = torch.Generator().manual_seed(0)
        losses_all = torch.rand(5, generator=g, dtype=torch.float64)
        mask_all = torch.tensor([True, False, True, True, True])
        sl = slice(0, 3) if rank == 0 else slice(3, 5)
        w = losses_all[sl].clone().requires_grad_()
        value = hd.global_masked_mean(w, mask_all[sl])
        value.backward()
        res["gmm_value"] = hd.all_reduce(value.detach().clone(), "mean")
        res["gmm_grad"] = hd.all_gather_rows(w.grad / WORLD)  # what DDP's gradient averaging applies
        res["losses_all"], res["mask_all"] = losses_all, mask_all
        torch.save(res, os.path.join(out_dir, f"helpers_rank{rank}.pt"))
    finally:
        hd.shutdown()


def _check_collective_results(out_dir):
    for rank in range(WORLD):
        res = torch.load(out_dir / f"helpers_rank{rank}.pt", weights_only=False)
        assert res["any_nonfinite"] is True and res["all_finite"] is False
        want_rows = torch.cat([torch.arange(6.).reshape(3, 2), torch.arange(12.).reshape(6, 2) + 100])
        assert torch.equal(res["gathered"], want_rows)
        assert res["broadcast"] == {"dir": "from-0"}
        # float64 reference: the mean over the 4 valid samples of the global batch and its gradient
        l, m = res["losses_all"], res["mask_all"]
        want = l[m].sum() / m.sum()
        want_grad = m.double() / m.sum()
        err = max(abs(res["gmm_value"].item() - want.item()), (res["gmm_grad"] - want_grad).abs().max().item())
        print("global masked mean max error", err)
        assert err < 1e-12
