"""An evaluation job as a config file: `pcmnet evaluate --config FILE [--set KEY=VALUE ...]`.

    model -> caption the images of `data` -> predictions file -> score against `data`'s captions

One YAML names everything an evaluation needs (configs/eval_*.yaml): the trained model, the test
split (references and images, any corpus pcmnet reads), where the captions and the numbers go,
the generation settings and the scoring options. Cross-domain evaluation (METHODS.md section 8)
is a config whose model was trained on domain A and whose `data` is domain B's test split; the
model keeps everything it learned from A, including a PCM model's concept vocabulary, unless
`concepts` names another one (e.g. built from B's captions with `pcmnet concepts`).

Without `model` the job scores an existing predictions file. Command-line flags of `pcmnet
evaluate` that differ from their defaults override the file (as `pcmnet synth` does), and so does
`--set KEY=VALUE`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..backbones.base import BackboneConfig
from ..config import ConfigError, from_dict, load_config, to_dict
from ..data.readers import CorpusConfig

log = logging.getLogger("pcmnet")


@dataclass
class GenerationConfig:
    """Decoding settings of the captioning step; null keeps the model's own (beam 3, max len 20
    for PCM-Net)."""

    beam_size: int | None = None
    max_len: int | None = None
    length_penalty: float | None = None
    no_repeat_ngram: int | None = None


@dataclass
class EvalConfig:
    """One evaluation (the keys of configs/eval_*.yaml). The scoring keys are `pcmnet evaluate`'s
    flags (docs/evaluation.md); their defaults are the flags' defaults.

    model:        trained model directory; set: its captions of `data`'s images are written to
                  `predictions` first; null: `predictions` is scored as it is
    data:         the test split: reference captions and images (`references`, `--images`,
                  `--split`, `--split-file` on the command line)
    predictions:  captions file (.jsonl, .json COCO results, .csv, .tsv; written when `model` is set).
                  Empty with a model: <model>/../eval/<config name>.predictions.jsonl (the run dir)
    output:       JSON file for every number and its metadata. null with a model (config file):
                  <model>/../eval/<config name>.json
    concepts:     PCM models: a concept directory (`pcmnet concepts`) replacing the model's own
                  vocabulary, which comes from its training domain (METHODS.md 8); null keeps it
    generation:   decoding settings of the captioning step
    backbone:     backbone of CLIP-S, RefCLIP-S and retrieval (ViT-B/32 for comparable numbers)
    device:       cpu, cuda, ... for captioning, the scoring backbone and the LM
    """

    model: str | None = None
    data: CorpusConfig = field(default_factory=CorpusConfig)
    predictions: str = ""
    output: str | None = None
    concepts: str | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch_size: int = 32
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    device: str | None = None
    no_clip: bool = False
    clip_prefix: str = "A photo depicts"
    ref_weight: float = 2.5
    lm: str = "auto"
    max_length: int | None = None
    no_spice: bool = False


# flag dest of `pcmnet evaluate` -> dotted key of EvalConfig
FLAG_KEYS = {
    "predictions": "predictions", "references": "data.path", "images": "data.images",
    "split": "data.split", "split_file": "data.split_file", "output": "output",
    "backbone": "backbone.name", "backbone_model": "backbone.model",
    "backbone_pretrained": "backbone.pretrained", "device": "device", "no_clip": "no_clip",
    "clip_prefix": "clip_prefix", "ref_weight": "ref_weight", "lm": "lm", "max_length": "max_length",
    "no_spice": "no_spice", "batch_size": "batch_size",
}


def _put(d: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        d = d[part]
    d[last] = value


def resolve(args) -> EvalConfig:
    """The job of a `pcmnet evaluate` command line: the defaults, then `--config` FILE, then
    `--set` overrides, then every flag given (the flags have no defaults of their own, so a flag
    given at the default value still overrides the file; switches only when set)."""
    config = getattr(args, "config", None)
    if getattr(args, "set", None) and not config:
        raise ConfigError("--set overrides keys of a --config file; without one, use the flags")
    cfg = load_config(EvalConfig, config, getattr(args, "set", None) or []) if config else EvalConfig()
    data = to_dict(cfg)
    if getattr(args, "backbone", None) not in (None, data["backbone"]["name"]):
        # another kind of backbone: the file's model name / tag belong to the file's kind
        data["backbone"].update(model=None, pretrained=None)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None and value is not False:
            _put(data, key, value)
    cfg = from_dict(EvalConfig, data)
    where = f"{config}: " if config else ""
    if cfg.model and config:  # results go next to the model, named after the config
        name, folder = Path(config).stem, Path(cfg.model).parent / "eval"
        cfg.predictions = cfg.predictions or str(folder / f"{name}.predictions.jsonl")
        cfg.output = cfg.output or str(folder / f"{name}.json")
    if not cfg.data.path:
        raise ConfigError(f"{where}no references: set data.path (or --references CORPUS)")
    if not cfg.predictions:
        raise ConfigError(f"{where}no predictions file: set predictions (or --predictions FILE)")
    if cfg.concepts and not cfg.model:
        raise ConfigError(f"{where}concepts is set but model is not (the concept vocabulary is used "
                          "when captioning with a model)")
    return cfg


def use_concepts(model, path: str | Path, backbone) -> list[str]:
    """Replace a PCM model's concept vocabulary by the one in `path` (embedded by the model's
    backbone; any number of words: the concept projection Wt acts on each embedding). Returns the
    words."""
    import torch.nn.functional as F

    from ..models.concepts import load_concepts

    tokens = getattr(model, "tokens", None)
    if getattr(tokens, "concepts", None) is None:
        raise ConfigError(f"concepts={path}: this model has no PCM concept vocabulary "
                          "(only PCM-Net models with pcm.enabled use one)")
    words, bank, _ = load_concepts(path, expect_backbone=backbone)
    tokens.concepts = F.normalize(bank.float(), dim=-1).to(tokens.concepts.device)
    model.extras["concept_words"] = words
    return words


def caption_data(cfg: EvalConfig, progress: bool = True) -> Path:
    """Caption every image of `cfg.data` with `cfg.model` into `cfg.predictions` (atomic write);
    returns its path. Unreadable images are reported and left out (the scoring step then counts
    them as reference images without a prediction)."""
    from ..caption import caption_records, load_captioner, output_format, render, write_atomic
    from ..data.readers import load_corpus
    from ..errors import PcmnetError

    out = Path(cfg.predictions)
    fmt = output_format(out)
    records = [r for r in load_corpus(cfg.data, require_captions=True) if r.captions]
    model, backbone = load_captioner(cfg.model, device=cfg.device)
    if cfg.concepts:
        words = use_concepts(model, cfg.concepts, backbone)
        log.info("concept vocabulary: %d words from %s instead of the model's own", len(words), cfg.concepts)
    gen = {k: v for k, v in to_dict(cfg.generation).items() if v is not None}
    results = list(caption_records(records, model, backbone, cfg.batch_size, progress=progress, **gen))
    bad = [r for r in results if r.caption is None]
    if len(bad) == len(results):
        raise PcmnetError(f"{cfg.data.path}: no image could be captioned (first: {bad[0].file}: {bad[0].error})")
    for r in bad[:5]:
        log.warning("%s: not captioned (%s)", r.file, r.error)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, render(results, fmt))
    log.info("captioned %d images of %s with %s -> %s", len(results) - len(bad), cfg.data.path, cfg.model, out)
    return out
