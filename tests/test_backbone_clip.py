"""open_clip and Hugging Face CLIP backbones on tiny random models built here (no downloads).

Every number is checked against the libraries' own forward passes (`encode_image`,
`get_text_features`, ...) or an independent formula (layer norm + projection written out here).
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from pcmnet.backbones.base import load_backbone
from pcmnet.errors import MissingWeightsError, PcmnetError

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from pcmnet.backbones.hfclip import HFCLIPBackbone  # noqa: E402
from pcmnet.backbones.openclip import OpenCLIPBackbone  # noqa: E402

TINY_VIT = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
TEXTS = ["a photo of a cat on a mat", "dog", "two people riding horses on the beach"]
ATOL = 1e-5


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((30 + 7 * i, 41, 3)) * 255).astype(np.uint8)) for i in range(n)]


def _features(out):
    """get_*_features returns a tensor in transformers 4.x and an output object in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def oc_ckpt(tmp_path_factory):
    """A registered tiny open_clip ViT config and a random checkpoint of it (safetensors)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("openclip")
    name = "pcmnet-test-tiny-vit"
    (d / f"{name}.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(d / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "tiny.safetensors")
    return name, d / "tiny.safetensors"


@pytest.fixture(scope="module")
def oc(oc_ckpt):
    name, path = oc_ckpt
    return OpenCLIPBackbone.load(name, str(path)).freeze()


# -- open_clip: image side ----------------------------------------------------------------------------
def test_openclip_image_matches_model_and_formula(oc):
    px = torch.stack([oc.preprocess(im) for im in _images()])
    assert px.shape == (3, 3, 32, 32)
    captured = {}
    hook = oc.model.visual.transformer.register_forward_hook(lambda m, a, out: captured.update(x=out))
    try:
        f = oc.encode_image(px)
    finally:
        hook.remove()
    x = captured["x"]  # [B, 1+N, Dv] transformer output
    assert (oc.embed_dim, oc.patch_dim, oc.num_patches) == (16, 32, 16)
    assert f.embeds.shape == (3, 16) and f.patches.shape == (3, 16, 32) and f.patch_embeds.shape == (3, 16, 16)
    assert torch.allclose(f.embeds.norm(dim=-1), torch.ones(3), atol=1e-6)
    with torch.no_grad():
        ref = oc.model.encode_image(px)
    # the class token through our projection is exactly the model's own image feature
    assert torch.allclose(oc.project_visual(x[:, 0]), ref, atol=ATOL)
    assert torch.allclose(f.embeds, F.normalize(ref, dim=-1), atol=ATOL)
    # P: grid tokens before ln_post; P': layer norm + proj written out by hand
    assert torch.allclose(f.patches, x[:, 1:])
    ln = oc.model.visual.ln_post
    mu, var = x[:, 1:].mean(-1, keepdim=True), x[:, 1:].var(-1, unbiased=False, keepdim=True)
    by_hand = ((x[:, 1:] - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias) @ oc.model.visual.proj
    assert torch.allclose(f.patch_embeds, by_hand, atol=ATOL)


def test_openclip_preprocess_is_the_models_val_transform(oc):
    img = Image.new("RGB", (50, 40), (255, 0, 128))  # constant colour: resize/crop keep it
    px = oc.preprocess(img)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    expect = [(c / 255 - m) / s for c, m, s in zip((255, 0, 128), mean, std)]
    assert px.shape == (3, 32, 32)
    for ch in range(3):
        assert torch.allclose(px[ch], torch.full((32, 32), expect[ch]), atol=1e-4)


@pytest.mark.parametrize("final_ln_after_pool", [False, True])
def test_openclip_avg_pooled_vit(final_ln_after_pool):
    vision = dict(TINY_VIT["vision_cfg"], pool_type="avg", final_ln_after_pool=final_ln_after_pool)
    torch.manual_seed(1)
    model = open_clip.CLIP(16, vision, TINY_VIT["text_cfg"]).eval()
    bb = OpenCLIPBackbone(model, None, None, "avg-test", None).freeze()
    px = torch.randn(2, 3, 32, 32)
    f = bb.encode_image(px)
    with torch.no_grad():
        ref = model.encode_image(px)
    assert torch.allclose(f.embeds, F.normalize(ref, dim=-1), atol=ATOL)
    # without the late layer norm the global token is exactly the mean of P'
    if not final_ln_after_pool:
        assert torch.allclose(f.patch_embeds.mean(1), ref, atol=ATOL)
    else:
        assert torch.allclose(bb.project_visual(f.patches.mean(1)), ref, atol=ATOL)


def test_openclip_modified_resnet_value_path():
    vision = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}
    torch.manual_seed(2)
    model = open_clip.CLIP(16, vision, TINY_VIT["text_cfg"]).eval()
    bb = OpenCLIPBackbone(model, None, None, "rn-test", None).freeze()
    assert (bb.embed_dim, bb.patch_dim, bb.num_patches) == (16, 256, 4)
    px = torch.randn(2, 3, 64, 64)
    f = bb.encode_image(px)
    with torch.no_grad():
        ref = model.encode_image(px)
    assert f.patches.shape == (2, 4, 256) and f.patch_embeds.shape == (2, 4, 16)
    assert torch.allclose(f.embeds, F.normalize(ref, dim=-1), atol=ATOL)
    # with q = k = 0 the attention pool is a plain average over [mean token; patches], so the global
    # embedding is the average of P' and the mean token's value path
    pool = model.visual.attnpool
    with torch.no_grad():
        for lin in (pool.q_proj, pool.k_proj):
            lin.weight.zero_()
            lin.bias.zero_()
        ref = model.encode_image(px)
        f = bb.encode_image(px)
        mean_tok = pool.c_proj(pool.v_proj(f.patches.mean(1) + pool.positional_embedding[0]))
    expect = (mean_tok + f.patch_embeds.sum(1)) / (bb.num_patches + 1)
    assert torch.allclose(ref, expect, atol=ATOL)


def test_openclip_attentional_pooler_is_refused_in_one_line():
    vision = dict(TINY_VIT["vision_cfg"], attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    model = open_clip.CLIP(16, vision, TINY_VIT["text_cfg"])
    with pytest.raises(PcmnetError) as e:
        OpenCLIPBackbone(model, None, None, "coca-like", None)
    assert "attentional" in str(e.value) and "\n" not in str(e.value)


# -- open_clip: text side ---------------------------------------------------------------------------
def test_openclip_text_matches_model(oc):
    tok = oc.tokenize(TEXTS)
    full = oc.tokenizer(TEXTS)  # [3, 77], what model.encode_text takes
    eot = full.argmax(-1)
    L = int(eot.max()) + 1
    assert tok["input_ids"].shape == (3, L) and torch.equal(tok["input_ids"], full[:, :L])
    assert torch.equal(tok["attention_mask"], torch.arange(L)[None] <= eot[:, None])
    f = oc.encode_tokens(**tok)
    with torch.no_grad():
        ref = oc.model.encode_text(full)
    assert f.tokens.shape == (3, L, 16) and f.mask.dtype == torch.bool
    assert torch.allclose(f.embeds, F.normalize(ref, dim=-1), atol=ATOL)
    # argmax pooling: the word-level feature at the EOT is the unnormalized sentence embedding
    assert torch.allclose(f.tokens[torch.arange(3), eot], ref, atol=ATOL)
    # causal tower: a caption's token features do not depend on the batch it is padded in
    alone = oc.encode_text([TEXTS[1]])
    n = int(alone.mask.sum())
    assert torch.allclose(alone.tokens[0, :n], f.tokens[1, :n], atol=ATOL)
    assert torch.allclose(oc.embed_texts(TEXTS, batch_size=2), f.embeds, atol=ATOL)


def test_openclip_soft_inputs_equal_ids_and_carry_gradients(oc):
    tok = oc.tokenize(TEXTS)
    table = oc.token_embedding().weight
    assert table.shape == (49408, 32)
    onehot = F.one_hot(tok["input_ids"], table.shape[0]).float().requires_grad_(True)
    soft = oc.encode_tokens(**tok, inputs_embeds=onehot @ table)
    hard = oc.encode_tokens(**tok)
    assert torch.allclose(soft.tokens, hard.tokens, atol=ATOL)
    assert torch.allclose(soft.embeds, hard.embeds, atol=ATOL)
    soft.embeds[:, 0].sum().backward()
    assert onehot.grad is not None and onehot.grad.abs().sum() > 0


# -- open_clip: loading, identity, errors --------------------------------------------------------------
def test_openclip_spec_roundtrip_and_fingerprint(oc, oc_ckpt, tmp_path):
    name, path = oc_ckpt
    spec = oc.spec()
    assert spec == {"name": "open_clip", "model": name, "pretrained": str(path.resolve())}
    again = load_backbone(spec, device="cpu")
    assert again.fingerprint() == oc.fingerprint() and oc.fingerprint().startswith(f"open_clip:{name}:sha256-")
    px = torch.stack([oc.preprocess(im) for im in _images(2)])
    assert torch.allclose(again.encode_image(px).embeds, oc.encode_image(px).embeds)
    # same bytes under another name -> same fingerprint; other weights -> another one
    copy = tmp_path / "renamed.safetensors"
    shutil.copy(path, copy)
    assert OpenCLIPBackbone.load(name, str(copy)).fingerprint() == oc.fingerprint()
    torch.manual_seed(5)
    other = tmp_path / "other.pt"
    torch.save(open_clip.create_model(name).state_dict(), other)
    assert OpenCLIPBackbone.load(name, str(other)).fingerprint() != oc.fingerprint()
    tagged = OpenCLIPBackbone(oc.model, oc.transform, oc.tokenizer, "ViT-B-32", "laion2b_s34b_b79k")
    assert tagged.fingerprint() == "open_clip:ViT-B-32:laion2b_s34b_b79k"


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Online mode with an empty cache and an endpoint that refuses connections at once: the loaders
    must detect that and fail in one line instead of retrying downloads."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    return constants


def test_openclip_missing_weights_is_one_fast_line(no_hub, tmp_path):
    with pytest.raises(MissingWeightsError) as e:
        OpenCLIPBackbone.load("ViT-B-32", "laion2b_s34b_b79k")
    msg = str(e.value)
    assert "\n" not in msg and "not on this machine" in msg and "backbone.pretrained=" in msg
    assert no_hub.HF_HUB_OFFLINE is False  # offline mode was only forced for the attempt
    with pytest.raises(MissingWeightsError, match="neither a checkpoint file"):
        OpenCLIPBackbone.load("ViT-B-32", str(tmp_path / "missing.pt"))
    with pytest.raises(MissingWeightsError, match="needs a pretrained tag"):
        OpenCLIPBackbone.load("ViT-B-32", None)
    with pytest.raises(PcmnetError, match="unknown open_clip model"):
        OpenCLIPBackbone.load("no-such-model", "x")


def test_openclip_wrong_checkpoint_is_one_line(oc_ckpt, tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, bad)
    with pytest.raises(PcmnetError) as e:
        OpenCLIPBackbone.load(oc_ckpt[0], str(bad))
    assert "\n" not in str(e.value) and "bad.pt" in str(e.value)


# -- Hugging Face CLIP ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """save_pretrained of a tiny random CLIPModel + a byte-level CLIP tokenizer + an image processor."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("hfclip")
    chars = sorted(ByteLevel.alphabet())  # no merges: every word is spelled out in bytes
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(d)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf(hf_dir):
    return HFCLIPBackbone.load(str(hf_dir)).freeze()


def test_hfclip_image_matches_model_and_processor(hf):
    images = _images()
    px = torch.stack([hf.preprocess(im) for im in images])
    assert torch.equal(px, hf.processor(images=images, return_tensors="pt")["pixel_values"])
    f = hf.encode_image(px)
    assert (hf.embed_dim, hf.patch_dim, hf.num_patches) == (16, 32, 16)
    assert f.embeds.shape == (3, 16) and f.patches.shape == (3, 16, 32) and f.patch_embeds.shape == (3, 16, 16)
    m = hf.model
    with torch.no_grad():
        ref = _features(m.get_image_features(pixel_values=px))
        h = m.vision_model(pixel_values=px).last_hidden_state
    assert torch.allclose(f.embeds, F.normalize(ref, dim=-1), atol=ATOL)
    assert torch.allclose(f.patches, h[:, 1:])
    ln = m.vision_model.post_layernorm
    by_hand = m.visual_projection(F.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps))
    assert torch.allclose(by_hand[:, 0], ref, atol=ATOL)  # the CLS token through the same layers
    assert torch.allclose(f.patch_embeds, by_hand[:, 1:], atol=ATOL)


def test_hfclip_text_matches_model(hf):
    tok = hf.tokenize(TEXTS)
    enc = hf.tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(tok["input_ids"], enc["input_ids"])
    assert torch.equal(tok["attention_mask"], enc["attention_mask"].bool())
    f = hf.encode_tokens(**tok)
    with torch.no_grad():
        ref = _features(hf.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    assert torch.allclose(f.embeds, F.normalize(ref, dim=-1), atol=ATOL)
    eos = (enc["input_ids"] == hf.tokenizer.eos_token_id).int().argmax(-1)
    assert torch.equal(eos, enc["attention_mask"].sum(1) - 1)  # mask = tokens up to and including EOS
    assert torch.allclose(f.tokens[torch.arange(3), eos], ref, atol=ATOL)


def test_hfclip_soft_inputs_equal_ids_and_carry_gradients(hf):
    tok = hf.tokenize(TEXTS)
    table = hf.token_embedding().weight
    onehot = F.one_hot(tok["input_ids"], table.shape[0]).float().requires_grad_(True)
    soft = hf.encode_tokens(**tok, inputs_embeds=onehot @ table)
    hard = hf.encode_tokens(**tok)
    assert torch.allclose(soft.tokens, hard.tokens, atol=ATOL)
    assert torch.allclose(soft.embeds, hard.embeds, atol=ATOL)
    soft.embeds[:, 0].sum().backward()
    assert onehot.grad is not None and onehot.grad.abs().sum() > 0
    # the table lookup is back to normal afterwards: other soft inputs give other features
    torch.manual_seed(0)
    shifted = hf.encode_tokens(**tok, inputs_embeds=onehot.detach() @ table + torch.randn(table.shape[1]))
    assert not torch.allclose(shifted.embeds, hard.embeds, atol=1e-3)
    assert torch.allclose(hf.encode_tokens(**tok).embeds, hard.embeds)


def test_hfclip_spec_fingerprint_and_missing(hf, hf_dir, tmp_path, no_hub):
    assert hf.spec() == {"name": "hf-clip", "model": str(hf_dir.resolve())}
    again = load_backbone(hf.spec(), device="cpu")
    assert again.fingerprint() == hf.fingerprint() and hf.fingerprint().startswith("hf-clip:sha256-")
    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy)
    assert HFCLIPBackbone.load(str(copy)).fingerprint() == hf.fingerprint()
    with pytest.raises(MissingWeightsError) as e:
        HFCLIPBackbone.load("openai/clip-vit-base-patch32")
    assert "\n" not in str(e.value) and "not on this machine" in str(e.value)
    assert no_hub.HF_HUB_OFFLINE is False
    with pytest.raises(MissingWeightsError, match="not found"):
        HFCLIPBackbone.load(str(tmp_path / "nowhere"))
