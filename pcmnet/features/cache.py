"""Feature cache: backbone features (METHODS.md section 1) computed once, stored on disk, read lazily.

Every method reads the frozen backbone's outputs many times (an epoch per pass), so they are
extracted once into a cache directory:

    <cache_dir>/<backbone fingerprint>/<kind>/          kind: "image" or "text"
        backbone.json                                  fingerprint + spec of the backbone
        shards/r<rank>-<run>-<seq>.safetensors          one tensor per field, [rows, ...]
        index-r<rank>.jsonl                            one line per complete shard:
            {"shard": name, "rows": n, "fields": [...], "keys": [[item_id, content_hash], ...]}

An item is keyed by (backbone fingerprint, item id, content hash): the fingerprint picks the
directory, (item id, hash) the index entry. Images hash their file bytes (`content_hash`), captions
their text (`text_hash`), so a changed file or caption is recomputed and never served stale.

Writing protocol (what makes reading during a run and resuming after a crash safe):
1. the extractor buffers at most `shard_size` rows (plus the batch in flight) in memory;
2. a full buffer is written to `<shard>.tmp`, fsync'd and `os.replace`d to its final name;
3. only then is its index line appended (one `write` call on an O_APPEND file) and fsync'd.
A reader therefore only ever sees index lines whose shard is complete; a crash loses at most the
unflushed buffer. A torn last index line (crash during step 3) is skipped by readers and closed off
with a newline by the next writer. Shards are read through `safetensors.safe_open` (memory-mapped,
row by row), so reading never loads the dataset into memory.

Storage types: "embeds" float32; the large per-token fields "patches", "patch_embeds", "tokens"
float16 (half the disk; a shard whose values would overflow float16 keeps float32); "mask" bool.
Everything floating is returned as float32.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..backbones.base import Backbone
from ..data.images import ImageError, content_hash, image_loader, text_hash
from ..data.records import CaptionItem, Record
from ..errors import PcmnetError

log = logging.getLogger("pcmnet")

IMAGE_FIELDS = ("embeds", "patches", "patch_embeds")
TEXT_FIELDS = ("embeds", "tokens", "mask")
HALF_FIELDS = ("patches", "patch_embeds", "tokens")  # stored float16 unless that would overflow
FP16_MAX = 65504.0
OPEN_SHARDS = 32  # memory-mapped shard handles a view keeps open (least recently used are closed)

Key = tuple[str, str]  # (item id, content hash)


def cache_dir_for(cache_dir: str | Path, fingerprint: str, kind: str) -> Path:
    """`<cache_dir>/<fingerprint>/<kind>`; a fingerprint that is not a safe file name is cleaned
    and suffixed with its hash so two fingerprints never share a directory."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", fingerprint).strip("._") or "backbone"
    if name != fingerprint:
        name = f"{name[:80]}-{hashlib.sha1(fingerprint.encode()).hexdigest()[:8]}"
    return Path(cache_dir) / name / kind


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# the store: one (backbone, kind) directory


class FeatureStore:
    """The shards and index of one (backbone fingerprint, kind) directory."""

    def __init__(self, cache_dir: str | Path, fingerprint: str, kind: str):
        self.root = cache_dir_for(cache_dir, fingerprint, kind)
        self.fingerprint = fingerprint
        self.kind = kind

    # -- reading ----------------------------------------------------------------------------------
    def read_index(self) -> tuple[list[tuple[Path, frozenset]], dict[Key, list[tuple[int, int]]]]:
        """All complete index entries: shards [(path, stored field names)] and, per key, its
        (shard number, row) entries in the order they were written (index files sorted by name)."""
        shards: list[tuple[Path, frozenset]] = []
        where: dict[Key, list[tuple[int, int]]] = {}
        for index in sorted(self.root.glob("index-*.jsonl")):
            with open(index, encoding="utf-8") as f:
                for line in f:
                    if not line.endswith("\n"):
                        continue  # torn last line of a crashed writer
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn line closed off by a later writer
                    path = self.root / "shards" / entry["shard"]
                    if not path.exists():
                        log.warning("feature cache %s: shard %s is missing; its items are recomputed",
                                    self.root, entry["shard"])
                        continue
                    s = len(shards)
                    shards.append((path, frozenset(entry["fields"])))
                    for row, (item, h) in enumerate(entry["keys"]):
                        where.setdefault((item, h), []).append((s, row))
        return shards, where

    def view(self, keys: list[Key | None], fields: dict[str, str]) -> "FeatureView":
        """A view of `keys` (None = no item) over the requested fields {name: stored name}."""
        return FeatureView(self, keys, fields)

    # -- writing ----------------------------------------------------------------------------------
    def writer(self, rank: int, shard_size: int, spec: dict | None = None) -> "ShardWriter":
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        meta = self.root / "backbone.json"
        if not meta.exists():
            tmp = meta.with_name(f"backbone.json.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "spec": spec}, indent=1) + "\n")
            os.replace(tmp, meta)
        return ShardWriter(self, rank, shard_size)


class ShardWriter:
    """Buffers rows and writes them as complete shards of `shard_size` rows (the last may be
    smaller), each atomically, then its index line. Use as a context manager: leaving it flushes
    the remainder (also on an exception, so work done before a Python error is kept)."""

    def __init__(self, store: FeatureStore, rank: int, shard_size: int):
        if shard_size < 1:
            raise PcmnetError(f"shard_size must be >= 1, got {shard_size}")
        self.store = store
        self.rank = rank
        self.shard_size = shard_size
        self.run = uuid.uuid4().hex[:8]
        self.seq = 0
        self.keys: list[Key] = []
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.index = store.root / f"index-r{rank}.jsonl"

    def add(self, keys: list[Key], tensors: dict[str, torch.Tensor]) -> None:
        """Append a batch: `tensors[name]` has len(keys) rows."""
        self.keys.extend(keys)
        for name, t in tensors.items():
            self.buffer.setdefault(name, []).append(t.detach().cpu())
        while len(self.keys) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        full = {name: torch.cat(parts) for name, parts in self.buffer.items()}
        rows = {name: _storage_dtype(name, t[:n]).contiguous() for name, t in full.items()}
        keys, self.keys = self.keys[:n], self.keys[n:]
        self.buffer = {name: [t[n:]] for name, t in full.items()} if self.keys else {}
        name = f"r{self.rank}-{self.run}-{self.seq:05d}.safetensors"
        self.seq += 1
        shards = self.store.root / "shards"
        tmp = shards / f"{name}.tmp"
        save_file(rows, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, shards / name)
        _fsync_dir(shards)
        line = json.dumps({"shard": name, "rows": n, "fields": sorted(rows),
                           "keys": [list(k) for k in keys]}, separators=(",", ":")) + "\n"
        fd = os.open(self.index, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size and _last_byte(self.index) != b"\n":
                os.write(fd, b"\n")  # close off a line torn by a crashed writer
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.keys:
            self._flush(len(self.keys))

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _storage_dtype(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t
    base = name.split("@")[0]
    if base in HALF_FIELDS and (t.numel() == 0 or t.abs().max().item() <= FP16_MAX):
        return t.to(torch.float16)
    return t.to(torch.float32)


# ------------------------------------------------------------------------------------------------
# the read-only view


class FeatureView:
    """Read-only view of the cached features of given items, in the given order.

    `view[i]` -> {field: tensor} (float32 / bool) or None when item i has no cached features
    (an unreadable image); `valid[i]` says which. `batch(indices)` stacks the valid ones of
    `indices` (plus "index": their positions); `stack(field)` stacks one field over all valid items.
    Rows are read from memory-mapped shards on demand; the view holds no feature tensors itself.
    The view is a snapshot of the index when it was made; it can be pickled into DataLoader workers.
    """

    def __init__(self, store: FeatureStore, keys: list[Key | None], fields: dict[str, str]):
        self.store = store
        self.fields = dict(fields)
        self.keys = list(keys)
        shards, where = store.read_index()
        wanted = set(self.fields.values())
        usable = [wanted <= f for _, f in shards]
        self.shards = [p for p, _ in shards]
        # the newest entry holding every requested field (older entries may hold fewer fields)
        self.loc: list[tuple[int, int] | None] = []
        for k in self.keys:
            hits = [e for e in where.get(k, ()) if usable[e[0]]] if k is not None else []
            self.loc.append(hits[-1] if hits else None)
        self.valid: list[bool] = [loc is not None for loc in self.loc]
        self.stats: dict = {}
        self._open: OrderedDict[int, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | None:
        if self.loc[i] is None:
            return None
        s, row = self.loc[i]
        f = self._shard(s)
        return {name: _to_float32(f.get_slice(stored)[row]) for name, stored in self.fields.items()}

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Stack the valid items of `indices`; "index" holds the positions that were valid."""
        keep = [int(i) for i in indices if self.loc[i] is not None]
        out = {name: self._read(stored, keep) for name, stored in self.fields.items()}
        out["index"] = torch.tensor(keep, dtype=torch.long)
        return out

    def stack(self, field: str) -> torch.Tensor:
        """One field of every valid item, in order: [num_valid, ...] (for small fields)."""
        if field not in self.fields:
            raise PcmnetError(f"field '{field}' is not in this view (fields: {', '.join(self.fields)})")
        return self._read(self.fields[field], [i for i, ok in enumerate(self.valid) if ok])

    def _read(self, stored: str, items: list[int]) -> torch.Tensor:
        """Rows of `items` (all valid); runs of consecutive rows of one shard are one slice read."""
        parts = []
        j = 0
        while j < len(items):
            s, start = self.loc[items[j]]
            end = start + 1
            while j + (end - start) < len(items) and self.loc[items[j + end - start]] == (s, end):
                end += 1
            parts.append(self._shard(s).get_slice(stored)[start:end])
            j += end - start
        if not parts:
            return self._empty(stored)
        return _to_float32(torch.cat(parts))

    def _empty(self, stored: str) -> torch.Tensor:
        """[0, ...] with the field's row shape (taken from any valid item), or [0] if there is none."""
        loc = next((loc for loc in self.loc if loc is not None), None)
        if loc is None:
            return torch.zeros(0)
        return _to_float32(self._shard(loc[0]).get_slice(stored)[0:0])

    def _shard(self, s: int):
        f = self._open.get(s)
        if f is None:
            f = safe_open(str(self.shards[s]), framework="pt")
            self._open[s] = f
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(s)
        return f

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # file handles do not travel; reopened on demand
        return state


def _to_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bool else t.float()


# ------------------------------------------------------------------------------------------------
# extraction


class _Ranks:
    """The bits of an accelerate `Accelerator` / `PartialState` used here (None = one process)."""

    def __init__(self, accelerator=None):
        self.acc = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.is_main = self.rank == 0

    def wait(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def share(self, todo: list[int], batch_size: int) -> list[int]:
        """This rank's part of `todo`: a contiguous run of whole batches (so every rank runs the
        same batches a single process would, and the shares are disjoint and cover `todo`)."""
        nb = -(-len(todo) // batch_size)
        lo, hi = nb * self.rank // self.world, nb * (self.rank + 1) // self.world
        return todo[lo * batch_size: hi * batch_size]


def _check_args(fields, allowed: tuple[str, ...], batch_size: int) -> tuple[str, ...]:
    if batch_size < 1:
        raise PcmnetError(f"batch_size must be >= 1, got {batch_size}")
    fields = tuple(fields)
    bad = [f for f in fields if f not in allowed]
    if bad or not fields:
        raise PcmnetError(f"unknown feature field '{bad[0] if bad else ''}' (fields: {', '.join(allowed)})")
    return fields


def _hash_images(records: list[Record], ranks: _Ranks, threads: int, progress: bool) -> list[str | None]:
    """content_hash of every record (None, logged once, when the file cannot be read); the work is
    split across ranks and gathered so every rank gets all hashes."""
    mine = list(range(ranks.rank, len(records), ranks.world))

    def one(i: int) -> str | None:
        if not records[i].has_image:
            log.warning("skipping record %s: it has no image", records[i].image_id)
            return None
        try:
            return content_hash(records[i])
        except ImageError as e:
            log.warning("skipping %s", e)
            return None

    bar = tqdm(total=len(mine), desc="hashing images", unit="img", disable=not (progress and ranks.is_main),
               leave=False)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        hashes = []
        for h in pool.map(one, mine):
            hashes.append(h)
            bar.update(1)
    bar.close()
    out: list[str | None] = [None] * len(records)
    for part, idx in zip(ranks.gather(hashes), [range(r, len(records), ranks.world) for r in range(ranks.world)]):
        for i, h in zip(idx, part):
            out[i] = h
    return out


def _missing(keys: list[Key | None], view: FeatureView) -> list[int]:
    """Positions whose key has no cached entry with all fields (each key once)."""
    seen, todo = set(), []
    for i, (k, ok) in enumerate(zip(keys, view.valid)):
        if k is not None and not ok and k not in seen:
            seen.add(k)
            todo.append(i)
    return todo


def _finish(store, keys, names, ranks, cached, computed, t0, kind) -> FeatureView:
    ranks.wait()  # every rank's shards are written before anyone reads the index
    view = store.view(keys, names)
    view.stats = {
        "kind": kind, "total": len(keys), "cached": cached, "computed": sum(ranks.gather(computed)),
        "unreadable": len(keys) - sum(view.valid), "seconds": time.perf_counter() - t0,
        "backbone": store.fingerprint, "cache": str(store.root),
    }
    return view


@torch.inference_mode()
def extract_image_features(records: list[Record], backbone: Backbone, cache_dir: str | Path,
                           fields=IMAGE_FIELDS, batch_size: int = 64, shard_size: int = 1024,
                           num_workers: int = 0, progress: bool = True, accelerator=None) -> FeatureView:
    """Backbone image features of `records` (ImageFeatures fields), computing only what the cache
    lacks, and a view of all of them in `records` order.

    An item is cached when one index entry for (image_id, content_hash) holds all `fields`; items
    cached with fewer fields are recomputed whole (the backbone computes every field in one
    forward anyway) and stored again with the requested fields. Unreadable images are logged once,
    skipped, and have `valid[i] = False`; they are retried on the next run (they are never cached).
    With an `accelerator` of several processes each rank computes a disjoint share into its own
    shards, then all ranks wait and return the same view.
    """
    fields = _check_args(fields, IMAGE_FIELDS, batch_size)
    ranks = _Ranks(accelerator)
    t0 = time.perf_counter()
    store = FeatureStore(cache_dir, backbone.fingerprint(), "image")
    hashes = _hash_images(records, ranks, num_workers, progress)
    keys = [(r.image_id, h) if h is not None else None for r, h in zip(records, hashes)]
    names = {f: f for f in fields}
    before = store.view(keys, names)
    todo = _missing(keys, before)
    ranks.wait()  # all ranks read the same index before anyone writes
    mine = ranks.share(todo, batch_size)
    bar = tqdm(total=len(mine), desc=f"image features ({backbone.kind})", unit="img",
               disable=not (progress and ranks.is_main))
    computed = 0
    with store.writer(ranks.rank, shard_size, backbone.spec()) as w:
        for idx, pixels, bad in image_loader([records[i] for i in mine], backbone.preprocess,
                                             batch_size, num_workers):
            if pixels is not None:
                out = backbone.encode_image(pixels.to(backbone.device))
                w.add([keys[mine[j]] for j in idx], {f: getattr(out, f).float() for f in fields})
                computed += len(idx)
            bar.update(len(idx) + len(bad))
    bar.close()
    return _finish(store, keys, names, ranks, sum(before.valid), computed, t0, "image")


@torch.inference_mode()
def extract_text_features(captions: list[CaptionItem], backbone: Backbone, cache_dir: str | Path,
                          fields=("embeds",), max_tokens: int = 32, batch_size: int = 256,
                          shard_size: int = 8192, progress: bool = True, accelerator=None) -> FeatureView:
    """Backbone text features of `captions` (TextFeatures fields): "embeds" [D]; "tokens"
    [max_tokens, D] and "mask" [max_tokens] padded with zeros/False or truncated to `max_tokens`
    (stored as "tokens@<max_tokens>", so several lengths can live side by side). Same caching,
    resuming and multi-process rules as `extract_image_features`, keyed by (caption_id, text_hash).
    """
    fields = _check_args(fields, TEXT_FIELDS, batch_size)
    ranks = _Ranks(accelerator)
    t0 = time.perf_counter()
    store = FeatureStore(cache_dir, backbone.fingerprint(), "text")
    keys = [(c.caption_id, text_hash(c.caption)) for c in captions]
    names = {f: (f if f == "embeds" else f"{f}@{max_tokens}") for f in fields}
    before = store.view(keys, names)
    todo = _missing(keys, before)
    ranks.wait()
    mine = ranks.share(todo, batch_size)
    bar = tqdm(total=len(mine), desc=f"text features ({backbone.kind})", unit="cap",
               disable=not (progress and ranks.is_main))
    with store.writer(ranks.rank, shard_size, backbone.spec()) as w:
        for b in range(0, len(mine), batch_size):
            part = mine[b: b + batch_size]
            out = backbone.encode_text([captions[i].caption for i in part])
            tokens, mask = _fit(out.tokens.float(), out.mask.bool(), max_tokens)
            have = {"embeds": out.embeds.float(), "tokens": tokens, "mask": mask}
            w.add([keys[i] for i in part], {names[f]: have[f] for f in fields})
            bar.update(len(part))
    bar.close()
    return _finish(store, keys, names, ranks, sum(before.valid), len(mine), t0, "text")


def _fit(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (zeros / False) or truncate [B,L,D] tokens and [B,L] mask to L = length."""
    B, L, D = tokens.shape
    if L >= length:
        return tokens[:, :length], mask[:, :length]
    return (torch.cat([tokens, tokens.new_zeros(B, length - L, D)], 1),
            torch.cat([mask, mask.new_zeros(B, length - L)], 1))
