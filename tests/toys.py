"""Tiny deterministic stand-ins used across the unit tests (no downloads, milliseconds to run),
and helpers that watch a training run from outside (kill/resume tests).

`ToyBackbone` honours the full backbone contract of pcmnet.backbones.base with random weights:
a 16x16 image is cut into 4x4 patches (N=16, Dv=32) and projected into a D=24 joint space by the
same linear map for the global (mean) token and every patch; text is a bag of hashed word
embeddings. It is NOT a captioning model; it only lets tests exercise real code paths quickly.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


def weights(model_dir) -> dict:
    """The tensors of a saved model directory."""
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


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


def kill_mid_epoch(cmd: list[str], run, cwd, min_step: int = 1) -> int:
    """Run `cmd` (a tests/scripts/train_toy.py command; every step slowed to 0.4 s) and kill -9 it
    once the newest checkpoint of `run` (a run or stage directory) is mid-epoch, at step >= min_step,
    and a later step was logged; return that checkpoint's step. If the window is missed on a busy
    machine, the next mid-epoch checkpoint gives another one."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOY_STEP_SLEEP="0.4")
    proc = subprocess.Popen([sys.executable] + [str(c) for c in cmd], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            done = complete_checkpoints(run)
            if done and done[-1]["batch"] > 0 and done[-1]["step"] >= min_step \
                    and max(logged_steps(run), default=0) > done[-1]["step"]:
                proc.send_signal(signal.SIGKILL)
                killed_at = done[-1]["step"]
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait()
    assert killed_at is not None, proc.stderr.read().decode()[-2000:]
    # the run restarts from the middle of an epoch (a newer checkpoint may have been completed
    # between the last look and the kill; then the test has to be rerun on a calmer machine)
    last = complete_checkpoints(run)[-1]
    assert last["step"] == killed_at and last["batch"] > 0, (killed_at, last)
    return killed_at


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
