"""Caption images in batches: the Python API under `pcmnet caption`.

    for r in caption_images(["photos/", "cat.jpg"], model="runs/x/model"):
        print(r.file, r.caption)

Images are read in batches through the backbone, unreadable files are reported and skipped (their
result has `error` set), and the captioner decodes a whole batch at once with beam search.
Under `accelerate launch` each process captions a disjoint share of the images.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .data.readers import read_folder
from .data.records import DataError, Record
from .errors import MissingWeightsError

log = logging.getLogger("pcmnet")

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default_captioner"
FORMATS = {".jsonl": "jsonl", ".json": "coco", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}


@dataclass
class CaptionResult:
    image_id: str
    file: str | None
    caption: str | None
    error: str | None = None


def collect_images(paths: Iterable[str | os.PathLike]) -> list[Record]:
    """Files and folders (walked recursively) -> image records, in the order given. A folder's
    images get ids relative to it; a single file's id is its name without suffix."""
    records: list[Record] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = read_folder(p)
            if not found:
                log.warning("%s: no images in this folder", p)
            records.extend(found)
        elif p.is_file():
            records.append(Record(image_id=p.stem, file=str(p.resolve())))
        else:
            raise DataError(f"{p}: no such file or directory")
    if not records:
        raise DataError("no images to caption")
    return _unique_ids(records)


def _unique_ids(records: list[Record]) -> list[Record]:
    """Drop repeats of the same file; ids shared by different files (photo.jpg, photo.png) keep
    their suffix ("photo.jpg", "photo.png") so every output row names one image."""
    seen, out = set(), []
    for r in records:
        if r.file not in seen:
            seen.add(r.file)
            out.append(r)
    counts = Counter(r.image_id for r in out)
    for r in out:
        if counts[r.image_id] > 1:
            r.image_id += Path(r.file).suffix
    return out


def load_captioner(model=None, backbone=None, device: str | None = None):
    """(captioner, backbone) from a model directory (default: the bundled offline model)."""
    from .backbones.base import load_backbone
    from .models.captioner import Captioner, read_model_config

    if model is None or isinstance(model, (str, os.PathLike)):
        model_dir = Path(model) if model is not None else DEFAULT_MODEL
        if model is None and not (model_dir / "config.json").exists():
            raise MissingWeightsError(f"the bundled default model is missing from {model_dir}; "
                                      "reinstall pcmnet or pass --model DIR")
        spec = read_model_config(model_dir)["backbone"]["spec"]  # checked before loading a backbone
        if backbone is None:
            backbone = load_backbone(spec, device=device)
        model = Captioner.from_pretrained(model_dir, backbone=backbone)
    elif backbone is None:
        backbone = load_backbone(model.backbone_info.spec, device=device)
    return model.to(backbone.device).eval(), backbone


@torch.no_grad()
def caption_records(records: list[Record], model, backbone, batch_size: int = 32, progress: bool = True,
                    num_workers: int = 0, **generate_kwargs) -> Iterator[CaptionResult]:
    """Caption `records` in batches, yielding results in input order (errors included)."""
    from tqdm.auto import tqdm

    from .data.images import image_loader

    bar = tqdm(total=len(records), desc="caption", unit="img", disable=not progress)
    for idx, pixels, bad in image_loader(records, backbone.preprocess, batch_size, num_workers):
        results = {i: CaptionResult(records[i].image_id, records[i].file, None, err) for i, err in bad}
        if pixels is not None:
            feats = backbone.encode_image(pixels.to(backbone.device))
            inputs = model.image_inputs({k: getattr(feats, k) for k in model.image_fields()})
            for i, cap in zip(idx, model.generate(inputs, **generate_kwargs)):
                results[i] = CaptionResult(records[i].image_id, records[i].file, cap)
        for i in sorted(results):
            yield results[i]
        bar.update(len(results))
    bar.close()


def caption_images(paths, model=None, backbone=None, batch_size: int = 32, progress: bool = False,
                   **generate_kwargs) -> list[CaptionResult]:
    """Caption image files / folders with a model directory or Captioner (default: bundled model).
    generate_kwargs: beam_size, max_len, length_penalty, no_repeat_ngram."""
    model, backbone = load_captioner(model, backbone)
    return list(caption_records(collect_images(paths), model, backbone, batch_size, progress,
                                **generate_kwargs))


# ------------------------------------------------------------------------------------------------
# output


def output_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unknown output format (use .jsonl, .json (COCO results), .csv or .tsv)")
    return FORMATS[suffix]


def coco_id(image_id: str):
    """COCO results want integer ids; numeric ids (also zero-padded file names) become ints."""
    return int(image_id) if image_id.isdigit() else image_id


def render(results: list[CaptionResult], fmt: str) -> str:
    ok = [r for r in results if r.caption is not None]
    if fmt == "jsonl":
        return "".join(json.dumps({"image_id": r.image_id, "file": r.file, "caption": r.caption}) + "\n"
                       for r in ok)
    if fmt == "coco":
        return json.dumps([{"image_id": coco_id(r.image_id), "caption": r.caption} for r in ok], indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image_id", "file", "caption"])
        w.writerows([r.image_id, r.file, r.caption] for r in ok)
        return buf.getvalue()
    return "".join(f"{r.file}\t{r.caption}\n" for r in ok)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:  # odd file names survive
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sidecar_path(file: str, keep_suffix: bool = False) -> Path:
    """photo.jpg -> photo.txt; with keep_suffix (another image is photo.png) -> photo.jpg.txt."""
    return Path(file + ".txt") if keep_suffix else Path(file).with_suffix(".txt")


def sidecar_paths(records: list[Record]) -> dict[str, Path]:
    """file -> its sidecar; images that would share one (photo.jpg, photo.png) keep their suffix."""
    stems = Counter(str(Path(r.file).with_suffix("")) for r in records if r.file)
    return {r.file: sidecar_path(r.file, stems[str(Path(r.file).with_suffix(""))] > 1)
            for r in records if r.file}
