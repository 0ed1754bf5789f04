"""The on-disk layout of a synthetic corpus, and every write to it (METHODS.md section 2).

    OUT/
      settings.json                  generation settings the folder was made with (model, steps, ...)
      images/ab/<slug>_<hash>_<k>.png
      manifest.part-00000.jsonl      generation lines, appended by process 0 (one per pair)
      manifest.part-00001.jsonl      ... by process 1 (accelerate), etc.
      scores.part-00000.jsonl        CLIP scores added later by `pcmnet synth score`
      manifest.jsonl                 the merged manifest: one line per pair, sorted
      .tmp/                          temp files of writes in flight (removed at the end of a run)

Durability: an image is written to `.tmp/` and renamed into place (os.replace is atomic), and
only then is its manifest line appended; a batch's lines go out in one write followed by fsync.
A pair is complete when its line exists and its image file has the recorded size (or the line
says the safety checker flagged it). So a kill at any moment loses at most the batch in flight,
and a torn last line (kill inside a write) is ignored when reading and cut off before the next
append. Images are not fsync'd one by one (8 ms each on a plain disk, see bench/bench_synth.py):
a process kill cannot lose page-cache data, and after a power cut an image whose data never
reached the disk shows up with the wrong size (empty) and is generated again.

Merge: the union of `manifest.jsonl` and all parts, one row per (caption_id, image_index) (the
latest `created` wins), with the latest CLIP score of any line or score part laid over it
(latest `scored_at` wins), sorted by (caption_id, image_index), written atomically.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..data.jsonl import dumps
from ..data.records import DataError, Record

MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"
TMP_DIR = ".tmp"
SCORE_FIELDS = ("clip_score", "clip_backbone", "scored_at")
TIME_FIELDS = ("gen_seconds", "created", "scored_at")  # differ between otherwise identical runs
META_FIELDS = ("image_index", "seed", "clip_score", "clip_backbone", "nsfw", "model", "scheduler",
               "steps", "guidance", "size", "dtype", "sha1")

Key = tuple[str, int]


def part_path(folder: str | Path, rank: int, kind: str = "manifest") -> Path:
    """`manifest.part-00003.jsonl` (generation) or `scores.part-00003.jsonl` (scoring)."""
    return Path(folder) / f"{kind}.part-{rank:05d}.jsonl"


def pair_key(row: dict) -> Key:
    return (str(row["caption_id"]), int(row["image_index"]))


def pair_id(caption_id: str, image_index: int) -> str:
    """Record id of a synthetic pair (also the `image_id` column of exports)."""
    return f"{caption_id}#{image_index}"


def tmp_dir(folder: str | Path, rank: int) -> Path:
    return Path(folder) / TMP_DIR / f"rank-{rank:05d}"


# --------------------------------------------------------------------------------------------
# writing


def atomic_write(path: Path, data: bytes, tmp: Path, fsync: bool = True) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete: write a temp file
    in `tmp` (same filesystem), optionally fsync it, then os.replace it onto `path`."""
    tmp.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = tmp / f"{path.name}.{os.getpid()}.tmp"
    with open(temp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(temp, path)


def clear_tmp(folder: str | Path, rank: int | None = None) -> None:
    """Remove temp files of writes that never finished (one process's, or all with rank=None)."""
    path = Path(folder) / TMP_DIR
    if rank is not None:
        path = tmp_dir(folder, rank)
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# reading and merging


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a manifest file. A torn last line (no newline) is ignored; any other bad line is a
    DataError naming the file and line."""
    path = Path(path)
    try:
        data = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    lines = data.split("\n")
    lines.pop()  # "" after the last newline, or a torn line
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pair_key(row)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}:{lineno}: not a manifest line ({type(e).__name__}: {e})") from None
        rows.append(row)
    return rows


def _later(a: float | None, b: float | None) -> bool:
    return (a or 0.0) >= (b or 0.0)


def merge_rows(generation: list[dict], scores: list[dict] = ()) -> list[dict]:
    """One row per pair: the latest generation line, with the latest score laid over it."""
    gen: dict[Key, dict] = {}
    best: dict[Key, dict] = {}
    for row in generation:
        k = pair_key(row)
        if k not in gen or _later(row.get("created"), gen[k].get("created")):
            gen[k] = row
    for row in list(generation) + list(scores):
        if row.get("clip_score") is None:
            continue
        k = pair_key(row)
        if k not in best or _later(row.get("scored_at"), best[k].get("scored_at")):
            best[k] = {f: row.get(f) for f in SCORE_FIELDS}
    out = []
    for k in sorted(gen):
        row = dict(gen[k])
        for f in SCORE_FIELDS:
            row.setdefault(f, None)
        row.update(best.get(k, {}))
        out.append(row)
    return out


def merged_rows(folder: str | Path) -> list[dict]:
    """The merged view of a synthetic-corpus folder (manifest.jsonl + all parts), in memory."""
    folder = Path(folder)
    generation, scores = [], []
    if (folder / MANIFEST).exists():
        generation += read_jsonl(folder / MANIFEST)
    for p in sorted(folder.glob("manifest.part-*.jsonl")):
        generation += read_jsonl(p)
    for p in sorted(folder.glob("scores.part-*.jsonl")):
        scores += read_jsonl(p)
    return merge_rows(generation, scores)


def write_merged(folder: str | Path, rank: int = 0) -> Path:
    """Merge everything into `folder/manifest.jsonl` atomically; returns its path."""
    folder = Path(folder)
    rows = merged_rows(folder)
    path = folder / MANIFEST
    atomic_write(path, "".join(dumps(r) + "\n" for r in rows).encode("utf-8"), tmp_dir(folder, rank))
    return path


def is_complete(folder: Path, row: dict) -> bool:
    """A line whose pair needs no more work: flagged by the safety checker, or its image is on
    disk with the recorded size."""
    if row.get("nsfw"):
        return True
    if not row.get("image"):
        return False
    try:
        return (folder / row["image"]).stat().st_size == row.get("bytes")
    except OSError:
        return False


def completed_keys(folder: str | Path, wanted: set[Key] | None = None,
                   rows: list[dict] | None = None) -> set[Key]:
    """Keys (of `wanted`, or all) whose pairs are complete in `folder`."""
    folder = Path(folder)
    rows = merged_rows(folder) if rows is None else rows
    return {pair_key(r) for r in rows
            if (wanted is None or pair_key(r) in wanted) and is_complete(folder, r)}


def check_folder(folder: str | Path) -> Path:
    """`folder` as a Path, or a one-line DataError if it holds no manifest (merged or parts)."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists() and not any(folder.glob("manifest.part-*.jsonl")):
        raise DataError(f"{folder}: no {MANIFEST} or manifest.part-*.jsonl here (not a pcmnet synth folder)")
    return folder


def read_manifest_records(path: str | Path, include_nsfw: bool = False) -> list[Record]:
    """Records of a synthetic corpus (`load_corpus(..., format="manifest")`): one per pair, with
    `file` (absolute), one caption and its `caption_id`, and `meta` (clip_score, seed, nsfw,
    image_index, model, ...). Pairs flagged by the safety checker are left out unless
    `include_nsfw` (they have no image file)."""
    path = Path(path)
    if path.is_dir():
        rows, root = merged_rows(check_folder(path)), path
    else:
        rows, root = merge_rows(read_jsonl(path)), path.parent
    out = []
    for row in rows:
        if row.get("nsfw") and not include_nsfw:
            continue
        if "caption" not in row:
            raise DataError(f"{path}: line for caption id {row['caption_id']} has no 'caption'")
        image = row.get("image")
        out.append(Record(
            image_id=pair_id(row["caption_id"], row["image_index"]),
            file=str((root / image).resolve()) if image else None,
            captions=[row["caption"]], caption_ids=[str(row["caption_id"])],
            meta={f: row.get(f) for f in META_FIELDS}))
    return out
