"""Text-only training end to end (METHODS.md section 6, docs/textonly.md): CapDec, DeCap and
FusionCap train from the Python API / CLI path with the toy backbone and caption images; no image
is opened in training; noise 0 + projection off is the plain model bit for bit; `auto` noise and
CLI overrides reach the run; projection memories saved with the model vs referenced by path."""
import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from pcmnet.caption import caption_images
from pcmnet.config import ConfigError, load_config
from pcmnet.data.readers import load_corpus
from pcmnet.errors import CheckpointError, PcmnetError
from pcmnet.models import memory_cli
from pcmnet.models.captioner import MEMORY_FILE, BackboneInfo, Captioner
from pcmnet.models.noise import estimate_noise_variance, gap_pairs
from pcmnet.models.projection import ProjectionMemory
from pcmnet.models.vocab import Vocab
from pcmnet.train import trainer
from pcmnet.train.config import TrainConfig
from toys import ToyBackbone, make_images

TESTS = Path(__file__).resolve().parent
TOY_SCRIPT = TESTS / "scripts" / "train_toy.py"
COLORS = ["red", "blue", "green", "white", "black", "yellow"]
THINGS = ["cat", "dog", "bus", "plate", "kite", "horse"]
PLACES = ["street", "park", "table", "beach"]


def write_coco(path: Path, image_dir: Path, n_images: int, offset: int = 0, seed: int = 0) -> Path:
    """A COCO caption json of n_images toy images (real files) with 4 captions each."""
    paths = make_images(image_dir, n_images, seed=seed)
    images, anns = [], []
    for i, p in enumerate(paths):
        images.append({"id": offset + i + 1, "file_name": p.name})
        for j in range(4):
            k = i + j + offset
            anns.append({"image_id": offset + i + 1, "id": 100 * (offset + i) + j,
                         "caption": f"a {COLORS[k % 6]} {THINGS[(k // 2) % 6]} on the {PLACES[(k + j) % 4]}"})
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Domain A: 8 images x 4 captions (the training corpus: only its captions may be read);
    domain B: another 6 images x 4 captions (cross-domain memory, paired examples)."""
    d = tmp_path_factory.mktemp("textonly")
    a = write_coco(d / "a" / "caps.json", d / "a", 8)
    b = write_coco(d / "b" / "caps.json", d / "b", 6, offset=50, seed=1)
    return {"a": a, "b": b, "cache": d / "cache", "images": sorted((d / "a").glob("img*"))}


VARIANTS = {
    "capdec": {"inputs": "global", "text_only": {"noise_variance": 0.003}},
    "decap": {"inputs": "global", "text_only": {"noise_variance": 0.0, "projection": True,
                                                "memory_dtype": "float32"}},
    "fusioncap": {"inputs": "global_local", "text_only": {
        "noise_variance": 0.003, "noise_net": True, "projection_net": True, "local_features": True,
        "noise_net_hidden": 16, "projection_net_hidden": 16, "max_local": 8, "memory_dtype": "float32"}},
}


def write_config(corpus, out: Path, model: dict, epochs: int = 3, **sections) -> Path:
    cfg = {
        "mode": "text_only",
        "data": {"train": {"path": str(corpus["a"])}},
        "model": {"width": 32, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn": 64,
                  "dropout": 0.1, "vocab_min_count": 1, "max_len": 10, **model},
        "optim": {"lr": 3e-3, "warmup_steps": 4, "batch_size": 8, "epochs": epochs},
        "run": {"output_dir": str(out / "run"), "seed": 0, "save_every": 0, "log_every": 1,
                "cache_dir": str(corpus["cache"]), "tensorboard": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return out / "cfg.yaml"


def run_api(corpus, out: Path, model: dict, overrides=(), backbone=None, **kw) -> Path:
    cfg = load_config(TrainConfig, write_config(corpus, out, model, **kw), list(overrides))
    return trainer.train(cfg, backbone=backbone or ToyBackbone().freeze())


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def caption_texts(data) -> list[str]:
    return [c for r in load_corpus(str(data["a"])) for c in r.captions]


class ImageRead(AssertionError):
    pass


def refuse_images(mp: pytest.MonkeyPatch, reads: list) -> None:
    """Make every way pcmnet opens, decodes, hashes or loads an image fail (and record it)."""
    import PIL.Image

    import pcmnet.data.images as images
    import pcmnet.features.cache as cache

    def refuse(*args, **kwargs):
        reads.append(args[:1])
        raise ImageRead(f"an image was read during text-only training: {args[:1]}")

    mp.setattr(PIL.Image, "open", refuse)
    for module, names in [(images, ("open_image", "load_record_image", "content_hash", "image_loader")),
                          (cache, ("content_hash", "image_loader"))]:
        for name in names:
            mp.setattr(module, name, refuse)


# ------------------------------------------------------------------------------------------------
# every variant trains (no image opened) and captions images


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The three variants trained once on domain A's captions, with images made unreadable."""
    base = tmp_path_factory.mktemp("variants")
    mp, reads = pytest.MonkeyPatch(), []
    refuse_images(mp, reads)
    try:
        dirs = {v: run_api(data, base / v, m) for v, m in VARIANTS.items()}
    finally:
        mp.undo()
    assert reads == []
    return dirs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_without_images_and_captions_them(trained, data, variant):
    final = trained[variant]
    log = read_log(final.parent)
    assert [r["step"] for r in log] == list(range(1, 13))  # 32 captions / batch 8 = 4 steps x 3 epochs
    assert log[-1]["loss"] < log[0]["loss"]
    files = sorted(p.name for p in final.iterdir())
    with_memory = variant != "capdec"
    assert (MEMORY_FILE in files) == with_memory
    m = Captioner.from_pretrained(final, backbone=ToyBackbone())
    assert m.extras["mode"] == "text_only" and m.extras["train_captions"] == 32
    assert "train_images" not in m.extras
    expected_variance = {"capdec": 0.003, "decap": 0.0, "fusioncap": 0.003}[variant]
    assert float(m.text_only.noise_variance) == pytest.approx(expected_variance)
    assert m.image_fields() == (("embeds", "patch_embeds") if variant == "fusioncap" else ("embeds",))
    results = caption_images([str(p) for p in data["images"][:3]], model=final, backbone=ToyBackbone().freeze(),
                             beam_size=2)
    assert [r.error for r in results] == [None] * 3
    assert all(isinstance(r.caption, str) for r in results)
    words = {w for r in results for w in r.caption.split()}
    assert words <= {w for c in caption_texts(data) for w in c.split()}  # decoded from the corpus vocabulary


def test_the_guard_catches_a_real_image_read(data, tmp_path, monkeypatch):
    """The guard used above fires on the code paths that read images (so 'no read' means
    something): a supervised run on the same corpus has to read its images."""
    reads = []
    refuse_images(monkeypatch, reads)
    with pytest.raises(ImageRead):
        run_api(data, tmp_path, {"inputs": "global", "text_only": None}, mode="supervised")
    assert reads


def test_decap_and_fusioncap_project_at_inference(trained):
    g = F.normalize(torch.randn(3, 24, generator=torch.Generator().manual_seed(0)), dim=-1)
    decap = Captioner.from_pretrained(trained["decap"], backbone=ToyBackbone())
    M = decap.text_only.memory.embeds.double()
    dense = F.normalize(torch.softmax(g.double() @ M.T * 150, 1) @ M, dim=-1)
    torch.testing.assert_close(decap.image_inputs({"embeds": g})["embeds"].double(), dense, atol=1e-5, rtol=0)
    fusion = Captioner.from_pretrained(trained["fusioncap"], backbone=ToyBackbone())
    pe = torch.randn(3, 16, 24)
    inputs = fusion.image_inputs({"embeds": g, "patch_embeds": pe})
    torch.testing.assert_close(inputs["embeds"], fusion.text_only.projection_net(g))
    torch.testing.assert_close(inputs["local"], F.normalize(pe, dim=-1))
    # the trained residual MLP moved away from its zero start (it learned text-only)
    assert fusion.text_only.projection_net.mlp[2].weight.abs().sum() > 0


@pytest.mark.slow
def test_capdec_with_a_prefix_lm(data, tmp_path):
    """CapDec's own decoder family: a ClipCap prefix LM (tiny random GPT-2) trained text-only."""
    from test_captioner import word_level_lm_tokenizer

    n = word_level_lm_tokenizer(tmp_path / "tok", caption_texts(data))
    model = {"decoder": "prefix_lm", "prefix_len": 3, "freeze_lm": False, "text_only": {"noise_variance": 0.003},
             "lm_config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": n,
                           "n_positions": 32, "bos_token_id": 0, "eos_token_id": 0,
                           "tokenizer": str(tmp_path / "tok")}}
    final = run_api(data, tmp_path, model, epochs=2)
    log = read_log(tmp_path / "run")
    assert len(log) == 8 and log[-1]["loss"] < log[0]["loss"]
    results = caption_images([str(data["images"][0])], model=final, backbone=ToyBackbone().freeze(),
                             beam_size=2, max_len=6)
    assert results[0].error is None and isinstance(results[0].caption, str)


# ------------------------------------------------------------------------------------------------
# noise 0 + projection off == the plain model


def plain_twin(cfg: TrainConfig, backbone, out: Path) -> Path:
    """Train a plain `global` captioner (no text_only section, no noise) on the text embeddings of
    the same captions, following `trainer.train` step by step (same seed, vocabulary, batches)."""
    from accelerate.utils import set_seed

    model_cfg = dataclasses.replace(cfg.model, text_only=None, noise_variance=0.0)
    pcfg = dataclasses.replace(cfg, mode="supervised", model=model_cfg,
                               run=dataclasses.replace(cfg.run, output_dir=str(out)))
    acc = trainer.make_accelerator(pcfg)
    out, _ = trainer._prepare_run_dir(pcfg, False, acc)
    set_seed(pcfg.run.seed)
    records = load_corpus(cfg.data.train, require_captions=True)
    view, pairs = trainer.text_only_data(cfg, backbone, acc, records)  # the plain model is fed t(c)
    vocab = Vocab.build([p.caption for p in pairs], model_cfg.vocab_min_count, model_cfg.vocab_max_size)
    model = Captioner(model_cfg, BackboneInfo.of(backbone), vocab)
    loader = torch.utils.data.DataLoader(
        trainer.PairDataset(view, pairs), batch_size=pcfg.optim.batch_size,
        sampler=trainer.EpochSampler(len(pairs), pcfg.run.seed), collate_fn=trainer.Collate(vocab, model_cfg.max_len),
        generator=torch.Generator().manual_seed(pcfg.run.seed))
    return trainer.run_loop(pcfg, acc, model, loader, trainer.supervised_step, out, None)


def test_noise_zero_projection_off_is_exactly_the_plain_model(data, tmp_path):
    bb = ToyBackbone().freeze()
    path = write_config(data, tmp_path / "to", {"inputs": "global", "text_only": {"noise_variance": 0.0}})
    cfg = load_config(TrainConfig, path)
    text_only_dir = trainer.train(cfg, backbone=bb)
    plain_dir = plain_twin(cfg, bb, tmp_path / "plain")
    a = Captioner.from_pretrained(text_only_dir, backbone=bb)
    b = Captioner.from_pretrained(plain_dir, backbone=bb)
    assert a.text_only is not None and b.text_only is None
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) - set(sb) == {"text_only.noise_variance"} and set(sb) <= set(sa)
    for k in sb:  # trained bit-identically (dropout on, same seed, same batches)
        assert torch.equal(sa[k], sb[k]), k
    assert [r["loss"] for r in read_log(text_only_dir.parent)] == [r["loss"] for r in read_log(plain_dir.parent)]
    # the same logits for a text embedding, the same inputs and captions for an image embedding
    t = bb.embed_texts(caption_texts(data)[:4])
    tok, _, pad = a.tokenize_captions(caption_texts(data)[:4])
    assert torch.equal(a({"embeds": t}, tok, pad), b({"embeds": t}, tok, pad))
    g = bb.encode_image(torch.randn(2, 3, 16, 16)).embeds
    ia, ib = a.image_inputs({"embeds": g}), b.image_inputs({"embeds": g})
    assert ia.keys() == ib.keys() == {"embeds"} and torch.equal(ia["embeds"], ib["embeds"])
    assert a.generate(ia, beam_size=2) == b.generate(ib, beam_size=2)


def test_decap_trains_exactly_the_no_noise_model(trained, data, tmp_path):
    """DeCap's projection acts at inference only: its training is the no-noise training, weight for
    weight (bench_textonly's DeCap row relies on this)."""
    final = run_api(data, tmp_path, {"inputs": "global", "text_only": {"noise_variance": 0.0}})
    plain = Captioner.from_pretrained(final, backbone=ToyBackbone()).state_dict()
    decap = Captioner.from_pretrained(trained["decap"], backbone=ToyBackbone()).state_dict()
    assert plain.keys() == decap.keys()
    for k in plain:
        assert torch.equal(plain[k], decap[k]), k


# ------------------------------------------------------------------------------------------------
# the noise level: statistics in training, auto, CLI override


def test_injected_noise_statistics_in_training(data, tmp_path, monkeypatch):
    """The embeddings the token builder receives in training are t + n with n of mean 0 and the
    configured variance (here set by a CLI-style override over the file's 0.016)."""
    import pcmnet.models.textonly as textonly

    seen = []
    original = textonly.text_only_features

    def spy(feats, cfg, train, noise_variance, *args, **kwargs):
        out, aux = original(feats, cfg, train, noise_variance, *args, **kwargs)
        if train:
            seen.append((out["embeds"] - feats.embeds).detach().double().flatten())
        return out, aux

    monkeypatch.setattr(textonly, "text_only_features", spy)
    model = {"inputs": "global", "text_only": {"noise_variance": 0.016}}
    final = run_api(data, tmp_path, model, epochs=8, overrides=["model.text_only.noise_variance=0.003"])
    n = torch.cat(seen)
    assert n.numel() == 8 * 32 * 24  # every caption of every epoch, every dimension
    # sample mean / variance of N(0, 0.003) within 5 standard errors
    assert abs(n.mean().item()) < 5 * math.sqrt(0.003 / n.numel())
    assert abs(n.var().item() - 0.003) < 5 * 0.003 * math.sqrt(2 / (n.numel() - 1))
    m = Captioner.from_pretrained(final, backbone=ToyBackbone())
    assert float(m.text_only.noise_variance) == pytest.approx(0.003) and m.extras["noise_variance"] == 0.003


@pytest.mark.slow
def test_cli_override_of_the_noise_level(data, tmp_path):
    """The CLI path (tests/scripts/train_toy.py = `pcmnet train` with the toy backbone)."""
    cfg = write_config(data, tmp_path, {"inputs": "global", "text_only": {"noise_variance": 0.016}}, epochs=1)
    res = subprocess.run([sys.executable, str(TOY_SCRIPT), str(cfg), "model.text_only.noise_variance=0.003"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    final = Path(res.stdout.strip().splitlines()[-1])
    m = Captioner.from_pretrained(final, backbone=ToyBackbone())
    assert float(m.text_only.noise_variance) == pytest.approx(0.003)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["text_only"]["noise_variance"] == 0.003


def test_noise_auto_is_measured_on_data_paired(data, tmp_path):
    bb = ToyBackbone().freeze()
    model = {"inputs": "global", "text_only": {"noise_variance": "auto"}}
    final = run_api(data, tmp_path, model, epochs=1, data={"paired": {"path": str(data["b"])}})
    expected = estimate_noise_variance(*gap_pairs(load_corpus(str(data["b"])), bb))  # reads the images
    assert 0 < expected < 4 / 24  # |g - t|^2 <= 4 over D = 24 dimensions
    m = Captioner.from_pretrained(final, backbone=bb)
    assert m.extras["noise_variance"] == pytest.approx(expected, rel=1e-5)
    assert float(m.text_only.noise_variance) == pytest.approx(expected, rel=1e-5)
    # "auto" without paired examples: one line naming the missing key
    with pytest.raises(ConfigError) as e:
        run_api(data, tmp_path / "no_pairs", model, epochs=1)
    assert "data.paired" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# projection memory: saved with the model vs referenced by path (cross-domain)


def test_memory_saved_with_the_model_is_the_training_captions(trained, data):
    bb = ToyBackbone().freeze()
    m = Captioner.from_pretrained(trained["decap"], backbone=bb)
    want = F.normalize(bb.embed_texts(caption_texts(data)), dim=-1)
    assert m.text_only.memory.size == 32 and m.text_only.memory.meta["corpus"] == str(data["a"])
    torch.testing.assert_close(m.text_only.memory.embeds, want, atol=1e-6, rtol=0)
    assert m.text_only.memory.temperature == pytest.approx(1 / 150)


def test_cross_domain_memory_by_path_and_attached(trained, data, tmp_path):
    bb = ToyBackbone().freeze()
    mem_b = memory_cli.build_memory(load_corpus(str(data["b"])), bb, data["cache"], corpus="B", dtype="float32")
    b_texts = [c for r in load_corpus(str(data["b"])) for c in r.captions]
    torch.testing.assert_close(mem_b.embeds, F.normalize(bb.embed_texts(b_texts), dim=-1), atol=1e-6, rtol=0)
    mem_file = tmp_path / "memory_b.safetensors"
    mem_b.save(mem_file)
    g = F.normalize(torch.randn(3, 24, generator=torch.Generator().manual_seed(1)), dim=-1)
    M = mem_b.embeds.double()
    on_b = F.normalize(torch.softmax(g.double() @ M.T * 150, 1) @ M, dim=-1)

    # 1. trained on A, memory referenced by path (B): not copied into the model
    model = {**VARIANTS["decap"], "text_only": {**VARIANTS["decap"]["text_only"], "memory_path": str(mem_file)}}
    final = run_api(data, tmp_path / "ref", model, epochs=1)
    assert not (final / MEMORY_FILE).exists()
    assert json.loads((final / "config.json").read_text())["model"]["text_only"]["memory_path"] == str(mem_file)
    m = Captioner.from_pretrained(final, backbone=bb)
    assert m.text_only.memory.meta["corpus"] == "B" and m.text_only.memory.size == 24
    torch.testing.assert_close(m.image_inputs({"embeds": g})["embeds"].double(), on_b, atol=1e-5, rtol=0)
    mem_file.rename(tmp_path / "moved.safetensors")  # a referenced memory that is gone: one line
    with pytest.raises(CheckpointError) as e:
        Captioner.from_pretrained(final, backbone=bb)
    assert str(mem_file) in str(e.value) and "\n" not in str(e.value)

    # 2. a model trained with its own memory (A) given B's memory afterwards: a new model directory
    out = memory_cli.attach_memory(trained["decap"], mem_b, tmp_path / "decap_b")
    attached = Captioner.from_pretrained(out, backbone=bb)
    torch.testing.assert_close(attached.image_inputs({"embeds": g})["embeds"].double(), on_b, atol=1e-5, rtol=0)
    assert attached.extras["memory_corpus"] == "B"
    original = Captioner.from_pretrained(trained["decap"], backbone=bb)
    assert original.text_only.memory.size == 32  # the source model is untouched
    for k, v in original.state_dict().items():
        assert torch.equal(v, attached.state_dict()[k]), k
    with pytest.raises(PcmnetError, match="already exists"):
        memory_cli.attach_memory(trained["decap"], mem_b, out)
    with pytest.raises(PcmnetError, match="would not be used"):
        memory_cli.attach_memory(trained["capdec"], mem_b, tmp_path / "capdec_b")

    # 3. a memory from another backbone (another embedding space) is refused, in training and attached
    other = ProjectionMemory.from_texts(b_texts, ToyBackbone(seed=1))
    other.save(tmp_path / "other.safetensors")
    model["text_only"]["memory_path"] = str(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="toy-1"):
        run_api(data, tmp_path / "other_run", model, epochs=1)
    with pytest.raises(CheckpointError, match="toy-1"):
        memory_cli.attach_memory(trained["decap"], other, tmp_path / "decap_other")


def memory_parser():
    parser = argparse.ArgumentParser(prog="pcmnet")
    memory_cli.add_parser(parser.add_subparsers())
    return parser


def test_memory_cli_errors_before_loading_a_backbone(data, tmp_path):
    parser = memory_parser()
    for argv, message in [
        (["memory", "--data", str(tmp_path / "nope.json"), "--out", str(tmp_path / "m.safetensors")], "nope.json"),
        (["memory", "--data", str(data["a"]), "--out", str(tmp_path)], "is a directory"),
        (["memory", "--data", str(data["a"]), "--model", str(tmp_path), "--out", str(tmp_path / "x")],
         "not a pcmnet model directory"),
        (["memory", "--data", str(data["a"]), "--out", str(tmp_path / "m.st"), "--temperature", "0"], "--temperature"),
    ]:
        args = parser.parse_args(argv)
        with pytest.raises(Exception) as e:
            args.func(args)
        assert message in str(e.value) and "\n" not in str(e.value)
        from pcmnet.cli import user_errors

        assert isinstance(e.value, user_errors())


@pytest.mark.slow
def test_memory_cli_with_the_mini_backbone(tmp_path):
    """The real command line on a small text corpus with the offline mini backbone."""
    from pcmnet.backbones.base import load_backbone
    from pcmnet.errors import MissingWeightsError

    try:
        bb = load_backbone("mini", device="cpu")
    except MissingWeightsError as e:
        pytest.skip(f"mini backbone not available: {e}")
    texts = ["a cat sleeping on a sofa", "two people riding horses on a beach", "a plate of pasta"]
    (tmp_path / "caps.txt").write_text("\n".join(texts) + "\n")
    args = memory_parser().parse_args(["memory", "--data", str(tmp_path / "caps.txt"), "--out",
                                       str(tmp_path / "m.safetensors"), "--cache", str(tmp_path / "cache"),
                                       "--no-progress"])
    assert args.func(args) == 0
    mem = ProjectionMemory.load(tmp_path / "m.safetensors", fingerprint=bb.fingerprint())
    assert mem.size == 3 and mem.embeds.dtype == torch.float16 and mem.temperature == pytest.approx(1 / 150)
    torch.testing.assert_close(mem.embeds.float(), F.normalize(bb.embed_texts(texts), dim=-1), atol=2e-3, rtol=0)
    # a memory item projects (nearly) onto itself
    torch.testing.assert_close(mem.project(mem.embeds[:1].float()), mem.embeds[:1].float(), atol=2e-3, rtol=0)
