"""Evaluation jobs as config files (`pcmnet evaluate --config`, pcmnet/evaluate/job.py) and the
shipped PCM-Net training / evaluation configs."""
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_pcm_train import coco, corpus, make_cfg  # noqa: F401 (corpus is a fixture)

from pcmnet.caption import caption_images
from pcmnet.cli import build_parser
from pcmnet.cli import main as cli_main
from pcmnet.config import ConfigError, load_config
from pcmnet.data.readers import load_corpus
from pcmnet.errors import CheckpointError
from pcmnet.evaluate import caption_metrics
from pcmnet.evaluate.job import EvalConfig, resolve, use_concepts
from pcmnet.models.captioner import Captioner
from pcmnet.models.concepts import concept_meta, embed_concepts, save_concepts
from pcmnet.train import trainer
from pcmnet.train.config import TrainConfig
from toys import ToyBackbone

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PUBLISHED = ["mscoco_sd_vitb32_pcmnet", "flickr30k_sd_vitb32_pcmnet", "mscoco_sd_vitl14_pcmnet",
             "flickr30k_sd_vitl14_pcmnet"]


def args_of(*argv) -> Namespace:
    """The Namespace `pcmnet evaluate ARGV` parses to."""
    return build_parser().parse_args(["evaluate", *map(str, argv)])


# ------------------------------------------------------------------------------------------------
# the shipped configs


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_pcmnet_configs(name):
    """Strictly loadable, and every constant is the published one (METHODS.md sections 3-5)."""
    cfg = load_config(TrainConfig, CONFIGS / f"{name}.yaml")
    assert cfg.mode == "pcm" and cfg.model.inputs == "pcm"
    vit = "ViT-B-32-quickgelu" if "vitb32" in name else "ViT-L-14-quickgelu"
    assert (cfg.backbone.name, cfg.backbone.model, cfg.backbone.pretrained) == ("open_clip", vit, "openai")
    assert cfg.data.train.format == "manifest" and cfg.data.train.path.startswith("outputs/synth_")
    assert ("coco" if name.startswith("mscoco") else "flickr30k") in cfg.data.train.path
    m, p = cfg.model, cfg.model.pcm
    assert (m.width, m.encoder_layers, m.decoder_layers, m.heads, m.ffn) == (512, 3, 3, 8, 2048)
    assert (m.max_len, m.beam_size, m.noise_variance, m.concepts, m.concepts_k) == (20, 3, 0.016, None, 400)
    assert (p.enabled, p.variant, p.top_k, p.tau, p.replace_m, p.threshold) == (True, "top", 5, 0.01, 5, 0.0)
    assert (cfg.loss.smoothing, cfg.loss.clip_weight, cfg.loss.clip_alpha, cfg.loss.focal_gamma) == (0.1, True, 2.5, 0)
    o = cfg.optim
    assert (o.lr, o.warmup_steps, o.schedule, o.batch_size, o.epochs, o.weight_decay) == (5e-4, 10000, "noam", 32, 12, 0)
    assert cfg.run.output_dir == f"runs/{name}"


def test_offline_twin_config_is_the_bench_setting():
    """configs/coco_mini_pcmnet.yaml trains what bench/bench_pcm.py's "PCM on, CLIP weight on" row
    trains (the mini backbone, real coco-mini train photos standing in for synthetic ones)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pcm", CONFIGS.parent / "bench" / "bench_pcm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.build_parser().parse_args([])
    args.workdir = Path("unused")
    want = bench.train_config(args, Path("unused"), bench.corpus("train"), True, True, 0, args.epochs)
    cfg = load_config(TrainConfig, CONFIGS / "coco_mini_pcmnet.yaml")
    assert cfg.backbone.name == "mini" and cfg.mode == want.mode == "pcm"
    assert (cfg.model, cfg.loss, cfg.optim) == (want.model, want.loss, want.optim)
    assert cfg.data.train.path.endswith("coco-mini/captions.json") and cfg.data.train.split == "train"


@pytest.mark.parametrize("name,train,test", [("eval_coco_to_flickr30k", "mscoco", "flickr30k"),
                                             ("eval_flickr30k_to_coco", "flickr30k", "coco"),
                                             ("eval_coco", "mscoco", "coco"),
                                             ("eval_flickr30k", "flickr30k", "flickr30k")])
def test_shipped_eval_configs(name, train, test):
    path = CONFIGS / f"{name}.yaml"
    cfg = resolve(args_of("--config", path))
    assert cfg.model == f"runs/{train}_sd_vitb32_pcmnet/model" and cfg.concepts is None
    assert (cfg.data.format, cfg.data.split) == ("karpathy", "test") and test in cfg.data.path
    assert (cfg.generation.beam_size, cfg.generation.max_len) == (3, 20)
    assert (cfg.backbone.model, cfg.backbone.pretrained) == ("ViT-B-32-quickgelu", "openai")
    run = f"runs/{train}_sd_vitb32_pcmnet/eval/{name}"
    assert (cfg.predictions, cfg.output) == (f"{run}.predictions.jsonl", f"{run}.json")
    # the ViT-L/14 model: results follow the model into its own run directory
    other = resolve(args_of("--config", path, "--set", f"model=runs/{train}_sd_vitl14_pcmnet/model"))
    assert other.output == f"runs/{train}_sd_vitl14_pcmnet/eval/{name}.json"
    # the training configs these evaluate exist
    assert (CONFIGS / f"{train}_sd_vitb32_pcmnet.yaml").is_file()


def test_bundled_model_eval_config_writes_outside_the_package():
    cfg = resolve(args_of("--config", CONFIGS / "eval_coco_mini_default.yaml"))
    assert cfg.model == "pcmnet/assets/default_captioner"
    for path in (cfg.predictions, cfg.output):  # an installed package may be read-only
        assert path.startswith("runs/") and "pcmnet/assets" not in path


# ------------------------------------------------------------------------------------------------
# resolving a command line


def test_flags_then_config_then_set_then_flags(tmp_path):
    plain = resolve(args_of("--predictions", "p.jsonl", "--references", "refs.json", "--images", "imgs"))
    assert (plain.predictions, plain.data.path, plain.data.images, plain.model) == ("p.jsonl", "refs.json", "imgs", None)
    assert plain == EvalConfig(predictions="p.jsonl", data=plain.data)  # every other value: the flag defaults
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"predictions": "a.jsonl", "data": {"path": "refs.json", "split": "test"},
                                    "lm": "none", "backbone": {"name": "open_clip", "model": "ViT-B-32"}}))
    cfg = resolve(args_of("--config", path))
    assert (cfg.predictions, cfg.data.split, cfg.lm, cfg.backbone.model, cfg.output) == \
        ("a.jsonl", "test", "none", "ViT-B-32", None)
    cfg = resolve(args_of("--config", path, "--set", "lm=auto", "--set", "generation.beam_size=5",
                          "--no-spice", "--output", "m.json", "--backbone-pretrained", "openai"))
    assert (cfg.lm, cfg.generation.beam_size, cfg.no_spice, cfg.output, cfg.backbone.pretrained) == \
        ("auto", 5, True, "m.json", "openai")
    # a flag given at its default value still overrides the file; another backbone kind drops
    # the file's model name
    cfg = resolve(args_of("--config", path, "--lm", "auto", "--backbone", "mini", "--ref-weight", "2.5"))
    assert (cfg.lm, cfg.backbone.name, cfg.backbone.model, cfg.ref_weight) == ("auto", "mini", None, 2.5)
    assert resolve(args_of("--config", path)).no_spice is False  # an unset switch leaves the file alone


@pytest.mark.parametrize("content,overrides,message", [
    ({"predictions": "p.jsonl"}, [], "no references: set data.path"),
    ({"data": {"path": "r.json"}}, [], "no predictions file"),
    ({"data": {"path": "r.json"}, "predictions": "p.jsonl", "concepts": "c/"}, [], "concepts is set but model is not"),
    ({"data": {"path": "r.json"}, "predictions": "p.jsonl"}, ["generation.beam=3"], "generation.beam"),
    ({"data": {"path": "r.json"}, "predicitons": "p.jsonl"}, [], "predicitons"),
])
def test_bad_jobs_are_one_line_errors(tmp_path, capsys, content, overrides, message):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(content))
    argv = ["evaluate", "--config", str(path)] + [a for o in overrides for a in ("--set", o)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("pcmnet evaluate: error:")


def test_without_config_predictions_and_references_are_required(capsys):
    assert cli_main(["evaluate", "--references", "refs.json"]) == 2
    assert "--predictions" in capsys.readouterr().err
    assert cli_main(["evaluate", "--predictions", "p.jsonl", "--references", "r.json", "--set", "lm=none"]) == 2
    assert "without one, use the flags" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# captioning + scoring end to end (toy backbone)


@pytest.fixture(scope="module")
def pcm_model(corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("pcm")
    torch.set_num_threads(1)
    return trainer.train(make_cfg(coco(corpus), out / "run", out / "cache"), backbone=ToyBackbone().freeze())


def test_config_captions_then_scores(corpus, pcm_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    bb = ToyBackbone().freeze()
    monkeypatch.setattr("pcmnet.backbones.base.load_backbone", lambda spec=None, device=None: bb)
    path = tmp_path / "eval_toy.yaml"
    path.write_text(yaml.safe_dump({"model": str(pcm_model), "data": coco(corpus),
                                    "generation": {"beam_size": 1, "max_len": 8}, "lm": "none", "no_spice": True}))
    assert cli_main(["evaluate", "--config", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    run = pcm_model.parent / "eval"
    result = json.loads((run / "eval_toy.json").read_text())
    assert "CLIP-S" in out and "toy-0" in out and f"wrote {run / 'eval_toy.json'}" in out
    assert result["counts"]["evaluated"] == 6 and result["inputs"]["model"] == str(pcm_model)
    assert result["inputs"]["generation"]["beam_size"] == 1 and result["inputs"]["concepts"] is None

    # the predictions are the model's captions with these settings, and the numbers are theirs
    rows = [json.loads(line) for line in (run / "eval_toy.predictions.jsonl").read_text().splitlines()]
    records = load_corpus(corpus / "caps.json")
    direct = caption_images([r.file for r in records], model=str(pcm_model), backbone=bb, beam_size=1, max_len=8)
    assert [r["caption"] for r in rows] == [d.caption for d in direct]
    refs = {r.image_id: r.captions for r in records}
    want = caption_metrics({r["image_id"]: r["caption"] for r in rows}, refs, metrics=("BLEU", "CIDEr-D"))
    assert result["metrics"]["CIDEr-D"] == pytest.approx(want["CIDEr-D"], rel=1e-12)
    assert result["metrics"]["BLEU-4"] == pytest.approx(want["BLEU-4"], rel=1e-12)


def test_concepts_of_another_domain(corpus, pcm_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    """By default a model keeps its training domain's vocabulary; `concepts:` swaps in another
    (any K, same backbone) for the captioning step only."""
    bb = ToyBackbone().freeze()
    model = Captioner.from_pretrained(pcm_model, backbone=bb)
    own = model.tokens.concepts.clone()
    words = ["lamp", "giraffe", "pizza", "kite", "bench", "train", "sheep"]  # K=7, not the model's 5
    save_concepts(tmp_path / "other", words, embed_concepts(words, bb), concept_meta(bb))
    assert use_concepts(model, tmp_path / "other", bb) == words
    assert model.tokens.concepts.shape == (7, bb.embed_dim) and model.extras["concept_words"] == words
    assert torch.allclose(model.tokens.concepts, F.normalize(embed_concepts(words, bb), dim=-1), atol=1e-6)
    files = [r.file for r in load_corpus(corpus / "caps.json")]
    swapped = caption_images(files, model=model, backbone=bb, beam_size=1)
    plan = model.tokens.mix_plan(_feats(bb, files), train=False)
    assert int(plan.concept_ids.max()) < 7 and not torch.equal(own, model.tokens.concepts[:5])

    # through the job: the same captions; the saved model itself is untouched
    monkeypatch.setattr("pcmnet.backbones.base.load_backbone", lambda spec=None, device=None: bb)
    path = tmp_path / "cross.yaml"
    path.write_text(yaml.safe_dump({"model": str(pcm_model), "data": coco(corpus), "concepts": str(tmp_path / "other"),
                                    "predictions": str(tmp_path / "p.jsonl"), "generation": {"beam_size": 1},
                                    "lm": "none", "no_spice": True, "no_clip": True}))
    assert cli_main(["evaluate", "--config", str(path)]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == [s.caption for s in swapped]
    assert torch.equal(Captioner.from_pretrained(pcm_model).tokens.concepts, own)

    # concepts of another backbone, or a model without PCM: one-line errors
    other = ToyBackbone(seed=1).freeze()
    save_concepts(tmp_path / "toy1", words, embed_concepts(words, other), concept_meta(other))
    with pytest.raises(CheckpointError, match="concepts were embedded with backbone") as e:
        use_concepts(model, tmp_path / "toy1", bb)
    assert "\n" not in str(e.value)
    model.tokens.concepts = None  # as a model with PCM off has
    with pytest.raises(ConfigError, match="no PCM concept vocabulary"):
        use_concepts(model, tmp_path / "other", bb)


def _feats(bb, files):
    from PIL import Image

    f = bb.encode_image(torch.stack([bb.preprocess(Image.open(p)) for p in files]))
    return {"embeds": f.embeds, "patches": f.patches, "patch_embeds": f.patch_embeds}
