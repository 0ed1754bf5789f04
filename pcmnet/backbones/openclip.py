"""OpenCLIP backbone (METHODS.md section 1): any open_clip model name + pretrained tag or checkpoint.

Image side, standard ViT towers (OpenAI CLIP, LAION, DataComp, MetaCLIP, CLIPA, ...):

    x  = transformer(ln_pre([cls; conv1(image)] + pos))      [B, 1+N, Dv]
    P  = x[:, 1:]                                             grid tokens before ln_post
    P' = ln_post(P) @ proj                                    what the class token goes through
    g  = normalize(ln_post(x[:, 0]) @ proj)                   pool_type "tok" (== model.encode_image)

For "avg" pooling the global token is the mean of the grid tokens (through ln_post and proj in the
order the model uses: mean of P' or ln_post(mean P) @ proj when `final_ln_after_pool`).
ModifiedResNet towers (RN50, ...) pool with one attention layer; there P is the last feature map
and P' = c_proj(v_proj(P + pos)), the value path of that attention (as MaskCLIP does): g is an
attention-weighted average of exactly these per-position outputs. Towers with an attentional
pooler (CoCa), timm image towers (SigLIP, MobileCLIP, ConvNeXt) and HF text towers have no
well-defined P' here and are refused at load time with a one-line error.

Text side: tokens = ln_final(transformer(embed(ids) + pos)) @ text_projection for every position;
the sentence embedding is the token at the model's pooling position (argmax id = EOT for OpenAI
tokenizers, the first `eos_id`, first or last token), normalized.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError, MissingWeightsError, PcmnetError
from .base import Backbone, ImageFeatures, TextFeatures
from .hub import (caused_by_missing_file, hub_offline_unless_reachable, one_line, sha256_files,
                     weight_files)


class OpenCLIPBackbone(Backbone):
    """A frozen open_clip model with its tokenizer and validation image transform."""

    kind = "open_clip"

    def __init__(self, model: nn.Module, preprocess, tokenizer, name: str, pretrained: str | None):
        super().__init__()
        self.model = model
        self.transform = preprocess
        self.tokenizer = tokenizer
        self.name, self.pretrained = name, pretrained
        self.embed_dim, self.patch_dim, self.num_patches = _check_supported(model, name)
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, model: str | None, pretrained: str | None = None) -> "OpenCLIPBackbone":
        """`model`: an open_clip name ("ViT-B-32"), "hf-hub:org/repo" or "local-dir:/path";
        `pretrained`: a tag ("laion2b_s34b_b79k", "openai") or a local checkpoint file
        (.pt/.bin/.safetensors), required for plain names and not allowed for hf-hub:/local-dir:."""
        import open_clip

        if not model:
            raise PcmnetError("backbone.model: open_clip needs a model name, e.g. ViT-B-32 (see open_clip.list_models())")
        schema = model.split(":", 1)[0] + ":" if model.startswith(("hf-hub:", "local-dir:")) else None
        if schema and pretrained:
            raise PcmnetError(f"backbone.pretrained: leave it empty for '{model}' ({schema} models bring their weights)")
        if schema is None:
            if open_clip.get_model_config(model) is None:
                raise PcmnetError(f"backbone.model: unknown open_clip model '{model}' (see open_clip.list_models())")
            if not pretrained:
                raise MissingWeightsError(f"backbone.pretrained: open_clip '{model}' needs a pretrained tag "
                                          f"({_known_tags(model)}) or a local checkpoint file")
            if not open_clip.get_pretrained_cfg(model, pretrained):
                path = Path(pretrained).expanduser()
                if not path.is_file():
                    raise MissingWeightsError(f"backbone.pretrained: '{pretrained}' is neither a checkpoint file on this "
                                              f"machine nor a pretrained tag of open_clip '{model}' ({_known_tags(model)})")
                pretrained = str(path.resolve())
        if model.startswith("local-dir:"):
            model = "local-dir:" + str(Path(model[len("local-dir:"):]).expanduser().resolve())
        what = f"open_clip '{model}'" + (f" with pretrained '{pretrained}'" if pretrained else "")
        quiet = logging.root.manager.disable
        logging.disable(logging.ERROR)  # open_clip logs the failures that the one-line errors below report
        try:
            with hub_offline_unless_reachable():
                clip, _, preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=pretrained, require_pretrained=True)
                tokenizer = open_clip.get_tokenizer(model)
        except Exception as err:  # noqa: BLE001 - every failure becomes one user-facing line
            if caused_by_missing_file(err):
                hint = ("download the repo elsewhere and pass backbone.model=local-dir:/path/to/repo" if schema else
                        "download the checkpoint elsewhere and pass backbone.pretrained=/path/to/checkpoint")
                raise MissingWeightsError(f"backbone.pretrained: the weights of {what} are not on this machine and "
                                          f"cannot be downloaded here; {hint} ({one_line(err)})") from None
            raise CheckpointError(f"backbone.pretrained: cannot load {what}: {one_line(err)}") from None
        finally:
            logging.disable(quiet)
        return cls(clip.float().eval(), preprocess, tokenizer, model, pretrained)

    # -- identity ---------------------------------------------------------------------------------
    def spec(self) -> dict:
        return {"name": "open_clip", "model": self.name, "pretrained": self.pretrained}

    def fingerprint(self) -> str:
        """"open_clip:<name>:<tag>" for pretrained tags and hf-hub: names; for a local checkpoint
        file (or local-dir: folder) the tag is replaced by "sha256-<16 hex>" of the weight bytes, so
        a copied or renamed file keeps its fingerprint and a retrained one gets a new one."""
        if self._fingerprint is None:
            files: list[Path] = []
            if self.pretrained and Path(self.pretrained).is_file():
                files = [Path(self.pretrained)]
            elif self.name.startswith("local-dir:"):
                files = weight_files(Path(self.name[len("local-dir:"):]))
            if files:
                name = "local-dir" if self.name.startswith("local-dir:") else self.name
                self._fingerprint = f"open_clip:{name}:sha256-{sha256_files(files)}"
            else:
                self._fingerprint = f"open_clip:{self.name}:{self.pretrained or ''}".rstrip(":")
        return self._fingerprint

    # -- image side -------------------------------------------------------------------------------
    def preprocess(self, image) -> torch.Tensor:
        """One PIL image -> [3,H,W] through the model's own validation transform."""
        return self.transform(image.convert("RGB"))

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        v = self.model.visual
        if _is_resnet(v):
            return self._encode_image_resnet(pixels)
        x = pixels.to(self.device, v.conv1.weight.dtype)
        x = v.conv1(x).flatten(2).transpose(1, 2)  # [B, N, Dv] patch embeddings
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.transformer(v.ln_pre(v.patch_dropout(x)))  # [B, 1+N, Dv]
        patches = x[:, 1:]
        patch_embeds = self.project_visual(patches)
        if v.pool_type == "tok":
            g = self.project_visual(x[:, 0])
        elif v.final_ln_after_pool:  # "avg": ln_post(mean of grid tokens) @ proj
            g = self.project_visual(patches.mean(1))
        else:  # "avg": mean of ln_post(grid tokens) @ proj
            g = patch_embeds.mean(1)
        return ImageFeatures(embeds=F.normalize(g, dim=-1), patches=patches, patch_embeds=patch_embeds)

    def project_visual(self, tokens: torch.Tensor) -> torch.Tensor:
        """ViT tokens [..., Dv] -> joint space [..., D] through the frozen ln_post and proj."""
        v = self.model.visual
        y = v.ln_post(tokens)
        return y @ v.proj if v.proj is not None else y

    def _encode_image_resnet(self, pixels: torch.Tensor) -> ImageFeatures:
        v = self.model.visual
        x = pixels.to(self.device, v.conv1.weight.dtype)
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # [B, C, h, w]
        g = v.attnpool(x)
        patches = x.flatten(2).transpose(1, 2)  # [B, N, C]
        pool = v.attnpool
        patch_embeds = pool.c_proj(pool.v_proj(patches + pool.positional_embedding[1:].to(x.dtype)))
        return ImageFeatures(embeds=F.normalize(g, dim=-1), patches=patches, patch_embeds=patch_embeds)

    # -- text side --------------------------------------------------------------------------------
    @property
    def text_tower(self) -> nn.Module:
        """The module holding token_embedding ... text_projection (CLIP keeps them on itself,
        CustomTextCLIP on .text)."""
        return getattr(self.model, "text", self.model)

    def tokenize(self, texts: list[str]) -> dict:
        """open_clip's tokenizer pads to the context length; for causal towers pooled at the EOT
        the padding after the longest EOT is cut off (it cannot change any real token's output)."""
        ids = self.tokenizer(list(texts)).to(self.device)
        t, pool = self.text_tower, _text_pool_type(self.text_tower)
        if pool in ("argmax", "eos"):
            mask = torch.arange(ids.shape[1], device=ids.device) <= self._pool_index(ids)[:, None]
            if t.attn_mask is not None and not getattr(t, "use_pad_mask", False):
                keep = int(mask.sum(1).max())
                ids, mask = ids[:, :keep], mask[:, :keep]
        else:
            mask = ids != getattr(t, "pad_id", 0)
        return {"input_ids": ids, "attention_mask": mask}

    def token_embedding(self) -> nn.Embedding:
        return self.text_tower.token_embedding

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      inputs_embeds: torch.Tensor | None = None) -> TextFeatures:
        """Text tower on ids [B,L] (L <= context length), or on soft `inputs_embeds` [B,L,E] that
        replace `token_embedding(ids)`; the ids still give the pooling (EOT) position."""
        t = self.text_tower
        ids = input_ids.to(self.device)
        L = ids.shape[1]
        dtype = t.transformer.get_cast_dtype()
        x = t.token_embedding(ids) if inputs_embeds is None else inputs_embeds.to(self.device)
        x = x.to(dtype) + t.positional_embedding[:L].to(dtype)
        attn_mask = t.attn_mask[:L, :L] if t.attn_mask is not None else None
        if getattr(t, "use_pad_mask", False):  # bidirectional towers that mask padding keys
            attn_mask = t._build_additive_mask(ids, L, x.dtype)
        x = t.ln_final(t.transformer(x, attn_mask=attn_mask))  # [B, L, W]
        proj = t.text_projection
        tokens = proj(x) if isinstance(proj, nn.Linear) else (x @ proj if proj is not None else x)
        pooled = tokens[torch.arange(ids.shape[0], device=ids.device), self._pool_index(ids)]
        return TextFeatures(embeds=F.normalize(pooled, dim=-1), tokens=tokens,
                            mask=attention_mask.to(self.device).bool())

    def _pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Per sequence, the position whose output is the sentence embedding."""
        t, pool = self.text_tower, _text_pool_type(self.text_tower)
        if pool == "argmax":  # OpenAI tokenizer: EOT has the largest id
            return ids.argmax(dim=-1)
        if pool == "eos":
            eos = t.text_eos_id if hasattr(t, "text_eos_id") else t.eos_id
            return (ids == eos).int().argmax(dim=-1)
        if pool == "first":
            return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)


def _known_tags(model: str, shown: int = 6) -> str:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    more = f", ... ({len(tags)} in all)" if len(tags) > shown else ""
    return "known tags: " + (", ".join(tags[:shown]) + more if tags else "none")


def _is_resnet(visual: nn.Module) -> bool:
    return hasattr(visual, "attnpool") and hasattr(visual, "layer4")


def _text_pool_type(text: nn.Module) -> str:
    return getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")


def _check_supported(model: nn.Module, name: str) -> tuple[int, int, int]:
    """(D, Dv, N) of a model whose towers this backbone handles; one-line error otherwise."""
    v = getattr(model, "visual", None)
    if v is not None and _is_resnet(v):
        pool = v.attnpool
        embed_dim, patch_dim = pool.c_proj.out_features, pool.v_proj.in_features
        num_patches = pool.positional_embedding.shape[0] - 1
    elif v is not None and hasattr(v, "conv1") and hasattr(v, "ln_post") and hasattr(v, "class_embedding"):
        if v.attn_pool is not None or v.pool_type not in ("tok", "avg"):
            raise PcmnetError(f"backbone.model: open_clip '{name}' pools its image tower with an attentional "
                              f"pooler (CoCa-style); patch projections P' are undefined there (use a CLIP ViT)")
        embed_dim = v.proj.shape[1] if v.proj is not None else v.transformer.width
        patch_dim, num_patches = v.transformer.width, v.grid_size[0] * v.grid_size[1]
    else:
        raise PcmnetError(f"backbone.model: open_clip '{name}' has a {type(v).__name__} image tower; only ViT "
                          f"and ModifiedResNet towers have patch tokens here (use e.g. ViT-B-32)")
    t = getattr(model, "text", model)
    if not hasattr(t, "token_embedding") or getattr(t, "cls_emb", None) is not None:
        raise PcmnetError(f"backbone.model: open_clip '{name}' has a {type(t).__name__} text tower; only "
                          f"open_clip's own text transformer is supported (use e.g. ViT-B-32)")
    if _text_pool_type(t) not in ("argmax", "eos", "first", "last"):
        raise PcmnetError(f"backbone.model: open_clip '{name}' text pooling '{_text_pool_type(t)}' is not supported")
    return int(embed_dim), int(patch_dim), int(num_patches)
