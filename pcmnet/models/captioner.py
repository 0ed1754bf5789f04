"""The captioner: token builder -> visual-semantic encoder -> sentence decoder (METHODS.md 3-4),
or g -> prefix -> causal LM (ClipCap), with batched beam search and a self-contained directory
format:

    model_dir/
      config.json        captioner config, backbone spec + fingerprint + dims, training info
      model.safetensors  weights (no pickle); a frozen pretrained LM is referenced, not copied
      vocab.json         word vocabulary (transformer decoder), or tokenizer/ (prefix LM)

A captioner only works on features of the backbone it was trained with: `from_pretrained(dir,
backbone=bb)` refuses another backbone with a one-line `CheckpointError`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from ..backbones.base import ImageFeatures, TextFeatures
from ..config import ConfigError, from_dict, to_dict
from ..errors import CheckpointError
from .decoder import TransformerCaptionDecoder
from .encoder import VisualSemanticEncoder, VisualTokens
from .pcm import PCMConfig, PCMTokens
from .projection import ProjectionMemory
from .textonly import TextOnly, TextOnlyConfig, text_only_token_builder
from .search import beam_search, sample
from .vocab import Vocab

INPUTS = ("global", "global_patches", "global_local", "pcm")
IGNORE_INDEX = -100


def caption_batch(tokenizer, captions: list[str], max_len: int, ignore_index: int = IGNORE_INDEX,
                  device=None):
    """Captions -> (inputs [B,t] starting with bos, targets [B,t] = inputs shifted by one with
    `ignore_index` past the eos, input pad mask [B,t]). Padding never becomes a target, even for LM
    tokenizers whose pad id is their eos id."""
    seqs = [tokenizer.encode(c, max_len) for c in captions]
    T = max(len(s) for s in seqs) - 1
    inp = torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long)
    tgt = torch.full((len(seqs), T), ignore_index, dtype=torch.long)
    for i, s in enumerate(seqs):
        inp[i, : len(s) - 1] = torch.tensor(s[:-1])
        tgt[i, : len(s) - 1] = torch.tensor(s[1:])
    return inp.to(device), tgt.to(device), (tgt == ignore_index).to(device)


def _tied_names(state: dict) -> set[str]:
    """Names whose tensor is the very same memory as an earlier name's (tied weights, e.g. a causal
    LM's lm_head and input embedding). safetensors refuses aliased tensors, so each is saved once;
    loading the first name fills the others, as the model ties them at construction."""
    seen, tied = set(), set()
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key in seen:
            tied.add(k)
        seen.add(key)
    return tied


@dataclass
class CaptionerConfig:
    """Model architecture and generation defaults (the `model:` section of a config).

    inputs: which tokens the encoder sees: "global" (g only), "global_patches" (g + patch tokens P),
            "global_local" (g + joint-space local tokens: word features in text-only training,
            projected patches P' at inference), "pcm" (PCM-Net token builder, models/pcm.py).
    decoder: "transformer" (word vocabulary) or "prefix_lm" (ClipCap: prefix + causal LM).
    noise_variance: Gaussian noise added to g before the global token, in training only (text-only
            models take their noise from `text_only` instead).
    pcm: PCM settings (inputs "pcm"); concepts: a concept directory from `pcmnet concepts` (None:
            the trainer builds the `concepts_k` most frequent nouns of the training captions).
    text_only: set for a text-only model (trained on caption embeddings, applied to images):
            noise injection, projection memory and the FusionCap pieces (models/textonly.py).
    """

    decoder: str = "transformer"
    inputs: str = "global_patches"
    width: int = 512
    encoder_layers: int = 3
    decoder_layers: int = 3
    heads: int = 8
    ffn: int = 2048
    dropout: float = 0.1
    max_len: int = 20
    max_local: int = 32
    noise_variance: float = 0.016
    vocab_min_count: int = 5
    vocab_max_size: int = 10000
    # prefix LM decoder (ClipCap)
    lm: str = "gpt2"
    lm_config: dict | None = None  # build a random LM from this config instead (tests)
    prefix_len: int = 10
    mapper: str = "mlp"
    mapper_layers: int = 2
    freeze_lm: bool = True
    # PCM-Net (inputs: pcm)
    pcm: PCMConfig = field(default_factory=PCMConfig)
    concepts: str | None = None
    concepts_k: int = 400
    # text-only models (CapDec / DeCap / FusionCap)
    text_only: TextOnlyConfig | None = None
    # generation defaults
    beam_size: int = 3
    length_penalty: float = 0.0
    no_repeat_ngram: int = 0


@dataclass
class BackboneInfo:
    """What a captioner needs to know about its backbone (recorded in config.json)."""

    spec: dict = field(default_factory=dict)
    fingerprint: str = ""
    embed_dim: int = 0
    patch_dim: int = 0
    num_patches: int = 0

    @classmethod
    def of(cls, backbone) -> "BackboneInfo":
        return cls(spec=backbone.spec(), fingerprint=backbone.fingerprint(), embed_dim=backbone.embed_dim,
                   patch_dim=backbone.patch_dim, num_patches=backbone.num_patches)


def read_model_config(model_dir: str | Path) -> dict:
    """A pcmnet model directory's config.json (model, backbone, extras), or a one-line
    CheckpointError when the directory is something else (e.g. a Hugging Face model folder)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: not a pcmnet model directory (no config.json)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # not json, or not UTF-8
        meta = None
    if not (isinstance(meta, dict) and isinstance(meta.get("model"), dict)
            and isinstance(meta.get("backbone"), dict) and "spec" in meta["backbone"]):
        raise CheckpointError(f"{model_dir}: not a pcmnet model directory (its config.json has no "
                              "pcmnet 'model' and 'backbone' sections)")
    return meta


class Captioner(nn.Module):
    """extras: json-able training information saved with the model (mode, corpus, counts, the
    concept words, ...). concepts: the concept bank C [K,D] of a PCM model (None when loading: the
    state dict restores it). memory / noise_variance: a text-only model's projection memory and
    resolved noise level (None when loading)."""

    def __init__(self, cfg: CaptionerConfig, backbone: BackboneInfo, tokenizer, lm: nn.Module | None = None,
                 extras: dict | None = None, concepts: torch.Tensor | None = None,
                 memory: ProjectionMemory | None = None, noise_variance: float | None = None):
        super().__init__()
        if cfg.inputs not in INPUTS:
            raise ValueError(f"unknown model.inputs '{cfg.inputs}' (one of: {', '.join(INPUTS)})")
        self.cfg = cfg
        self.backbone_info = backbone
        self.tokenizer = tokenizer
        self.extras = dict(extras or {})
        D, Dv, N = backbone.embed_dim, backbone.patch_dim, backbone.num_patches
        self.text_only = None
        if cfg.text_only is not None:
            want = "global_local" if cfg.text_only.local_features else "global"
            if cfg.decoder == "transformer" and cfg.inputs != want:
                raise ConfigError(f"model.inputs must be '{want}' for a text-only model with "
                                  f"text_only.local_features={cfg.text_only.local_features}")
            if cfg.decoder == "prefix_lm" and cfg.text_only.local_features:
                raise ConfigError("text_only.local_features needs model.decoder=transformer")
            self.text_only = TextOnly(cfg.text_only, D, noise_variance or 0.0, memory)
        if cfg.decoder == "transformer":
            if self.text_only is not None:
                self.tokens = text_only_token_builder(cfg.text_only, backbone, cfg.width, cfg.dropout)
            elif cfg.inputs == "pcm":
                if concepts is None:  # loading: the state dict fills the bank in
                    concepts = torch.zeros(len(self.extras.get("concept_words", [])) or 1, D)
                self.tokens = PCMTokens(cfg.pcm, concepts, D, Dv, N, cfg.width,
                                        noise_variance=cfg.noise_variance, dropout=cfg.dropout)
            else:
                # global_local: room for every patch token P' at inference (never drop patches)
                max_local = max(cfg.max_local, N) if cfg.inputs == "global_local" else cfg.max_local
                self.tokens = VisualTokens(D, Dv, N, cfg.width, use_patches=cfg.inputs == "global_patches",
                                           use_local=cfg.inputs == "global_local", max_local=max_local,
                                           noise_variance=cfg.noise_variance, dropout=cfg.dropout)
            self.encoder = VisualSemanticEncoder(cfg.width, cfg.encoder_layers, cfg.heads, cfg.ffn, cfg.dropout)
            self.decoder = TransformerCaptionDecoder(len(tokenizer), cfg.width, cfg.decoder_layers, cfg.heads,
                                                     cfg.ffn, cfg.dropout, cfg.max_len, tokenizer.pad_id)
        elif cfg.decoder == "prefix_lm":
            from .prefix_lm import PrefixLMDecoder

            if lm is None:
                raise ValueError("a prefix_lm captioner needs its causal LM")
            self.decoder = PrefixLMDecoder(lm, D, cfg.prefix_len, cfg.mapper, cfg.mapper_layers, cfg.freeze_lm)
        else:
            raise ValueError(f"unknown model.decoder '{cfg.decoder}' (transformer or prefix_lm)")

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, cfg: CaptionerConfig, backbone, captions: list[str] | None = None, extras=None, **parts):
        """A fresh captioner for `backbone` (a Backbone or BackboneInfo); the word vocabulary is
        built from `captions` (the training corpus). parts: concepts / memory / noise_variance."""
        info = backbone if isinstance(backbone, BackboneInfo) else BackboneInfo.of(backbone)
        lm = None
        if cfg.decoder == "prefix_lm":
            from .prefix_lm import build_lm

            lm, tokenizer = build_lm(cfg.lm, cfg.lm_config)
        else:
            if not captions:
                raise ValueError("building a word vocabulary needs the training captions")
            tokenizer = Vocab.build(captions, cfg.vocab_min_count, cfg.vocab_max_size)
        return cls(cfg, info, tokenizer, lm=lm, extras=extras, **parts)

    # ------------------------------------------------------------------ forward
    def image_fields(self) -> tuple[str, ...]:
        """The backbone image features this model reads (what the feature cache must hold)."""
        if self.text_only is not None:
            return ("embeds", "patch_embeds") if self.cfg.text_only.local_features else ("embeds",)
        if self.cfg.decoder == "prefix_lm":
            return ("embeds",)  # the prefix is mapped from g alone, whatever `inputs` says
        return {"global": ("embeds",), "global_patches": ("embeds", "patches"),
                "global_local": ("embeds", "patch_embeds"),
                "pcm": ("embeds", "patches", "patch_embeds")}[self.cfg.inputs]

    def text_fields(self) -> tuple[str, ...]:
        """The cached text features a text-only model trains on."""
        return ("embeds", "tokens", "mask") if self.cfg.text_only.local_features else ("embeds",)

    def image_inputs(self, image_feats: dict) -> dict:
        """Backbone image features -> the `feats` dict `encode` takes at inference. Text-only models
        move the image into the text region of the space here (projection, local patch tokens)."""
        if self.text_only is None:
            return {k: image_feats[k] for k in self.image_fields()}
        g = image_feats["embeds"]
        if self.text_only.memory is not None:
            self.text_only.memory.to(g.device)
        feats, _ = self.text_only(ImageFeatures(embeds=g, patches=None,
                                                patch_embeds=image_feats.get("patch_embeds")), train=False)
        return feats

    def train_inputs(self, feats: dict) -> tuple[dict, dict]:
        """Training features -> (`feats` for `encode`, weighted auxiliary losses). Text-only models
        get their caption's text features here and apply noise / projection / local tokens."""
        if self.text_only is None:
            return feats, {}
        text = TextFeatures(embeds=feats["embeds"], tokens=feats.get("tokens"), mask=feats.get("mask"))
        if self.text_only.memory is not None:
            self.text_only.memory.to(text.embeds.device)
        return self.text_only(text, train=True)

    def encode(self, feats: dict, train: bool | None = None):
        """Features -> what the decoder attends to: (memory, pad_mask) or the LM prefix."""
        train = self.training if train is None else train
        if self.cfg.decoder == "prefix_lm":
            g = feats["embeds"]
            if train and self.cfg.noise_variance > 0 and self.text_only is None:
                g = g + torch.randn_like(g) * self.cfg.noise_variance ** 0.5
            return self.decoder.prefix(g), None
        if self.cfg.inputs == "global_local" and "local" not in feats:
            # image features: the local tokens are the patches in the joint space P', normalized
            # like the word features they stand in for (text-only recipe, local_normalize)
            local = nn.functional.normalize(feats["patch_embeds"], dim=-1)
            feats = {**feats, "local": local,
                     "local_mask": torch.ones(local.shape[:2], dtype=torch.bool, device=local.device)}
        tokens, pad = self.tokens(feats, train)
        return self.encoder(tokens, pad), pad

    def decode(self, memory, pad, tokens: torch.Tensor, token_pad: torch.Tensor | None = None):
        if self.cfg.decoder == "prefix_lm":
            return self.decoder(tokens, memory, token_pad)
        return self.decoder(tokens, memory, pad, token_pad)

    def forward(self, feats: dict, tokens: torch.Tensor, token_pad: torch.Tensor | None = None,
                return_aux: bool = False):
        """Teacher forcing on training features: tokens [B,t] starting with bos -> logits [B,t,V]
        (and the auxiliary losses of text-only models with `return_aux`). Everything trainable runs
        inside this call, so a DistributedDataParallel wrapper sees all of it."""
        feats, aux = self.train_inputs(feats)
        memory, pad = self.encode(feats)
        logits = self.decode(memory, pad, tokens, token_pad)
        return (logits, aux) if return_aux else logits

    def tokenize_captions(self, captions: list[str], device=None, ignore_index: int = IGNORE_INDEX):
        return caption_batch(self.tokenizer, captions, self.cfg.max_len, ignore_index, device)

    # ------------------------------------------------------------------ generation
    def _repeat(self, x, k):
        return None if x is None else x.repeat_interleave(k, dim=0)

    @torch.no_grad()
    def generate_ids(self, feats: dict, beam_size: int | None = None, max_len: int | None = None,
                     length_penalty: float | None = None, no_repeat_ngram: int | None = None):
        """Beam search (greedy when beam_size=1). Returns (token ids [B,T], scores [B]). A word
        vocabulary's <unk> is never generated (it carries no word to show)."""
        K = beam_size or self.cfg.beam_size
        max_len = self._max_len(max_len)
        memory, pad = self.encode(feats, train=False)
        memory, pad = self._repeat(memory, K), self._repeat(pad, K)
        B = feats["embeds"].shape[0]
        unk = getattr(self.tokenizer, "unk_id", None)

        def step(tokens):
            logp = torch.log_softmax(self.decode(memory, pad, tokens)[:, -1].float(), -1)
            if unk is not None:
                logp[:, unk] = float("-inf")
            return logp

        return beam_search(step, B, self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id,
                           beam_size=K, max_len=max_len,
                           length_penalty=self.cfg.length_penalty if length_penalty is None else length_penalty,
                           no_repeat_ngram=self.cfg.no_repeat_ngram if no_repeat_ngram is None else no_repeat_ngram,
                           device=feats["embeds"].device)

    def generate(self, feats: dict, **kw) -> list[str]:
        was_training = self.training
        self.eval()
        ids, _ = self.generate_ids(feats, **kw)
        self.train(was_training)
        return [self.tokenizer.decode(row) for row in ids.tolist()]

    def _max_len(self, max_len: int | None) -> int:
        """The length limit of a search: the model's by default; the word decoder has learned
        positions for cfg.max_len words only, so it refuses a longer one."""
        if max_len is None:
            return self.cfg.max_len
        if self.cfg.decoder == "transformer" and max_len > self.cfg.max_len:
            raise ConfigError(f"max_len {max_len} is longer than this model's {self.cfg.max_len} "
                              "(its decoder has positions for that many words)")
        return max_len

    @torch.no_grad()
    def sample_ids(self, feats: dict, num_samples: int = 1, temperature: float = 1.0,
                   max_len: int | None = None, generator: torch.Generator | None = None):
        """num_samples captions per item by multinomial sampling (RL): tokens [B*num_samples, T]."""
        max_len = self._max_len(max_len)
        memory, pad = self.encode(feats, train=False)
        memory, pad = self._repeat(memory, num_samples), self._repeat(pad, num_samples)
        M = feats["embeds"].shape[0] * num_samples

        def step(tokens):
            return torch.log_softmax(self.decode(memory, pad, tokens)[:, -1].float(), -1)

        return sample(step, M, self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id,
                      max_len=max_len, temperature=temperature, generator=generator,
                      device=feats["embeds"].device)

    # ------------------------------------------------------------------ save / load
    def _lm_is_referenced(self) -> bool:
        return self._lm_is_referenced_cfg(self.cfg)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        full = self.state_dict()
        tied = _tied_names(full)
        state = {k: v.detach().cpu().contiguous() for k, v in full.items()
                 if k not in tied and not (self._lm_is_referenced() and k.startswith("decoder.lm."))}
        tmp = out / "model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(out / "model.safetensors")
        if self.cfg.decoder == "prefix_lm":
            self.tokenizer.save(out / "tokenizer")
            if not self._lm_is_referenced():  # its weights are in model.safetensors; keep its shape too
                self.decoder.lm.config.save_pretrained(str(out / LM_CONFIG_DIR))
        else:
            self.tokenizer.save(out / "vocab.json")
        if self._memory_is_saved():
            self.text_only.memory.save(out / MEMORY_FILE)
        meta = {"pcmnet_version": __version__, "model": to_dict(self.cfg),
                "backbone": to_dict(self.backbone_info), "extras": self.extras}
        (out / "config.json.tmp").write_text(json.dumps(meta, indent=2))
        (out / "config.json.tmp").replace(out / "config.json")
        return out

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, backbone=None, map_location="cpu") -> "Captioner":
        d = Path(model_dir)
        if not (d / "model.safetensors").is_file():
            raise CheckpointError(f"{d}: not a pcmnet model directory (needs config.json and model.safetensors)")
        meta = read_model_config(d)
        cfg = from_dict(CaptionerConfig, meta["model"], prefix="model")
        info = BackboneInfo(**meta["backbone"])
        if backbone is not None and backbone.fingerprint() != info.fingerprint:
            raise CheckpointError(
                f"{d}: trained on backbone {info.fingerprint} ({info.spec}), but the loaded backbone is "
                f"{backbone.fingerprint()}; load the matching backbone or retrain")
        lm = None
        if cfg.decoder == "prefix_lm":
            from .prefix_lm import LMTokenizer, build_lm

            tokenizer = LMTokenizer.load(d / "tokenizer")
            if cls._lm_is_referenced_cfg(cfg):
                lm, _ = build_lm(cfg.lm)
            elif (d / LM_CONFIG_DIR).is_dir():  # a fine-tuned LM: rebuilt from its saved config, no download
                from transformers import AutoConfig, AutoModelForCausalLM

                lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(d / LM_CONFIG_DIR)))
            else:
                lm, _ = build_lm(cfg.lm, {**cfg.lm_config, "tokenizer": str(d / "tokenizer")}
                                 if cfg.lm_config else None)
        else:
            tokenizer = Vocab.load(d / "vocab.json")
        memory = None
        if cfg.text_only is not None and cfg.text_only.uses_memory:
            memory = load_memory(cfg.text_only, d / MEMORY_FILE, info.fingerprint)
        extras = meta.get("extras") or {}
        model = cls(cfg, info, tokenizer, lm=lm, extras=extras, memory=memory,
                    noise_variance=extras.get("noise_variance"))
        state = load_file(str(d / "model.safetensors"), device=str(map_location))
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of the wrong shape: the config does not fit the weights
            detail = " ".join(str(e).split("\n")[1:2]).strip() or str(e).splitlines()[0]
            raise CheckpointError(f"{d}: weights do not match the config ({detail})") from None
        tied = _tied_names(model.state_dict())
        missing = [k for k in missing if k not in tied
                   and not (model._lm_is_referenced() and k.startswith("decoder.lm."))]
        if missing or unexpected:
            raise CheckpointError(f"{d}: weights do not match the config (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        return model.eval()

    @staticmethod
    def _lm_is_referenced_cfg(cfg: CaptionerConfig) -> bool:
        """A frozen pretrained LM is not copied into the checkpoint; it is reloaded by name."""
        return cfg.decoder == "prefix_lm" and cfg.freeze_lm and cfg.lm_config is None

    def _memory_is_saved(self) -> bool:
        """A memory built from the training captions is saved with the model; one given by
        text_only.memory_path (e.g. another domain's captions) is referenced by that path."""
        return self.text_only is not None and self.text_only.memory is not None \
            and self.cfg.text_only.memory_path is None


MEMORY_FILE = "memory.safetensors"
LM_CONFIG_DIR = "lm_config"


def load_memory(cfg: TextOnlyConfig, saved: Path, fingerprint: str) -> ProjectionMemory:
    """A text-only model's projection memory: cfg.memory_path if set, else the copy saved with the
    model; its backbone fingerprint must match; temperature / top-k / budget come from cfg."""
    path = Path(cfg.memory_path) if cfg.memory_path else saved
    if not path.is_file():
        raise CheckpointError(f"{path}: the projection memory of this text-only model is missing")
    memory = ProjectionMemory.load(path, fingerprint=fingerprint, budget_mb=cfg.memory_budget_mb)
    memory.temperature, memory.top_k = cfg.projection_temperature, cfg.projection_top_k
    return memory
