"""``python -m harmony.audit``: the reference scores against a float64 brute force, their independence of the
batch size, order and number of ranks, the merged output of two torchrun ranks, the page, the training run's
suspects.jsonl, and bad input (one-line errors, no OUT_DIR left behind)."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harmony.audit import records
from harmony.audit.observer import memory_rows
from harmony.audit.run import embed_share, reference_of, score_share
from harmony.audit.scoring import (TEMPERATURE, fit_split, misaligned_posterior, pair_scores, select_reference,
                                   suspect_pair, suspicion)
from harmony.audit.source import load_config, load_model, open_dataset, verified_checkpoint
from harmony.method.curriculum import ScoreMemory
from harmony.model.losses import mil_nce
from helpers import REPO, SMALL, grid_dir

# A few-steps run of the real model on 64 small synthetic clips (30% swapped captions, 20% swapped audio).
TINY_STEPS = ["--train.steps=4", "--log.plots=false", "--log.progress=false"]
# fp32 embeddings of one clip differ by ~1e-6 between batch shapes (GEMM blocking); a loss by ~3e-6 nats here.
FP32_LOSS_ATOL = 2e-5


# ----------------------------------------------------------------------------------------- brute force

def brute_pair(anchor, cands, valid, ids, ref_anchor, ref_cands, ref_valid, ref_ids, tau):
    """Item by item, in float64 Python loops: (loss, rank, best) as docs/AUDIT.md defines them."""
    def unit(x):
        return [v / math.sqrt(sum(u * u for u in x)) for v in x]

    def s(x, y):
        return sum(a * b for a, b in zip(unit(x), unit(y))) / tau

    def lse(xs):
        m = max(xs)
        return m + math.log(sum(math.exp(x - m) for x in xs))

    out = []
    for i in range(len(anchor)):
        own = [s(anchor[i], cands[i][l]) for l in range(len(cands[i])) if valid[i][l]]
        others = [r for r in range(len(ref_anchor)) if ref_ids[r] != ids[i]]
        terms = own + own
        ref_best = {}
        for r in others:
            row = [s(anchor[i], ref_cands[r][l]) for l in range(len(ref_cands[r])) if ref_valid[r][l]]
            terms += row
            if row:
                ref_best[r] = max(row)
            terms += [s(ref_anchor[r], cands[i][l]) for l in range(len(cands[i])) if valid[i][l]]
        own_best = max(own) if own else float("-inf")
        best = max(ref_best, key=lambda r: (ref_best[r], -r)) if ref_best else -1
        best = best if best >= 0 and ref_best[best] > own_best else -1
        if not own:  # an unusable pair: no score, but the clip still has a most likely caption
            out.append((float("nan"), 0, best))
            continue
        rank = 1 + sum(v >= own_best for v in ref_best.values())
        out.append((lse(terms) - lse(own), rank, best))
    return out


@pytest.mark.parametrize("cands_n", [1, 3])
def test_pair_scores_match_float64_brute_force(cands_n):
    g = torch.Generator().manual_seed(7 + cands_n)
    n, m, d = 13, 11, 5
    anchor, cands = torch.randn(n, d, generator=g), torch.randn(n, cands_n, d, generator=g)
    valid = torch.rand(n, cands_n, generator=g) > 0.2
    valid[0] = False                                       # an unusable pair
    ids = torch.arange(n) * 2                              # even ids; the reference shares some of them
    ref_ids = torch.tensor([0, 2, 4, 7, 9, 11, 13, 15, 17, 19, 21])
    ref_anchor, ref_cands = torch.randn(m, d, generator=g), torch.randn(m, cands_n, d, generator=g)
    ref_valid = torch.rand(m, cands_n, generator=g) > 0.2
    got = pair_scores(anchor, cands, valid, ids, ref_anchor, ref_cands, ref_valid, ref_ids, chunk=4)
    want = brute_pair(anchor.double().tolist(), cands.double().tolist(), valid.tolist(), ids.tolist(),
                      ref_anchor.double().tolist(), ref_cands.double().tolist(), ref_valid.tolist(), ref_ids.tolist(),
                      TEMPERATURE)
    want_loss = torch.tensor([w[0] for w in want], dtype=torch.float64)
    err = (got.loss - want_loss).abs().nan_to_num(0).max().item()
    print(f"max |loss - brute force| = {err:.3e}")
    assert torch.equal(torch.isnan(got.loss), torch.isnan(want_loss)) and bool(torch.isnan(got.loss[0]))
    assert err < 1e-10
    assert got.rank.tolist() == [w[1] for w in want]
    assert got.best.tolist() == [w[2] for w in want]


def test_reference_is_seeded_and_order_free():
    ids = torch.arange(100)
    ref = select_reference(ids[torch.randperm(100)], 10, seed=3)
    assert torch.equal(ref, select_reference(ids, 10, seed=3))
    assert ref.numel() == 10 and torch.equal(ref, ref.sort().values)
    assert not torch.equal(ref, select_reference(ids, 10, seed=4))
    assert torch.equal(select_reference(ids, 0, seed=3), ids) and torch.equal(select_reference(ids, 500, 3), ids)


def test_split_posterior_and_suspect_rule():
    g = torch.Generator().manual_seed(0)
    losses = torch.cat([torch.randn(300, generator=g) * 0.3 + 1.0, torch.randn(100, generator=g) * 0.8 + 5.0])
    split = fit_split(losses)
    assert abs(split.mean[0] - 1.0) < 0.1 and abs(split.mean[1] - 5.0) < 0.3 and abs(split.weight[1] - 0.25) < 0.05
    x = torch.linspace(-10, 20, 301, dtype=torch.float64)
    post = misaligned_posterior(x, split)
    assert bool((post[1:] >= post[:-1]).all()) and post[0] < 0.01 and post[-1] > 0.99
    sus = suspicion(x, split)
    assert bool((sus[1:] > sus[:-1]).all()) and abs(float(suspicion(torch.tensor([1.0]), split))) < 0.5
    assert suspect_pair(torch.tensor([0.9, 0.1, 0.9, 0.1, float("nan")]),
                        torch.tensor([0.1, 0.9, 0.9, 0.1, 0.2])) == ["text", "audio", "both", "none", "none"]
    assert fit_split(torch.ones(10)) is None
    # a split whose aligned component is not clearly below chance flags nothing (the ranking stays)
    assert split.informative and fit_split(losses, chance=1.5) is not None
    dull = fit_split(losses, chance=1.5)
    assert not dull.informative and bool(misaligned_posterior(x, dull).isnan().all())
    assert torch.equal(suspicion(x, dull), sus)


# ------------------------------------------------------------------------------------- a tiny real run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 4-step run of the real model on 64 synthetic clips (~10 s)."""
    from harmony.trainer.loop import main

    run = tmp_path_factory.mktemp("audit") / "run"
    main([*SMALL, *TINY_STEPS, f"--log.run_dir={run}"])
    return run


def _audit(args, cwd=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "harmony.audit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=timeout)


def _scores(run, batch_size, world=1):
    """audit rows (index -> (loss_text, loss_audio, rank_text, rank_audio)) with this rank layout, in-process:
    each simulated rank embeds its share, the shares are concatenated as the collectives would."""
    cfg = load_config(run, [])
    model = load_model(cfg, verified_checkpoint(run))
    dataset = open_dataset(cfg)
    shares = [embed_share(model, cfg, dataset, batch_size, SimpleNamespace(rank=r, world_size=world, is_main=False,
                                                                           device=torch.device("cpu")))[0]
              for r in range(world)]
    emb = {k: torch.cat([s[k] for s in shares]) for k in shares[0]}
    perm = torch.randperm(emb["index"].numel(), generator=torch.Generator().manual_seed(batch_size))
    emb = {k: v[perm] for k, v in emb.items()}             # the order rows arrive in must not matter either
    scores = score_share(emb, reference_of(emb, 40, seed=0))
    return {int(i): (scores["text"].loss[k].item(), scores["audio"].loss[k].item(), int(scores["text"].rank[k]),
                     int(scores["audio"].rank[k])) for k, i in enumerate(emb["index"].tolist())}


def test_scores_do_not_depend_on_batch_order_or_ranks(tiny_run):
    base = _scores(tiny_run, 64)
    assert sorted(base) == list(range(64))
    for batch_size, world in ((1, 1), (7, 1), (5, 2), (16, 3)):
        other = _scores(tiny_run, batch_size, world)
        diff = max(abs(base[i][p] - other[i][p]) for i in base for p in (0, 1))
        print(f"batch {batch_size}, {world} rank(s): max |Δloss| = {diff:.2e}")
        assert diff < FP32_LOSS_ATOL
        assert [base[i][2:] for i in base] == [other[i][2:] for i in base]


def test_the_in_batch_training_loss_does_depend_on_the_batch(tiny_run):
    """The control for the invariance test: the same clip's training loss moves with its batch-mates by far more
    than the audit's tolerance, so that test could fail if the audit scored in batches."""
    cfg = load_config(tiny_run, [])
    model = load_model(cfg, verified_checkpoint(tiny_run))
    ds = open_dataset(cfg)
    from harmony.data.batch import collate

    def loss_of_item0(others):
        b = collate([ds[0]] + [ds[i] for i in others])
        with torch.no_grad():
            out = model(b["video"], b["audio"], b["text"])
        return float(mil_nce(out.z_vt_v, out.z_vt_t, gather=False)[0])

    moved = abs(loss_of_item0(range(1, 8)) - loss_of_item0(range(30, 60)))
    print(f"item 0's in-batch caption loss moves by {moved:.3f} nats")
    assert moved > 100 * FP32_LOSS_ATOL


def _page_images(out: Path):
    page = (out / "index.html").read_text()
    return page, re.findall(r"<img src='([^']+)'", page)


def test_cli_writes_rows_and_a_page_whose_images_exist(tiny_run, tmp_path):
    out = tmp_path / "audit"
    proc = _audit(["--run", tiny_run, "--out", out, "--top", 5, "--batch-size", 16])
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0
    rows = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(64))
    for r in rows:
        assert {"id", "caption", "loss_text", "loss_audio", "suspect_text", "suspect_audio", "suspect",
                "noisy_text", "noisy_audio", "best_caption"} <= set(r)
        assert r["suspect"] in ("text", "audio", "both", "none")
    truth = open_dataset(load_config(tiny_run, []))
    assert [(r["noisy_text"], r["noisy_audio"]) for r in rows] == [
        (bool(truth[i]["noisy_text"]), bool(truth[i]["noisy_audio"])) for i in range(64)]
    assert any(r["noisy_text"] for r in rows) and any(r["noisy_audio"] for r in rows)
    page, images = _page_images(out)
    assert page.count("<tr class='suspect'>") == 2 * 5
    assert len(images) == 2 + 2 * 2 * 5 and all((out / src).is_file() for src in images)
    assert "AUC" in page and re.search(r"text: AUC 0\.\d{4}", proc.stdout) and "ETA" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    # the reported AUC is the one of the rows' own scores and flags
    from harmony.trainer.evaluate import roc_auc

    auc = roc_auc(torch.tensor([r["suspect_text"] for r in rows]), torch.tensor([r["noisy_text"] for r in rows]))
    assert summary["ground_truth"]["auc_text"] == pytest.approx(auc)
    assert not list(tmp_path.glob(".audit.*"))


def test_training_run_writes_suspects_from_its_score_memory(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "suspects.jsonl").read_text().splitlines()]
    assert rows and [r["index"] for r in rows] == sorted(r["index"] for r in rows)
    assert all(r["suspect_audio"] is None and 0 <= r["suspect_text"] <= 1 for r in rows)  # gmm: the caption only
    assert all("caption" in r and "noisy_text" in r for r in rows)


def test_memory_rows_say_only_what_the_score_can():
    mem = ScoreMemory(0.5)
    mem.update(torch.tensor([3, 1]), torch.tensor([0.9, 0.2]), torch.tensor([True, True]))
    gmm = memory_rows(mem, "gmm")
    assert [(r["index"], r["suspect"]) for r in gmm] == [(1, "text"), (3, "none")]
    assert gmm[0]["suspect_text"] == pytest.approx(0.8) and gmm[0]["suspect_audio"] is None
    cos = memory_rows(mem, "cos")
    assert all(r["suspect"] is None and r["suspect_text"] is None for r in cos)
    assert cos[0]["suspect_any"] > cos[1]["suspect_any"]

    class ScoresOnly:  # a user's memory with only the interface the noise monitor reads
        def scores(self, ids):
            return ids.double() / 10, ids % 2 == 1

    rows = memory_rows(ScoresOnly(), "gmm", num_items=5)
    assert [(r["index"], r["memory_seen"]) for r in rows] == [(1, None), (3, None)]


# ------------------------------------------------------------------------------------------- bad input

def _assert_clean_failure(proc, out: Path, needle: str):
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("audit: error:") and needle in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_missing_run_folder(tmp_path):
    out = tmp_path / "out"
    _assert_clean_failure(_audit(["--run", tmp_path / "nope", "--out", out]), out, "no such run folder")


def test_run_without_checkpoint(tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    out = tmp_path / "out"
    _assert_clean_failure(_audit(["--run", run, "--out", out]), out, "no checkpoint")


def test_corrupt_checkpoint(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for step in (run / "checkpoints").glob("step_*"):
        (step / "state.pt").write_bytes(b"not a checkpoint" * 10)
    out = tmp_path / "out"
    _assert_clean_failure(_audit(["--run", run, "--out", out]), out, "no readable checkpoint")


def test_a_corrupt_newest_checkpoint_falls_back_to_the_last_readable_one(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    (newest / "state.pt").write_bytes(b"")
    assert verified_checkpoint(run) == sorted((run / "checkpoints").glob("step_*"))[-2]


def test_unreadable_manifest(tiny_run, tmp_path):
    out = tmp_path / "out"
    proc = _audit(["--run", tiny_run, "--out", out, "--data.kind=manifest", f"--data.manifest={tmp_path / 'x.jsonl'}"])
    _assert_clean_failure(proc, out, "x.jsonl")


def test_a_failure_while_writing_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with records.staged_output(out) as tmp:
            (tmp / "audit.jsonl").write_text("half")
            raise RuntimeError("page failed")
    assert not out.exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- at scale

@pytest.mark.distributed
def test_two_torchrun_ranks_write_what_one_process_writes(tiny_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _audit(["--run", tiny_run, "--out", one, "--batch-size", 8]).returncode == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "harmony.audit", "--run-dir", str(tiny_run), "--out", str(two), "--batch-size", "8"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    rows1 = [json.loads(x) for x in (one / "audit.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (two / "audit.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows1] == [r["index"] for r in rows2] == list(range(64))
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    for a, b in zip(rows1, rows2):
        assert set(a) == set(b)
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], abs=FP32_LOSS_ATOL * 10), key
            else:
                assert a[key] == b[key], key


@pytest.mark.slow
def test_other_sources_by_data_overrides(tiny_run, tmp_path):
    """The synthetic run audits exported clips as a manifest (with injected caption noise: ground truth) and as
    shards (no captions, no ground truth); the run's own noise rates do not carry over to another source."""
    from harmony.data.export import main as export

    export(["--out", str(tmp_path / "exp"), "--n", "24", "--shards", "4"])
    man = tmp_path / "man"
    proc = _audit(["--run", tiny_run, "--out", man, "--top", 3, "--data.kind=manifest",
                   f"--data.manifest={tmp_path / 'exp' / 'manifest.jsonl'}", "--data.noise=0.3"])
    print(proc.stdout, proc.stderr)
    rows = [json.loads(x) for x in (man / "audit.jsonl").read_text().splitlines()]
    assert len(rows) == 22 and all(r["path"].endswith(".mp4") and r["caption"] for r in rows)
    assert sum(r["noisy_text"] for r in rows) == round(0.3 * 22) and not any(r["noisy_audio"] for r in rows)
    # bad media: a clip that is not there and a line that is not JSON are counted, listed, and not scored
    bad = tmp_path / "exp" / "bad.jsonl"                   # beside the clips: manifest paths are relative
    good = (tmp_path / "exp" / "manifest.jsonl").read_text().splitlines()
    bad.write_text("\n".join(good[:5] + ['{"path": "items/gone.mp4", "text": "a lost clip", "id": "gone"}',
                                         "{not json"] + good[5:10]) + "\n")
    out = tmp_path / "badman"
    proc = _audit(["--run", tiny_run, "--out", out, "--top", 3, "--data.kind=manifest", f"--data.manifest={bad}",
                   f"--data.eval_manifest={tmp_path / 'exp' / 'manifest.jsonl'}"])  # every line of bad.jsonl trains
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0 and "missing_file 1" in proc.stdout and "bad_line 1" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad_media"] == {"missing_file": 1, "bad_line": 1}
    assert summary["bad_media_names"]["missing_file"] == ["gone"]
    assert len(summary["unscored"]) == 1
    rows = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    assert "gone" not in [r["id"] for r in rows] and len(rows) == summary["items"] == 10
    page = (out / "index.html").read_text()
    assert "missing_file" in page and "bad_line" in page and "gone" in page
    # a manifest whose clips are all elsewhere: nothing to score is an error, not a crash
    lost = tmp_path / "lost.jsonl"
    lost.write_text(bad.read_text())
    out = tmp_path / "lost"
    proc = _audit(["--run", tiny_run, "--out", out, "--data.kind=manifest", f"--data.manifest={lost}"])
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not out.exists()
    assert proc.stderr.strip().splitlines()[-1] == "audit: error: no item of the data could be scored (see the " \
        "bad-media warnings above)"
    shards = tmp_path / "shards"
    proc = _audit(["--run", tiny_run, "--out", shards, "--top", 3, "--data.kind=shards",
                   f"--data.shards={tmp_path / 'exp' / 'shards' / '*.tar'}"])
    print(proc.stdout, proc.stderr)
    rows = [json.loads(x) for x in (shards / "audit.jsonl").read_text().splitlines()]
    assert len(rows) == 22 and "noisy_text" not in rows[0] and rows[0]["loss_text"] is not None
    page, images = _page_images(shards)
    assert page.count("<tr class='suspect'>") == 2 * 3 and all((shards / s).is_file() for s in images)


@pytest.mark.slow
def test_a_sharded_fsdp_checkpoint_loads_into_the_plain_model(tmp_path):
    from harmony.model import VATT
    from harmony.trainer.loop import main

    run = tmp_path / "fsdp"
    main([*SMALL, "--train.steps=2", "--log.plots=false", "--log.progress=false", "--train.parallel=fsdp",
          f"--log.run_dir={run}"])
    cfg = load_config(run, [])
    found = verified_checkpoint(run)
    assert (found / "dcp").is_dir()
    torch.manual_seed(cfg.train.seed)                      # the run's initial weights, before the load
    model = load_model(cfg, found)
    torch.manual_seed(cfg.train.seed)
    fresh = VATT(cfg.model, cfg.data)
    moved = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert moved > 1e-4                                    # the trained weights, not the initial ones
    assert _audit(["--run", run, "--out", tmp_path / "out", "--top", 2]).returncode == 0


# ------------------------------------------------------------------------------------------------- GRID

@pytest.mark.slow
def test_grid_page_shows_real_frames_and_audio(tmp_path):
    """24 GRID clips with 30% of the transcripts swapped: a 2-step run, then the audit's page."""
    manifest = grid_dir() / "manifest.jsonl"
    if not manifest.is_file():
        pytest.skip(f"GRID clips not found at {grid_dir()} (set HARMONY_GRID_DIR)")
    lines = manifest.read_text().splitlines()[:24]
    small = tmp_path / "grid.jsonl"
    small.write_text("\n".join(json.dumps({**json.loads(x), "path": str(grid_dir() / json.loads(x)["path"]),
                                           "align": str(grid_dir() / json.loads(x)["align"])}) for x in lines))
    from harmony.trainer.loop import main

    run = tmp_path / "run"
    main(["--config", str(REPO / "configs" / "grid.yaml"), f"--data.manifest={small}", "--data.noise=0.3",
          "--train.steps=2", "--train.batch_size=8", "--train.device=cpu", "--log.plots=false",
          "--log.progress=false", "--eval.size=4", "--eval.batch_size=4", f"--log.run_dir={run}"])
    out = tmp_path / "audit"
    proc = _audit(["--run", run, "--out", out, "--top", 3])
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0
    rows = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    assert all(Path(r["path"]).is_file() and str(grid_dir()) in r["path"] and r["caption"] for r in rows)
    assert sum(r["noisy_text"] for r in rows) == round(0.3 * len(rows))
    page, images = _page_images(out)
    assert page.count("<tr class='suspect'>") == 2 * 3 and all((out / s).is_file() for s in images)
    import matplotlib.image as mpimg

    frames = mpimg.imread(out / next(s for s in images if s.endswith("_frames.png")))
    assert frames.std() > 0.05                             # a real picture, not a flat frame
