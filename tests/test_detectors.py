"""The cross-modal neighbourhood agreement and the side-by-side detector report: against brute force in float64 and
on planted cases where the answer is known."""
import itertools
import math

import pytest
import torch

from harmony.method.agreement import AgreementBank, neighbour_agreement
from harmony.method.detectors import detector_report, pair_detectors, split_aucs


def brute_agreement(qk, qv, bk, bv, allowed, k, kernel=0.0):
    """Loop form: per query, sort the allowed rows by key cosine, average the kernel of the value cosines of the
    first k (exp((c − 1)/kernel), or c itself at kernel 0)."""
    kap = (lambda c: math.exp((c - 1) / kernel)) if kernel else (lambda c: c)
    out = []
    for i in range(qk.shape[0]):
        cand = [(float(qk[i].double() @ bk[j].double()), j) for j in range(bk.shape[0]) if allowed[i, j]]
        cand.sort(key=lambda t: -t[0])
        top = [j for _, j in cand[:k]]
        out.append(sum(kap(float(qv[i].double() @ bv[j].double())) for j in top) / len(top) if top else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("kernel", [0.0, 0.1])
@pytest.mark.parametrize("B,N,d,k", [(1, 1, 3, 1), (5, 13, 7, 3), (9, 31, 4, 10), (3, 4, 5, 10)])
def test_neighbour_agreement_matches_brute_force(B, N, d, k, kernel):
    qk, qv, bk, bv = unit(B, d, seed=1), unit(B, d, seed=2), unit(N, d, seed=3), unit(N, d, seed=4)
    allowed = torch.rand(B, N, generator=torch.Generator().manual_seed(5)) > 0.3
    allowed[0] = False  # a query with no candidate at all
    got = neighbour_agreement(qk, qv, bk, bv, allowed, k, kernel).double()
    want = brute_agreement(qk, qv, bk, bv, allowed, k, kernel)
    print("max err", float((got - want).abs().nan_to_num().max()))
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(got[0]))
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=0, atol=1e-6)


def test_bank_never_uses_the_item_itself_and_keeps_the_newest():
    bank = AgreementBank(size=6, k=2, kernel=0.0)
    d = 4
    z = unit(4, d, seed=7)
    m = torch.ones(4, dtype=torch.bool)
    # two copies of the same items: each item's nearest video is its own copy, which must be excluded
    ids = torch.tensor([0, 1, 2, 3])
    bank.score(ids, (z, z), (z, z), m, m)
    a_vt, a_va = bank.score(ids, (z, z), (z, z), m, m)
    assert bank.ids.tolist() == [2, 3, 0, 1, 2, 3]  # FIFO of size 6
    allowed = bank.ids[None, :] != ids[:, None]
    want = brute_agreement(z, z, bank.emb["vt_v"], bank.emb["vt_t"], allowed, 2)
    torch.testing.assert_close(a_vt.double(), want, rtol=0, atol=1e-6)
    assert (a_vt < 0.999).all()  # never its own copy (which would agree perfectly)
    # a masked pair gives NaN and is never a neighbour's candidate
    m2 = torch.tensor([True, False, True, True])
    a_vt, _ = bank.score(torch.tensor([4, 5, 6, 7]), (z, z), (z, z), m2, m)
    assert bool(torch.isnan(a_vt[1])) and not bool(torch.isnan(a_vt[0]))
    # several kernels at once: the same neighbours, each kernel's agreement in turn
    both = bank.score(torch.tensor([8, 9, 10, 11]), (z, z), (z, z), m, m, kernels=(0.0, 0.1))
    allowed = bank.ids[None, :] != torch.tensor([8, 9, 10, 11])[:, None]
    for got, tau in ((both[0], 0.0), (both[2], 0.1)):
        want = brute_agreement(z, z, bank.emb["vt_v"], bank.emb["vt_t"], allowed, 2, tau)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    state = bank.state_dict()
    other = AgreementBank(size=6, k=2, kernel=0.0)
    other.load_state_dict(state)
    assert torch.equal(other.ids, bank.ids) and torch.equal(other.emb["vt_t"], bank.emb["vt_t"])


def test_agreement_sees_a_systematic_minority_caption():
    """Planted: 16 visual concepts; each concept's clips say its own word 60% of the time and one fixed other word
    40% (a narrator's bias). Neighbours by video are the concept's clips, so the biased captions agree less; the
    margin is the bias's (0.6 against 0.4 of the neighbours), so the AUC stays well below 1 (0.83 with the plain
    mean cosine, 0.72 with the kernel τ = 0.1 here)."""
    from harmony.trainer.evaluate import roc_auc
    g = torch.Generator().manual_seed(0)
    n, d = 2048, 16
    concept = torch.arange(n) % 16
    biased = torch.rand(n, generator=g) < 0.4
    word = torch.where(biased, (concept + 1) % 16, concept)
    v = torch.nn.functional.normalize(torch.eye(d)[concept] + 0.15 * torch.randn(n, d, generator=g), dim=1)
    t = torch.nn.functional.normalize(torch.eye(d)[word] + 0.15 * torch.randn(n, d, generator=g), dim=1)
    m = torch.ones(n, dtype=torch.bool)
    aucs = {}
    for k, tau in ((1, 0.0), (32, 0.0), (32, 0.1)):
        agree, _ = AgreementBank(size=n, k=k, kernel=tau).score(torch.arange(n), (v, t), (v, v), m, m)
        aucs[k, tau] = roc_auc(-agree.double(), biased)
    print("agreement AUC on the planted bias, by (k, kernel)", aucs)
    # the kernel helps where a word's captions sit tightly together (the trained model's caption space), not here,
    # where same-word captions have cos ≈ 0.7 ± noise and exp((c − 1)/0.1) is small and noisy for all of them
    assert aucs[32, 0.0] > 0.78 and aucs[32, 0.0] > aucs[1, 0.0] + 0.1 and aucs[32, 0.1] > 0.68


def brute_auc(score, pos, neg):
    """P(−score of a positive > −score of a negative) + ½ P(tie), by all pairs."""
    p = [float(score[i]) for i in range(len(score)) if pos[i] and math.isfinite(float(score[i]))]
    q = [float(score[i]) for i in range(len(score)) if neg[i] and math.isfinite(float(score[i]))]
    if not p or not q:
        return math.nan
    wins = sum((a < b) + 0.5 * (a == b) for a, b in itertools.product(p, q))
    return wins / (len(p) * len(q))


def window(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    tk = torch.randint(0, 4, (n,), generator=g) * (torch.rand(n, generator=g) < 0.5)
    ak = (torch.rand(n, generator=g) < 0.3).long()
    return {"noisy_text": tk > 0, "noisy_audio": ak > 0, "text_kind": tk, "audio_kind": ak,
            "hard": torch.rand(n, generator=g) < 0.3, "concept": torch.randint(0, 8, (n,), generator=g)}


def test_split_aucs_match_the_pairwise_definition():
    cat = window()
    score = torch.randn(120, generator=torch.Generator().manual_seed(1)).round(decimals=1)  # ties included
    score[3] = float("nan")
    clean = ~(cat["noisy_text"] | cat["noisy_audio"])
    got = split_aucs(score, cat, "text", "x", tail_from=4)
    want = {"x": brute_auc(score, cat["noisy_text"], clean),
            "x_hard": brute_auc(score, cat["noisy_text"], clean & cat["hard"]),
            "x_easy": brute_auc(score, cat["noisy_text"], clean & ~cat["hard"]),
            "x_tail": brute_auc(score, cat["noisy_text"] & (cat["concept"] >= 4), clean & (cat["concept"] >= 4)),
            "x_head": brute_auc(score, cat["noisy_text"] & (cat["concept"] < 4), clean & (cat["concept"] < 4))}
    for name, code in (("swap", 1), ("bias", 2), ("unrelated", 3)):
        want[f"x_{name}"] = brute_auc(score, cat["text_kind"] == code, clean)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_residual_detector_tells_hard_clean_from_wrong_captions():
    """Planted losses: a hard clean clip raises both losses, a wrong caption raises only ℓ^vt. The own caption loss
    confuses the two; the two-dimensional residual does not."""
    g = torch.Generator().manual_seed(3)
    n = 600
    hard = torch.rand(n, generator=g) < 0.3
    noisy = (torch.rand(n, generator=g) < 0.3) & ~hard
    base = torch.randn(n, generator=g) * 0.2
    l_va = 1.0 + base + 1.5 * hard + 0.1 * torch.randn(n, generator=g)
    l_vt = 1.0 + base + 1.5 * hard + 1.5 * noisy + 0.1 * torch.randn(n, generator=g)
    cat = {"noisy_text": noisy, "noisy_audio": torch.zeros(n, dtype=torch.bool), "hard": hard,
           "loss_vt": l_vt, "loss_va": l_va}
    rep = detector_report(cat)
    print({k: round(v, 3) for k, v in rep.items() if k.endswith("_text_hard")})
    assert rep["noise_auc_resid_text_hard"] > 0.95 > rep["noise_auc_loss_text_hard"] + 0.2
    dets = pair_detectors(cat)["text"]
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    rho = float((z(l_vt.double()) * z(l_va.double())).mean())
    torch.testing.assert_close(dets["resid"], -(z(l_vt.double()) - rho * z(l_va.double())), rtol=1e-4, atol=1e-4)
    # the mixture on the caption loss flags the hard clean clips far more often than the easy ones
    assert rep["fpr_lossgmm_text_hard"] > rep["fpr_lossgmm_text_easy"] + 0.3
