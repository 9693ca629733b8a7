"""Two gloo ranks on the CPU with FSDP2 (fully_shard per block + root): a run equal to one process on the
same global batch, and an exact resume from its sharded (torch.distributed.checkpoint) checkpoint."""
import pytest
import torch

from harmony.trainer import checkpoint as ckpt
from harmony.trainer.loop import main
from helpers import (COMMON, FEATURE_KEEP, compare_resumed, compare_runs, free_ports, max_weight_diff, spawn,
                     train_worker)
from standins import standin_parts, tiny_args

pytestmark = pytest.mark.distributed


def _dcp_model(ckpt_dir, out):
    """The full (unsharded) model state of a DCP checkpoint, read back as one torch.save file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt_dir / "dcp"), str(out))
    return torch.load(out, weights_only=True)["model"]


def test_fsdp2_two_ranks(tmp_path):
    single, full, resumed = tmp_path / "single", tmp_path / "fsdp", tmp_path / "fsdp_resumed"
    single_ga, fsdp_ga = tmp_path / "single_ga", tmp_path / "fsdp_ga"
    main(tiny_args(single, 4, *COMMON), parts=standin_parts(feature_keep=FEATURE_KEEP))
    main(tiny_args(single_ga, 2, *COMMON, "--train.grad_accum=2"), parts=standin_parts(feature_keep=FEATURE_KEEP))
    runs = [tiny_args(full, 4, *COMMON, "--train.parallel=fsdp"),
            tiny_args(resumed, 4, *COMMON, "--train.parallel=fsdp",
                      f"--train.resume={full / 'checkpoints' / 'step_00000002'}"),
            # gradient accumulation: no reduce-scatter on the first micro-step
            tiny_args(fsdp_ga, 2, *COMMON, "--train.parallel=fsdp", "--train.grad_accum=2")]
    spawn(train_worker, (free_ports(4), runs, str(tmp_path)))

    compare_runs(single, full)
    compare_runs(single_ga, fsdp_ga)
    step4 = full / "checkpoints" / "step_00000004"
    assert (step4 / "dcp").is_dir() and not (step4 / "state.pt").exists()
    w_single = ckpt.load(single / "checkpoints" / "step_00000004" / "state.pt")["model"]
    w_full = _dcp_model(step4, tmp_path / "full.pt")
    err = max_weight_diff(w_single, w_full)
    print("max weight difference after 4 steps, FSDP2 vs one process:", err)
    assert err < 1e-5
    compare_resumed(full, resumed, first_step=3)
    w_res = _dcp_model(resumed / "checkpoints" / "step_00000004", tmp_path / "resumed.pt")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
