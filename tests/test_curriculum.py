"""Curriculum schedules, update coefficients, the score memory and the prioritized sampler (docs/METHOD.md
"Curriculum"): hand-computed cases, plus an independent pure-Python reference on fresh random inputs with ties."""
import io
import math
import random
import zlib

import pytest
import torch

from helpers import method_cfg
from harmony.method.curriculum import (PrioritizedSampler, ScoreMemory, curriculum_weights, is_active, progress,
                                rule_weights, update_coefficients)

COS = torch.tensor([0.3, -0.1, 0.05, -0.6, 0.0, 0.2, -0.3, 0.1])
ALL = torch.ones(8, dtype=torch.bool)
T = 100


def rule_kw(rule):
    """A rule, or "memory": the ratio rule on the per-item score memory (score_memory)."""
    return dict(curriculum="ratio", score_memory=True) if rule == "memory" else dict(curriculum=rule)


def cfg_for(rule, **kw):
    """start 0 and ramp 1: step s of T = 100 is progress s/100."""
    base = dict(**rule_kw(rule), curriculum_start=0.0, ramp=1.0, min_keep=0.0)
    base.update(kw)
    return method_cfg(**base)


def roundtrip(obj):
    """torch.save / torch.load(weights_only=True) of a state dict."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def ref_weights(scores, valid, p, rule, cfg):
    """Independent reference in plain Python floats: weights of one rule, guard included."""
    idx = [i for i in range(len(scores)) if valid[i]]
    n = len(idx)
    k_min = math.ceil(round(cfg.min_keep * n, 6))
    best = sorted(idx, key=lambda i: (-scores[i], i))  # highest first, ties to the lower index
    w = [1.0] * len(scores)
    if rule == "ratio":
        k = max(math.ceil(round((cfg.rho0 + (1 - cfg.rho0) * p) * n, 6)), k_min)
        for r, i in enumerate(best):
            w[i] = 1.0 if r < k else 0.0
        return w
    kap = cfg.kappa0 + (cfg.kappa1 - cfg.kappa0) * p
    if k_min > 0:
        kap = min(kap, scores[best[k_min - 1]])
    if rule == "threshold":
        for i in idx:
            w[i] = 1.0 if scores[i] >= kap else 0.0
        return w
    sig = {i: 1.0 / (1.0 + math.exp(-(scores[i] - kap) / cfg.temperature)) for i in idx}
    mean = sum(sig.values()) / n if n else 1.0
    for i in idx:
        w[i] = sig[i] / mean
    return w


def test_progress_and_start():
    cfg = method_cfg(curriculum_start=0.1, ramp=0.5)
    T2 = 200  # curriculum from step 20, full at step 20 + 100
    expected = {0: 0.0, 19: 0.0, 20: 0.0, 70: 0.5, 95: 0.75, 120: 1.0, 199: 1.0}
    for step, p in expected.items():
        assert progress(step, T2, cfg) == pytest.approx(p)
    assert not is_active(19, T2, cfg) and is_active(20, T2, cfg)
    assert progress(30, 100, method_cfg(curriculum_start=0.0, ramp=0.6)) == pytest.approx(0.5)
    # start + ramp > 1: the curriculum never reaches p = 1
    assert progress(99, 100, method_cfg(curriculum_start=0.6, ramp=0.5)) == pytest.approx(0.78)
    with pytest.raises(ValueError):
        progress(0, 0, cfg)


@pytest.mark.parametrize("rule", ["threshold", "ratio", "soft", "memory"])
def test_no_curriculum_before_start(rule):
    cfg = method_cfg(**rule_kw(rule), curriculum_start=0.3, ramp=0.5, memory_use="weights")
    mem = ScoreMemory(0.9)
    ids = torch.arange(8)
    for step in (0, 29):
        w = curriculum_weights(COS, ALL, step, T, cfg, ids=ids, memory=mem)
        assert torch.equal(w, torch.ones(8))
    w = curriculum_weights(COS, ALL, 30, T, cfg, ids=ids, memory=mem)  # switched on, strictest
    assert float(w.min()) < 0.5


def test_threshold_hand():
    cfg = cfg_for("threshold")  # κ: 0 -> -1
    w0 = curriculum_weights(COS, ALL, 0, T, cfg)  # κ = 0
    w5 = curriculum_weights(COS, ALL, 50, T, cfg)  # κ = -0.5
    w1 = curriculum_weights(COS, ALL, 100, T, cfg)  # κ = -1
    assert w0.tolist() == [1, 0, 1, 0, 1, 1, 0, 1]
    assert w5.tolist() == [1, 1, 1, 0, 1, 1, 1, 1]
    assert w1.tolist() == [1] * 8
    assert w0.dtype == torch.float32


def test_ratio_hand():
    cfg = cfg_for("ratio")  # ρ: 0.5 -> 1, n = 8
    assert curriculum_weights(COS, ALL, 0, T, cfg).tolist() == [1, 0, 1, 0, 0, 1, 0, 1]  # top 4
    assert curriculum_weights(COS, ALL, 50, T, cfg).tolist() == [1, 1, 1, 0, 1, 1, 0, 1]  # top 6
    assert curriculum_weights(COS, ALL, 100, T, cfg).tolist() == [1] * 8
    # ρ = 0.7 of 10 valid keeps 7 (not 8 from 7.000000000000001)
    c10 = torch.linspace(-0.9, 0.9, 10)
    assert int(curriculum_weights(c10, torch.ones(10, dtype=torch.bool), 0, T, cfg_for("ratio", rho0=0.7)).sum()) == 7


def test_ratio_counts_valid_samples_only():
    valid = torch.tensor([True, False, True, True, False, True, True, True])  # 6 valid
    w = curriculum_weights(COS, valid, 0, T, cfg_for("ratio"))  # top 3 of the valid ones
    assert w.tolist() == [1, 1, 0, 0, 1, 1, 0, 1]  # 0.3, 0.2, 0.1 kept; invalid 1


def test_soft_hand_and_mean_one():
    cfg = cfg_for("soft", temperature=0.2)
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    for step, kap in ((0, 0.0), (50, -0.5), (100, -1.0)):
        w = curriculum_weights(COS, valid, step, T, cfg)
        sig = [1 / (1 + math.exp(-(c - kap) / 0.2)) for c in COS.tolist()]
        mean = sum(s for s, v in zip(sig, valid.tolist()) if v) / 7
        hand = [s / mean if v else 1.0 for s, v in zip(sig, valid.tolist())]
        err = max(abs(a - b) for a, b in zip(w.tolist(), hand))
        print(f"soft p={step / 100}: max error vs hand {err:.2e}, mean over valid {w[valid].mean().item():.7f}")
        assert err <= 1e-6
        assert w[valid].mean().item() == pytest.approx(1.0, abs=1e-6)
        assert w[3] == 1.0


def test_soft_tiny_temperature_no_nan():
    """An underflowing sigmoid must not give 0/0: the normalisation runs in log space."""
    cfg = cfg_for("soft", temperature=1e-9, kappa0=0.9)
    w = curriculum_weights(COS, ALL, 0, T, cfg)
    assert bool(torch.isfinite(w).all())
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert w[0].item() == pytest.approx(8.0)  # all the weight on the highest cosine


def test_guard():
    """min_keep 0.5 of 8 valid: at least 4 kept; the hard rules keep the highest cosines."""
    thr = cfg_for("threshold", kappa0=0.25, min_keep=0.5)  # alone, κ keeps only 0.3
    assert curriculum_weights(COS, ALL, 0, T, thr).tolist() == [1, 0, 1, 0, 0, 1, 0, 1]
    ratio = cfg_for("ratio", rho0=0.1, min_keep=0.5)  # alone, ρ keeps ceil(0.8) = 1
    assert curriculum_weights(COS, ALL, 0, T, ratio).tolist() == [1, 0, 1, 0, 0, 1, 0, 1]
    # soft: κ is lowered to the 4th highest cosine (0.05), so 4 samples reach sigmoid ≥ 1/2
    soft = cfg_for("soft", kappa0=0.9, min_keep=0.5, temperature=0.1)
    w = curriculum_weights(COS, ALL, 0, T, soft)
    sig = [1 / (1 + math.exp(-(c - 0.05) / 0.1)) for c in COS.tolist()]
    hand = [s * 8 / sum(sig) for s in sig]
    assert max(abs(a - b) for a, b in zip(w.tolist(), hand)) <= 1e-6
    # guard with one valid sample: ceil(0.25) = 1 is kept
    one = torch.tensor([False, False, False, True, False, False, False, False])
    assert curriculum_weights(COS, one, 0, T, cfg_for("threshold", min_keep=0.25)).tolist() == [1] * 8


def test_ties_are_deterministic():
    c = torch.tensor([0.5, 0.1, 0.1, 0.1, -0.2, 0.1])
    v = torch.ones(6, dtype=torch.bool)
    # ratio ρ = 0.5 keeps 3: 0.5 then the two 0.1 at the lowest positions
    for _ in range(3):
        assert curriculum_weights(c, v, 0, T, cfg_for("ratio")).tolist() == [1, 1, 1, 0, 0, 0]
    # a threshold keeps every sample tied at it
    assert curriculum_weights(c, v, 0, T, cfg_for("threshold", kappa0=0.1)).tolist() == [1, 1, 1, 1, 0, 1]
    # the guard at a tie: threshold keeps all tied, ratio exactly k
    assert curriculum_weights(c, v, 0, T, cfg_for("threshold", kappa0=0.9, min_keep=0.5)).tolist() == [1, 1, 1, 1, 0, 1]
    assert curriculum_weights(c, v, 0, T, cfg_for("ratio", rho0=0.0, min_keep=0.5)).tolist() == [1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("rule", ["threshold", "ratio", "soft"])
def test_rules_against_python_reference(rule):
    rng = random.Random(zlib.crc32(rule.encode()))
    worst = 0.0
    for trial in range(25):
        n = rng.choice([0, 1, 2, 7, 31, 64])
        scores = [round(rng.uniform(-1, 1), 1) for _ in range(n)]  # one decimal: many ties
        valid = [rng.random() > 0.2 for _ in range(n)]
        p = rng.choice([0.0, rng.random(), 1.0])
        cfg = method_cfg(kappa0=rng.uniform(-0.5, 0.8), kappa1=rng.uniform(-1, -0.5), rho0=rng.random(),
                            temperature=rng.choice([0.05, 0.3]), min_keep=rng.choice([0.0, 0.25, 0.6]))
        w = rule_weights(torch.tensor(scores, dtype=torch.float32), torch.tensor(valid, dtype=torch.bool), p, rule, cfg)
        ref = ref_weights([float(torch.tensor(s, dtype=torch.float32)) for s in scores], valid, p, rule, cfg)
        err = max([abs(a - b) for a, b in zip(w.tolist(), ref)], default=0.0)
        worst = max(worst, err)
        assert w.shape == (n,) and err <= 1e-5, (trial, n, p, err)
        if rule != "soft":  # the guard, counted on the output
            kept = sum(1 for i in range(n) if valid[i] and w[i] == 1)
            assert kept >= math.ceil(round(cfg.min_keep * sum(valid), 6))
    print(f"{rule}: 25 random batches with ties match the Python reference (max error {worst:.1e})")


def test_update_coefficients():
    alpha = torch.tensor([1.0, 0.5, 1.2, 1.0])
    beta = torch.tensor([1.0, 0.8, 0.3, 2.0])
    w = torch.tensor([1.0, 0.0, 1.0, 1.0])
    ca, cv = update_coefficients(alpha, beta, w, renormalize=True)  # norm = 3/4
    assert torch.allclose(ca, torch.tensor([4 / 3, 0.0, 1.6, 4 / 3]), rtol=1e-7, atol=0)
    assert torch.allclose(cv, torch.tensor([4 / 3, 0.0, 0.4, 8 / 3]), rtol=1e-7, atol=0)
    ca, cv = update_coefficients(alpha, beta, w, renormalize=False)
    assert torch.equal(ca, w * alpha) and torch.equal(cv, w * beta)
    # plain training: w ≡ 1, α = 1, β = λ gives exactly L_va + λ·L_vt
    ones = torch.ones(5)
    ca, cv = update_coefficients(ones, 0.7 * ones, ones, renormalize=True)
    assert torch.equal(ca, ones) and torch.equal(cv, 0.7 * ones) and ca.dtype == torch.float32
    # Σw = 0 and the empty batch: finite zeros
    ca, cv = update_coefficients(alpha, beta, torch.zeros(4), renormalize=True)
    assert torch.equal(ca, torch.zeros(4)) and torch.equal(cv, torch.zeros(4))
    ca, cv = update_coefficients(torch.zeros(0), torch.zeros(0), torch.zeros(0), renormalize=True)
    assert ca.shape == cv.shape == (0,)


def test_update_coefficients_random_against_float64():
    g = torch.Generator().manual_seed(5)
    B = 97
    alpha, beta = torch.randn(B, generator=g) + 1, torch.randn(B, generator=g) + 1
    w = torch.rand(B, generator=g) * (torch.rand(B, generator=g) > 0.3)
    ca, cv = update_coefficients(alpha, beta, w, renormalize=True)
    norm = w.double().sum() / B
    ref_a, ref_v = w.double() * alpha.double() / norm, w.double() * beta.double() / norm
    err = max(((ca.double() - ref_a).abs() / ref_a.abs().clamp(min=1e-30)).max().item(),
              ((cv.double() - ref_v).abs() / ref_v.abs().clamp(min=1e-30)).max().item())
    print(f"update_coefficients max relative error vs float64 {err:.2e}")
    assert err <= 2 ** -24  # one fp32 rounding of the float64 result


def test_memory_ema_hand():
    mem = ScoreMemory(decay=0.8)
    on = torch.tensor([True, True, True])
    mem.update(torch.tensor([4, 1, 7]), torch.tensor([0.5, -0.25, 0.75]), on)  # first: score = c
    mem.update(torch.tensor([1, 4, 2]), torch.tensor([0.25, 0.0, 1.0]), torch.tensor([True, True, False]))
    mem.update(torch.tensor([4, 4, 9]), torch.tensor([1.0, -1.0, float("nan")]), on)  # repeated id, NaN
    h4 = 0.8 * (0.8 * (0.8 * 0.5 + 0.2 * 0.0) + 0.2 * 1.0) + 0.2 * -1.0  # folded in batch order
    h1 = 0.8 * -0.25 + 0.2 * 0.25
    score, seen = mem.scores(torch.tensor([4, 1, 7, 2, 9, 0, 123]))
    print(f"memory scores {score.tolist()}, hand item 4 {h4}, item 1 {h1}")
    assert seen.tolist() == [True, True, True, False, False, False, False]
    assert score[:3].tolist() == pytest.approx([h4, h1, 0.75], abs=1e-7)
    assert score[3:].tolist() == [0, 0, 0, 0]
    assert mem.count[[4, 1, 7, 2]].tolist() == [4, 2, 1, 0] and mem.num_items == 8  # NaN never stored
    with pytest.raises(ValueError):
        mem.update(torch.tensor([-1]), torch.tensor([0.1]), torch.tensor([True]))


def test_memory_round_trip():
    mem = ScoreMemory(0.9)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        ids = torch.randint(0, 300, (32,), generator=g)
        mem.update(ids, torch.rand(32, generator=g) * 2 - 1, torch.rand(32, generator=g) > 0.2)
    state = roundtrip(mem.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    back = ScoreMemory(0.9)
    back.load_state_dict(state)
    ids = torch.arange(320)
    assert all(torch.equal(a, b) for a, b in zip(mem.scores(ids), back.scores(ids)))
    mem.update(torch.tensor([5, 310]), torch.tensor([0.3, -0.3]), torch.tensor([True, True]))
    back.update(torch.tensor([5, 310]), torch.tensor([0.3, -0.3]), torch.tensor([True, True]))
    assert all(torch.equal(a, b) for a, b in zip(mem.scores(ids), back.scores(ids)))


@pytest.mark.parametrize("schedule", ["threshold", "ratio", "soft"])
def test_memory_curriculum_weights(schedule):
    """Seen items are weighted by their memory score, unseen ones by their current cosine."""
    cfg = cfg_for(schedule, score_memory=True, memory_use="weights", min_keep=0.25, temperature=0.2)
    mem = ScoreMemory(0.5)
    mem.update(torch.tensor([10, 11, 12]), torch.tensor([-0.5, 0.5, 0.25]), torch.ones(3, dtype=torch.bool))
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    cos = torch.tensor([0.5, -0.5, 0.125, 0.375, -0.125, 0.0])
    valid = torch.tensor([True, True, True, True, True, False])
    scores = [-0.5, 0.5, 0.25, 0.375, -0.125, 0.0]
    for step in (0, 40, 100):
        w = curriculum_weights(cos, valid, step, T, cfg, ids=ids, memory=mem)
        ref = ref_weights(scores, valid.tolist(), step / T, schedule, cfg)
        assert max(abs(a - b) for a, b in zip(w.tolist(), ref)) <= 1e-6, (step, w, ref)
    assert curriculum_weights(cos, valid, 0, T, cfg, ids=ids, memory=mem)[0] < 0.5  # its memory, not its cos
    sampler_cfg = cfg_for("ratio", score_memory=True, memory_use="sampler")
    assert torch.equal(curriculum_weights(cos, valid, 0, T, sampler_cfg, ids=ids, memory=mem), torch.ones(6))
    with pytest.raises(ValueError, match="ScoreMemory"):
        curriculum_weights(cos, valid, 0, T, cfg)


def seeded_memory(n=40, seed=0):
    mem = ScoreMemory(0.9)
    g = torch.Generator().manual_seed(seed)
    seen = torch.randperm(n, generator=g)[: 3 * n // 4]
    mem.update(seen, torch.rand(seen.numel(), generator=g) * 2 - 1, torch.ones(seen.numel(), dtype=torch.bool))
    return mem


SAMPLER_CFG = dict(score_memory=True, memory_use="sampler", curriculum_start=0.0, ramp=1.0, min_keep=0.25)


@pytest.mark.parametrize("replacement", [True, False])
def test_sampler_deterministic_and_rank_disjoint(replacement):
    mem, cfg = seeded_memory(), method_cfg(curriculum="soft", **SAMPLER_CFG)

    def draw(rank, world, epoch, seed=7):
        s = PrioritizedSampler(mem, 40, cfg, T, num_samples=36, replacement=replacement, seed=seed,
                               rank=rank, world_size=world)
        s.set_epoch(epoch, step=10)
        return list(s)

    single = draw(0, 1, 0)
    assert single == draw(0, 1, 0) and len(single) == 36
    assert single != draw(0, 1, 1) and single != draw(0, 1, 0, seed=8)
    shares = [draw(r, 3, 0) for r in range(3)]
    assert all(len(s) == 12 for s in shares)
    interleaved = [shares[j % 3][j // 3] for j in range(36)]
    assert interleaved == single  # one global draw, split by position
    if not replacement:
        assert len(set(single)) == 36  # each item at most once, so the ranks' items are disjoint
        assert not (set(shares[0]) & set(shares[1])) and not (set(shares[1]) & set(shares[2]))


def test_sampler_probabilities():
    """With replacement the frequencies follow the priorities: zero-priority items never, unseen at the mean."""
    mem = ScoreMemory(0.9)
    mem.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0.9, 0.5, -0.2, -0.8]), torch.ones(4, dtype=torch.bool))
    cfg = method_cfg(curriculum="ratio", **SAMPLER_CFG)  # p = 0: ρ = 0.5 keeps items 0 and 1
    s = PrioritizedSampler(mem, 6, cfg, T, num_samples=60000, seed=1)
    s.set_epoch(0, 0)
    prio = s.priorities()
    assert prio.tolist() == [1, 1, 0, 0, 0.5, 0.5]  # unseen items 4, 5: mean of the seen priorities
    counts = torch.bincount(torch.tensor(list(s)), minlength=6).double()
    expect = prio / prio.sum() * 60000
    z = ((counts - expect).abs() / expect.clamp(min=1).sqrt()).max().item()
    print(f"sampler counts {counts.tolist()}, expected {expect.tolist()}, max z {z:.2f}")
    assert counts[2] == 0 and counts[3] == 0 and z < 5
    late_cfg = method_cfg(curriculum="ratio", **{**SAMPLER_CFG, "curriculum_start": 0.5})
    late = PrioritizedSampler(mem, 6, late_cfg, T, seed=1)
    late.set_epoch(0, step=10)  # before curriculum_start: uniform
    assert late.priorities().tolist() == [1] * 6
    empty = PrioritizedSampler(ScoreMemory(0.9), 6, cfg, T)
    assert empty.priorities().tolist() == [1] * 6  # nothing seen yet: uniform


@pytest.mark.parametrize("replacement", [True, False])
def test_sampler_resume(replacement):
    cfg = method_cfg(curriculum="threshold", **SAMPLER_CFG)
    mem = seeded_memory(seed=4)
    s = PrioritizedSampler(mem, 40, cfg, T, replacement=replacement, seed=3, rank=1, world_size=2)
    s.set_epoch(2, step=30)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    state = roundtrip(s.state_dict())
    rest = list(it)
    # the memory keeps changing during the epoch; the resumed epoch must not be redrawn from it
    mem.update(torch.arange(40), torch.full((40,), 0.99), torch.ones(40, dtype=torch.bool))
    back = PrioritizedSampler(mem, 40, cfg, T, replacement=replacement, seed=0, rank=1, world_size=2)
    back.load_state_dict(state)
    back.set_epoch(2, 999)  # the restored draw is kept, its step from the checkpoint
    assert head + list(back) == head + rest and len(head + rest) == 20
    assert back.step == 30
    back.set_epoch(3, 40)  # the next epoch is drawn afresh from the (changed) memory
    assert len(list(back)) == 20 and back.step == 40
    # `consumed`: a DataLoader prefetched further than the trainer used
    s2 = PrioritizedSampler(seeded_memory(seed=4), 40, cfg, T, replacement=replacement, seed=3, rank=1, world_size=2)
    s2.set_epoch(2, step=30)
    full = list(s2)
    back2 = PrioritizedSampler(mem, 40, cfg, T, replacement=replacement, rank=1, world_size=2)
    back2.load_state_dict(roundtrip(s2.state_dict(consumed=5)))
    assert list(back2) == full[5:]
    with pytest.raises(ValueError, match="rank"):
        PrioritizedSampler(mem, 40, cfg, T, rank=0, world_size=4).load_state_dict(state)


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["threshold", "ratio", "soft", "memory"])
def test_cuda_matches_cpu(rule):
    g = torch.Generator().manual_seed(2)
    cos = torch.rand(50, generator=g) * 2 - 1
    valid = torch.rand(50, generator=g) > 0.2
    ids = torch.randperm(100, generator=g)[:50]
    mem = seeded_memory(n=100)
    cfg = cfg_for(rule, min_keep=0.25, memory_use="weights")
    for step in (0, 37, 100):
        a = curriculum_weights(cos, valid, step, T, cfg, ids=ids, memory=mem)
        b = curriculum_weights(cos.cuda(), valid.cuda(), step, T, cfg, ids=ids, memory=mem)
        assert b.is_cuda and torch.allclose(a, b.cpu(), rtol=1e-6, atol=0)
    ca, cv = update_coefficients(cos.cuda(), cos.cuda(), b, True)
    assert ca.is_cuda and cv.is_cuda


def test_loss_mixture_recovers_two_components_and_orders_the_posterior():
    """EM on 4000 draws of 0.3·N(1, 0.2²) + 0.7·N(4, 0.5²): weights, means and variances within a few standard
    errors of the truth, the posterior of the low component falls with the loss, and the state round-trips."""
    from harmony.method.curriculum import LossMixture

    g = torch.Generator().manual_seed(0)
    n = 4000
    low = torch.rand(n, generator=g) < 0.3
    x = torch.where(low, 1 + 0.2 * torch.randn(n, generator=g), 4 + 0.5 * torch.randn(n, generator=g))
    gm = LossMixture(window=n, iters=50)
    gm.add(x, torch.ones(n, dtype=torch.bool))
    w, mu, var = gm.fit()
    i = int(torch.argmin(mu))
    print("weights", w.tolist(), "means", mu.tolist(), "sd", var.sqrt().tolist())
    assert abs(float(w[i]) - 0.3) < 0.03 and abs(float(mu[i]) - 1) < 0.03 and abs(float(mu[1 - i]) - 4) < 0.05
    assert abs(float(var[i].sqrt()) - 0.2) < 0.02 and abs(float(var[1 - i].sqrt()) - 0.5) < 0.03
    post = gm.clean_posterior(torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 5.0]))
    assert post[0] > 0.99 and post[-1] < 0.01 and (post[:-1] >= post[1:]).all()
    again = LossMixture(window=n)
    again.load_state_dict(gm.state_dict())
    assert torch.equal(again.clean_posterior(x[:10]), gm.clean_posterior(x[:10]))
    assert torch.equal(LossMixture().clean_posterior(x[:3]), torch.full((3,), 0.5, dtype=torch.float64))


def test_loss_mixture_revives_a_collapsed_warm_start_and_drops_the_planted_noise():
    """A warm start that has collapsed (one component with ~0 weight on a spike of losses that left the window, as a
    run seen in training did) is refitted cold, and the refit's clean posterior drops the planted noisy losses."""
    from harmony.method.curriculum import LossMixture
    from harmony.trainer.evaluate import roc_auc
    g = torch.Generator().manual_seed(0)
    noisy = torch.rand(4096, generator=g) < 0.4
    x = torch.where(noisy, 4.5 + 0.8 * torch.randn(4096, generator=g), 3.2 + 0.4 * torch.randn(4096, generator=g))
    m = LossMixture(window=4096)
    m.add(x, torch.ones_like(noisy))
    m.params = torch.tensor([[1e-12, 1.0], [5.0, 3.6], [1e-4, 0.7]], dtype=torch.float64)  # the collapsed state
    stuck = LossMixture(window=4096, min_weight=0.0)         # without the guard EM keeps the empty component
    stuck.add(x, torch.ones_like(noisy))
    stuck.params = m.params.clone()
    stuck.fit()
    post = m.clean_posterior(x) if m.fit() is not None else None
    auc = roc_auc(-post.double(), noisy)
    print("weights", m.params[0].tolist(), "AUC", auc, "stuck weights", stuck.params[0].tolist())
    assert float(m.params[0].min()) > 0.2 and auc > 0.9
    assert float(stuck.params[0].min()) < 1e-6 and (stuck.clean_posterior(x) > 0.5).all()
    dropped = post < 0.5
    assert float(dropped[noisy].double().mean()) > 0.7 and float(dropped[~noisy].double().mean()) < 0.15
