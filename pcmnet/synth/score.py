"""CLIP score of synthetic pairs: s = max(cos(g(x), t(c)), 0) with the backbone (METHODS.md 2).

Scored inline by `pcmnet synth` (when a backbone is set) or afterwards by `pcmnet synth score`
on an existing folder. Scores go to `scores.part-{rank}.jsonl` (append + fsync per batch) and are
laid over the manifest on merge, so scoring resumes after a kill and runs sharded under
`accelerate launch` like generation. A pair already scored by the same backbone (same
fingerprint) is skipped; scoring with another backbone replaces the scores.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone, BackboneConfig
from ..config import ConfigError
from ..data.jsonl import PartWriter
from ..data.records import Record
from . import manifest as mf
from ..distributed import process_state
from .shard import owns

log = logging.getLogger("pcmnet.synth")
BACKBONES = ("mini", "open_clip", "hf-clip", "hf_clip")  # what load_backbone knows


def load_scorer(cfg: BackboneConfig, device: str | torch.device | None = None) -> Backbone | None:
    """The backbone a config names, or None for name 'none' (no inline scoring)."""
    if cfg.name == "none":
        return None
    if cfg.name not in BACKBONES:
        raise ConfigError(f"config key 'backbone.name' is '{cfg.name}' (one of: {', '.join(BACKBONES)}, none)")
    from ..backbones.base import load_backbone

    return load_backbone(cfg, device=str(device) if device is not None else None)


def cosine_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> list[float]:
    """max(cos(g_i, t_i), 0) for each row i."""
    g = F.normalize(image_embeds.float(), dim=-1)
    t = F.normalize(text_embeds.float(), dim=-1)
    return (g * t).sum(-1).clamp(min=0).cpu().tolist()


@torch.no_grad()
def clip_scores(backbone: Backbone, images: list, captions: list[str]) -> list[float]:
    """CLIP scores of PIL images against their captions (one score per pair)."""
    pixels = torch.stack([backbone.preprocess(im.convert("RGB")) for im in images]).to(backbone.device)
    return cosine_scores(backbone.encode_image(pixels).embeds, backbone.encode_text(list(captions)).embeds)


@torch.no_grad()
def score_folder(folder: str | Path, backbone: Backbone, batch_size: int = 64) -> dict:
    """Score every complete, unflagged pair of `folder` not yet scored by this backbone.

    Process r takes the pairs at positions p = r mod N of the sorted manifest (the same list for
    every process: scoring adds no pairs); process 0 merges the scores into manifest.jsonl once
    all are done. Returns counts for this process.
    """
    from ..data.images import image_loader

    folder = mf.check_folder(folder)
    state = process_state()
    rank, world = state.process_index, state.num_processes
    mf.clear_tmp(folder, rank)
    fingerprint = backbone.fingerprint()
    rows = mf.merged_rows(folder)
    todo = [r for i, r in enumerate(rows) if owns(i, rank, world) and not r.get("nsfw")
            and not (r.get("clip_score") is not None and r.get("clip_backbone") == fingerprint)
            and mf.is_complete(folder, r)]
    scored = 0
    if todo:
        records = [Record(image_id=mf.pair_id(r["caption_id"], r["image_index"]),
                          file=str(folder / r["image"])) for r in todo]
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="img", desc=f"score[{rank}]", disable=not state.is_local_main_process)
        with PartWriter(mf.part_path(folder, rank, "scores")) as writer:
            for idx, pixels, bad in image_loader(records, backbone.preprocess, batch_size):
                if idx:
                    g = backbone.encode_image(pixels.to(backbone.device)).embeds
                    t = backbone.encode_text([todo[i]["caption"] for i in idx]).embeds
                    now = time.time()
                    writer.append([{"caption_id": todo[i]["caption_id"], "image_index": todo[i]["image_index"],
                                    "clip_score": s, "clip_backbone": fingerprint, "scored_at": now}
                                   for i, s in zip(idx, cosine_scores(g, t))])
                    scored += len(idx)
                bar.update(len(idx) + len(bad))
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        mf.write_merged(folder, rank)
        mf.clear_tmp(folder)
    log.info("process %d/%d: scored %d pairs (%d already scored by %s)", rank, world, scored,
             sum(1 for r in rows if r.get("clip_backbone") == fingerprint), fingerprint)
    return {"scored": scored, "todo": len(todo)}
