"""Evaluation metrics against brute-force float64 computations and hand-made similarity matrices."""
import itertools
import math

import pytest
import torch

from harmony.trainer.evaluate import (average_ranks, evaluate, linear_probe, noise_detection_auc, probe_split,
                              retrieval_metrics, retrieval_ranks, roc_auc, video_text_similarity)


def brute_auc(scores, labels):
    """Pairwise count: P(pos > neg) + ½ P(tie) over every (positive, negative) pair."""
    pos = [s for s, l in zip(scores.tolist(), labels.tolist()) if l]
    neg = [s for s, l in zip(scores.tolist(), labels.tolist()) if not l]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("n,levels,seed", [(2, 2, 0), (7, 3, 1), (31, 5, 2), (100, 1000, 3), (257, 4, 4)])
def test_roc_auc_matches_pairwise_count(n, levels, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(levels, (n,), generator=g).double() / levels  # few levels: many ties
    labels = torch.rand(n, generator=g) < 0.4
    labels[0], labels[-1] = True, False
    got, want = roc_auc(scores, labels), brute_auc(scores, labels)
    print(f"n={n} auc={got} brute={want} err={abs(got - want):.2e}")
    assert abs(got - want) < 1e-12


def test_roc_auc_edges():
    assert math.isnan(roc_auc(torch.rand(5), torch.zeros(5, dtype=torch.bool)))
    assert math.isnan(roc_auc(torch.rand(5), torch.ones(5, dtype=torch.bool)))
    assert roc_auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([True, False, False])) == 1.0
    assert roc_auc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, False])) == 0.0
    assert roc_auc(torch.ones(4), torch.tensor([True, False, True, False])) == 0.5


def test_average_ranks_brute_force():
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0, 3.0, -5.0])
    want = [sum(1.0 for y in x if y < v) + (sum(1.0 for y in x if y == v) + 1) / 2 for v in x]
    print(average_ranks(x).tolist(), want)
    assert average_ranks(x).tolist() == want


def test_noise_detection_auc_kinds():
    g = torch.Generator().manual_seed(5)
    n = 60
    cos = torch.rand(n, generator=g) * 2 - 1
    valid = torch.rand(n, generator=g) > 0.1
    nt, na = torch.rand(n, generator=g) < 0.3, torch.rand(n, generator=g) < 0.3
    cos[3] = float("nan")  # no cosine: excluded like an invalid sample
    got = noise_detection_auc(cos, valid, nt, na)
    keep = valid & torch.isfinite(cos)
    clean = ~(nt | na)
    want_any = brute_auc(-cos[keep], (nt | na)[keep])
    want_text = brute_auc(-cos[keep & (nt | clean)], nt[keep & (nt | clean)])
    want_audio = brute_auc(-cos[keep & (na | clean)], na[keep & (na | clean)])
    print(got, want_any, want_text, want_audio)
    assert abs(got["noise_auc"] - want_any) < 1e-12
    assert abs(got["noise_auc_text"] - want_text) < 1e-12
    assert abs(got["noise_auc_audio"] - want_audio) < 1e-12


def test_retrieval_hand_made_matrix():
    # query 0: match best (rank 1); query 1: two others above (rank 3); query 2: tie with one other
    # (ties count against the query: rank 2); query 3: every other item above (rank 4).
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.3],
                        [0.8, 0.5, 0.7, 0.1],
                        [0.4, 0.6, 0.6, 0.0],
                        [0.5, 0.4, 0.3, 0.2]])
    assert retrieval_ranks(sim).tolist() == [1, 3, 2, 4]
    m = retrieval_metrics(sim)
    print(m)
    assert m["r1"] == 0.25 and m["r5"] == 1.0 and m["r10"] == 1.0
    assert m["medr"] == 2.5  # mean of the middle ranks 2 and 3
    labels = torch.tensor([0, 1, 1, 0])
    # top-1 items: 0, 0, 1 (first of the tie at columns 1, 2), 0 -> concepts 0, 0, 1, 0 vs queries 0, 1, 1, 0
    m = retrieval_metrics(sim, labels, labels)
    assert m["concept_acc"] == 0.75 and "concept_acc_tail" not in m
    # split at concept 1: head = queries 0 and 3 (both right), tail = queries 1 (wrong) and 2 (right)
    m = retrieval_metrics(sim, labels, labels, tail_from=1)
    assert m["concept_acc_head"] == 1.0 and m["concept_acc_tail"] == 0.5 and m["concept_acc"] == 0.75


@pytest.mark.parametrize("seed", [0, 1])
def test_concept_accuracy_split_against_loops(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 37, 6
    sim = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, gl = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    m = retrieval_metrics(sim, q, gl, tail_from=4)
    hits = {"head": [], "tail": []}
    for i in range(n):
        best = max(range(n), key=lambda j: (float(sim[i, j]), -j))  # first index on ties
        hits["tail" if int(q[i]) >= 4 else "head"].append(int(gl[best]) == int(q[i]))
    for part in ("head", "tail"):
        assert m[f"concept_acc_{part}"] == pytest.approx(sum(hits[part]) / len(hits[part]), abs=1e-12)


def test_retrieval_constant_similarity_is_chance_not_perfect():
    m = retrieval_metrics(torch.zeros(10, 10))
    assert m["r1"] == 0.0 and m["r10"] == 1.0 and m["medr"] == 10.0


@pytest.mark.parametrize("n,seed", [(1, 0), (13, 1), (100, 2), (1025, 3)])
def test_retrieval_random_against_loops(n, seed):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(n, n, generator=g, dtype=torch.float64).round(decimals=1)  # ties on purpose
    ranks = [1 + sum(1 for j in range(n) if j != i and sim[i, j] >= sim[i, i]) for i in range(n)] if n <= 100 else None
    got = retrieval_ranks(sim, chunk=37)
    if ranks is not None:
        assert got.tolist() == ranks
    else:  # large: vectorised float64 count, independent of the chunking
        want = (sim >= sim.diagonal()[:, None]).sum(1)
        assert torch.equal(got, want)
    m = retrieval_metrics(sim)
    r = got.double()
    assert m["r5"] == (r <= 5).double().mean().item()
    s = sorted(got.tolist())
    assert m["medr"] == (s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)


def test_video_text_similarity_takes_best_candidate():
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(5, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    got = video_text_similarity(v, t)
    vn = v.double() / v.double().norm(dim=-1, keepdim=True)
    tn = t.double() / t.double().norm(dim=-1, keepdim=True)
    want = torch.tensor([[max(float(vn[i] @ tn[j, l]) for l in range(3)) for j in range(5)] for i in range(5)])
    err = (got.double() - want).abs().max().item()
    print("max err", err)
    assert err < 1e-6


def test_linear_probe_matches_independent_ridge():
    g = torch.Generator().manual_seed(0)
    n, d, k = 90, 7, 3
    labels = torch.randint(k, (n,), generator=g)
    centers = torch.randn(k, d, generator=g) * 1.5
    feats = centers[labels] + torch.randn(n, d, generator=g)
    ridge = 2.0
    acc = linear_probe(feats, labels, ridge)
    # independent: least squares on the augmented system [X; sqrt(λ) I] w = [Y; 0] with an unpenalised
    # intercept handled by centring, in float64
    x = feats.double()
    tr, te = probe_split(n)
    assert sorted(torch.cat([tr, te]).tolist()) == list(range(n)) and abs(len(tr) - len(te)) <= 1
    mu, sd = x[tr].mean(0), x[tr].std(0)
    xs = (x - mu) / sd
    y = torch.nn.functional.one_hot(labels, k).double()
    ym = y[tr].mean(0)
    a = torch.cat([xs[tr], math.sqrt(ridge) * torch.eye(d, dtype=torch.float64)])
    b = torch.cat([y[tr] - ym, torch.zeros(d, k, dtype=torch.float64)])
    w = torch.linalg.lstsq(a, b).solution
    want = ((xs[te] @ w + ym).argmax(1) == labels[te]).double().mean().item()
    print("probe acc", acc, "independent", want)
    assert acc == want and acc > 0.6


class _EmbedModel(torch.nn.Module):
    """z = one-hot of the item's id read from the inputs: perfect retrieval in every direction."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, video, audio, text):
        from types import SimpleNamespace

        ids = video[:, 0].long()
        z = torch.nn.functional.one_hot(ids, 32).float() + 0 * self.w
        return SimpleNamespace(z_va_v=z, z_va_a=z, z_vt_v=z, z_vt_t=z[:, None].repeat(1, 2, 1), feat_v=z,
                               feat_a=z, feat_t=z)


class _ConceptModel(_EmbedModel):
    """Pooled features = one-hot of the item's concept (id % 4); embeddings as _EmbedModel."""

    def forward(self, video, audio, text):
        out = super().forward(video, audio, text)
        out.feat_v = out.feat_a = out.feat_t = torch.nn.functional.one_hot(video[:, 0].long() % 4, 32).float()
        return out


def test_linear_probe_with_labels_cycling_with_the_index():
    """Labels that cycle with the item index (like the synthetic eval split) must not defeat the split."""
    n, k = 64, 16
    labels = torch.arange(n) % k
    noise = torch.randn(n, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    feats = torch.nn.functional.one_hot(labels, k).double() * 3 + 0.1 * noise
    acc = linear_probe(feats, labels, 1.0)
    print("probe acc on cyclic labels", acc)
    assert acc > 0.9


def test_evaluate_end_to_end_perfect_model():
    def batches():
        for start in range(0, 20, 6):
            ids = torch.arange(start, min(start + 6, 20))
            yield {"video": ids[:, None].float(), "audio": ids[:, None].float(), "text": ids[:, None, None],
                   "index": ids, "mask_va": torch.ones(len(ids), dtype=torch.bool),
                   "mask_vt": ids != 3, "concept": ids % 4}

    model = _EmbedModel()
    model.train()
    res = evaluate(model, batches(), torch.device("cpu"), max_items=0, probe=True)
    print(res)
    assert model.training  # mode restored
    assert res["eval_items"] == 20
    for d in ("v2t", "t2v", "v2a", "a2v"):
        assert res["retrieval"][d]["r1"] == 1.0 and res["retrieval"][d]["medr"] == 1.0
        assert res["retrieval"][d]["concept_acc"] == 1.0
    # the probe tests on items whose id features it never saw in training: it can only predict one class for
    # all of them, at most the share of the most frequent test concept (4 of 10)
    assert res["probe_acc"] <= 0.4 + 1e-9
    concept_coded = evaluate(_ConceptModel(), batches(), torch.device("cpu"), max_items=0, probe=True)
    assert concept_coded["probe_acc"] == 1.0    # features that carry the concept: a perfect probe
    limited = evaluate(model, batches(), torch.device("cpu"), max_items=7, probe=False)
    assert limited["eval_items"] == 7 and "probe_acc" not in limited


def test_unlabelled_items_get_no_concept_accuracy():
    """Real clips without labels carry concept -1: every top hit 'shares' it, so concept_acc would read 1.0."""
    from harmony.trainer.evaluate import retrieval_report

    g = torch.Generator().manual_seed(3)
    n, d = 9, 4
    emb = {"z_vt_v": torch.randn(n, d, generator=g), "z_vt_t": torch.randn(n, 1, d, generator=g),
           "z_va_v": torch.randn(n, d, generator=g), "z_va_a": torch.randn(n, d, generator=g),
           "mask_vt": torch.ones(n, dtype=torch.bool), "mask_va": torch.ones(n, dtype=torch.bool)}
    unlabelled = retrieval_report({**emb, "concept": torch.full((n,), -1)})
    assert all("concept_acc" not in m and "r1" in m for m in unlabelled.values())
    labelled = retrieval_report({**emb, "concept": torch.arange(n) % 3})
    assert all("concept_acc" in m for m in labelled.values())
