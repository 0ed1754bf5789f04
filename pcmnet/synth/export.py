"""Export a synthetic corpus as a Hugging Face `datasets` dataset or as parquet shards.

One row per pair, images embedded as bytes (the export is self-contained):

    image_id (caption_id#k), image, caption, caption_id, image_index, clip_score, clip_backbone,
    seed, nsfw, model, scheduler, steps, guidance, size, dtype, gen_seconds, sha1

    hf       `save_to_disk` folder: `load_corpus(CorpusConfig(path=OUT))` reads it back (format hf)
    parquet  OUT/data/train-00000-of-0000N.parquet (the hub's layout; `datasets.load_dataset(
             "parquet", data_files=...)` or `load_dataset(OUT)` read it)

Pairs flagged by the safety checker are left out unless `include_nsfw`. The export is built in a
temp folder next to OUT and renamed into place, so OUT is either absent or complete.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

from ..errors import PcmnetError
from . import manifest as mf

log = logging.getLogger("pcmnet.synth")


def features():
    from datasets import Features, Image, Value

    return Features({
        "image_id": Value("string"), "image": Image(), "caption": Value("string"),
        "caption_id": Value("string"), "image_index": Value("int32"), "clip_score": Value("float64"),
        "clip_backbone": Value("string"), "seed": Value("int64"), "nsfw": Value("bool"),
        "model": Value("string"), "scheduler": Value("string"), "steps": Value("int32"),
        "guidance": Value("float64"), "size": Value("string"), "dtype": Value("string"),
        "gen_seconds": Value("float64"), "sha1": Value("string"),
    })


def _examples(folder: str, rows: list[dict]):
    names = [n for n in features() if n not in ("image_id", "image")]
    for row in rows:
        image = None
        if row.get("image"):
            path = Path(folder) / row["image"]
            image = {"bytes": path.read_bytes(), "path": path.name}
        yield {"image_id": mf.pair_id(row["caption_id"], row["image_index"]), "image": image,
               **{n: row.get(n) for n in names}}


def export_rows(folder: str | Path, include_nsfw: bool = False) -> list[dict]:
    """The merged rows of a synth folder that go into an export (complete pairs only)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PcmnetError(f"{folder}: no such synth folder")
    rows = [r for r in mf.merged_rows(folder) if mf.is_complete(folder, r)]
    if not include_nsfw:
        rows = [r for r in rows if not r.get("nsfw")]
    if not rows:
        raise PcmnetError(f"{folder}: no complete pairs to export")
    return rows


def export(folder: str | Path, out: str | Path, fmt: str = "hf", include_nsfw: bool = False,
           max_shard_mb: float = 500, push_to_hub: str | None = None) -> Path:
    """Write the export of synth folder `folder` to `out` (must not exist yet). Returns `out`."""
    import datasets

    if fmt not in ("hf", "parquet"):
        raise PcmnetError(f"export format '{fmt}' (one of: hf, parquet)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PcmnetError(f"{out}: already exists and is not empty; choose a new export folder")
    rows = export_rows(folder, include_nsfw)
    total = sum(r.get("bytes") or 0 for r in rows)
    shards = max(1, math.ceil(total / (max_shard_mb * 2**20)))

    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        ds = datasets.Dataset.from_generator(
            _examples, features=features(), cache_dir=str(work / "cache"),
            gen_kwargs={"folder": str(folder), "rows": rows}, fingerprint=f"pcmnet-synth-{os.getpid()}")
        target = work / "export"
        if fmt == "hf":
            ds.save_to_disk(str(target), num_shards=shards)
        else:
            (target / "data").mkdir(parents=True)
            for i in range(shards):
                ds.shard(shards, i, contiguous=True).to_parquet(
                    str(target / "data" / f"train-{i:05d}-of-{shards:05d}.parquet"))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(target, out)  # the local export is complete before any upload is tried
        if push_to_hub:
            try:
                ds.push_to_hub(push_to_hub, max_shard_size=int(max_shard_mb * 2**20))
            except Exception as e:  # network, auth, repo name: the export above stays
                msg = " ".join(str(e).split())[:200]
                raise PcmnetError(f"{out}: exported, but pushing to the hub as '{push_to_hub}' failed "
                                  f"({type(e).__name__}: {msg})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("exported %d pairs (%d shards) to %s", len(rows), shards, out)
    return out
