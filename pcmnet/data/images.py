"""Image loading that never crashes a batch: unreadable images are reported and skipped."""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError

from .records import Record

log = logging.getLogger("pcmnet")


class ImageError(ValueError):
    """An image that cannot be decoded. The message is one line and names the file."""


def open_image(source, name: str | None = None) -> Image.Image:
    """Path, bytes or PIL image -> RGB PIL image, or ImageError (one line, names the file)."""
    name = name or (str(source) if isinstance(source, (str, Path)) else "<in-memory image>")
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(source)
        img.load()
        return img.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name}: unreadable image ({type(e).__name__}: {e})") from None


def load_record_image(rec: Record) -> Image.Image:
    if rec.image is not None:
        return open_image(rec.image, rec.file or f"image {rec.image_id}")
    if rec.file is None:
        raise ImageError(f"record {rec.image_id}: has no image")
    return open_image(rec.file)


def content_hash(rec: Record) -> str:
    """Hash of the image bytes (or of the in-memory image), used to key cached features."""
    h = hashlib.sha1()
    if rec.image is not None:
        if isinstance(rec.image, (bytes, bytearray)):
            h.update(rec.image)
        else:
            h.update(rec.image.tobytes())
    else:
        try:
            with open(rec.file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise ImageError(f"{rec.file}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()[:16]


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class ImageDataset(torch.utils.data.Dataset):
    """Records -> (index, pixels) with the backbone's preprocessing; (index, None) if unreadable."""

    def __init__(self, records: list[Record], preprocess: Callable):
        self.records = records
        self.preprocess = preprocess

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        try:
            return i, self.preprocess(load_record_image(self.records[i]))
        except ImageError as e:
            return i, str(e)


def collate_skip_bad(batch):
    """Collate (index, pixels|error) pairs; returns (indices, pixels or None, [(index, error)])."""
    good = [(i, x) for i, x in batch if not isinstance(x, str)]
    bad = [(i, x) for i, x in batch if isinstance(x, str)]
    if not good:
        return [], None, bad
    idx = [i for i, _ in good]
    return idx, torch.stack([x for _, x in good]), bad


def image_loader(records: list[Record], preprocess: Callable, batch_size: int = 32,
                 num_workers: int = 0):
    """Batches of (indices, pixels, errors). Errors are logged once here and never raise."""
    ds = ImageDataset(records, preprocess)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                     collate_fn=collate_skip_bad)
    for idx, pixels, bad in dl:
        for _, err in bad:
            log.warning("skipping %s", err)
        yield idx, pixels, bad
