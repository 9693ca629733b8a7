"""The real thing, end to end on the CPU for a few steps: VATT, the synthetic and GRID data, the CMA losses and
the GradientHarmonizer through ``main([...])``, writing every output (torchrun: test_trainer_torchrun.py)."""
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from harmony.metrics import read_jsonl
from harmony.trainer import main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--train.batch_size=8", "--train.warmup_steps=1", "--train.device=cpu", "--data.size=64",
         "--data.eval_size=16", "--data.noise=0.3", "--data.noise_audio=0.2", "--data.frames=4",
         "--data.image_size=16", "--model.video_patch=[2,8,8]", "--eval.size=16", "--eval.batch_size=8",
         "--log.every=1", "--log.progress=false", "--train.ckpt_every=2"]


def grid_dir() -> Path:
    return Path(os.environ.get("HARMONY_GRID_DIR", REPO.parent / "shared" / "data" / "grid"))


def _check_outputs(run: Path, steps: int, synthetic: bool) -> dict:
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == steps
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert r["loss"] is not None and r["cos_mean"] is not None and 0 <= r["kept"] <= 1
        assert -1.0 <= r["cos_mean"] <= 1.0 and r["skipped"] == 0
    summary = json.loads((run / "summary.json").read_text())
    for d in ("v2t", "t2v", "v2a", "a2v"):
        assert {"r1", "r5", "r10", "medr"} <= set(summary["retrieval"][d])
    assert summary["steps"] == steps and summary["samples_per_s"] > 0 and summary["wall_s"] > 0
    if synthetic:
        assert 0 <= summary["probe_acc"] <= 1 and 0 <= summary["noise_auc"] <= 1
        assert 0 <= summary["noise_auc_memory"] <= 1
    assert (run / "checkpoints" / f"step_{steps:08d}" / "state.pt").is_file()
    assert {"losses.png", "cos_hist.png", "retrieval.png"} <= {p.name for p in (run / "plots").iterdir()}
    print(json.dumps({k: v for k, v in summary.items() if k != "retrieval"}, indent=None)[:600])
    return summary


def test_synthetic_run_end_to_end(tmp_path):
    run = tmp_path / "synthetic"
    main([f"--log.run_dir={run}", "--train.steps=3", "--harmony.mode=auto", "--harmony.curriculum=threshold",
          "--harmony.curriculum_start=0", *SMALL])
    _check_outputs(run, 3, synthetic=True)


def test_grid_run_end_to_end(tmp_path):
    manifest = grid_dir() / "manifest.jsonl"
    if not manifest.is_file():
        pytest.skip(f"GRID test clips not found at {grid_dir()} (set HARMONY_GRID_DIR)")
    run = tmp_path / "grid"
    main(["--config", str(REPO / "configs" / "grid.yaml"), f"--data.manifest={manifest}",
          f"--log.run_dir={run}", "--train.steps=2", "--train.batch_size=4", "--train.device=cpu",
          "--eval.size=8", "--eval.batch_size=4", "--data.eval_size=8", "--log.every=1", "--log.progress=false"])
    summary = _check_outputs(run, 2, synthetic=False)
    assert summary["eval_items"] == 8 and "noise_auc" not in summary


def test_memory_sampler_follows_the_training_step(tmp_path):
    """harmony.memory_use=sampler: the prioritized sampler starts each epoch at the trainer's current step
    (its priorities follow the curriculum's progress); 64 items in batches of 8 start epoch 1 at step 8."""
    from harmony.cli import parse_args
    from harmony.trainer import Trainer

    cfg, _ = parse_args([f"--log.run_dir={tmp_path / 'mem'}", "--train.steps=10", "--harmony.curriculum=memory",
                         "--harmony.memory_use=sampler", "--harmony.curriculum_start=0", "--eval.final=false",
                         "--log.plots=false", *SMALL])
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        sampler = trainer.sampler.sampler
        print("sampler epoch", sampler.epoch, "step", sampler.step)
        assert sampler.epoch == 1 and sampler.step == 8
        seen, _ = trainer.harmonizer.memory.scores(torch.arange(64))
        assert torch.isfinite(seen).all()
    finally:
        trainer.close()
