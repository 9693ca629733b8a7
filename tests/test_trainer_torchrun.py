"""``train.py`` under torchrun with two gloo ranks and the real model, data and harmonizer (DDP, a few steps)."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, SMALL

pytestmark = pytest.mark.distributed


def test_train_py_under_torchrun_two_ranks(tmp_path):
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), f"--log.run_dir={run}", "--train.steps=2", "--train.parallel=ddp",
           "--harmony.mode=ghost", "--log.plots=false", *SMALL]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    ckpt_dir = run / "checkpoints" / "step_00000002"
    assert {"rank_00000.pt", "rank_00001.pt", "state.pt", "meta.pt"} <= {p.name for p in ckpt_dir.iterdir()}
