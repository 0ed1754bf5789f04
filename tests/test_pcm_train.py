"""PCM-Net training (`pcmnet train`, mode pcm) end to end with the ToyBackbone.

A tiny COCO-json corpus and a tiny synthetic corpus made by the real `pcmnet synth` code (random
Stable Diffusion-shaped pipeline, manifest format): training, saving, loading (concept bank and
words come back), captioning; PCM on/off and the variants; the CLIP weights that reach the loss
against an independent computation with the backbone; each pair's score computed once (backbone
calls counted); gradients in a full Captioner step; one-line errors.
"""
import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from pcmnet.caption import caption_images
from pcmnet.cli import main as cli_main
from pcmnet.config import ConfigError, from_dict
from pcmnet.data.readers import CorpusConfig, load_corpus
from pcmnet.errors import CheckpointError
from pcmnet.models.captioner import Captioner, CaptionerConfig
from pcmnet.models.concepts import concept_meta, embed_concepts, frequent_nouns, load_concepts, save_concepts
from pcmnet.models.encoder import VisualTokens
from pcmnet.models.pcm import PCMConfig, PCMTokens
from pcmnet.train import trainer
from pcmnet.train.config import TrainConfig
from pcmnet.train.losses import weighted_label_smoothed_ce
from toys import ToyBackbone

OBJECTS = ["dog", "cat", "bus", "horse", "boat", "clock", "tree", "car"]
COLORS = ["red", "blue", "green", "small", "big", "old"]
SYNTH_CAPTIONS = ["a red dog on a beach", "a small cat on a sofa", "a green bus on a street",
                  "a tall man on a hill", "a blue boat on a lake", "an old clock on a wall"]


RGB = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 200, 30), "small": (240, 240, 240),
       "big": (20, 20, 20), "old": (200, 120, 40)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 images x 2 captions (COCO json): 'a <color> <object> near a <object>'. The images are
    noisy solid colours: their toy embeddings point in different directions, so the pairs' CLIP
    cosines have both signs (random-noise images all embed alike)."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "imgs").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, color in enumerate(COLORS):
        arr = np.clip(np.array(RGB[color]) + rng.integers(-40, 40, (30, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / "imgs" / f"img{i}.png")
        images.append({"id": i + 1, "file_name": f"imgs/img{i}.png"})
        for j in range(2):
            anns.append({"image_id": i + 1, "id": 10 * i + j, "caption":
                         f"a {COLORS[(i + j) % 6]} {OBJECTS[(i + 2 * j) % 8]} near a {OBJECTS[(3 * i + j + 1) % 8]}"})
    (d / "caps.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return d


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic corpus in the manifest format, made by `pcmnet.synth.generate` with a tiny random
    diffusion pipeline (32x32 images) and scored inline by ToyBackbone(seed=0)."""
    from pcmnet.backbones.base import BackboneConfig
    from pcmnet.synth.config import SynthConfig
    from pcmnet.synth.generate import generate
    from pcmnet.synth.tiny import build_tiny_pipeline

    d = tmp_path_factory.mktemp("synth")
    build_tiny_pipeline(d / "tiny-sd")
    (d / "caps.txt").write_text("\n".join(SYNTH_CAPTIONS) + "\n")
    cfg = SynthConfig(captions=CorpusConfig(path=str(d / "caps.txt")), model=str(d / "tiny-sd"),
                      out=str(d / "pairs"), steps=2, batch_size=6, device="cpu",
                      backbone=BackboneConfig(name="none"))
    assert generate(cfg, backbone=ToyBackbone().freeze())["generated"] == 6
    return d / "pairs"


def make_cfg(data, out, cache, **sections) -> TrainConfig:
    """A tiny mode-pcm config; `sections` update the defaults one level deep (pcm= sets model.pcm)."""
    cfg = {
        "mode": "pcm",
        "data": {"train": data},
        "model": {"inputs": "pcm", "width": 32, "encoder_layers": 1, "decoder_layers": 1, "heads": 2,
                  "ffn": 64, "dropout": 0.1, "noise_variance": 0.016, "vocab_min_count": 1, "max_len": 12,
                  "concepts_k": 5, "pcm": {"top_k": 3, "replace_m": 4}},
        "loss": {"clip_weight": False},
        "optim": {"lr": 5e-3, "warmup_steps": 5, "batch_size": 4, "epochs": 10},
        "run": {"output_dir": str(out), "seed": 0, "save_every": 0, "log_every": 1,
                "cache_dir": str(cache), "tensorboard": False},
    }
    if "pcm" in sections:
        cfg["model"]["pcm"].update(sections.pop("pcm"))
    for section, values in sections.items():
        cfg[section].update(values)
    return from_dict(TrainConfig, copy.deepcopy(cfg))


def coco(corpus):
    return {"path": str(corpus / "caps.json")}


def manifest(folder):
    return {"path": str(folder), "format": "manifest"}


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def learned(run) -> bool:
    ls = losses(run)
    return sum(ls[-3:]) / 3 < 0.85 * sum(ls[:3]) / 3


class CountingToy(ToyBackbone):
    """ToyBackbone(0) that records what its towers were asked to encode."""

    def __init__(self):
        super().__init__()
        self.texts, self.images = [], 0

    def encode_text(self, texts):
        self.texts += list(texts)
        return super().encode_text(texts)

    def encode_image(self, pixels):
        self.images += len(pixels)
        return super().encode_image(pixels)


def record_batches(monkeypatch) -> list[dict]:
    """Every training batch's captions, cached image embeddings and pair weights, as the loss saw them."""
    seen = []

    class Collate(trainer.Collate):
        def __call__(self, items):
            batch = super().__call__(items)
            batch["captions"] = [c for _, c, _ in items]
            return batch

    def step(model, batch, cfg):
        seen.append({"captions": list(batch["captions"]), "embeds": batch["feats"]["embeds"].clone(),
                     "weights": batch["weights"].clone()})
        return original(model, batch, cfg)

    original = trainer.supervised_step
    monkeypatch.setattr(trainer, "Collate", Collate)
    monkeypatch.setattr(trainer, "supervised_step", step)
    return seen


@torch.no_grad()
def independent_pairs(records, bb) -> list[tuple[torch.Tensor, str, float]]:
    """(g, caption, cos(g, t)) of every pair, straight from the backbone (no cache, no trainer)."""
    out = []
    for r in records:
        g = bb.encode_image(bb.preprocess(Image.open(r.file))[None]).embeds[0]
        for cap in r.captions:
            t = bb.encode_text([cap]).embeds[0]
            out.append((g, cap, F.cosine_similarity(g, t, dim=0).item()))
    return out


def expected_weight(cos: float, alpha: float) -> float:
    return min(max(alpha * max(cos, 0.0), 0.0), 1.0)


def check_weights(seen, pairs, alpha, epochs):
    """Each pair appears once per epoch, with weight clamp(alpha * max(cos, 0), 0, 1)."""
    count = 0
    for b in seen:
        for cap, g, w in zip(b["captions"], b["embeds"], b["weights"].tolist()):
            # the pair: this caption with the image whose independent g the cached g matches
            match = [(gi, c) for gi, ci, c in pairs if ci == cap and torch.allclose(gi, g, atol=1e-5)]
            assert len(match) == 1, cap
            assert w == pytest.approx(expected_weight(match[0][1], alpha), abs=1e-5)
            count += 1
    assert count == epochs * len(pairs)


# ------------------------------------------------------------------------------------------------
# training, saving, loading, captioning


def test_pcm_trains_saves_loads_and_captions(corpus, tmp_path):
    bb = ToyBackbone().freeze()
    final = trainer.train(make_cfg(coco(corpus), tmp_path / "run", tmp_path / "cache"), backbone=bb)
    run = final.parent
    assert learned(run), losses(run)

    # the concept vocabulary: the 5 most frequent nouns of the training captions, built once
    captions = [c for r in load_corpus(corpus / "caps.json") for c in r.captions]
    words, bank, meta = load_concepts(run / "concepts", expect_backbone=bb)
    assert words == frequent_nouns(captions, k=5) and set(words) <= set(OBJECTS)
    assert torch.allclose(bank, embed_concepts(words, bb), atol=1e-6)
    assert meta["source"]["k"] == 5

    # loading: the bank (a buffer in the weights) and the words (config.json) come back
    model = Captioner.from_pretrained(final, backbone=bb)
    assert isinstance(model.tokens, PCMTokens) and model.tokens.concept_proj is not None
    assert torch.allclose(model.tokens.concepts, F.normalize(bank, dim=-1), atol=1e-6)
    assert model.extras["concept_words"] == words and model.extras["train_pairs"] == 12
    assert model.cfg.pcm == PCMConfig(top_k=3, replace_m=4)

    # inference token layout of the loaded model: [global, V, U], U masked unless selected
    files = [r.file for r in load_corpus(corpus / "caps.json")]
    f = bb.encode_image(torch.stack([bb.preprocess(Image.open(p)) for p in files]))
    feats = model.image_inputs({"embeds": f.embeds, "patches": f.patches, "patch_embeds": f.patch_embeds})
    with torch.no_grad():
        memory, pad = model.encode(feats, train=False)
    plan = model.tokens.mix_plan(feats, train=False)
    N = bb.num_patches
    assert memory.shape[1] == 1 + 2 * N and not pad[:, : 1 + N].any()
    assert torch.equal(pad[:, 1 + N:], ~plan.replace)
    assert (plan.replace.sum(1) >= 2).all() and (plan.replace.sum(1) <= 4).all()  # ceil(M/k)..M

    # captioning through the public API, from the model directory
    results = caption_images(files, model=str(final), backbone=bb, beam_size=2)
    assert [r.file for r in results] == files
    vocab = set(model.tokenizer.itos)
    assert all(r.caption and set(r.caption.split()) <= vocab for r in results)


@pytest.mark.parametrize("pcm", [{"enabled": False}, {"variant": "random", "random_fraction": 0.25}],
                         ids=["pcm-off", "random"])
def test_pcm_off_and_random_variant_train(corpus, tmp_path, pcm):
    bb = ToyBackbone().freeze()
    final = trainer.train(make_cfg(coco(corpus), tmp_path / "run", tmp_path / "cache", pcm=pcm), backbone=bb)
    assert learned(final.parent), losses(final.parent)
    model = Captioner.from_pretrained(final, backbone=bb)
    state = model.state_dict()
    if pcm.get("enabled") is False:
        # PCM off: no concept vocabulary is built and the builder is plain global + patch tokens
        assert not (final.parent / "concepts").exists() and "concept_words" not in model.extras
        assert model.tokens.concept_proj is None and "tokens.concepts" not in state
        plain = VisualTokens(bb.embed_dim, bb.patch_dim, bb.num_patches, 32, noise_variance=0.016)
        assert {k for k in state if k.startswith("tokens.")} == {"tokens." + k for k in plain.state_dict()}
    else:
        assert model.cfg.pcm.variant == "random" and model.extras["concept_words"]
        assert "tokens.concepts" in state and "tokens.concept_proj.weight" in state
    caps = caption_images([r.file for r in load_corpus(corpus / "caps.json")], model=model, backbone=bb,
                          beam_size=1)  # (a beam of this barely trained model may prefer the empty caption)
    assert all(r.caption and set(r.caption.split()) <= set(model.tokenizer.itos) for r in caps)


# ------------------------------------------------------------------------------------------------
# CLIP weights


def test_clip_weights_are_the_backbone_cosines(corpus, tmp_path, monkeypatch):
    bb = ToyBackbone().freeze()
    records = load_corpus(corpus / "caps.json")
    pairs = independent_pairs(records, bb)
    cos = [c for _, _, c in pairs]
    # alpha from the data: the largest cosine is clamped to 1, smaller positive ones are not,
    # negative ones give 0 (the toy's cosines are spread around 0)
    alpha = 1.5 / max(cos)
    ws = [expected_weight(c, alpha) for c in cos]
    assert 1.0 in ws and 0.0 in ws and any(0 < w < 1 for w in ws)

    seen = record_batches(monkeypatch)
    cfg = make_cfg(coco(corpus), tmp_path / "run", tmp_path / "cache", optim={"epochs": 2},
                   loss={"clip_weight": True, "clip_alpha": alpha})
    final = trainer.train(cfg, backbone=bb)
    check_weights(seen, pairs, alpha, epochs=2)
    assert Captioner.from_pretrained(final).extras["clip_weighted"] is True

    # clip_weight off: every weight is exactly 1 (plain label smoothing)
    seen.clear()
    trainer.train(make_cfg(coco(corpus), tmp_path / "plain", tmp_path / "cache", optim={"epochs": 1}), backbone=bb)
    assert all(torch.equal(b["weights"], torch.ones(len(b["captions"]))) for b in seen)


def test_pair_scores_are_computed_once(corpus, tmp_path, monkeypatch):
    """The first run computes every g and t once; a second run on the same cache (new output dir,
    concepts from the first) and a resume make no backbone call at all, with the same weights."""
    captions = {c for r in load_corpus(corpus / "caps.json") for c in r.captions}
    seen = record_batches(monkeypatch)
    loss = {"clip_weight": True, "clip_alpha": 2.5}
    first = CountingToy().freeze()
    run_a = trainer.train(make_cfg(coco(corpus), tmp_path / "a", tmp_path / "cache", optim={"epochs": 1},
                                   loss=loss), backbone=first).parent
    assert sorted(t for t in first.texts if t in captions) == sorted(captions)  # each caption once
    assert first.images == 6
    weights_a = sorted(w for b in seen for w in b["weights"].tolist())

    for out, resume in ((tmp_path / "b", False), (run_a, True)):
        seen.clear()
        again = CountingToy().freeze()
        cfg = make_cfg(coco(corpus), out, tmp_path / "cache", optim={"epochs": 1}, loss=loss)
        if not resume:
            cfg.model.concepts = str(run_a / "concepts")
        trainer.train(cfg, backbone=again, resume=resume)
        assert again.texts == [] and again.images == 0
        if not resume:  # (a resume of a finished run has no step left to take)
            assert sorted(w for b in seen for w in b["weights"].tolist()) == pytest.approx(weights_a)


# ------------------------------------------------------------------------------------------------
# a synthetic corpus (manifest format)


def test_synthetic_manifest_corpus(synth, tmp_path, monkeypatch):
    """Pairs scored by the training backbone at synthesis keep that score: no caption is embedded
    again. Scored by another backbone, the scores are recomputed with the training backbone."""
    records = load_corpus(CorpusConfig(**manifest(synth)))
    assert len(records) == 6 and all(r.meta["clip_backbone"] == "toy-0" for r in records)
    pairs = independent_pairs(records, ToyBackbone().freeze())
    alpha = 1.5 / max(c for _, _, c in pairs)
    seen = record_batches(monkeypatch)
    loss = {"clip_weight": True, "clip_alpha": alpha}
    bb = CountingToy().freeze()
    final = trainer.train(make_cfg(manifest(synth), tmp_path / "run", tmp_path / "cache", loss=loss,
                                   optim={"epochs": 3}), backbone=bb)
    assert not set(bb.texts) & set(SYNTH_CAPTIONS)  # only concept prompts went through the text tower
    check_weights(seen, pairs, alpha, epochs=3)

    model = Captioner.from_pretrained(final, backbone=bb)
    assert model.extras["train_corpus"] == str(synth) and model.extras["train_pairs"] == 6
    assert model.extras["concept_words"] == load_concepts(final.parent / "concepts")[0]
    caps = caption_images([r.file for r in records], model=str(final), backbone=bb)
    assert [c.file for c in caps] == [r.file for r in records]
    assert all(c.error is None and set(c.caption.split()) <= set(model.tokenizer.itos) for c in caps)

    # the same pairs scored by another backbone: their stored scores are not used
    from pcmnet.synth.score import score_folder

    other = tmp_path / "rescored"
    shutil.copytree(synth, other)
    score_folder(other, ToyBackbone(seed=1).freeze())
    assert {r.meta["clip_backbone"] for r in load_corpus(CorpusConfig(**manifest(other)))} == {"toy-1"}
    seen.clear()
    bb2 = CountingToy().freeze()
    trainer.train(make_cfg(manifest(other), tmp_path / "run2", tmp_path / "cache", loss=loss,
                           optim={"epochs": 1}), backbone=bb2)
    assert sorted(t for t in bb2.texts if t in SYNTH_CAPTIONS) == sorted(SYNTH_CAPTIONS)
    check_weights(seen, pairs, alpha, epochs=1)


# ------------------------------------------------------------------------------------------------
# gradients in a full Captioner step


@pytest.mark.parametrize("replace_m", [4, 0])
def test_gradients_reach_only_trainable_parts(corpus, replace_m):
    bb = ToyBackbone().freeze()
    records = load_corpus(corpus / "caps.json")
    captions = [c for r in records for c in r.captions]
    words = frequent_nouns(captions, k=5)
    cfg = CaptionerConfig(inputs="pcm", width=32, encoder_layers=1, decoder_layers=1, heads=2, ffn=64,
                          vocab_min_count=1, pcm=PCMConfig(top_k=3, replace_m=replace_m))
    model = Captioner.build(cfg, bb, captions, concepts=embed_concepts(words, bb)).train()
    pixels = torch.stack([bb.preprocess(Image.open(r.file)) for r in records for _ in r.captions])
    f = bb.encode_image(pixels)  # live from the frozen backbone, not from a cache
    feats = {"embeds": f.embeds, "patches": f.patches, "patch_embeds": f.patch_embeds}
    inp, tgt, pad = model.tokenize_captions(captions)
    logits = model(feats, inp, pad)
    loss = weighted_label_smoothed_ce(logits, tgt, torch.linspace(0.2, 1.0, len(captions)), -100)
    loss.backward()

    assert all(p.grad is None for p in bb.parameters())  # the backbone is frozen
    assert not model.tokens.concepts.requires_grad and model.tokens.concepts.grad is None
    assert "tokens.concepts" not in dict(model.named_parameters())
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads and all(g is not None for g in grads.values())
    for name, g in grads.items():
        if name.startswith("tokens.concept_proj."):  # Wt: trained only through replaced patches
            assert (g.abs().sum() > 0) == (replace_m > 0), name
        else:  # Wg, Wv, positions, token types, LayerNorm, encoder, decoder
            assert g.abs().sum() > 0, name
    assert {"tokens.global_proj.weight", "tokens.patch_proj.weight", "tokens.concept_proj.weight"} <= set(grads)
    assert any(n.startswith("encoder.") for n in grads) and any(n.startswith("decoder.") for n in grads)


# ------------------------------------------------------------------------------------------------
# errors


def test_mode_pcm_needs_pcm_inputs(corpus, tmp_path, capsys):
    cfg = make_cfg(coco(corpus), tmp_path / "run", tmp_path / "cache")
    cfg.model.inputs = "global_patches"
    with pytest.raises(ConfigError, match="mode pcm needs model.inputs: pcm") as e:
        trainer.train(cfg, backbone=ToyBackbone().freeze())
    assert "\n" not in str(e.value)
    # through the CLI (checked before any backbone is loaded): exit 2, one line
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"mode": "pcm", "data": {"train": coco(corpus)},
                                    "run": {"output_dir": str(tmp_path / "cli")}}))
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pcmnet train: error:") and "model.inputs" in err


def test_concepts_of_another_backbone_are_refused(corpus, tmp_path):
    other = ToyBackbone(seed=1).freeze()
    words = ["dog", "cat", "bus"]
    save_concepts(tmp_path / "concepts", words, embed_concepts(words, other), concept_meta(other))
    cfg = make_cfg(coco(corpus), tmp_path / "run", tmp_path / "cache")
    cfg.model.concepts = str(tmp_path / "concepts")
    with pytest.raises(CheckpointError, match="concepts.json: concepts were embedded with backbone") as e:
        trainer.train(cfg, backbone=ToyBackbone().freeze())
    assert "\n" not in str(e.value) and "toy-1" in str(e.value)
    cfg.model.concepts = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="missing") as e:
        trainer.train(cfg, backbone=ToyBackbone().freeze())
    assert "\n" not in str(e.value)
