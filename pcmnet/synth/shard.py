"""Which process does what, and the seed of each pair (METHODS.md section 2).

Under `accelerate launch --num_processes N ...` every process runs the same command. Process r
takes the captions whose id hashes to r (`shard_of`): the assignment depends only on the caption
id and N, never on what is already done, so processes need not talk to each other before they
start and shards never overlap. Single-process runs are rank 0 of 1.

Seeds: `pair_seed(global seed, caption id, image index)` is a stable 63-bit hash, so an image is
reproducible from its manifest line alone: `torch.Generator("cpu").manual_seed(seed)`.
"""
from __future__ import annotations

import hashlib
from datetime import timedelta

# Processes wait for each other once, at the end, before process 0 merges the manifest. A process
# whose shard was mostly done before a resume may wait for hours; the default 30 min would kill it.
BARRIER_TIMEOUT = timedelta(hours=48)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def pair_seed(global_seed: int, caption_id: str, image_index: int) -> int:
    """Seed of image `image_index` of caption `caption_id`: sha256 of the three, 63 bits."""
    return _hash64(f"{int(global_seed)}\x1f{caption_id}\x1f{int(image_index)}") & (2**63 - 1)


def shard_of(caption_id: str, num_shards: int) -> int:
    """Process that owns a caption id: sha256(caption id) mod N."""
    return _hash64(caption_id) % num_shards if num_shards > 1 else 0


def process_state():
    """accelerate's PartialState (rank, world size, device, barrier); one process when not launched."""
    from accelerate import PartialState

    return PartialState(timeout=BARRIER_TIMEOUT)
