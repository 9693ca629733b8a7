"""The trainer's CUDA paths on one GPU (skipped without one): fp32 and bf16, the Nsight/torch.profiler hooks,
FSDP2 in one process (NCCL) equal to the unsharded run and resuming exactly from its DCP checkpoint, and the
real VATT + GradientHarmonizer (ghost, materialize, FSDP2+ghost in bf16) on random batches of VATT's shapes."""
import pytest
import torch

from harmony.trainer.metrics import read_jsonl
from harmony.trainer.loop import Parts, main
from standins import standin_parts, tiny_args

pytestmark = pytest.mark.gpu
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


# bf16 against fp32, per logged step. On the CPU the stand-ins' bf16 autocast run differs from fp32 by at most 1.0%
# in loss and 0.012 in cos_mean over 3 steps (seeds 0-4, test_trainer.py); these GPU bounds give 5x that room
# (4 steps, the GPU's bf16 kernels; not yet measured on a GPU). Equal losses would mean bf16 was not in use.
BF16_LOSS_REL, BF16_COS_ABS = 0.05, 0.1


def _close_to_fp32(rows, ref, loss_rel=BF16_LOSS_REL, cos_abs=BF16_COS_ABS, differ=True):
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    rel = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(rows, ref)]
    cos = [abs(a["cos_mean"] - b["cos_mean"]) for a, b in zip(rows, ref) if b["cos_mean"] is not None]
    print("relative loss differences", rel, "cos_mean differences", cos)
    assert max(rel) <= loss_rel and all(c <= cos_abs for c in cos)
    if differ:
        assert max(rel) > 0


def test_bf16_with_profilers(tmp_path):
    main(tiny_args(tmp_path / "fp32", 4, *BASE), parts=standin_parts(0.7))
    ref = _rows(tmp_path / "fp32")
    run = tmp_path / "bf16"
    main(tiny_args(run, 4, *BASE, "--train.precision=bf16", "--profile.nsys=1:3", "--profile.torch=1:2"),
         parts=standin_parts(0.7))
    _close_to_fp32(_rows(run), ref)
    assert (run / "profile" / "trace_rank0_steps1-2.json").is_file()
    main(tiny_args(tmp_path / "fsdp_bf16", 4, *BASE, "--train.parallel=fsdp", "--train.precision=bf16"),
         parts=standin_parts(0.7))
    _close_to_fp32(_rows(tmp_path / "fsdp_bf16"), ref)


def _vatt_parts() -> Parts:
    """The project's model, losses and harmonizer; random batches of the configured shapes (no decoding)."""
    from harmony import GradientHarmonizer
    from harmony.model.losses import mil_nce, nce
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


def _vatt_run(run, extra):
    main([f"--log.run_dir={run}", "--train.steps=4", "--train.device=cuda", "--log.plots=false",
          "--train.ckpt_every=0", "--log.every=1", "--log.progress=false", "--train.batch_size=32",
          "--data.eval_size=64", "--eval.size=64", "--eval.batch_size=32", *extra], parts=_vatt_parts())
    rows = _rows(run)
    assert all(r["cos_mean"] is not None for r in rows)
    return rows


@pytest.fixture(scope="module")
def vatt_fp32_reference(tmp_path_factory):
    """The fp32 materialize run: per-sample gradients formed explicitly, the reference of the other tiers."""
    return _vatt_run(tmp_path_factory.mktemp("vatt") / "materialize-fp32", ["--harmony.mode=materialize"])


@pytest.mark.parametrize("extra", [["--harmony.mode=ghost"],
                                   ["--harmony.mode=materialize", "--train.precision=bf16"],
                                   ["--harmony.mode=ghost", "--train.parallel=fsdp", "--train.precision=bf16"]],
                         ids=["ghost-fp32", "materialize-bf16", "fsdp-ghost-bf16"])
def test_vatt_harmonized_on_gpu(tmp_path, extra, vatt_fp32_reference):
    """Each run against the fp32 materialize run: ghost in fp32 computes the same dots and update in another order
    (fp32 rounding only), the bf16 runs stay within the bf16 bounds above. The same runs with --train.device=cpu
    (FSDP aside) differ by 1e-7 (ghost) and by 0.25% in loss, 0.002 in cos_mean (materialize bf16)."""
    rows = _vatt_run(tmp_path / "vatt", extra)
    print([(r["loss"], r["cos_mean"]) for r in rows])
    if "--train.precision=bf16" in extra:
        _close_to_fp32(rows, vatt_fp32_reference)
    else:
        _close_to_fp32(rows, vatt_fp32_reference, loss_rel=1e-3, cos_abs=1e-3, differ=False)
