"""Text-only building blocks (METHODS.md section 6): noise, projection memory, FusionCap pieces."""
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pcmnet.backbones.base import ImageFeatures, TextFeatures
from pcmnet.config import ConfigError, from_dict
from pcmnet.data.records import Record
from pcmnet.errors import CheckpointError, PcmnetError
from pcmnet.models.encoder import VisualTokens
from pcmnet.models.noise import (NoiseNetwork, estimate_noise_variance, gap_pairs, gaussian_kl,
                                 inject_noise)
from pcmnet.models.projection import ProjectionMemory, ProjectionNetwork
from pcmnet.models.textonly import (TextOnly, TextOnlyConfig, open_memory, preset,
                                    resolve_noise_variance, text_only_features,
                                    text_only_token_builder)
from toys import make_images


def unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def dense_projection(q, M, tau, top_k=None, drop=None):
    """Independent reference in float64: the full [B x m] softmax (optionally top-k / minus rows).
    M is used as given (unit rows; a float16 memory's rows are unit only to float16 precision)."""
    q = F.normalize(q.double(), dim=-1)
    M = M.double()
    s = q @ M.T / tau
    if drop is not None:
        s = s.masked_fill(drop, float("-inf"))
    if top_k is not None:
        kth = s.topk(top_k, dim=1).values[:, -1:]
        s = s.masked_fill(s < kth, float("-inf"))
    return F.normalize(torch.softmax(s, dim=1) @ M, dim=-1)


# -- the gap ("auto") ---------------------------------------------------------------------------
def test_estimate_noise_variance_matches_numpy():
    rng = np.random.default_rng(0)
    g, t = rng.normal(size=(50, 24)), rng.normal(size=(50, 24))
    gn = g / np.sqrt((g ** 2).sum(1, keepdims=True))
    tn = t / np.sqrt((t ** 2).sum(1, keepdims=True))
    d = gn - tn
    assert estimate_noise_variance(torch.tensor(g), torch.tensor(t)) == pytest.approx((d ** 2).mean(), rel=1e-12)
    assert estimate_noise_variance(torch.tensor(g), torch.tensor(t), centered=True) == pytest.approx(
        np.var(d, axis=0, ddof=1).mean(), rel=1e-12)


def test_estimate_noise_variance_hand_cases():
    t = unit(10, 16)
    assert estimate_noise_variance(t, t) == 0.0
    # g = -t: d = -2t, |d|^2 = 4 per pair, spread over D=16 dimensions
    assert estimate_noise_variance(-t, t) == pytest.approx(4 / 16)
    # a constant gap: t = (0.6, 0.8 u_i), g = (-0.6, 0.8 u_i), d = (-1.2, 0, ...) for every pair.
    # It is all gap when uncentered (1.44 / D), none of it when centered.
    t = torch.cat([torch.full((10, 1), 0.6, dtype=torch.float64), 0.8 * unit(10, 15, dtype=torch.float64)], 1)
    g = t.clone()
    g[:, 0] = -0.6
    assert estimate_noise_variance(g, t) == pytest.approx(1.44 / 16)
    assert estimate_noise_variance(g, t, centered=True) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(PcmnetError, match="auto"):
        estimate_noise_variance(t[:0], t[:0])


def test_gap_pairs_pairs_each_image_with_each_caption(toy_backbone, tmp_path):
    paths = make_images(tmp_path / "img", n=3)
    records = [Record("a", str(paths[0]), ["a red cat", "the cat sits"]),
               Record("b", str(paths[1]), ["two dogs", "dogs run", "a dog park"]),
               Record("c", str(paths[2]), []),  # unlabeled: no pair
               Record("d", None, ["text only caption"])]  # no image: no pair
    g, t = gap_pairs(records, toy_backbone)
    assert g.shape == t.shape == (5, toy_backbone.embed_dim)
    with torch.no_grad():
        from pcmnet.data.images import open_image
        enc = {r.image_id: toy_backbone.encode_image(
            toy_backbone.preprocess(open_image(r.file))[None]).embeds[0] for r in records[:2]}
        caps = records[0].captions + records[1].captions
        exp_t = torch.stack([toy_backbone.encode_text([c]).embeds[0] for c in caps])
    exp_g = torch.stack([enc["a"]] * 2 + [enc["b"]] * 3)
    torch.testing.assert_close(g, exp_g, atol=1e-5, rtol=0)
    torch.testing.assert_close(t, exp_t, atol=1e-5, rtol=0)
    # cached embeddings instead of images: same pairs; max_images keeps the first paired image
    g2, t2 = gap_pairs(records, toy_backbone, image_embeds=enc)
    torch.testing.assert_close(g2, exp_g, atol=1e-5, rtol=0)
    g3, _ = gap_pairs(records, toy_backbone, image_embeds=enc, max_images=1)
    assert g3.shape[0] == 2

    cfg = TextOnlyConfig(noise_variance="auto")
    assert resolve_noise_variance(cfg, records, toy_backbone) == pytest.approx(
        estimate_noise_variance(exp_g, exp_t), rel=1e-5)
    with pytest.raises(PcmnetError, match="noise_variance=auto"):
        resolve_noise_variance(cfg, [], toy_backbone)
    assert resolve_noise_variance(TextOnlyConfig(noise_variance=0.003)) == 0.003


# -- fixed noise (CapDec) -------------------------------------------------------------------------
def test_inject_noise_statistics():
    torch.manual_seed(0)
    v = 0.016
    x = unit(100_000, 10)
    n = (inject_noise(x, v) - x).double().flatten()
    N = n.numel()
    assert abs(n.mean().item()) < 5 * math.sqrt(v / N)  # sd of a sample mean
    assert abs(n.var().item() - v) < 5 * math.sqrt(2 * v * v / (N - 1))  # sd of a sample variance
    # per dimension too (isotropic), and no renormalization
    per_dim = (inject_noise(x, v) - x).var(0)
    assert (per_dim - v).abs().max() < 5 * math.sqrt(2 * v * v / 99_999)
    assert (inject_noise(x, v).norm(dim=-1) - 1).abs().max() > 0.05
    assert inject_noise(x, 0.0) is x
    with pytest.raises(ValueError):
        inject_noise(x, -0.1)


# -- learned noise (FusionCap) --------------------------------------------------------------------
def test_gaussian_kl_matches_torch_distributions():
    log_std = torch.randn(7, 5) * 0.5 - 2.0
    target = 0.003
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(0.0, log_std.exp()),
        torch.distributions.Normal(0.0, torch.full_like(log_std, math.sqrt(target)))).mean()
    torch.testing.assert_close(gaussian_kl(log_std, target), expected)
    assert gaussian_kl(torch.full((3, 4), 0.5 * math.log(target)), target).abs() < 1e-7


def test_noise_network_starts_at_fixed_noise_and_gets_gradients():
    torch.manual_seed(1)
    net = NoiseNetwork(dim=16, hidden=32, init_variance=0.01)
    x = unit(50_000, 16)
    out, log_std = net(x)
    torch.testing.assert_close(log_std, torch.full_like(log_std, 0.5 * math.log(0.01)))
    n = (out - x).double().flatten()
    assert abs(n.var().item() - 0.01) < 5 * math.sqrt(2 * 0.01 ** 2 / n.numel())
    # gradient reaches the network through the reparameterized sample: d sum(out^2) / d bias_j
    # = sum_b 2 out_bj * sigma_j * eps_bj, with eps = (out - x) / sigma
    net.zero_grad()
    x = unit(64, 16, seed=3)
    out, log_std = net(x)
    out.pow(2).sum().backward()
    sigma = log_std.exp().detach()
    eps = (out.detach() - x) / sigma
    expected = (2 * out.detach() * sigma * eps).sum(0)
    torch.testing.assert_close(net.net[2].bias.grad, expected, rtol=1e-4, atol=1e-6)
    assert net.net[2].weight.grad.abs().sum() > 0


def test_noise_regularizer_gradient_points_to_target():
    # d KL / d log_std = (-1 + sigma^2 / sigma0^2) / count: pushes up below the target, down above
    log_std = torch.tensor([[math.log(0.01), 0.5 * math.log(0.003), math.log(0.2)]], requires_grad=True)
    gaussian_kl(log_std, 0.003).backward()
    expected = (-1 + torch.exp(2 * log_std.detach()) / 0.003) / 3
    torch.testing.assert_close(log_std.grad, expected)
    assert log_std.grad[0, 0] < 0 and log_std.grad[0, 1].abs() < 1e-6 and log_std.grad[0, 2] > 0


# -- projection memory (DeCap) --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_memory_item_projects_onto_itself(dtype):
    M = unit(300, 64)
    mem = ProjectionMemory(M, temperature=1 / 150, dtype=dtype)
    out = mem.project(M[:40])
    assert out.shape == (40, 64)
    assert (out * M[:40]).sum(-1).min() > 0.999
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(40))  # renormalized (DeCap)


@pytest.mark.parametrize("budget_mb", [1e-6, 4e-4, 3e-3, 100.0])
def test_chunked_projection_equals_dense(budget_mb):
    M, q = unit(97, 12, seed=1), unit(5, 12, seed=2) * 3.0  # queries need not be unit length
    mem = ProjectionMemory(M, temperature=0.05, budget_mb=budget_mb, dtype="float32")
    chunk = mem.chunk_rows(5)
    out = mem.project(q)
    assert mem.stats["chunk_rows"] == chunk and mem.stats["chunks"] == math.ceil(97 / chunk)
    torch.testing.assert_close(out.double(), dense_projection(q, M, 0.05), atol=1e-6, rtol=0)
    mem.top_k = 9
    torch.testing.assert_close(mem.project(q).double(), dense_projection(q, M, 0.05, top_k=9), atol=1e-6, rtol=0)
    mem.top_k = 500  # more than the memory holds: the exact softmax
    torch.testing.assert_close(mem.project(q).double(), dense_projection(q, M, 0.05), atol=1e-6, rtol=0)


def test_chunk_sizes_actually_differ():
    mem = ProjectionMemory(unit(97, 12), dtype="float32")
    sizes = set()
    for budget in (1e-6, 4e-4, 3e-3, 100.0):
        mem.budget_mb = budget
        sizes.add(mem.chunk_rows(5))
    # per row 4 bytes * (4 * 5 queries + 12 dims) = 128 bytes: 1.05 -> 1, 419.4 -> 3, 3145.7 -> 24, all
    assert sizes == {1, 3, 24, 97}


@pytest.mark.parametrize("top_k", [None, 4])
def test_projection_gradients_match_dense(top_k):
    M, q = unit(40, 6, seed=4), unit(3, 6, seed=5, dtype=torch.float64).requires_grad_(True)
    mem = ProjectionMemory(M, temperature=0.1, top_k=top_k, budget_mb=2e-4, dtype="float32")
    assert torch.autograd.gradcheck(lambda x: mem.project(x), (q,))
    w = torch.randn(3, 6, dtype=torch.float64)
    (g1,) = torch.autograd.grad((mem.project(q) * w).sum(), q)
    (g2,) = torch.autograd.grad((dense_projection(q, M.float(), 0.1, top_k) * w).sum(), q)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_leave_one_out_excludes_the_caption_and_its_copies():
    M = unit(60, 10, seed=6)
    M[17] = M[3]  # a duplicate caption
    mem = ProjectionMemory(M, temperature=0.02, budget_mb=1e-3, dtype="float16")
    q = M[[3, 8]] + 0.05 * unit(2, 10, seed=7)  # noised captions 3 and 8
    drop = torch.zeros(2, 60, dtype=torch.bool)
    drop[0, [3, 17]] = True
    drop[1, 8] = True
    expected = dense_projection(q, M, 0.02, drop=drop)
    torch.testing.assert_close(mem.project(q, exclude=M[[3, 8]]).double(), expected, atol=2e-3, rtol=0)
    mem.top_k = 5
    torch.testing.assert_close(mem.project(q, exclude=M[[3, 8]]).double(),
                               dense_projection(q, M, 0.02, top_k=5, drop=drop), atol=2e-3, rtol=0)
    # without exclusion the caption (nearly) reconstructs itself
    mem.top_k = None
    assert (mem.project(q) * M[[3, 8]]).sum(-1).min() > 0.99
    # a memory holding only the caption itself leaves nothing: zero vector, not NaN
    solo = ProjectionMemory(M[3:4], dtype="float32")
    assert torch.equal(solo.project(M[3:4], exclude=M[3:4]), torch.zeros(1, 10))


def test_500k_memory_stays_within_budget():
    m, D, B, budget = 500_000, 64, 8, 4.0
    g = torch.Generator().manual_seed(0)
    mem = ProjectionMemory(torch.randn(m, D, generator=g), temperature=1 / 150, budget_mb=budget,
                           dtype="float16")
    assert mem.embeds.dtype == torch.float16 and mem.embeds.shape == (m, D)
    q = torch.randn(B, D, generator=g)
    out = mem.project(q)
    assert B * m * 4 > budget * 2 ** 20  # a dense similarity matrix would not fit
    assert 1 < mem.stats["chunk_rows"] < m and mem.stats["chunks"] == math.ceil(m / mem.stats["chunk_rows"])
    assert mem.stats["peak_block_bytes"] <= budget * 2 ** 20
    Mf = mem.embeds.float()  # the test's own dense reference (16 MB of logits)
    ref = F.normalize(torch.softmax(F.normalize(q, dim=-1) @ Mf.T * 150, dim=1) @ Mf, dim=-1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k", [None, 8])
def test_backward_and_top_k_stay_within_budget(top_k):
    M, budget = unit(20_000, 32, seed=13), 0.25
    mem = ProjectionMemory(M, temperature=1 / 150, top_k=top_k, budget_mb=budget, dtype="float16")
    q = unit(16, 32, seed=14).requires_grad_(True)
    mem.project(q, exclude=q.detach()).sum().backward()  # the recomputing backward is chunked too
    assert 1 < mem.stats["chunk_rows"] < 20_000
    assert 0 < mem.stats["peak_block_bytes"] <= budget * 2 ** 20
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_memory_save_load_and_fingerprint(toy_backbone, tmp_path):
    texts = ["a cat on a mat", "two dogs in a park", "a red bus", "a plate of food"]
    mem = ProjectionMemory.from_texts(texts, toy_backbone, corpus="toy", temperature=0.02, top_k=3,
                                      dtype="float32")
    torch.testing.assert_close(mem.embeds, toy_backbone.embed_texts(texts))
    path = tmp_path / "m" / "memory.safetensors"
    mem.save(path)
    assert not list(path.parent.glob("*.tmp"))
    back = ProjectionMemory.load(path, fingerprint=toy_backbone.fingerprint())
    assert torch.equal(back.embeds, mem.embeds)
    assert (back.temperature, back.top_k) == (0.02, 3)
    assert back.meta == {"corpus": "toy", "backbone": "toy-0", "num_captions": 4}
    with pytest.raises(CheckpointError, match="toy-0"):
        ProjectionMemory.load(path, fingerprint="other-backbone")
    with pytest.raises(CheckpointError, match="not found"):
        ProjectionMemory.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a memory")
    with pytest.raises(CheckpointError, match="not a pcmnet projection memory"):
        ProjectionMemory.load(tmp_path / "junk.safetensors")


def test_open_memory_precedence(toy_backbone, tmp_path):
    other = ProjectionMemory.from_texts(["a boat at sea", "a snowy mountain"], toy_backbone, corpus="B")
    other.save(tmp_path / "other.safetensors")
    saved = ProjectionMemory.from_texts(["a saved caption"], toy_backbone, corpus="saved")
    saved.save(tmp_path / "ckpt.safetensors")
    cfg = TextOnlyConfig(projection=True, projection_temperature=0.5, projection_top_k=1,
                         memory_budget_mb=2.0, memory_dtype="float32")
    built = open_memory(cfg, toy_backbone, texts=["a cat", "a dog", "a bus"], corpus="A")
    assert built.size == 3 and built.meta["corpus"] == "A" and built.embeds.dtype == torch.float32
    assert (built.temperature, built.top_k, built.budget_mb) == (0.5, 1, 2.0)
    assert open_memory(cfg, toy_backbone, saved=tmp_path / "ckpt.safetensors").meta["corpus"] == "saved"
    cross = dataclass_replace(cfg, memory_path=str(tmp_path / "other.safetensors"))  # cross-domain wins
    assert open_memory(cross, toy_backbone, texts=["a cat"], saved=tmp_path / "ckpt.safetensors").meta["corpus"] == "B"
    with pytest.raises(CheckpointError, match="no projection memory"):
        open_memory(cfg, toy_backbone, saved=tmp_path / "absent.safetensors")


def dataclass_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


# -- projection network (FusionCap) ---------------------------------------------------------------
def test_projection_network_starts_as_decap_and_trains_the_mlp_only():
    M = unit(50, 12, seed=8)
    mem = ProjectionMemory(M, temperature=0.05, dtype="float32")
    net = ProjectionNetwork(mem, dim=12, hidden=20)
    x = unit(4, 12, seed=9)
    torch.testing.assert_close(net(x), mem.project(x))
    assert set(net.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    net(x, exclude=x).sum().backward()
    assert net.mlp[2].weight.grad.abs().sum() > 0


# -- the recipe -----------------------------------------------------------------------------------
def fake_text(B=4, L=6, D=12, seed=0):
    tokens = torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(L)[None] < torch.tensor([6, 3, 1, 4])[:B, None]
    return TextFeatures(embeds=unit(B, D, seed=seed + 1), tokens=tokens, mask=mask)


def fake_image(B=4, N=9, D=12, seed=0):
    pe = torch.randn(B, N, D, generator=torch.Generator().manual_seed(seed))
    return ImageFeatures(embeds=unit(B, D, seed=seed + 2), patches=torch.randn(B, N, 5), patch_embeds=pe)


def test_noise_zero_projection_off_is_the_plain_model(toy_backbone):
    cfg = TextOnlyConfig(noise_variance=0.0)
    text = toy_backbone.encode_text(["a cat on a mat", "two dogs"])
    feats, aux = text_only_features(text, cfg, train=True, noise_variance=0.0)
    assert feats.keys() == {"embeds"} and feats["embeds"] is text.embeds and aux == {}
    image = toy_backbone.encode_image(torch.randn(2, 3, 16, 16))
    feats, aux = text_only_features(image, cfg, train=False, noise_variance=0.0)
    assert feats.keys() == {"embeds"} and feats["embeds"] is image.embeds and aux == {}
    # and through the token builder: the same tokens as the plain model's builder on its features
    torch.manual_seed(0)
    builder = text_only_token_builder(cfg, toy_backbone, width=16).eval()
    plain = VisualTokens(toy_backbone.embed_dim, toy_backbone.patch_dim, toy_backbone.num_patches, 16,
                         use_patches=False, noise_variance=0.0).eval()
    plain.load_state_dict(builder.state_dict())
    plain_feats = {"embeds": image.embeds, "patches": image.patches, "patch_embeds": image.patch_embeds}
    for train in (False, True):  # builder noise is 0: train mode adds nothing either
        a, ma = builder(feats, train)
        b, mb = plain(plain_feats, train)
        assert torch.equal(a, b) and torch.equal(ma, mb)


def test_capdec_noises_training_only():
    torch.manual_seed(0)
    cfg = preset("capdec", local_features=True)
    text = fake_text(B=4, L=6, D=12)
    big = TextFeatures(embeds=unit(20_000, 12), tokens=text.tokens, mask=text.mask)
    feats, _ = text_only_features(big, cfg, True, 0.016)
    n = (feats["embeds"] - big.embeds).double().flatten()
    assert abs(n.var().item() - 0.016) < 5 * math.sqrt(2 * 0.016 ** 2 / n.numel())
    feats, _ = text_only_features(text, cfg, True, 0.016)
    clean = F.normalize(text.tokens, dim=-1)
    assert not torch.allclose(feats["local"], clean)  # noise_on_local
    assert (feats["local"] - clean).abs().max() < 1.0
    assert torch.equal(feats["local_mask"], text.mask)
    off = dataclass_replace(cfg, noise_on_local=False)
    assert torch.equal(text_only_features(text, off, True, 0.016)[0]["local"], clean)
    image = fake_image()
    feats, _ = text_only_features(image, cfg, False, 0.016)
    assert feats["embeds"] is image.embeds
    torch.testing.assert_close(feats["local"], F.normalize(image.patch_embeds, dim=-1))
    assert feats["local_mask"].all() and feats["local_mask"].shape == (4, 9)


def test_decap_projects_at_inference_and_optionally_in_training():
    M = unit(40, 12, seed=11)
    mem = ProjectionMemory(M, temperature=1 / 150, dtype="float32")
    cfg = preset("decap")
    text, image = fake_text(), fake_image()
    feats, _ = text_only_features(text, cfg, True, 0.0, memory=mem)
    assert feats["embeds"] is text.embeds  # DeCap trains on clean caption embeddings
    feats, _ = text_only_features(image, cfg, False, 0.0, memory=mem)
    torch.testing.assert_close(feats["embeds"].double(), dense_projection(image.embeds, M, 1 / 150),
                               atol=1e-4, rtol=0)
    # projection in training: leave-one-out, so a caption in the memory does not return itself
    mem2 = ProjectionMemory(torch.cat([M, text.embeds]), temperature=1 / 150, dtype="float32")
    cfg2 = dataclass_replace(cfg, projection_in_training=True)
    feats, _ = text_only_features(text, cfg2, True, 0.0, memory=mem2)
    torch.testing.assert_close(feats["embeds"].double(), dense_projection(text.embeds, M, 1 / 150),
                               atol=1e-4, rtol=0)


def test_fusioncap_end_to_end_on_toy_backbone(toy_backbone):
    torch.manual_seed(0)
    captions = ["a cat on a mat", "two dogs run in a park", "a red bus on the street",
                "a plate of food", "a man riding a wave", "a snowy mountain"]
    cfg = preset("fusioncap", memory_dtype="float32", noise_net_hidden=16, projection_net_hidden=16)
    mem = open_memory(cfg, toy_backbone, texts=captions)
    model = TextOnly(cfg, toy_backbone.embed_dim, noise_variance=0.003, memory=mem)
    assert set(k.split(".")[0] for k in model.state_dict()) == {"noise_variance", "noise_net", "projection_net"}
    assert float(model.noise_variance) == pytest.approx(0.003)
    reloaded = TextOnly(cfg, toy_backbone.embed_dim, noise_variance=0.016, memory=mem)
    reloaded.load_state_dict(model.state_dict())  # the checkpoint keeps what "auto" measured
    assert float(reloaded.noise_variance) == pytest.approx(0.003)
    builder = text_only_token_builder(cfg, toy_backbone, width=16)

    text = toy_backbone.encode_text(captions[:3])
    feats, aux = model(text, train=True)
    assert set(aux) == {"noise_reg", "proj_align"}
    assert aux["noise_reg"].abs() < 1e-6  # starts at its target (init variance = target)
    local_noise = feats["local"] - F.normalize(text.tokens, dim=-1)  # word features + noise
    assert 0 < local_noise.abs().max() < 7 * math.sqrt(0.003)
    tokens, pad = builder(feats, train=True)
    assert tokens.shape == (3, 1 + toy_backbone.max_len, 16)
    assert torch.equal(pad[:, 1:], ~text.mask)
    (tokens * torch.randn_like(tokens)).sum().add(sum(aux.values())).backward()
    for name, p in model.named_parameters():
        if ".0." not in name:  # first layers sit behind zero-initialised last layers at step 0
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    image = toy_backbone.encode_image(torch.randn(2, 3, 16, 16))
    feats, aux = model(image, train=False)
    assert aux == {}
    torch.testing.assert_close(feats["embeds"], model.projection_net(image.embeds))
    torch.testing.assert_close(feats["local"], F.normalize(image.patch_embeds, dim=-1))
    tokens, pad = builder(feats, train=False)
    assert tokens.shape == (2, 1 + toy_backbone.num_patches, 16) and not pad.any()


def test_projection_alignment_loss_by_hand():
    M = unit(30, 12, seed=12)
    mem = ProjectionMemory(M, temperature=0.05, dtype="float32")
    cfg = TextOnlyConfig(noise_variance=0.0, projection_net=True, projection_net_align=2.0)
    model = TextOnly(cfg, 12, 0.0, mem)
    text = fake_text()
    feats, aux = model(text, train=True)
    expected = 2.0 * (1 - F.cosine_similarity(feats["embeds"], text.embeds)).mean()
    torch.testing.assert_close(aux["proj_align"], expected)
    torch.testing.assert_close(feats["embeds"], mem.project(text.embeds, exclude=text.embeds))


def test_config_validation_and_yaml():
    cfg = from_dict(TextOnlyConfig, {"noise_variance": "auto", "projection_top_k": 32}, prefix="text_only")
    assert cfg.validate().noise_variance == "auto" and cfg.projection_top_k == 32
    for bad, key in [({"noise_variance": "loud"}, "noise_variance"), ({"noise_variance": -0.1}, "noise_variance"),
                     ({"projection_temperature": 0.0}, "projection_temperature"),
                     ({"projection_top_k": 0}, "projection_top_k"), ({"memory_dtype": "int8"}, "memory_dtype"),
                     ({"noise_net": True, "noise_variance": 0.0}, "noise_variance")]:
        with pytest.raises(ConfigError, match=f"text_only.{key}"):
            TextOnlyConfig(**bad).validate()
    with pytest.raises(ConfigError, match="unknown config key 'text_only.noise'"):
        from_dict(TextOnlyConfig, {"noise": 0.1}, prefix="text_only")
    with pytest.raises(ConfigError, match="unknown text-only variant"):
        preset("clipcap")
    assert preset("decap").projection and preset("decap").noise_variance == 0.0
    with pytest.raises(PcmnetError, match="no projection memory was given"):
        TextOnly(preset("decap"), 12, 0.0, memory=None)
