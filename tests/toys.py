"""Tiny deterministic stand-ins used across the unit tests (no downloads, milliseconds to run),
and helpers that watch a training run from outside (kill/resume tests).

`ToyBackbone` honours the full backbone contract of pcmnet.backbones.base with random weights:
a 16x16 image is cut into 4x4 patches (N=16, Dv=32) and projected into a D=24 joint space by the
same linear map for the global (mean) token and every patch; text is a bag of hashed word
embeddings. It is NOT a captioning model; it only lets tests exercise real code paths quickly.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pcmnet.backbones.base import Backbone, ImageFeatures, TextFeatures


class ToyBackbone(Backbone):
    kind = "toy"
    embed_dim = 24
    patch_dim = 32
    num_patches = 16
    vocab_size = 1000
    max_len = 16

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.patchify = nn.Conv2d(3, self.patch_dim, kernel_size=4, stride=4)
        self.proj = nn.Linear(self.patch_dim, self.embed_dim)
        self.tok = nn.Embedding(self.vocab_size, 16)
        self.text_proj = nn.Linear(16, self.embed_dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.seed = seed

    def spec(self):
        return {"name": "toy", "model": str(self.seed)}

    def fingerprint(self):
        return f"toy-{self.seed}"

    def preprocess(self, image):
        arr = np.asarray(image.convert("RGB").resize((16, 16), Image.BILINEAR), dtype=np.float32)
        return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1)

    def encode_image(self, pixels):
        p = self.patchify(pixels.to(self.device)).flatten(2).transpose(1, 2)  # [B,16,32]
        g = self.proj(p.mean(1))
        return ImageFeatures(embeds=nn.functional.normalize(g, dim=-1), patches=p,
                             patch_embeds=self.proj(p))

    def tokenize(self, texts):
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        mask = torch.zeros(len(texts), self.max_len, dtype=torch.bool)
        for i, t in enumerate(texts):
            words = t.lower().split()[: self.max_len] or [""]
            for j, w in enumerate(words):
                ids[i, j] = zlib.crc32(w.encode()) % (self.vocab_size - 1) + 1
                mask[i, j] = True
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def token_embedding(self):
        return self.tok

    def encode_tokens(self, input_ids, attention_mask, inputs_embeds=None):
        e = self.tok(input_ids) if inputs_embeds is None else inputs_embeds
        tokens = self.text_proj(e)
        m = attention_mask.float().unsqueeze(-1)
        t = (tokens * m).sum(1) / m.sum(1).clamp(min=1)
        return TextFeatures(embeds=nn.functional.normalize(t, dim=-1), tokens=tokens,
                            mask=attention_mask.bool())


def make_images(folder, n: int = 6, size=(40, 30), seed: int = 0) -> list:
    """Write n small random JPEG/PNG images; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        p = folder / (f"img{i:03d}.jpg" if i % 2 == 0 else f"img{i:03d}.png")
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def complete_checkpoints(run) -> list[dict]:
    """trainer_state.json of every complete checkpoint of a run (or stage) directory, oldest first;
    safe while the run writes and prunes them."""
    ckpts = Path(run) / "checkpoints"
    out = []
    for d in sorted(ckpts.glob("step-*")) if ckpts.exists() else []:
        if d.name.endswith(".tmp"):
            continue
        try:
            out.append(json.loads((d / "trainer_state.json").read_text()))
        except (OSError, json.JSONDecodeError):  # not complete yet, or removed while we looked
            continue
    return out


def logged_steps(run) -> list[int]:
    """Steps in a run's train_log.jsonl (a line cut by a kill is skipped)."""
    try:
        lines = (Path(run) / "train_log.jsonl").read_text().splitlines()
    except OSError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return steps


WORDS = ["red", "blue", "green", "small", "big", "old", "new", "tall"]


def toy_coco_corpus(folder, n: int) -> None:
    """folder/imgs/ with n images of `make_images` and folder/caps.json (COCO format): 2 captions
    per image, 4 words each ("a red small thing"), so every batch has equal token counts."""
    folder = Path(folder)
    images, anns = [], []
    for i, p in enumerate(make_images(folder / "imgs", n)):
        images.append({"id": i + 1, "file_name": f"imgs/{p.name}"})
        for j in range(2):
            anns.append({"image_id": i + 1, "id": 10 * i + j,
                         "caption": f"a {WORDS[(i + j) % 8]} {WORDS[(3 * i + j) % 8]} thing"})
    (folder / "caps.json").write_text(json.dumps({"images": images, "annotations": anns}))
