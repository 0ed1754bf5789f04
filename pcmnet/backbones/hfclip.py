"""Hugging Face CLIP backbone (METHODS.md section 1): `transformers.CLIPModel` from a hub id or a local dir.

    g  = normalize(visual_projection(post_layernorm(h_cls)))         == normalize(get_image_features)
    P  = h[:, 1:]                       the vision tower's last hidden states of the grid tokens
    P' = visual_projection(post_layernorm(P))   the layers the CLS token goes through, per patch
    tokens = text_projection(last_hidden_state)  (last_hidden_state is already after final_layer_norm)
    t  = normalize(text_projection(pooled EOS state))                == normalize(get_text_features)

Soft inputs (`inputs_embeds`, e.g. Gumbel-softmax one-hots times the embedding table) replace the
output of the token-embedding table for one forward pass; the text model's own code then adds the
positions, builds the causal/padding mask and pools at the EOS position found from `input_ids`.

Hub access and weight fingerprints: `hub.py` (shared with `openclip.py`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import MissingWeightsError, PcmnetError
from .base import Backbone, ImageFeatures, TextFeatures
from .hub import caused_by_missing_file, hub_offline_unless_reachable, one_line, sha256_files, weight_files

# -- backbone ---------------------------------------------------------------------------------------
class HFCLIPBackbone(Backbone):
    """A frozen `transformers.CLIPModel` with its tokenizer and image processor."""

    kind = "hf-clip"

    def __init__(self, model, tokenizer, processor, source: str):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.source = source  # hub id or absolute local dir
        vcfg, tcfg = model.config.vision_config, model.config.text_config
        self.embed_dim = model.config.projection_dim
        self.patch_dim = vcfg.hidden_size
        self.num_patches = (vcfg.image_size // vcfg.patch_size) ** 2
        self.max_length = min(int(getattr(tokenizer, "model_max_length", 10 ** 9)),
                              tcfg.max_position_embeddings)
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, model: str | None) -> "HFCLIPBackbone":
        """CLIPModel + tokenizer + image processor from a hub id (e.g. "openai/clip-vit-base-patch32")
        or a local directory written by `save_pretrained` (with the tokenizer and processor files)."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        if not model:
            raise PcmnetError("backbone.model: hf-clip needs a Hugging Face CLIP id or a local model directory")
        local = Path(model).expanduser()
        source = str(local.resolve()) if local.is_dir() else model
        if not local.is_dir() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
            raise MissingWeightsError(f"backbone.model: local CLIP directory not found: {model}")
        try:
            with hub_offline_unless_reachable():
                clip = CLIPModel.from_pretrained(source)
                tokenizer = AutoTokenizer.from_pretrained(source)
                processor = AutoImageProcessor.from_pretrained(source)
        except Exception as err:  # noqa: BLE001 - every failure becomes one user-facing line
            if caused_by_missing_file(err):
                raise MissingWeightsError(
                    f"backbone.model: Hugging Face CLIP '{model}' is not on this machine and cannot be downloaded "
                    f"here; download it elsewhere (CLIPModel/CLIPProcessor .save_pretrained(DIR)) and pass "
                    f"backbone.model=DIR ({one_line(err)})") from None
            raise PcmnetError(f"backbone.model: cannot load Hugging Face CLIP '{model}': {one_line(err)}") from None
        return cls(clip.float().eval(), tokenizer, processor, source)

    # -- identity ---------------------------------------------------------------------------------
    def spec(self) -> dict:
        return {"name": "hf-clip", "model": self.source}

    def fingerprint(self) -> str:
        """hub id: "hf-clip:<id>@<commit>" (commit of the downloaded snapshot when known);
        local dir: "hf-clip:sha256-<16 hex>" over the contents of its weight files."""
        if self._fingerprint is None:
            folder = Path(self.source)
            if folder.is_dir():
                self._fingerprint = f"hf-clip:sha256-{sha256_files(weight_files(folder))}"
            else:
                commit = getattr(self.model.config, "_commit_hash", None)
                self._fingerprint = f"hf-clip:{self.source}" + (f"@{commit}" if commit else "")
        return self._fingerprint

    # -- image side -------------------------------------------------------------------------------
    def preprocess(self, image) -> torch.Tensor:
        """One PIL image -> [3,H,W], exactly the image processor's pixels."""
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        m = self.model
        pixels = pixels.to(self.device, m.visual_projection.weight.dtype)
        out = m.vision_model(pixel_values=pixels)
        patches = out.last_hidden_state[:, 1:]  # grid tokens before post_layernorm
        patch_embeds = m.visual_projection(m.vision_model.post_layernorm(patches))
        g = m.visual_projection(out.pooler_output)  # pooler_output = post_layernorm(CLS)
        return ImageFeatures(embeds=F.normalize(g, dim=-1), patches=patches, patch_embeds=patch_embeds)

    # -- text side --------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].bool().to(self.device)}

    def token_embedding(self) -> nn.Embedding:
        return self.model.text_model.embeddings.token_embedding

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      inputs_embeds: torch.Tensor | None = None) -> TextFeatures:
        """Text tower on ids, or on soft `inputs_embeds` [B,L,E] that replace the embedding-table
        lookup (the ids still give the EOS position and the padding mask)."""
        m = self.model
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hook = None
        if inputs_embeds is not None:
            soft = inputs_embeds.to(self.device)
            hook = self.token_embedding().register_forward_hook(lambda mod, args, out: soft.to(out.dtype))
        try:
            out = m.text_model(input_ids=input_ids, attention_mask=attention_mask.long())
        finally:
            if hook is not None:
                hook.remove()
        tokens = m.text_projection(out.last_hidden_state)
        t = m.text_projection(out.pooler_output)
        return TextFeatures(embeds=F.normalize(t, dim=-1), tokens=tokens, mask=attention_mask.bool())
