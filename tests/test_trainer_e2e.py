"""The real thing, end to end on the CPU for a few steps: VATT, the synthetic and GRID data, the CMA losses and
the GradientHarmonizer through ``main([...])``, writing every output (torchrun: test_trainer_torchrun.py)."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from harmony.trainer.metrics import read_jsonl
from harmony.trainer.loop import main
from helpers import REPO, SMALL, grid_dir

# the real model for a few steps each: seconds per test
pytestmark = pytest.mark.slow


def _check_outputs(run: Path, steps: int, synthetic: bool) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["steps"] == steps
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert r["skipped"] == 0
        assert r["loss"] == pytest.approx(r["loss_va"] + cfg["harmony"]["lam"] * r["loss_vt"], rel=1e-6)
        # the step's statistics describe the same n cosines: the histogram holds each valid sample once, the
        # mean lies within a bin of the histogram's mean, and kept / conflict fractions are counts out of n
        n = sum(r["cos_hist"])
        assert 0 < n <= cfg["train"]["batch_size"]
        width = 2.0 / len(r["cos_hist"])
        hist_mean = sum(c * (-1 + (i + 0.5) * width) for i, c in enumerate(r["cos_hist"])) / n
        assert abs(r["cos_mean"] - hist_mean) <= width / 2 + 1e-9, (r["cos_mean"], hist_mean)
        for frac in ("kept", "frac_conflict"):
            assert r[frac] * n == pytest.approx(round(r[frac] * n), abs=1e-6), (frac, r[frac], n)
    summary = json.loads((run / "summary.json").read_text())
    for d in ("v2t", "t2v", "v2a", "a2v"):
        ret = summary["retrieval"][d]
        assert ret["r1"] <= ret["r5"] <= ret["r10"] and ret["medr"] >= 1, (d, ret)
    assert summary["steps"] == steps and summary["samples_per_s"] > 0 and summary["wall_s"] > 0
    if synthetic:   # a few steps learn nothing to bound (test_measure_arm_finds_planted_noise does); both
        # classes of the planted noise must be in the window, else the AUC is NaN
        assert all(math.isfinite(summary[k]) for k in ("probe_acc", "noise_auc", "noise_auc_memory"))
    assert (run / "checkpoints" / f"step_{steps:08d}" / "state.pt").is_file()
    assert {"losses.png", "cos_hist.png", "retrieval.png"} <= {p.name for p in (run / "plots").iterdir()}
    print(json.dumps({k: v for k, v in summary.items() if k != "retrieval"}, indent=None)[:600])
    return summary


def test_synthetic_run_end_to_end(tmp_path):
    run = tmp_path / "synthetic"
    main([f"--log.run_dir={run}", "--train.steps=3", "--harmony.mode=auto", "--harmony.curriculum=threshold",
          "--harmony.curriculum_start=0", *SMALL])
    _check_outputs(run, 3, synthetic=True)


def test_feature_mode_run_end_to_end(tmp_path):
    """harmony.mode=feature: the trainer hands the pooled video feature to the harmonizer."""
    run = tmp_path / "feature"
    main([f"--log.run_dir={run}", "--train.steps=2", "--harmony.mode=feature", "--harmony.curriculum=threshold",
          "--harmony.curriculum_start=0", *SMALL])
    _check_outputs(run, 2, synthetic=True)


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
    from harmony.trainer.loop import Trainer

    cfg, _ = parse_args([f"--log.run_dir={tmp_path / 'mem'}", "--train.steps=10", "--harmony.score_memory=true",
                         "--harmony.curriculum=ratio",
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


@pytest.mark.parametrize("method", ["measure", "plain"])
def test_window_noise_statistics_are_logged(tmp_path, method):
    """Premise-(a) statistics per log window: the harmonizer's cosine (noise_auc*, frac_conflict_*), the
    pooled-feature cosine (noise_auc_feat*, also without a harmonizer) and the score memory's AUC."""
    run = tmp_path / method
    arm = ["--harmony.realign=none", "--harmony.score_memory=true", "--harmony.curriculum=ratio",
           "--harmony.curriculum_start=0"] \
        if method == "measure" else ["--harmony.enabled=false"]
    main([f"--log.run_dir={run}", "--train.steps=3", "--log.plots=false", "--data.noise=0.5", *arm, *SMALL])
    rows = read_jsonl(run / "metrics.jsonl")
    for r in rows:   # logged with a value (both classes present); what the values reach: the test below
        for key in ("noise_auc_feat", "noise_auc_feat_text", "noise_auc_loss_text", "noise_auc_loss_audio"):
            assert math.isfinite(r[key]), key
        if method == "measure":
            for key in ("noise_auc", "noise_auc_text", "noise_auc_memory", "frac_conflict_clean",
                        "frac_conflict_text"):
                assert math.isfinite(r[key]), key
        else:
            measured = {k for k, v in r.items() if v is not None}
            assert not measured & {"noise_auc", "noise_auc_text", "noise_auc_memory", "frac_conflict",
                                   "frac_conflict_clean", "frac_conflict_text", "cos_mean"}


def test_measure_arm_finds_planted_noise(tmp_path):
    """The measure arm (harmonizer on, realign=none) on planted noise (30% of captions and 20% of audio tracks
    swapped for another concept's): once the model learns, the per-sample gradient cosine ranks the misaligned
    triplets below the clean ones, and the own caption loss ranks swapped captions above clean ones. Measured with
    this command on seeds 0, 1, 2 (2026-12-05): the last window's (steps 151-200) noise_auc 0.77 / 0.63 / 0.68 and
    noise_auc_loss_text 0.87 / 0.74 / 0.77; the first window's (steps 1-50) noise_auc 0.52 / 0.51 / 0.53. A window
    scores 1600 triplets (AUC standard error about 0.015), so the bounds sit more than 3 standard errors under the
    worst seed, while a measurement without signal (random or sign-flipped cosines: AUC <= 0.5) fails them. The
    test runs seed 0."""
    run = tmp_path / "measure"
    main([*SMALL, f"--log.run_dir={run}", "--train.steps=200", "--train.batch_size=32", "--data.size=4096",
          "--train.lr=0.001", "--train.warmup_steps=10", "--train.weight_decay=0.01", "--train.clip_norm=1.0",
          "--model.droptoken=0.5", "--data.noise=0.3", "--data.noise_audio=0.2", "--data.noise_kind=swap",
          "--harmony.realign=none", "--harmony.score_memory=true", "--harmony.curriculum=ratio",
          "--harmony.curriculum_start=0",
          "--harmony.upstream=path", "--harmony.curriculum_score=cos",
          "--harmony.mode=auto", "--harmony.scope=shared", "--log.every=50", "--log.plots=false",
          "--eval.final=false", "--train.ckpt_every=0", "--train.seed=0", "--data.seed=0"])
    rows = read_jsonl(run / "metrics.jsonl")
    print([(r["step"], round(r["noise_auc"], 3), round(r["noise_auc_loss_text"], 3)) for r in rows])
    assert [r["step"] for r in rows] == [50, 100, 150, 200]
    assert rows[-1]["noise_auc"] >= 0.58
    assert rows[-1]["noise_auc_loss_text"] >= 0.69
    assert rows[-1]["noise_auc"] >= rows[0]["noise_auc"] + 0.05     # it rises with learning (seeds: +0.12 ... +0.25)


def test_feature_cosine_matches_private_feature_copies_in_float64(tmp_path):
    """NoiseMonitor.feature_scores against the per-sample definitions at the pooled video feature: give every sample
    a private copy of its feature (f_i + δ_i, δ = 0) in a float64 model. path: ∂(Σ_j ℓ_j)/∂δ_i; own_row:
    ∂ℓ_i/∂δ_i (sample i's own row through its own copy); own_pair: (∂ℓ_i/∂s_ii)·∂s_ii/∂δ_i with ∂ℓ/∂s taken
    on a loss written out from the logit matrix (brute_force.logits_loss). The magnitude-aware scores follow."""
    from brute_force import logits_loss
    from harmony.cli import parse_args
    from harmony.trainer.loop import Trainer

    cfg, _ = parse_args([f"--log.run_dir={tmp_path / 'fc'}", "--train.steps=1", "--train.batch_size=7",
                         "--harmony.enabled=false", "--data.noise=0.5", *SMALL[1:]])
    trainer = Trainer(cfg)
    try:
        batch = next(iter(trainer._train_loader()))
        batch["mask_vt"][2] = False  # a masked caption: no cosine for that sample
        got = trainer.monitor.feature_scores(batch, trainer.forward(batch, micro_index=3))

        model = trainer.model.double()
        delta = torch.zeros(7, trainer.model.video_post.in_features if hasattr(trainer.model.video_post,
                            "in_features") else trainer.model.dims["width"], dtype=torch.float64, requires_grad=True)
        hook = model.video_post.register_forward_pre_hook(lambda m, args: (args[0] + delta,))
        try:
            out = model(batch["video"].double(), batch["audio"].double(), batch["text"],
                        generator=trainer._droptoken_generator(3))
        finally:
            hook.remove()
        m_va, m_vt = batch["mask_va"].bool(), batch["mask_vt"].bool()
        lva = trainer.parts.nce(out.z_va_v, out.z_va_a, mask=m_va)
        lvt = trainer.parts.mil_nce(out.z_vt_v, out.z_vt_t, mask=m_vt, cand_mask=out.cand_mask)
        ok = m_va & m_vt
        assert not ok[2]

        def own_pair(anchor, cands, mask, cand_valid):
            e = torch.nn.functional.normalize(anchor, dim=-1)
            c = torch.nn.functional.normalize(cands, dim=-1)
            S = (torch.einsum("jd,kld->jkl", e, c) / 0.07).detach().requires_grad_(True)
            w = torch.autograd.grad(logits_loss(S, mask, cand_valid).sum(), S)[0]
            rows = [torch.autograd.grad((w[i, i] * (e[i] * c[i]).sum(-1) / 0.07).sum(), delta,
                                        retain_graph=True)[0][i] if mask[i] else torch.zeros(delta.shape[1],
                                                                                             dtype=torch.float64)
                    for i in range(7)]
            return torch.stack(rows)

        cand = out.cand_mask if out.cand_mask is not None else torch.ones(out.z_vt_t.shape[:2], dtype=torch.bool)
        refs = {
            "": (torch.autograd.grad(lva[m_va].sum(), delta, retain_graph=True)[0],
                 torch.autograd.grad(lvt[m_vt].sum(), delta, retain_graph=True)[0]),
            "_own_row": tuple(torch.stack([torch.autograd.grad(l[i], delta, retain_graph=True)[0][i] if m[i] else
                                           torch.zeros(delta.shape[1], dtype=torch.float64) for i in range(7)])
                              for l, m in ((lva, m_va), (lvt, m_vt))),
            "_own_pair": (own_pair(out.z_va_v, out.z_va_a[:, None], m_va, None),
                          own_pair(out.z_vt_v, out.z_vt_t, m_vt, cand)),
        }
        for sfx, (g_va, g_vt) in refs.items():
            want = torch.nn.functional.cosine_similarity(g_va, g_vt, dim=1)
            c = got[f"feat_cos{sfx}"]
            print(sfx or "path", "max |Δcos|", float((c[ok].double() - want[ok]).abs().max()))
            assert torch.isnan(c[2])
            torch.testing.assert_close(c[ok].double(), want[ok], atol=2e-5, rtol=0)
            assert c[ok].abs().max() > 0
            gvt = -g_vt.norm(dim=1) * (1 - want)
            torch.testing.assert_close(got[f"feat_gvt{sfx}"][ok].double(), gvt[ok], atol=0, rtol=1e-4)
        # the definitions measure different things here (else the comparison above could not tell them apart)
        assert (got["feat_cos"][ok] - got["feat_cos_own_row"][ok]).abs().max() > 1e-3
        assert (got["feat_cos_own_row"][ok] - got["feat_cos_own_pair"][ok]).abs().max() > 1e-3
        # measured once per log window: the window's later micro-steps hold no value, the next window measures again
        trainer.model.float()
        again = trainer.monitor.feature_scores(batch, trainer.forward(batch, micro_index=3))
        assert set(again) == set(got) and all(bool(torch.isnan(v).all()) for v in again.values())
        trainer.monitor.on_log()
        fresh = trainer.monitor.feature_scores(batch, trainer.forward(batch, micro_index=3))
        assert bool(torch.isfinite(fresh["feat_cos"][ok]).all())
    finally:
        trainer.close()


def test_oracle_drop_masks_exactly_the_flagged_losses(tmp_path):
    from harmony.cli import parse_args
    from harmony.config import ConfigError
    from harmony.trainer.loop import Trainer

    cfg, _ = parse_args([f"--log.run_dir={tmp_path / 'o'}", "--train.steps=1", "--data.oracle_drop=true", *SMALL])
    trainer = Trainer(cfg)
    try:
        batch = next(iter(trainer._train_loader()))  # the training loader applies the control
        nt, na = batch["noisy_text"].clone(), batch["noisy_audio"].clone()
        assert nt.any() or na.any()
        assert torch.equal(batch["mask_vt"], ~nt) and torch.equal(batch["mask_va"], ~na)
        from harmony.data.batch import oracle_drop
        with pytest.raises(ConfigError, match="flags"):
            oracle_drop({k: v for k, v in batch.items() if k != "noisy_text"})
    finally:
        trainer.close()


def _pairwise_noise_auc(score, pos, neg) -> float:
    """Mann–Whitney by pairwise counting in float64: the fraction of (flagged, clean) pairs whose flagged sample has
    the lower score (higher = more trusted, so the lower is the one ranked more suspect), ties ½; samples without a
    score (NaN) left out. NaN without a pair."""
    ok = torch.isfinite(score)
    p, q = score[ok & pos].double().tolist(), score[ok & neg].double().tolist()
    if not p or not q:
        return math.nan
    return sum(1.0 if a < b else 0.5 if a == b else 0.0 for a in p for b in q) / (len(p) * len(q))


def _expected_aucs(seen: list, key: str, prefix: str) -> dict:
    """{prefix, prefix_text, prefix_audio} of the captured per-sample scores ``key`` by pairwise counting against the
    batches' own flags: overall noisy = text or audio misaligned; per kind that kind against the samples clean in
    both. NaN entries (no pair) are absent from the logs."""
    nt = torch.cat([s["noisy_text"] for s in seen])
    na = torch.cat([s["noisy_audio"] for s in seen])
    score = torch.cat([torch.where(s["valid"], s[key], torch.full_like(s[key], math.nan)) for s in seen])
    clean = ~(nt | na)
    return {prefix: _pairwise_noise_auc(score, nt | na, clean), f"{prefix}_text": _pairwise_noise_auc(score, nt, clean),
            f"{prefix}_audio": _pairwise_noise_auc(score, na, clean)}


def _assert_logged(logged: dict, want: dict, where) -> None:
    for k, v in want.items():
        if math.isnan(v):
            assert k not in logged, (where, k, logged.get(k))
        else:
            assert logged[k] == pytest.approx(v, abs=1e-12), (where, k, logged[k], v)


@pytest.mark.parametrize("score", ["cos", "gvt", "loss"])
def test_noise_auc_follows_the_runs_detector_score(tmp_path, score):
    """noise_auc (per window and in the summary) is the AUC of what the curriculum ranks by; noise_auc_cos stays
    the cosine's. The expected AUCs are counted pair by pair from the per-sample scores the harmonizer returned to
    the trainer and the batches' ground-truth flags (not through the monitor). With the cosine the score is the
    cosine; with gvt it equals the magnitude-aware score's AUC (computed by the monitor from the same dots); with a
    measure-free loss ranking no cosine is measured."""
    from harmony.cli import parse_args
    from harmony.trainer.loop import Trainer

    extra = {"cos": ["--harmony.mode=feature", "--harmony.curriculum_score=cos"],
             "gvt": ["--harmony.mode=feature", "--harmony.curriculum=ratio", "--harmony.curriculum_score=gvt"],
             "loss": ["--harmony.measure=false", "--harmony.curriculum=ratio", "--harmony.curriculum_score=loss",
                      "--data.noise_audio=0.0", "--harmony.lam=1.0"]}[score]
    run = tmp_path / score
    steps, noise_window = 6, 4
    cfg, _ = parse_args([f"--log.run_dir={run}", f"--train.steps={steps}", "--harmony.realign=none",
                         "--log.plots=false", "--eval.every=0", f"--eval.noise_window={noise_window}", *SMALL, *extra])
    assert cfg.train.grad_accum == 1 and cfg.log.every == 1  # one micro-step per logged window
    trainer = Trainer(cfg)
    seen = []
    harmonize = trainer.harmonize

    def spy(batch, fwd):   # what the harmonizer hands back, before any observer sees it
        stats = harmonize(batch, fwd)
        seen.append({"step": trainer.step + 1, "noisy_text": batch["noisy_text"].bool().cpu().clone(),
                     "noisy_audio": batch["noisy_audio"].bool().cpu().clone(),
                     "valid": stats.valid.bool().cpu().clone(), "cos": stats.cos.detach().double().cpu().clone(),
                     "score": stats.score.detach().double().cpu().clone(),
                     "gvt": (-stats.dots[:, 2].detach().double().clamp(min=0).sqrt()
                             * (1 - stats.cos.detach().double())).cpu()})
        return stats

    trainer.harmonize = spy
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "noise_auc" in r]
    assert [s["step"] for s in seen] == list(range(1, steps + 1))
    assert rows
    if score == "cos":  # the run's detector is the harmonizer's cosine itself
        for s in seen:
            assert torch.equal(s["score"][s["valid"]], s["cos"][s["valid"]])
    for r in rows:
        window = [s for s in seen if s["step"] == r["step"]]
        _assert_logged(r, _expected_aucs(window, "score", "noise_auc"), r["step"])
        if score == "loss":
            assert "noise_auc_cos" not in r
        else:
            _assert_logged(r, _expected_aucs(window, "cos", "noise_auc_cos"), r["step"])
            _assert_logged(r, _expected_aucs(window, "gvt", "noise_auc_gvt"), r["step"])
        if score == "gvt":
            assert r["noise_auc"] == pytest.approx(r["noise_auc_gvt"], abs=1e-12)
    if score == "gvt":      # a different detector than the cosine (in some window of this short run)
        assert any(r["noise_auc"] != r["noise_auc_cos"] for r in rows)
    last = [s for s in seen if s["step"] > steps - noise_window]   # the summary's window: the last steps
    _assert_logged(summary, _expected_aucs(last, "score", "noise_auc"), "summary")
    if score == "loss":
        assert "noise_auc_cos" not in summary
    else:
        _assert_logged(summary, _expected_aucs(last, "cos", "noise_auc_cos"), "summary")
    assert "noise_auc" in summary


def test_web_like_data_per_pair_action_and_detector_report(tmp_path):
    """Web-like data (swapped and biased captions, swapped audio, hard clips, a long tail) with a per-pair loss filter:
    every detector is reported per window, split by noise kind, hardness and concept frequency; the run's own scores
    are per pair (noise_auc_text from the caption score, noise_auc_audio from the audio score: here the own losses,
    so they equal the own-loss detector's AUCs on the same samples), and the summary splits them the same way."""
    run = tmp_path / "web"
    summary = main([*SMALL, f"--log.run_dir={run}", "--train.steps=4", "--log.every=4", "--eval.noise_window=4",
                    "--train.batch_size=32", "--data.size=128", "--data.noise=0.2", "--data.noise_bias=0.2",
                    "--data.noise_audio=0.3", "--data.hard=0.3", "--data.imbalance=4", "--harmony.realign=none",
                    "--harmony.mode=feature", "--harmony.upstream=own_pair", "--harmony.curriculum=ratio",
                    "--harmony.curriculum_score=loss", "--harmony.curriculum_target=pair",
                    "--harmony.curriculum_start=0", "--harmony.rho0=0.75", "--harmony.min_keep=0", "--log.plots=false",
                    "--eval.every=0", "--eval.feature_cos=true", "--train.ckpt_every=0"])
    (row,) = read_jsonl(run / "metrics.jsonl")
    assert row["noise_auc_text"] == pytest.approx(row["noise_auc_loss_text"], abs=1e-12)
    assert row["noise_auc_audio"] == pytest.approx(row["noise_auc_loss_audio"], abs=1e-12)
    for det in ("loss", "lossgmm", "resid", "agree", "agreecos", "comb", "featcos", "featmag", "featref", "cos", "mag"):
        for split in ("", "_swap", "_hard", "_easy", "_tail", "_head"):
            assert math.isfinite(row[f"noise_auc_{det}_audio{split}"]), (det, split)
        for split in ("", "_swap", "_bias", "_hard", "_easy"):
            assert math.isfinite(row[f"noise_auc_{det}_text{split}"]), (det, split)
    assert 0 < row["kept"] < 1
    for split in ("", "_swap", "_bias", "_hard", "_easy", "_tail", "_head"):
        assert summary[f"noise_auc_text{split}"] == pytest.approx(row[f"noise_auc_loss_text{split}"], abs=1e-12)
    assert summary["noise_auc_audio_swap"] == pytest.approx(row["noise_auc_loss_audio_swap"], abs=1e-12)
