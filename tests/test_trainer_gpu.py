"""The trainer's CUDA paths on one GPU (skipped without one): fp32 and bf16, the Nsight/torch.profiler hooks,
FSDP2 in one process (NCCL) equal to the unsharded run and resuming exactly from its DCP checkpoint, and the
real VATT + GradientHarmonizer (ghost, materialize, FSDP2+ghost in bf16) on random batches of VATT's shapes."""
import pytest
import torch

from harmony.metrics import read_jsonl
from harmony.trainer import Parts, main
from test_trainer_standins import standin_parts, tiny_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BASE = ["--log.plots=false", "--train.device=cuda", "--train.ckpt_every=2"]


def _rows(run):
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows and all(r["loss"] is not None and r["skipped"] == 0 for r in rows)
    return rows


def test_fsdp_equals_unsharded_and_resumes_exactly(tmp_path):
    main(tiny_args(tmp_path / "plain", 4, *BASE), parts=standin_parts(0.7))
    main(tiny_args(tmp_path / "fsdp", 4, *BASE, "--train.parallel=fsdp"), parts=standin_parts(0.7))
    main(tiny_args(tmp_path / "resumed", 4, *BASE, "--train.parallel=fsdp",
                   f"--train.resume={tmp_path / 'fsdp' / 'checkpoints' / 'step_00000002'}"), parts=standin_parts(0.7))
    plain, fsdp, resumed = (_rows(tmp_path / n) for n in ("plain", "fsdp", "resumed"))
    for a, b in zip(plain, fsdp):
        print(a["step"], a["loss"], b["loss"])
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    assert [r["loss"] for r in fsdp[2:]] == [r["loss"] for r in resumed]
    assert fsdp[-1]["mem_gb"] > 0


def test_bf16_with_profilers(tmp_path):
    run = tmp_path / "bf16"
    main(tiny_args(run, 4, *BASE, "--train.precision=bf16", "--profile.nsys=1:3", "--profile.torch=1:2"),
         parts=standin_parts(0.7))
    _rows(run)
    assert (run / "profile" / "trace_rank0_steps1-2.json").is_file()
    main(tiny_args(tmp_path / "fsdp_bf16", 4, *BASE, "--train.parallel=fsdp", "--train.precision=bf16"),
         parts=standin_parts(0.7))
    _rows(tmp_path / "fsdp_bf16")


def _vatt_parts() -> Parts:
    """The project's model, losses and harmonizer; random batches of the configured shapes (no decoding)."""
    from harmony import GradientHarmonizer
    from harmony.losses import mil_nce, nce
    from harmony.model import VATT

    def loader(dc, split, b, rank, world, seed, start, drop_last=True, sampler=None):
        n_audio = int(dc.sample_rate * dc.audio_seconds)
        pos, count = start, 0
        while split == "train" or count < dc.eval_size:
            g = torch.Generator().manual_seed(seed * 7919 + pos * 31 + (split == "eval"))
            idx = torch.arange(pos * b, pos * b + b)
            yield {"video": torch.rand(b, 3, dc.frames, dc.image_size, dc.image_size, generator=g),
                   "audio": torch.rand(b, n_audio, generator=g) * 2 - 1,
                   "text": torch.randint(1, 65536, (b, dc.candidates, dc.max_words), generator=g),
                   "mask_va": torch.ones(b, dtype=torch.bool), "mask_vt": torch.ones(b, dtype=torch.bool),
                   "index": idx, "concept": idx % 4, "noisy_text": idx % 3 == 0, "noisy_audio": idx % 5 == 0,
                   "source": ["random"] * b}
            pos, count = pos + 1, count + b

    return Parts(build_model=lambda cfg: VATT(cfg.model, cfg.data), build_loader=loader, nce=nce, mil_nce=mil_nce,
                 build_harmonizer=GradientHarmonizer)


@pytest.mark.parametrize("extra", [["--harmony.mode=ghost"],
                                   ["--harmony.mode=materialize", "--train.precision=bf16"],
                                   ["--harmony.mode=ghost", "--train.parallel=fsdp", "--train.precision=bf16"]],
                         ids=["ghost-fp32", "materialize-bf16", "fsdp-ghost-bf16"])
def test_vatt_harmonized_on_gpu(tmp_path, extra):
    run = tmp_path / "vatt"
    main([f"--log.run_dir={run}", "--train.steps=4", "--train.device=cuda", "--log.plots=false",
          "--train.ckpt_every=0", "--log.every=1", "--log.progress=false", "--train.batch_size=32",
          "--data.eval_size=64", "--eval.size=64", "--eval.batch_size=32", *extra], parts=_vatt_parts())
    rows = _rows(run)
    assert all(r["cos_mean"] is not None for r in rows)
    print([(r["loss"], r["cos_mean"]) for r in rows])
