"""Caption corpus -> image-caption pairs with a diffusers text-to-image pipeline (METHODS.md 2).

For every caption c (and image index k < images_per_caption) of this process's shard:

    seed   = pair_seed(global seed, caption id, k)            (shard.py)
    x      = pipeline(c, generator=torch.Generator("cpu").manual_seed(seed), steps, guidance, size)
    s      = max(cos(g(x), t(c)), 0) with the backbone        (score.py; optional here)
    images/..png written atomically, then one manifest line   (manifest.py)

Prompts are batched (`batch_size` per pipeline call) with one generator per image, so an image
does not depend on its batch-mates' seeds. Batches are fixed slices of the shard's pair list in
corpus order; pairs already complete are dropped from their slice, so a resumed run calls the
pipeline on the same batches as an uninterrupted one. The latents are drawn on the CPU, so they
are the same on every device; the denoising itself is bit-exact only on the same device.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..data.jsonl import PartWriter
from ..data.readers import load_corpus
from ..data.records import DataError, iter_captions
from ..errors import MissingWeightsError, PcmnetError
from . import manifest as mf
from .config import GENERATION_KEYS, SynthConfig, parse_size
from ..distributed import process_state
from .shard import owns, pair_seed

log = logging.getLogger("pcmnet.synth")


@dataclass
class Pair:
    caption_id: str
    caption: str
    image_index: int
    seed: int

    @property
    def key(self) -> mf.Key:
        return (self.caption_id, self.image_index)


# --------------------------------------------------------------------------------------------
# what to generate


def load_captions(cfg: SynthConfig) -> list[tuple[str, str]]:
    """(caption id, caption) of the corpus in corpus order; the first `limit` captions."""
    records = load_corpus(cfg.captions, require_captions=True)
    items, seen = [], set()
    for it in iter_captions(records):
        if it.caption_id in seen:
            raise DataError(f"{cfg.captions.path}: caption id '{it.caption_id}' appears twice "
                            "(synthetic pairs are keyed by caption id; set captions.id_column)")
        seen.add(it.caption_id)
        items.append((it.caption_id, it.caption))
        if cfg.limit is not None and len(items) >= cfg.limit:
            break
    return items


def shard_pairs(items: list[tuple[str, str]], cfg: SynthConfig, rank: int, world: int) -> list[Pair]:
    """The pairs of the captions process `rank` of `world` owns, in corpus order."""
    return [Pair(cid, cap, k, pair_seed(cfg.seed, cid, k))
            for i, (cid, cap) in enumerate(items) if owns(i, rank, world)
            for k in range(cfg.images_per_caption)]


def image_relpath(caption_id: str, image_index: int, ext: str) -> str:
    """images/<2 hex>/<readable slug>_<8 hex>_<k>.<ext>: the hash keeps odd ids ('a.jpg#2', '/')
    unique and fans files out over 256 folders."""
    h = hashlib.sha1(caption_id.encode("utf-8")).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", caption_id).strip("-")[:40] or "caption"
    return f"images/{h[:2]}/{slug}_{h[:8]}_{image_index}.{ext}"


def model_name(model: str) -> str:
    """Absolute path for a local pipeline dir, the hub id otherwise (recorded in the manifest)."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


# --------------------------------------------------------------------------------------------
# the pipeline


def process_device(wanted: str | None, state) -> str:
    """The config's device, except that a bare "cuda" (or none) means this process's own GPU
    (cuda:LOCAL_RANK under accelerate), so N processes never pile onto cuda:0."""
    return str(state.device) if wanted in (None, "", "cuda") else wanted


def resolve_dtype(name: str, device: str):
    """(torch dtype, name actually used). CPU always runs fp32 (half precision there is slow or
    unsupported in many kernels)."""
    import torch

    on_cpu = str(device).startswith("cpu")
    if name == "auto":
        name = "fp32" if on_cpu else "fp16"
    if on_cpu and name != "fp32":
        warnings.warn(f"dtype {name} requested on CPU; using fp32")  # shown once per run
        name = "fp32"
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name], name


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for the named one, keeping its noise schedule config."""
    if name == "default":
        return
    import diffusers

    classes = {"dpmpp": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler",
               "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
               "pndm": "PNDMScheduler", "unipc": "UniPCMultistepScheduler"}
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpmpp" else {}
    cls = getattr(diffusers, classes[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def load_pipeline(cfg: SynthConfig, device: str):
    """A diffusers text-to-image pipeline (SD 1.x/2.x, SDXL, ...) from a hub id or local dir, on
    `device`, in the config's dtype, with the chosen scheduler. Returns (pipe, dtype name)."""
    from diffusers import AutoPipelineForText2Image

    dtype, dtype_name = resolve_dtype(cfg.dtype, device)
    local = Path(cfg.model).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise MissingWeightsError(f"{cfg.model}: not a diffusers pipeline folder (no model_index.json)")
    from ..backbones.hub import hub_offline_unless_reachable

    offline = False
    try:  # a hub id without a reachable hub fails at once (cache only), not after minutes of retries
        with warnings.catch_warnings(), hub_offline_unless_reachable() as offline:
            warnings.filterwarnings("ignore", message=".*torch_dtype.*")  # newer diffusers: `dtype`
            pipe = AutoPipelineForText2Image.from_pretrained(str(local) if local.exists() else cfg.model,
                                                             torch_dtype=dtype)
    except OSError as e:
        first = (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__).rstrip(".")
        hint = ("; the Hugging Face hub is not reachable from here, so pass a local diffusers folder"
                if offline and not local.exists() else "")
        raise MissingWeightsError(f"cannot load diffusion pipeline '{cfg.model}': {first}{hint}") from None
    if not cfg.safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    set_scheduler(pipe, cfg.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), dtype_name


# zlib level 1: ~5x faster than PIL's default 6 on 512x512 photos for ~7-15% larger files
# (bench/bench_synth.py); encoding is CPU time the GPU spends waiting.
PNG_COMPRESS_LEVEL = 1


def encode_image(image, fmt: str) -> bytes:
    """PIL image -> file bytes (PNG lossless, or JPEG quality 95). Deterministic for a given image."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def check_settings(folder: Path, settings: dict, rank: int) -> None:
    """Refuse to add pairs made with other generation settings to a folder that holds pairs
    (a folder without any, e.g. after a first run whose pipeline failed to load, is re-set)."""
    path = folder / mf.SETTINGS
    has_pairs = (folder / mf.MANIFEST).exists() or any(folder.glob("manifest.part-*.jsonl"))
    if path.exists() and has_pairs:
        old = json.loads(path.read_text())
        diff = [k for k in GENERATION_KEYS if old.get(k) != settings.get(k)]
        if diff:
            shown = ", ".join(f"{k}={old.get(k)!r} (now {settings.get(k)!r})" for k in diff)
            raise PcmnetError(f"{path}: this folder was made with {shown}; use another --out "
                              "or the same settings")
        return
    mf.atomic_write(path, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode(),
                    mf.tmp_dir(folder, rank))


# --------------------------------------------------------------------------------------------
# the loop


def generate(cfg: SynthConfig, pipe=None, backbone=None) -> dict:
    """Run one `pcmnet synth` job (this process's shard). `pipe`/`backbone` may be passed in
    already loaded (Python API, tests); otherwise they are loaded from the config. Returns
    counts for this process; process 0 also writes the merged manifest.jsonl at the end."""
    import torch
    from tqdm.auto import tqdm

    cfg.check()
    state = process_state()
    rank, world = state.process_index, state.num_processes
    device = process_device(cfg.device, state)
    folder = Path(cfg.out)
    folder.mkdir(parents=True, exist_ok=True)
    mf.clear_tmp(folder, rank)
    tmp = mf.tmp_dir(folder, rank)

    _, dtype_name = resolve_dtype(cfg.dtype, device)
    size = parse_size(cfg.size)
    settings = {"model": model_name(cfg.model), "scheduler": cfg.scheduler, "steps": cfg.steps,
                "guidance": float(cfg.guidance), "size": "%dx%d" % size if size else None,
                "dtype": dtype_name, "seed": cfg.seed, "image_format": cfg.image_format}
    check_settings(folder, settings, rank)

    pairs = shard_pairs(load_captions(cfg), cfg, rank, world)
    done = mf.completed_keys(folder, wanted={p.key for p in pairs})
    batches = [[p for p in pairs[i: i + cfg.batch_size] if p.key not in done]
               for i in range(0, len(pairs), cfg.batch_size)]
    batches = [b for b in batches if b]
    todo = sum(len(b) for b in batches)
    log.info("process %d/%d: %d pairs in shard, %d already complete, %d to generate",
             rank, world, len(pairs), len(pairs) - todo, todo)

    counts = {"pairs": len(pairs), "skipped": len(pairs) - todo, "generated": 0, "nsfw": 0}
    if batches:
        if pipe is None:
            pipe, dtype_name = load_pipeline(cfg, device)
        if backbone is None:
            from .score import load_scorer

            backbone = load_scorer(cfg.backbone, device)
        fixed = {"model": settings["model"], "scheduler": cfg.scheduler, "steps": cfg.steps,
                 "guidance": float(cfg.guidance), "dtype": dtype_name,
                 "device": torch.device(device).type}
        bar = tqdm(total=todo, unit="img", desc=f"synth[{rank}]", disable=not state.is_local_main_process)
        with PartWriter(mf.part_path(folder, rank)) as writer:
            for batch in batches:
                rows = generate_batch(pipe, batch, cfg, size, fixed, folder, tmp, backbone)
                writer.append(rows)
                counts["generated"] += len(rows)
                counts["nsfw"] += sum(r["nsfw"] for r in rows)
                bar.update(len(rows))
        bar.close()

    state.wait_for_everyone()
    if state.is_main_process:
        counts["manifest"] = str(mf.write_merged(folder, rank))
        mf.clear_tmp(folder)
    else:
        mf.clear_tmp(folder, rank)
    log.info("process %d/%d: generated %d pairs (%d flagged by the safety checker), skipped %d",
             rank, world, counts["generated"], counts["nsfw"], counts["skipped"])
    return counts


def generate_batch(pipe, batch: list[Pair], cfg: SynthConfig, size, fixed: dict, folder: Path,
                   tmp: Path, backbone=None) -> list[dict]:
    """One pipeline call for a batch of pairs; writes their images; returns their manifest lines."""
    import torch

    width, height = size if size else (None, None)
    generators = [torch.Generator("cpu").manual_seed(p.seed) for p in batch]
    start = time.perf_counter()
    with torch.no_grad():
        out = pipe(prompt=[p.caption for p in batch], generator=generators, height=height, width=width,
                   num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, output_type="pil")
    seconds = (time.perf_counter() - start) / len(batch)
    flags = getattr(out, "nsfw_content_detected", None) or [False] * len(batch)

    scores = [None] * len(batch)
    keep = [i for i, f in enumerate(flags) if not f]
    if backbone is not None and keep:
        from .score import clip_scores

        for i, s in zip(keep, clip_scores(backbone, [out.images[i] for i in keep],
                                          [batch[i].caption for i in keep])):
            scores[i] = s
    now = time.time()
    ext = "jpg" if cfg.image_format == "jpg" else "png"
    scorer = backbone.fingerprint() if backbone is not None else None
    rows = []
    for p, image, flag, score in zip(batch, out.images, flags, scores):
        row = {"caption_id": p.caption_id, "image_index": p.image_index, "caption": p.caption,
               "seed": p.seed, **fixed, "size": f"{image.width}x{image.height}",
               "nsfw": bool(flag), "image": None, "bytes": None, "sha1": None,
               "gen_seconds": seconds, "created": now,
               "clip_score": score, "clip_backbone": scorer if score is not None else None,
               "scored_at": now if score is not None else None}
        if not flag:  # a flagged image is blacked out by the pipeline: nothing worth keeping
            data = encode_image(image, cfg.image_format)
            rel = image_relpath(p.caption_id, p.image_index, ext)
            mf.atomic_write(folder / rel, data, tmp, fsync=False)  # the manifest append is fsync'd
            row.update(image=rel, bytes=len(data), sha1=hashlib.sha1(data).hexdigest())
        rows.append(row)
    return rows
