"""Text-only training, the whole recipe in one place (METHODS.md section 6; docs/textonly.md).

No image is seen in training: a caption's own text features stand in for its image. The function
`text_only_features` turns backbone features into the `feats` dict the token builder takes
(`VisualTokens(use_patches=False, use_local=cfg.local_features, noise_variance=0)`):

    training  (TextFeatures of the caption c)          inference (ImageFeatures of the image x)
    x = t(c)                                            x = g(x)
    x = x + n         fixed noise (CapDec)   or         -
    x = NoiseNet(x)   learned noise (FusionCap)         -
    x = P(x)          memory projection (DeCap; in      x = P(x)         (DeCap)
                      training only if asked)
    x = ProjNet(x)    projection network (FusionCap)    x = ProjNet(x)   (FusionCap)
    local = normalize(word features of c) (+ noise)     local = normalize(P'(x))  (FusionCap)

with every step switchable in `TextOnlyConfig`, so CapDec, DeCap, FusionCap and their ablations
are one config each (PRESETS). Noise lives here, not in the token builder: build the token builder
with noise_variance=0 (`text_only_token_builder` does), or the global token gets noised twice.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..backbones.base import ImageFeatures, TextFeatures
from ..config import ConfigError
from ..errors import CheckpointError, PcmnetError
from .encoder import VisualTokens
from .noise import NoiseNetwork, estimate_noise_variance, gap_pairs, gaussian_kl, inject_noise
from .projection import ProjectionMemory, ProjectionNetwork


@dataclass
class TextOnlyConfig:
    """Every knob of text-only training (defaults: CapDec with the published sigma^2).

    noise_variance:        sigma^2 of the Gaussian added to caption embeddings in training (CapDec
                           0.016 for CLIP ViT-B/32), or "auto": the measured image/caption gap
                           (noise.estimate_noise_variance) on whatever paired examples exist.
                           With noise_net it is the variance the learned noise is pulled toward.
    noise_auto_max_images: at most this many paired images are encoded for "auto".
    noise_on_local:        also noise the local (word) tokens in training, same variance.
    projection:            DeCap: replace the image embedding by its projection onto the caption
                           memory at inference.
    projection_in_training: also project the (noised) caption embedding in training, leaving the
                           caption itself out of the memory (not in DeCap; an ablation).
    projection_temperature: tau_p, 1/150.
    projection_top_k:      None = exact softmax over the whole memory; k = softmax over the top k.
    memory_path:           a saved memory (any corpus, e.g. another domain) referenced by path;
                           None = built from the training captions and saved with the checkpoint.
    memory_budget_mb:      bound on one chunk step of the projection (no dense [B x m] matrix).
    memory_dtype:          storage of the memory: "float16" (default) or "float32".
    noise_net:             FusionCap: learned input-conditioned noise instead of the fixed one.
    noise_net_hidden:      its MLP width.
    noise_net_reg:         weight of its KL regularizer toward noise_variance.
    projection_net:        FusionCap: memory projection + residual MLP, trained text-only and used
                           in training and inference (replaces `projection` when both are on).
    projection_net_hidden: its MLP width.
    projection_net_align:  weight of the alignment loss 1 - cos(ProjNet(noised t), t) (0 = decoder
                           loss only).
    local_features:        FusionCap: local tokens = word features (training) / projected patches
                           P' (inference).
    local_normalize:       L2-normalize each local token (words and patches on the same sphere).
    max_local:             at most this many local tokens (they carry no positions).
    """

    noise_variance: float | str = 0.016
    noise_auto_max_images: int = 1000
    noise_on_local: bool = True
    projection: bool = False
    projection_in_training: bool = False
    projection_temperature: float = 1 / 150
    projection_top_k: int | None = None
    memory_path: str | None = None
    memory_budget_mb: float = 64.0
    memory_dtype: str = "float16"
    noise_net: bool = False
    noise_net_hidden: int = 512
    noise_net_reg: float = 1.0
    projection_net: bool = False
    projection_net_hidden: int = 512
    projection_net_align: float = 1.0
    local_features: bool = False
    local_normalize: bool = True
    max_local: int = 77

    @property
    def uses_memory(self) -> bool:
        return self.projection or self.projection_net

    def validate(self, prefix: str = "text_only") -> "TextOnlyConfig":
        """Raise ConfigError (one line, names the key) for a value that cannot work."""
        def bad(key, why):
            raise ConfigError(f"config key '{prefix}.{key}' {why}, got {getattr(self, key)!r}")

        v = self.noise_variance
        if v != "auto" and (isinstance(v, (str, bool)) or v < 0):
            bad("noise_variance", "must be a number >= 0 or 'auto'")
        if self.noise_net and v == 0:
            bad("noise_variance", "must be > 0 (or 'auto') with noise_net: it is the learned noise's target")
        if self.projection_temperature <= 0:
            bad("projection_temperature", "must be > 0")
        if self.projection_top_k is not None and self.projection_top_k < 1:
            bad("projection_top_k", "must be >= 1 or null")
        if self.memory_budget_mb <= 0:
            bad("memory_budget_mb", "must be > 0")
        if self.memory_dtype not in ("float16", "float32", "bfloat16"):
            bad("memory_dtype", "must be float16, float32 or bfloat16")
        for key in ("noise_net_reg", "projection_net_align"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        for key in ("noise_net_hidden", "projection_net_hidden", "max_local", "noise_auto_max_images"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        return self


PRESETS: dict[str, dict] = {
    "capdec": {},
    "decap": {"noise_variance": 0.0, "projection": True},
    "fusioncap": {"noise_net": True, "projection_net": True, "local_features": True},
}


def preset(name: str, **overrides) -> TextOnlyConfig:
    """TextOnlyConfig of a published variant (capdec, decap, fusioncap), with overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown text-only variant '{name}' (one of: {', '.join(PRESETS)})")
    return dataclasses.replace(TextOnlyConfig(**PRESETS[name]), **overrides).validate()


# -- setup: the noise level and the memory --------------------------------------------------------
def resolve_noise_variance(cfg: TextOnlyConfig, paired_records=None, backbone=None,
                           image_embeds=None) -> float:
    """cfg.noise_variance as a number; "auto" measures the gap on the paired records (their images
    are read, or taken from `image_embeds` {image_id: g}) with noise.estimate_noise_variance."""
    if cfg.noise_variance != "auto":
        return float(cfg.noise_variance)
    if not paired_records or backbone is None:
        raise PcmnetError("text_only.noise_variance=auto needs paired image-caption examples "
                          "(none given); set a number instead, e.g. 0.016")
    g, t = gap_pairs(paired_records, backbone, image_embeds, max_images=cfg.noise_auto_max_images)
    return estimate_noise_variance(g, t)


def open_memory(cfg: TextOnlyConfig, backbone, texts: list[str] | None = None,
                saved: str | Path | None = None, corpus: str = "") -> ProjectionMemory:
    """The projection memory a run uses, with cfg's temperature / top-k / budget applied.

    cfg.memory_path (a memory from any corpus) wins; else a memory saved with the checkpoint
    (`saved`, the captioner's case); else one built from `texts` (the trainer's case: it then saves
    it with the checkpoint). The memory must come from the same backbone (fingerprint checked).
    """
    path = cfg.memory_path or (saved if saved is not None and Path(saved).is_file() else None)
    if path is not None:
        memory = ProjectionMemory.load(path, fingerprint=backbone.fingerprint())
    elif texts:
        memory = ProjectionMemory.from_texts(texts, backbone, corpus=corpus, dtype=cfg.memory_dtype)
    else:
        where = saved if saved is not None else "text_only.memory_path"
        raise CheckpointError(f"{where}: no projection memory (set text_only.memory_path, "
                              "or give captions to build one)")
    memory.temperature = cfg.projection_temperature
    memory.top_k = cfg.projection_top_k
    memory.budget_mb = cfg.memory_budget_mb
    return memory.to(backbone.device)


# -- local tokens (FusionCap) ---------------------------------------------------------------------
def local_from_text(text: TextFeatures, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Training: the caption's word-level features [B,L,D] and mask [B,L] (True = real token)."""
    tokens = F.normalize(text.tokens, dim=-1) if normalize else text.tokens
    return tokens, text.mask.bool()


def local_from_image(image: ImageFeatures, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference: the image's patch tokens in the joint space P' [B,N,D], all real."""
    tokens = F.normalize(image.patch_embeds, dim=-1) if normalize else image.patch_embeds
    return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


# -- the recipe -----------------------------------------------------------------------------------
def text_only_features(feats: TextFeatures | ImageFeatures, cfg: TextOnlyConfig, train: bool,
                       noise_variance: float, memory: ProjectionMemory | None = None,
                       noise_net: NoiseNetwork | None = None,
                       projection_net: ProjectionNetwork | None = None) -> tuple[dict, dict]:
    """Backbone features -> (feats dict for the token builder, weighted auxiliary losses).

    train=True takes the caption's TextFeatures; train=False the image's ImageFeatures. The dict
    has "embeds" [B,D] and, with cfg.local_features, "local" [B,L,D] + "local_mask" [B,L]. The
    auxiliary losses ("noise_reg", "proj_align"; empty at inference) are already weighted: the
    trainer adds their sum to the decoder loss. With noise 0 and every other switch off, the dict
    is {"embeds": feats.embeds}: the plain model's input, untouched.
    """
    aux: dict[str, torch.Tensor] = {}
    if train:
        if not isinstance(feats, TextFeatures):
            raise TypeError("text-only training takes the caption's TextFeatures (no image is used)")
        t = feats.embeds
        if noise_net is not None:
            x, log_std = noise_net(t)
            aux["noise_reg"] = cfg.noise_net_reg * gaussian_kl(log_std, noise_variance)
        else:
            x = inject_noise(t, noise_variance)
        if projection_net is not None:
            x = projection_net(x, exclude=t)
            if cfg.projection_net_align > 0:
                aux["proj_align"] = cfg.projection_net_align * (1 - (x * t).sum(-1)).mean()
        elif cfg.projection and cfg.projection_in_training:
            x = memory.project(x, exclude=t).to(t.dtype)
        out = {"embeds": x}
        if cfg.local_features:
            local, mask = local_from_text(feats, cfg.local_normalize)
            out["local"] = inject_noise(local, noise_variance) if cfg.noise_on_local else local
            out["local_mask"] = mask
        return out, aux

    if not isinstance(feats, ImageFeatures):
        raise TypeError("text-only inference takes the image's ImageFeatures")
    x = feats.embeds
    if projection_net is not None:
        x = projection_net(x)
    elif cfg.projection:
        x = memory.project(x).to(feats.embeds.dtype)
    out = {"embeds": x}
    if cfg.local_features:
        out["local"], out["local_mask"] = local_from_image(feats, cfg.local_normalize)
    return out, aux


class TextOnly(nn.Module):
    """The learned parts of the recipe (noise and projection networks) plus the resolved noise level
    (a buffer, so checkpoints keep the value "auto" measured) and the memory (not in state_dict)."""

    def __init__(self, cfg: TextOnlyConfig, dim: int, noise_variance: float,
                 memory: ProjectionMemory | None = None):
        super().__init__()
        cfg.validate()
        if cfg.uses_memory and memory is None:
            raise PcmnetError("text_only: projection is on but no projection memory was given")
        self.cfg, self.memory = cfg, memory
        self.register_buffer("noise_variance", torch.tensor(float(noise_variance)))
        self.noise_net = NoiseNetwork(dim, cfg.noise_net_hidden, noise_variance) if cfg.noise_net else None
        self.projection_net = (ProjectionNetwork(memory, dim, cfg.projection_net_hidden)
                                if cfg.projection_net else None)

    def forward(self, feats: TextFeatures | ImageFeatures, train: bool) -> tuple[dict, dict]:
        return text_only_features(feats, self.cfg, train, float(self.noise_variance), self.memory,
                                  self.noise_net, self.projection_net)


def text_only_token_builder(cfg: TextOnlyConfig, backbone, width: int, dropout: float = 0.1) -> VisualTokens:
    """The token builder for text-only models: global token (+ local tokens), no raw patches (text
    has none), no noise of its own (the recipe above adds it), room for every patch at inference."""
    return VisualTokens(embed_dim=backbone.embed_dim, patch_dim=backbone.patch_dim,
                        num_patches=backbone.num_patches, width=width, use_patches=False,
                        use_local=cfg.local_features,
                        max_local=max(cfg.max_local, backbone.num_patches), noise_variance=0.0,
                        dropout=dropout)
