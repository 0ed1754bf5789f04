"""Which process does what, and the seed of each pair (METHODS.md section 2).

Under `accelerate launch --num_processes N ...` every process runs the same command and reads the
same caption list. Process r takes the captions at positions p with p mod N == r (`owns`): the
assignment depends only on the list and N, never on what is already done, so processes need not
talk to each other before they start, shards never overlap, and their sizes differ by at most
one caption. Single-process runs are rank 0 of 1.

Seeds: `pair_seed(global seed, caption id, image index)` is a stable 63-bit hash, so an image is
reproducible from its manifest line alone: `torch.Generator("cpu").manual_seed(seed)`.
"""
from __future__ import annotations

import hashlib


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def pair_seed(global_seed: int, caption_id: str, image_index: int) -> int:
    """Seed of image `image_index` of caption `caption_id`: sha256 of the three, 63 bits."""
    return _hash64(f"{int(global_seed)}\x1f{caption_id}\x1f{int(image_index)}") & (2**63 - 1)


def owns(position: int, rank: int, world: int) -> bool:
    """Does process `rank` of `world` own the item at `position` of the shared list?"""
    return position % world == rank


