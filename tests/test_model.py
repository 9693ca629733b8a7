"""VATT model (docs/DESIGN.md "The model (VATT)"): shapes, per-sample independence, DropToken, masking, scopes by
autograd, sizes, init."""
import math

import pytest
import torch

from harmony.config import ConfigError, DataConfig, ModelConfig
from harmony.model.losses import masked_mean, mil_nce, nce
from harmony.model import VATT, droptoken_keep

FIELDS = ("z_va_v", "z_va_a", "z_vt_v", "z_vt_t", "feat_v", "feat_a", "feat_t")
FP32_TOL = 2e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one intra-op thread


def small_data(**kw):
    """Awkward small shapes: 2x2x4 video grid, 2000 audio samples (12.5 patches: padded), 7 words."""
    base = dict(frames=4, image_size=16, sample_rate=8000, audio_seconds=0.25, max_words=7, candidates=2)
    base.update(kw)
    return DataConfig(**base)


def small_model(**kw):
    base = dict(size="tiny", video_patch=[2, 8, 4], vocab_buckets=97, droptoken=0.5)
    base.update(kw)
    return ModelConfig(**base)


def make_inputs(data, b, n_cand, gen):
    """video [B,3,T,H,W] in [0,1], audio [B,S] in [-1,1], text [B,L,N] with padding and an empty candidate."""
    video = torch.rand(b, 3, data.frames, data.image_size, data.image_size, generator=gen)
    audio = torch.rand(b, int(data.sample_rate * data.audio_seconds), generator=gen) * 2 - 1
    text = torch.randint(1, 97, (b, n_cand, data.max_words), generator=gen)
    lengths = torch.randint(1, data.max_words + 1, (b, n_cand), generator=gen)
    text = torch.where(torch.arange(data.max_words) < lengths[..., None], text, torch.zeros_like(text))
    if b > 1 and n_cand > 1:
        text[1, 1] = 0  # an empty candidate
    return video, audio, text


def build(model_cfg, data_cfg, seed=0):
    torch.manual_seed(seed)
    return VATT(model_cfg, data_cfg)


def test_output_shapes_and_describe():
    data = small_data()
    model = build(small_model(), data)
    video, audio, text = make_inputs(data, 3, 2, torch.Generator().manual_seed(0))
    out = model(video, audio, text)
    d, dva, dvt = model.dims["width"], model.dims["d_va"], model.dims["d_vt"]
    assert out.z_va_v.shape == (3, dva) and out.z_va_a.shape == (3, dva)
    assert out.z_vt_v.shape == (3, dvt) and out.z_vt_t.shape == (3, 2, dvt)
    assert out.feat_v.shape == out.feat_a.shape == out.feat_t.shape == (3, d)
    assert out.cand_mask.tolist() == (text != 0).any(-1).tolist() and not out.cand_mask[1, 1]
    assert all(torch.isfinite(getattr(out, f)).all() for f in FIELDS)
    only_video = model.encode_video(video)
    assert only_video.z_va_a is None and only_video.z_vt_t is None and only_video.z_vt_v.shape == (3, dvt)
    text_2d = model.encode_text(text[:, 0])
    assert text_2d.z_vt_t.shape == (3, 1, dvt)
    line = model.describe()
    print(line)
    assert "VATT-tiny agnostic" in line and "M" in line


def _max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("head_norm", ["layernorm", "none"])
@pytest.mark.parametrize("variant", ["agnostic", "specific"])
@pytest.mark.parametrize("train", [False, True])
def test_per_sample_independence(train, variant, head_norm):
    """Sample i's outputs in a batch equal those of sample i alone (eval; train with a fixed DropToken draw)."""
    data = small_data()
    model = build(small_model(variant=variant, head_norm=head_norm), data)
    model.train(train)
    b = 5
    video, audio, text = make_inputs(data, b, 2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = model(video, audio, text, generator=torch.Generator().manual_seed(42))
        worst = 0.0
        for i in range(b):
            alone = model(video[i:i + 1], audio[i:i + 1], text[i:i + 1], generator=torch.Generator().manual_seed(42))
            for f in FIELDS:
                worst = max(worst, _max_err(getattr(batch, f)[i:i + 1], getattr(alone, f)))
    print(f"train={train} {variant} {head_norm}: max |batch - alone| = {worst:.3e}")
    assert worst < FP32_TOL


def test_droptoken():
    data = small_data()
    model = build(small_model(droptoken=0.5), data)
    video, audio, text = make_inputs(data, 3, 2, torch.Generator().manual_seed(2))
    n = model.video_embed.num_tokens
    keep = droptoken_keep(n, 0.5, torch.Generator().manual_seed(0))
    assert keep.numel() == round(n * 0.5) and torch.equal(keep, keep.unique())  # sorted, distinct
    tokens = model.video_embed(video, keep)
    assert tokens.shape[1] == 1 + keep.numel()
    # The kept tokens are exactly the full sequence's tokens at those positions.
    full = model.video_embed(video)
    assert torch.equal(tokens[:, 1:], full[:, 1 + keep]) and torch.equal(tokens[:, 0], full[:, 0])
    with torch.no_grad():
        model.eval()
        ref = model(video, audio, text)
        model.train()
        a = model(video, audio, text, generator=torch.Generator().manual_seed(3))
        b = model(video, audio, text, generator=torch.Generator().manual_seed(3))
        c = model(video, audio, text, generator=torch.Generator().manual_seed(4))
        model.cfg.droptoken = 1.0  # no DropToken: training equals evaluation (dropout is 0)
        d = model(video, audio, text)
    assert torch.equal(a.z_va_v, b.z_va_v) and torch.equal(a.z_va_a, b.z_va_a)
    assert _max_err(a.z_va_v, c.z_va_v) > 1e-4 and _max_err(a.z_va_v, ref.z_va_v) > 1e-4
    assert _max_err(a.z_va_a, ref.z_va_a) > 1e-4
    assert _max_err(a.z_vt_t, ref.z_vt_t) == 0.0  # text is never dropped
    err = max(_max_err(getattr(d, f), getattr(ref, f)) for f in FIELDS)
    print("keep rate 1 train vs eval", err)
    assert err < FP32_TOL


def test_text_padding_is_masked():
    """A padded sequence gives the same text outputs as its unpadded prefix (padding keys are masked)."""
    data = small_data(candidates=1)
    model = build(small_model(), data).eval()
    gen = torch.Generator().manual_seed(5)
    words = torch.randint(1, 97, (4, 1, data.max_words), generator=gen)
    lengths = [1, 3, 5, 7]
    for i, n in enumerate(lengths):
        words[i, 0, n:] = 0
    with torch.no_grad():
        padded = model.encode_text(words)
        worst = 0.0
        for i, n in enumerate(lengths):
            short = model.encode_text(words[i:i + 1, :, :n])
            worst = max(worst, _max_err(padded.z_vt_t[i:i + 1], short.z_vt_t), _max_err(padded.feat_t[i:i + 1],
                                                                                      short.feat_t))
    print("padded vs unpadded max err", worst)
    assert worst < FP32_TOL


def test_feat_t_is_mean_over_nonempty_candidates():
    data = small_data(candidates=3)
    model = build(small_model(), data).eval()
    video, audio, text = make_inputs(data, 3, 3, torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model.encode_text(text)
        for i in range(3):
            per_cand = [model.encode_text(text[i:i + 1, l:l + 1]).feat_t for l in range(3) if text[i, l].any()]
            ref = torch.cat(per_cand).double().mean(0)
            err = _max_err(out.feat_t[i].double(), ref)
            print(f"sample {i}: feat_t err {err:.2e}")
            assert err < FP32_TOL


def test_video_patches_and_positions():
    """Token n = (t, h, w) in row-major order holds that patch, channel-major, and gets positions (t, h, w)."""
    data = small_data()
    embed = build(small_model(), data).video_embed
    (pt, ph, pw), (gt, gh, gw) = embed.patch, embed.grid
    video = torch.rand(2, 3, data.frames, data.image_size, data.image_size)
    patches = embed.patches(video)
    norm = (video - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(3, 1, 1, 1)
    n = 0
    for t in range(gt):
        for h in range(gh):
            for w in range(gw):
                ref = norm[:, :, t * pt:(t + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw].reshape(2, -1)
                assert torch.allclose(patches[:, n], ref, atol=1e-6)
                assert (embed.pos_t.index[n], embed.pos_h.index[n], embed.pos_w.index[n]) == (t, h, w)
                n += 1
    assert n == patches.shape[1] == embed.num_tokens


def test_audio_pad_and_crop():
    data = small_data()
    embed = build(small_model(), data).audio_embed
    assert embed.num_tokens == math.ceil(2000 / 160)
    length = embed.num_tokens * embed.patch
    wave = torch.rand(2, 2000) * 2 - 1
    patches = embed.patches(wave)
    expected = torch.cat([wave, torch.zeros(2, length - 2000)], 1).view(2, embed.num_tokens, embed.patch)
    assert torch.equal(patches, expected)
    longer = torch.cat([wave, torch.rand(2, 900)], 1)
    assert torch.equal(embed.patches(longer), longer[:, :length].view(2, embed.num_tokens, embed.patch))


def _touched(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return {id(p) for p, g in zip(params, grads) if g is not None and g.abs().sum() > 0}


@pytest.mark.parametrize("head_norm", ["layernorm", "none", "batchnorm"])
@pytest.mark.parametrize("variant", ["agnostic", "specific"])
def test_scopes_by_autograd(variant, head_norm):
    """scope 'shared' is exactly the set of parameters that both L_va and L_vt reach (BatchNorm heads excluded)."""
    data = small_data()
    model = build(small_model(variant=variant, head_norm=head_norm), data).train()
    video, audio, text = make_inputs(data, 4, 2, torch.Generator().manual_seed(7))
    out = model(video, audio, text, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    loss_va = masked_mean(nce(out.z_va_v, out.z_va_a))
    loss_vt = masked_mean(mil_nce(out.z_vt_v, out.z_vt_t, cand_mask=out.cand_mask))
    both = _touched(loss_va, params) & _touched(loss_vt, params)
    expected = set(both)
    if head_norm == "batchnorm":
        head = {id(p) for p in model.head_va_v.parameters()}
        assert head <= both  # the head IS reached by both losses; it is left out on purpose
        expected -= head
    shared = model.scope_parameters("shared")
    got = {id(p) for p in shared}
    print(f"{variant}/{head_norm}: shared = {len(got)} tensors, {sum(p.numel() for p in shared)} params")
    assert len(got) == len(shared), "duplicates in scope"
    assert got == expected, (f"missing {[names[i] for i in expected - got]}, "
                             f"extra {[names[i] for i in got - expected]}")

    video_tf = model.transformer("video")
    backbone = {id(p) for p in model.scope_parameters("backbone")}
    last = {id(p) for p in model.scope_parameters("last_block")}
    assert backbone == {id(p) for p in video_tf.parameters()} and backbone <= got
    assert last == {id(p) for p in list(video_tf.blocks[-1].parameters()) + list(video_tf.norm.parameters())}
    assert {id(p) for p in model.scope_parameters("all")} == {id(p) for p in params}
    with pytest.raises(ConfigError, match="harmony.scope"):
        model.scope_parameters("everything")


def _block_params(d, m):
    return 2 * (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)


def expected_count(size, variant, model_cfg, data_cfg):
    """Parameter count written out from the architecture description (docs/DESIGN.md "The model (VATT)"), independently
    of the code."""
    layers, d, m = {"tiny": (2, 64, 256), "small": (6, 512, 2048), "base": (12, 768, 3072),
                    "medium": (12, 1024, 4096)}[size]
    dva, dvt = (64, 32) if size == "tiny" else (512, 256)
    pt, ph, pw = model_cfg.video_patch
    grid = (data_cfg.frames // pt, data_cfg.image_size // ph, data_cfg.image_size // pw)
    n_audio = math.ceil(data_cfg.sample_rate * data_cfg.audio_seconds / model_cfg.audio_patch)
    video = (3 * pt * ph * pw * d + d) + (d * d + d) + sum(grid) * d + d
    audio = (model_cfg.audio_patch * d + d) + (d * d + d) + n_audio * d + d
    text = model_cfg.vocab_buckets * d + (d * d + d) + data_cfg.max_words * d + d
    transformer = layers * _block_params(d, m) + 2 * d
    post = 3 * (d * d + d)
    heads = (d * dva + dva) + 2 * dva + (dva * dva + dva)      # video -> S_va MLP (LayerNorm)
    heads += (dva * dvt + dvt) + 2 * dvt + (dvt * dvt + dvt)   # S_va -> S_vt MLP
    heads += (d * dva + dva) + (d * dvt + dvt)                  # audio, text linear heads
    return video + audio + text + transformer * (1 if variant == "agnostic" else 3) + post + heads


@pytest.mark.parametrize("variant", ["agnostic", "specific"])
def test_parameter_counts(variant):
    data = DataConfig()
    for size in ("tiny", "small", "base", "medium"):
        cfg = ModelConfig(size=size, variant=variant)
        with torch.device("meta"):  # no memory, no init cost: medium is ~220M parameters
            model = VATT(cfg, data)
        got, want = model.num_parameters(), expected_count(size, variant, cfg, data)
        shared = sum(p.numel() for p in model.scope_parameters("shared"))
        print(f"{size:6s} {variant:8s}: {got:>12,d} parameters (formula {want:,d}); shared scope {shared:,d}")
        assert got == want


def test_initialisation():
    """Linear: Glorot-uniform weights (bound sqrt(6/(in+out)), std sqrt(2/(in+out))), zero biases; LayerNorm (1, 0);
    word embedding rows N(0, 1/d) with a zero padding row; positional tables and AGG token truncated N(0, .02)."""
    model = build(ModelConfig(size="tiny"), DataConfig())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            fan_in, fan_out = module.in_features, module.out_features
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert w.abs().max() <= bound + 1e-7, name
            if w.numel() >= 4096:
                want = math.sqrt(2.0 / (fan_in + fan_out))
                assert abs(w.std().item() - want) < 0.05 * want, (name, w.std().item(), want)
            assert (module.bias == 0).all(), name
        if isinstance(module, torch.nn.LayerNorm):
            assert (module.weight == 1).all() and (module.bias == 0).all(), name
    table = model.text_embed.word_embed.weight
    assert (table[0] == 0).all()
    d = table.shape[1]
    assert abs(table[1:].std().item() - d ** -0.5) < 0.01 * d ** -0.5, table[1:].std().item()
    assert 0.01 < model.video_embed.agg.token.std() < 0.03
    for emb in (model.video_embed.pos_t, model.video_embed.pos_h, model.video_embed.pos_w, model.audio_embed.pos,
                model.text_embed.pos):
        assert emb.table.abs().max() <= 0.04 + 1e-7


def _synthetic_batch(n: int, seed: int = 0, **kw):
    """n clean items of the synthetic benchmark (default clip sizes): the inputs the default run trains on."""
    from harmony.data import build_dataset, collate

    data = DataConfig(size=n, eval_size=n, seed=seed, **kw)
    ds = build_dataset(data, "eval")
    return data, collate([ds[i] for i in range(n)])


def _mean_offdiag_cos(z):
    """z [B, ...] -> mean cosine between the flattened embeddings of DIFFERENT samples (float64)."""
    z = torch.nn.functional.normalize(z.reshape(z.shape[0], -1).double(), dim=-1)
    c = z @ z.T
    return c[~torch.eye(c.shape[0], dtype=torch.bool)].mean().item()


def test_init_content_dominates_shared_tables():
    """At initialisation each token's content (what differs between samples) outweighs what every sample shares
    (positional tables, AGG token), and the pooled embeddings of different samples are far from collapsed.

    The former init (truncated N(0, .02) everywhere) failed both: per-sample token content was 0.5x (audio) and
    0.1x (text) the tables' size, and the cosines between different samples' embeddings were 0.86-0.99."""
    data, batch = _synthetic_batch(32)
    model = build(ModelConfig(), data).eval()
    with torch.no_grad():
        ve, ae = model.video_embed, model.audio_embed
        tokens = {
            "video": ve.pre_proj(ve.patch_proj(ve.patches(batch["video"]))),
            "audio": ae.pre_proj(ae.patch_proj(ae.patches(batch["audio"]))),
            "text": model.text_embed.pre_proj(model.text_embed.word_embed(batch["text"][:, 0])),
        }
        tables = {"video": [model.video_embed.pos_t, model.video_embed.pos_h, model.video_embed.pos_w],
                  "audio": [model.audio_embed.pos], "text": [model.text_embed.pos]}
        for name, x in tokens.items():
            if name == "text":  # padding positions carry no content
                x = x[batch["text"][:, 0] != 0][:, None]
            content = (x - x.mean(0, keepdim=True)).pow(2).mean().sqrt().item()
            shared = max([e.table.pow(2).mean().sqrt().item() for e in tables[name]]
                         + [model.video_embed.agg.token.pow(2).mean().sqrt().item()])
            print(f"{name}: per-sample token content rms {content:.4f}, largest shared table rms {shared:.4f}")
            assert content > 3 * shared, name
        out = model(batch["video"], batch["audio"], batch["text"])
    cos = {f: _mean_offdiag_cos(getattr(out, f)) for f in ("z_va_v", "z_va_a", "z_vt_v", "z_vt_t")}
    print("mean cosine between different samples at init:", {k: round(v, 3) for k, v in cos.items()})
    assert max(cos.values()) < 0.75


@pytest.mark.slow
def test_plain_training_leaves_the_chance_loss():
    """Plain AdamW training of the tiny model on the synthetic benchmark (batch 32, lr 1e-3 after 10 warm-up
    steps, clipping 1.0) leaves the chance loss log(2B) of both losses within a few tens of steps (L_va first);
    with the former init both sat at log(2B) ± 0.01 for ~100 steps."""
    torch.manual_seed(0)
    steps, b = 60, 32
    data, batch = _synthetic_batch(steps * b // 2, seed=3)  # two epochs of a small clean set
    model = build(ModelConfig(), data).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    chance = math.log(2 * b)
    l_va, l_vt = [], []
    for step in range(steps):
        rows = torch.randperm(batch["index"].numel(), generator=torch.Generator().manual_seed(step))[:b]
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 10)
        out = model(batch["video"][rows], batch["audio"][rows], batch["text"][rows],
                    generator=torch.Generator().manual_seed(step))
        va, vt = masked_mean(nce(out.z_va_v, out.z_va_a)), masked_mean(mil_nce(out.z_vt_v, out.z_vt_t))
        opt.zero_grad()
        (va + vt).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        l_va.append(va.item())
        l_vt.append(vt.item())
    print(f"chance {chance:.3f}; L_va every 5 steps", [round(x, 3) for x in l_va[::5]],
          "L_vt", [round(x, 3) for x in l_vt[::5]])
    assert sum(l_va[-10:]) / 10 < chance - 0.5 and sum(l_vt[-10:]) / 10 < chance - 0.3


def test_bad_config_and_inputs():
    with pytest.raises(ConfigError, match="data.frames"):
        VATT(small_model(), small_data(frames=5))
    with pytest.raises(ConfigError, match="model.video_patch"):
        VATT(small_model(video_patch=[2, 8]), small_data())
    with pytest.raises(ConfigError, match="model.head_norm"):
        VATT(small_model(head_norm="groupnorm"), small_data())
    data = small_data()
    model = build(small_model(), data)
    with pytest.raises(ValueError, match="video must be"):
        model.encode_video(torch.rand(1, 3, 4, 16, 8))
    with pytest.raises(ValueError, match="max_words"):
        model.encode_text(torch.ones(1, 1, data.max_words + 1, dtype=torch.long))


def test_learns_a_fixed_batch():
    """AdamW steps on one batch of a tiny model lower L_va + L_vt (gradients flow end to end)."""
    data = small_data(candidates=1)
    model = build(small_model(), data).train()
    video, audio, text = make_inputs(data, 8, 1, torch.Generator().manual_seed(8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for step in range(30):
        out = model(video, audio, text, generator=torch.Generator().manual_seed(step))
        loss = masked_mean(nce(out.z_va_v, out.z_va_a)) + masked_mean(mil_nce(out.z_vt_v, out.z_vt_t))
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    print("losses", [round(x, 3) for x in losses])
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0]


def test_text_ids_fold_into_a_small_vocabulary():
    """Ids from the data tokenizer (2^16 buckets) fold into model.vocab_buckets: 0 stays padding, id ->
    1 + (id − 1) mod (V − 1), so a small vocabulary embeds them instead of raising IndexError."""
    from harmony.data.text import tokenize

    data = small_data(candidates=2)
    model = build(small_model(vocab_buckets=97), data).eval()
    raw = torch.stack([tokenize("a crimson box moves to the left", data.max_words),
                       tokenize("okay so the blue orb is moving up", data.max_words),
                       tokenize("ring", data.max_words),
                       torch.tensor([65535, 97, 96, 1, 193, 0, 0])])
    raw = torch.stack([raw[:2], raw[2:]])                                  # [2, 2, 7]
    assert raw.max() >= 97                                                 # ids past the table
    folded = torch.tensor([[[0 if i == 0 else 1 + (i - 1) % 96 for i in row] for row in s] for s in raw.tolist()])
    assert folded.max() < 97 and ((folded == 0) == (raw == 0)).all()
    with torch.no_grad():
        got, ref = model.encode_text(raw), model.encode_text(folded)
        err = max(_max_err(got.z_vt_t, ref.z_vt_t), _max_err(got.feat_t, ref.feat_t))
        # 97 and 193 fold onto 1, 96 stays 96: equal ids give equal single-word captions
        one = model.encode_text(torch.tensor([[[97]], [[193]], [[1]], [[96]]]))
    print("raw vs pre-folded ids max err", err)
    assert err == 0.0 and torch.equal(got.cand_mask, (raw != 0).any(-1))
    assert torch.equal(one.z_vt_t[0], one.z_vt_t[2]) and torch.equal(one.z_vt_t[1], one.z_vt_t[2])
    assert _max_err(one.z_vt_t[3], one.z_vt_t[2]) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_matches_sdpa_and_its_backward_batches(dtype):
    """harmony.model.attention: the same forward and backward as F.scaled_dot_product_attention (key padding
    included), and a two-column ``is_grads_batched`` backward (the harmonizer's measurement) equal to two plain
    ones, through the explicit form rather than the per-column fallback (which would warn)."""
    import warnings

    import torch.nn.functional as F

    from harmony.model import attention as attn

    g = torch.Generator().manual_seed(3)
    B, H, N, d = 3, 2, 11, 5
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=dtype).requires_grad_(True) for _ in range(3))
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[1, 6:] = False
    mask = key_mask[:, None, None, :]
    out, ref = attn.attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6}[dtype]
    print("forward max abs err", (out - ref).abs().max().item())
    assert torch.allclose(out, ref, rtol=0, atol=tol)
    cols = torch.randn(2, B, H, N, d, generator=g, dtype=dtype)
    explicit = []
    orig = attn._explicit_backward
    attn._explicit_backward = lambda *a: explicit.append(1) or orig(*a)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            batched = torch.autograd.grad(out, (q, k, v), cols, is_grads_batched=True, retain_graph=True)
    finally:
        attn._explicit_backward = orig
    assert explicit, "the batched backward did not take the explicit form"
    for c in range(2):
        want = torch.autograd.grad(ref, (q, k, v), cols[c], retain_graph=True)
        plain = torch.autograd.grad(out, (q, k, v), cols[c], retain_graph=True)
        for got_b, got_p, w in zip(batched, plain, want):
            err = max((got_b[c] - w).abs().max().item(), (got_p - w).abs().max().item())
            print(f"column {c}: backward max abs err {err:.3e}")
            assert err <= tol * 10
