"""The backbone contract (METHODS.md section 1): the one "CLIP" object every method talks to.

An image side and a text side that share a D-dim joint space:

    encode_image(pixels) -> ImageFeatures(embeds g [B,D], patches P [B,N,Dv], patch_embeds P' [B,N,D])
    encode_text(texts)   -> TextFeatures(embeds t [B,D], tokens [B,L,D], mask [B,L])

`embeds` are L2-normalized (every method normalizes them before use; doing it once here removes a
class of bugs). `patches` are the raw grid tokens, `patch_embeds` their projection into the joint
space through exactly the layers the global token goes through (not normalized); `tokens` are the
text tower's per-token outputs through its final projection (not normalized).

Implementations: `OpenCLIPBackbone` (open_clip), `HFCLIPBackbone` (transformers CLIPModel) and
`MiniBackbone` (offline default: EfficientNet-Lite0 + all-MiniLM-L6-v2 + trained heads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BackboneConfig:
    """Which backbone to load.

    name:       "mini" | "open_clip" | "hf-clip"
    model:      open_clip model name (e.g. "ViT-B-32"), HF hub id or local dir; for mini, a heads file
                (default: the heads bundled with pcmnet)
    pretrained: open_clip pretrained tag (e.g. "laion2b_s34b_b79k", "openai") or a local checkpoint
    device:     "cpu", "cuda", ... (default: cuda if available)
    tta:        mini only: average the 4 fixed test views (centre crop, squashed, their flips)
    """

    name: str = "mini"
    model: str | None = None
    pretrained: str | None = None
    device: str | None = None
    tta: bool = True


@dataclass
class ImageFeatures:
    embeds: torch.Tensor  # [B, D], L2-normalized global embedding g
    patches: torch.Tensor  # [B, N, Dv] raw patch tokens P
    patch_embeds: torch.Tensor  # [B, N, D] patch tokens in the joint space P'


@dataclass
class TextFeatures:
    embeds: torch.Tensor  # [B, D], L2-normalized sentence embedding t
    tokens: torch.Tensor  # [B, L, D] word-level features in the joint space
    mask: torch.Tensor  # [B, L] bool, True for real tokens


class Backbone(nn.Module):
    """Frozen image/text towers sharing a joint space. Subclasses fill in the abstract parts."""

    kind: str = "base"
    embed_dim: int  # D
    patch_dim: int  # Dv
    num_patches: int  # N

    # -- identity ---------------------------------------------------------------------------------
    def spec(self) -> dict:
        """What a checkpoint records to reload this backbone (BackboneConfig fields)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Stable id of the weights: cached features and checkpoints are only valid for the same one."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- image side -------------------------------------------------------------------------------
    def preprocess(self, image) -> torch.Tensor:
        """One RGB PIL image -> the pixel tensor `encode_image` takes (batched by stacking)."""
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        raise NotImplementedError

    # -- text side --------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict:
        """-> {"input_ids": [B,L] long, "attention_mask": [B,L] bool} for the text tower."""
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> TextFeatures:
        return self.encode_tokens(**self.tokenize(list(texts)))

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      inputs_embeds: torch.Tensor | None = None) -> TextFeatures:
        """Text tower on token ids, or on `inputs_embeds` [B,L,E] (soft tokens, e.g. Gumbel-softmax
        one-hots times `token_embedding().weight`) with the ids still giving positions/EOT."""
        raise NotImplementedError

    def token_embedding(self) -> nn.Embedding:
        """The text tower's input embedding table (for differentiable soft-token inputs)."""
        raise NotImplementedError

    # -- convenience ------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Normalized sentence embeddings [len(texts), D] on CPU, batched."""
        out = []
        for i in range(0, len(texts), batch_size):
            out.append(self.encode_text(texts[i: i + batch_size]).embeds.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def freeze(self) -> "Backbone":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self


def load_backbone(cfg: BackboneConfig | dict | str | None = None, device: str | None = None) -> Backbone:
    """Build the backbone a config names. Weights come from local files or the backend's own loader."""
    if cfg is None:
        cfg = BackboneConfig()
    elif isinstance(cfg, str):
        cfg = BackboneConfig(name=cfg)
    elif isinstance(cfg, dict):
        from ..config import from_dict

        cfg = from_dict(BackboneConfig, cfg, prefix="backbone")
    device = device or cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.name == "mini":
        from .mini import MiniBackbone

        bb = MiniBackbone.load(heads=cfg.model, tta=cfg.tta)
    elif cfg.name == "open_clip":
        from .openclip import OpenCLIPBackbone

        bb = OpenCLIPBackbone.load(cfg.model, cfg.pretrained)
    elif cfg.name in ("hf-clip", "hf_clip"):
        from .hfclip import HFCLIPBackbone

        bb = HFCLIPBackbone.load(cfg.model)
    else:
        from ..config import ConfigError

        raise ConfigError(f"unknown backbone '{cfg.name}' (one of: mini, open_clip, hf-clip)")
    return bb.to(device).freeze()
