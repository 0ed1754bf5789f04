"""The one record type every reader produces and every job consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """Bad input data. The message is one line and names the file (and line, where there is one)."""


@dataclass
class Record:
    """One image (or one caption group of a text corpus).

    image_id:    stable string id (COCO id, Flickr file stem, row id, ...).
    file:        absolute path of the image file, or None (text corpora, in-memory images).
    captions:    reference captions (empty for unlabeled images).
    caption_ids: one stable id per caption (COCO annotation id, "img.jpg#2", line number, ...).
    image:       an in-memory image (PIL.Image or encoded bytes) when there is no file, e.g. a
                 Hugging Face dataset with an Image column.
    meta:        anything else a reader knows (split, clip_score, seed, ...).
    """

    image_id: str
    file: str | None = None
    captions: list[str] = field(default_factory=list)
    caption_ids: list[str] = field(default_factory=list)
    image: Any = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.image_id = str(self.image_id)
        if not self.caption_ids:
            self.caption_ids = [f"{self.image_id}#{j}" for j in range(len(self.captions))]
        elif len(self.caption_ids) != len(self.captions):
            raise ValueError("caption_ids and captions must have the same length")
        self.caption_ids = [str(c) for c in self.caption_ids]

    @property
    def has_image(self) -> bool:
        return self.file is not None or self.image is not None


@dataclass
class CaptionItem:
    """One caption of a corpus, flattened out of its record (text-only training, synthesis)."""

    caption_id: str
    caption: str
    image_id: str


def iter_captions(records: list[Record]):
    for r in records:
        for cid, cap in zip(r.caption_ids, r.captions):
            yield CaptionItem(caption_id=cid, caption=cap, image_id=r.image_id)
