"""Synthetic misalignment benchmark: contract, determinism, noise flags and kinds, and that each modality
really shows its concept (sprite colour and motion, tones, caption words)."""
import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from harmony.config import REAL_DATA_VALUES, ConfigError, DataConfig
from harmony.data import collate
from harmony.data.synthetic import COLOURS, DIRECTIONS, SHAPES, SyntheticDataset, concept_factors
from harmony.data.text import words


def cfg(**kw):
    """The benchmark with no misalignment, hard items or imbalance unless a test asks for them."""
    return DataConfig(**{**REAL_DATA_VALUES, "size": 512, "eval_size": 64, **kw})


def check_contract(item, c):
    T, S = c.frames, c.image_size
    n = int(round(c.sample_rate * c.audio_seconds))
    assert item["video"].shape == (3, T, S, S) and item["video"].dtype == torch.float32
    assert item["audio"].shape == (n,) and item["audio"].dtype == torch.float32
    assert item["text"].shape == (c.candidates, c.max_words) and item["text"].dtype == torch.int64
    assert torch.isfinite(item["video"]).all() and torch.isfinite(item["audio"]).all()
    assert 0.0 <= float(item["video"].min()) and float(item["video"].max()) <= 1.0
    assert float(item["audio"].abs().max()) <= 1.0
    assert item["text"].min() >= 0 and item["text"].max() < 65536
    assert item["mask_va"] is True and item["mask_vt"] is True and item["source"] == "synthetic"


@pytest.mark.parametrize("kw", [{}, dict(frames=3, image_size=17, sample_rate=1000, audio_seconds=0.37,
                                         candidates=3, max_words=5, concepts=5)])
def test_contract_shapes_and_ranges(kw):
    c = cfg(**kw)
    ds = SyntheticDataset(c)
    items = [ds[i] for i in (0, 1, 7, len(ds) - 1)]
    for it in items:
        check_contract(it, c)
    batch = collate(items)
    assert batch["video"].shape == (4, 3, c.frames, c.image_size, c.image_size)
    assert batch["concept"].dtype == torch.int64 and batch["noisy_text"].dtype == torch.bool
    assert batch["index"].tolist() == [0, 1, 7, len(ds) - 1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_deterministic_from_seed_and_index_also_in_a_worker():
    c = cfg(noise=0.3, noise_audio=0.3)
    a, b = SyntheticDataset(c), SyntheticDataset(c)
    for i in (0, 5, 300):
        x, y = a[i], b[i]
        for k in ("video", "audio", "text"):
            assert torch.equal(x[k], y[k])
        assert (x["noisy_text"], x["text_concept"]) == (y["noisy_text"], y["text_concept"])
    loaded = next(iter(DataLoader(a, batch_size=3, num_workers=1, collate_fn=collate)))
    assert torch.equal(loaded["video"], collate([a[0], a[1], a[2]])["video"])
    other = SyntheticDataset(dataclasses.replace(c, seed=1))[5]
    assert not torch.equal(other["video"], a[5]["video"])


def test_eval_split_is_clean_and_disjoint_from_train():
    c = cfg(noise=1.0, noise_audio=1.0)
    train, held = SyntheticDataset(c, "train"), SyntheticDataset(c, "eval")
    assert len(held) == c.eval_size
    for i in range(8):
        e, t = held[i], train[i]
        assert not e["noisy_text"] and not e["noisy_audio"]
        assert e["text_concept"] == e["concept"] == e["audio_concept"]
        assert t["noisy_text"] and t["noisy_audio"]
        assert not torch.equal(e["video"], t["video"])


def test_clean_items_do_not_depend_on_noise_settings():
    clean = SyntheticDataset(cfg())
    noisy = SyntheticDataset(cfg(noise=0.5, noise_audio=0.5, noise_kind="unrelated"))
    compared = 0
    for i in range(40):
        n = noisy[i]
        if n["noisy_text"] or n["noisy_audio"]:
            continue
        c = clean[i]
        assert torch.equal(c["video"], n["video"]) and torch.equal(c["audio"], n["audio"])
        assert torch.equal(c["text"], n["text"])
        compared += 1
    assert compared >= 5


def test_noise_rates_and_independence():
    n = 800
    ds = SyntheticDataset(cfg(size=n, noise=0.3, noise_audio=0.1))
    flags = np.array([(it["noisy_text"], it["noisy_audio"]) for it in (ds[i] for i in range(n))])
    rate_t, rate_a = flags.mean(0)
    both = (flags[:, 0] & flags[:, 1]).mean()
    print("rates", rate_t, rate_a, "both", both)
    # 4 sigma of a binomial proportion
    assert abs(rate_t - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    assert abs(rate_a - 0.1) < 4 * np.sqrt(0.1 * 0.9 / n)
    assert abs(both - 0.03) < 4 * np.sqrt(0.03 * 0.97 / n)


def _noisy_items(kind, n=320):
    ds = SyntheticDataset(cfg(size=n, noise=0.5, noise_audio=0.5, noise_kind=kind))
    return ds, [ds[i] for i in range(n)]


def test_swap_noise_uses_other_random_concepts():
    ds, items = _noisy_items("swap")
    noisy_t = [it for it in items if it["noisy_text"]]
    noisy_a = [it for it in items if it["noisy_audio"]]
    assert all(it["text_concept"] != it["concept"] and 0 <= it["text_concept"] < ds.k for it in noisy_t)
    assert all(it["audio_concept"] != it["concept"] and 0 <= it["audio_concept"] < ds.k for it in noisy_a)
    per_concept = {}
    for it in noisy_t:
        per_concept.setdefault(it["concept"], set()).add(it["text_concept"])
    print({k: len(v) for k, v in per_concept.items()})
    assert np.mean([len(v) for v in per_concept.values()]) > 3  # many different wrong concepts


def test_bias_noise_is_a_fixed_wrong_concept_per_concept():
    ds, items = _noisy_items("bias")
    text_map, audio_map = {}, {}
    for it in items:
        if it["noisy_text"]:
            text_map.setdefault(it["concept"], set()).add(it["text_concept"])
        if it["noisy_audio"]:
            audio_map.setdefault(it["concept"], set()).add(it["audio_concept"])
    print(text_map, audio_map)
    assert len(text_map) == ds.k and len(audio_map) == ds.k
    assert all(len(v) == 1 and c not in v for c, v in text_map.items())
    assert all(len(v) == 1 and c not in v for c, v in audio_map.items())
    assert text_map != audio_map


def concept_words(ds, concept):
    shape, colour = ds.describe(concept)
    return {w for syn in SHAPES[shape][1] for w in words(syn)} | {w for syn in COLOURS[colour][2] for w in words(syn)}


ALL_CONCEPT_WORDS = {w for _, syns in SHAPES for s in syns for w in words(s)} | \
                    {w for _, _, syns in COLOURS for s in syns for w in words(s)}


def test_unrelated_noise_has_no_concept_words_and_no_concept_tones():
    ds, _ = _noisy_items("unrelated", n=64)
    seen = 0
    for i in range(64):
        item, captions = ds.generate(i)
        if item["noisy_text"]:
            assert item["text_concept"] == -1
            assert not set(words(captions[0])) & ALL_CONCEPT_WORDS, captions[0]
            seen += 1
        if item["noisy_audio"]:
            assert item["audio_concept"] == -1
            peaks = _tone_energy(ds, item["audio"])
            print("unrelated concept-band energy", peaks)
            assert peaks.max() < 0.05
    assert seen > 10


def _spectrum(audio, rate):
    x = audio.double().numpy()
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x)))) / (len(x) / 4)
    return np.fft.rfftfreq(len(x), 1.0 / rate), mag


def _tone_energy(ds, audio):
    """Peak amplitude near every concept tone (±2.5%)."""
    freqs, mag = _spectrum(audio, ds.cfg.sample_rate)
    tones = np.concatenate([ds.shape_freqs, ds.colour_freqs])
    return np.array([mag[(freqs > 0.975 * f) & (freqs < 1.025 * f)].max() for f in tones])


def direction_of(caption):
    """Index of the direction phrase in a caption (longest phrase wins: 'up and left' over 'up')."""
    ws = words(caption)
    best, best_len = None, 0
    for d, (_, phrases) in enumerate(DIRECTIONS):
        for p in phrases:
            pw = words(p)
            if any(ws[i:i + len(pw)] == pw for i in range(len(ws))) and len(pw) > best_len:
                best, best_len = d, len(pw)
    return best


def test_clean_modalities_show_their_concept():
    ds = SyntheticDataset(cfg(size=64, frames=8))  # 8 frames: enough motion to measure
    for i in range(32):
        item, captions = ds.generate(i)
        c = item["concept"]
        shape, colour = ds.describe(c)
        # caption: a shape synonym, a colour synonym, and a direction
        ws = set(words(captions[0]))
        assert ws & {w for s in SHAPES[shape][1] for w in words(s)}, captions[0]
        assert ws & {w for s in COLOURS[colour][2] for w in words(s)}, captions[0]
        d = direction_of(captions[0])
        assert d is not None, captions[0]
        # video: saturated sprite pixels have the concept's hue and move in the caption's direction
        v = item["video"].numpy()                                    # [3, T, H, W]
        sat = v.max(0) - v.min(0)                                    # [T, H, W]
        mask = sat > 0.4
        assert mask.sum(axis=(1, 2)).min() > 4
        rgb = np.array([v[ch][mask].mean() for ch in range(3)])
        want = np.array(COLOURS[colour][1])
        assert np.argmax(rgb) == np.argmax(want) and np.argmin(rgb) == np.argmin(want), (rgb, want)
        ys, xs = np.mgrid[0:v.shape[2], 0:v.shape[3]]
        cx = np.array([xs[m].mean() for m in mask])
        cy = np.array([ys[m].mean() for m in mask])
        (dx, dy), _ = DIRECTIONS[d]
        move = (cx[-1] - cx[0], cy[-1] - cy[0])
        for want_sign, got in ((dx, move[0]), (dy, move[1])):
            if want_sign == 0:
                assert abs(got) < 1.5, (captions[0], move)
            else:
                assert np.sign(got) == want_sign and abs(got) > 2, (captions[0], move)
        # audio: the two strongest concept-band peaks are this concept's shape and colour tones
        energy = _tone_energy(ds, item["audio"])
        top_shape = int(np.argmax(energy[:ds.n_shapes]))
        top_colour = int(np.argmax(energy[ds.n_shapes:]))
        print(i, captions[0], "move", np.round(move, 1), "tone peaks", np.round(energy, 3))
        assert (top_shape, top_colour) == (shape, colour)
        assert energy[shape] > 0.1 and energy[ds.n_shapes + colour] > 0.1


@pytest.mark.parametrize("k", [2, 5, 16, 64])
def test_other_concept_counts(k):
    ns, nc = concept_factors(k)
    assert ns * nc >= k and ns <= len(SHAPES) and nc <= len(COLOURS)
    ds = SyntheticDataset(cfg(size=2 * k, concepts=k, noise=0.5, noise_kind="bias"))
    seen = {ds[i]["concept"] for i in range(2 * k)}
    assert seen == set(range(k))
    for i in range(0, 2 * k, max(1, k // 4)):
        item, captions = ds.generate(i)
        check_contract(item, ds.cfg)
        assert set(words(captions[0])) & concept_words(ds, item["text_concept"])


def test_too_many_concepts_is_a_config_error():
    with pytest.raises(ConfigError, match="data.concepts"):
        DataConfig(concepts=65).validate()
    with pytest.raises(ValueError, match="concepts"):
        concept_factors(65)


# ---- web-like knobs: mixed caption noise, hard-but-clean items, a long tail of concepts

def test_mixed_caption_noise_has_both_kinds_at_their_rates_and_flags():
    n = 1200
    ds = SyntheticDataset(cfg(size=n, noise=0.2, noise_bias=0.25, noise_audio=0.1))
    items = [ds[i] for i in range(n)]
    kinds = np.array([it["text_kind"] for it in items])
    for code, rate in ((1, 0.2), (2, 0.25)):
        got = (kinds == code).mean()
        print("text kind", code, got)
        assert abs(got - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    assert all(it["noisy_text"] == (it["text_kind"] != 0) for it in items)
    assert all(it["noisy_audio"] == (it["audio_kind"] == 1) for it in items)
    biased = {}
    for it in items:
        if it["text_kind"] == 2:
            biased.setdefault(it["concept"], set()).add(it["text_concept"])
        elif it["text_kind"] == 1:
            assert it["text_concept"] != it["concept"]
    # the narrator's error is systematic: one wrong concept per concept, the same one noise_kind=bias uses
    plain_bias = SyntheticDataset(cfg(size=n, noise=0.25, noise_kind="bias"))
    assert all(len(v) == 1 and c not in v for c, v in biased.items()) and len(biased) == ds.k
    assert all(next(iter(v)) == (c + plain_bias.bias_text) % ds.k for c, v in biased.items())


def test_bias_at_its_own_rate_is_the_bias_kind():
    a = SyntheticDataset(cfg(noise_bias=0.4))
    b = SyntheticDataset(cfg(noise=0.4, noise_kind="bias"))
    for i in range(0, 60, 3):
        x, y = a[i], b[i]
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["text"], y["text"])
        assert x["noisy_text"] == y["noisy_text"] and x["text_kind"] == y["text_kind"]


def _sprite_stats(video):
    """(pixels differing from the median background by > 0.25 in some channel, their mean contrast) of frame 0."""
    f = video[:, 0].double()
    bg = f.flatten(1).median(dim=1).values[:, None, None]
    diff = (f - bg).abs().max(0).values
    sel = diff > 0.25
    return int(sel.sum()), float(diff[sel].mean()) if bool(sel.any()) else 0.0


def test_hard_items_are_weaker_but_still_show_their_concept():
    n = 400
    easy = SyntheticDataset(cfg(size=n))
    hard = SyntheticDataset(cfg(size=n, hard=0.5))
    flags = np.array([hard[i]["hard"] for i in range(n)])
    print("hard fraction", flags.mean())
    assert abs(flags.mean() - 0.5) < 4 * np.sqrt(0.25 / n)
    assert not any(SyntheticDataset(cfg(size=n, hard=0.5), "eval")[i]["hard"] for i in range(64))
    ratios_px, ratios_tone = [], []
    for i in np.nonzero(flags)[0][:30]:
        e, h = easy[int(i)], hard[int(i)]
        assert h["concept"] == e["concept"] and torch.equal(h["text"], e["text"])  # same item, weaker signal
        ratios_px.append((_sprite_stats(h["video"])[0] + 1) / (_sprite_stats(e["video"])[0] + 1))
        ratios_tone.append(_tone_energy(hard, h["audio"]).max() / _tone_energy(easy, e["audio"]).max())
        # still the right tones: the loudest concept band is one of the item's own two
        shape, colour = hard.describe(h["concept"])
        assert int(np.argmax(_tone_energy(hard, h["audio"]))) in (shape, hard.n_shapes + colour)
    print("sprite pixel ratio", np.median(ratios_px), "tone ratio", np.median(ratios_tone))
    assert np.median(ratios_px) < 0.6 and np.median(ratios_tone) < 0.45
    for i in np.nonzero(~flags)[0][:10]:  # easy items of the hard set are the easy set's
        assert torch.equal(hard[int(i)]["video"], easy[int(i)]["video"])


def test_long_tail_follows_the_imbalance_and_eval_stays_uniform():
    from harmony.data.synthetic import concept_frequencies
    n, k = 4096, 16
    ds = SyntheticDataset(cfg(size=n, concepts=k, imbalance=16.0, eval_size=256))
    counts = np.bincount([ds[i]["concept"] for i in range(0, n)], minlength=k)
    print("counts", counts.tolist())
    assert counts[0] / counts[-1] == pytest.approx(16.0, rel=0.05)
    assert np.all(np.diff(counts) <= 0) and counts.sum() == n
    np.testing.assert_allclose(counts / n, concept_frequencies(k, 16.0), atol=1.0 / n)
    ev = SyntheticDataset(cfg(size=n, concepts=k, imbalance=16.0, eval_size=256), "eval")
    assert np.bincount([ev[i]["concept"] for i in range(256)], minlength=k).tolist() == [16] * k
    np.testing.assert_allclose(concept_frequencies(k, 1.0), np.full(k, 1 / k))


def test_web_knob_config_errors():
    with pytest.raises(ConfigError, match="exceeds 1"):
        DataConfig(noise=0.7, noise_bias=0.4).validate()
    with pytest.raises(ConfigError, match="data.hard"):
        DataConfig.clips(kind="manifest", manifest="m.jsonl", hard=0.2).validate()
    with pytest.raises(ConfigError, match="data.imbalance"):
        DataConfig.clips(kind="manifest", manifest="m.jsonl", imbalance=4.0).validate()
    with pytest.raises(ConfigError):
        DataConfig(imbalance=0.5).validate()
