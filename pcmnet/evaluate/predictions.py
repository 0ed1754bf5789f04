"""Reading generated captions and pairing them with reference records (METHODS.md section 8).

Prediction files come in the formats `pcmnet caption` writes:

    .jsonl       one object per line: {"image_id": ..., "file": ..., "caption": ...}
    .json        COCO results: [{"image_id": 139, "caption": "..."}, ...] (or a {id: caption} mapping)
    .csv         header row with a caption column and image_id and/or file columns
    .tsv / .txt  the plain stdout format `file<TAB>caption` (a header row naming the columns is allowed)

Ids are compared after `normalize_id`: strings, with all-digit ids compared as integers, so
"000000000139" == 139. A prediction without a matching id is matched by its file (same file name as
the reference record's image, or a file stem equal to a reference id).
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..data.records import DataError, Record

log = logging.getLogger("pcmnet")

CAPTION_KEYS = ("caption", "text", "prediction")
ID_KEYS = ("image_id", "id")
FILE_KEYS = ("file", "file_name", "filename", "image", "path")


@dataclass
class Prediction:
    caption: str
    image_id: str | None = None
    file: str | None = None
    where: str = ""  # "file:line" for messages


def normalize_id(image_id) -> str:
    """String id; all-digit ids lose their leading zeros ("000000000139" -> "139")."""
    s = str(image_id).strip()
    return str(int(s)) if s.isdigit() else s


def _clean(text) -> str:
    return " ".join(str(text).split())


def _from_mapping(obj: dict, where: str) -> Prediction:
    cap_key = next((k for k in CAPTION_KEYS if k in obj), None)
    if cap_key is None or not isinstance(obj[cap_key], str):
        raise DataError(f"{where}: no caption string (expected a 'caption' field)")
    image_id = next((obj[k] for k in ID_KEYS if obj.get(k) is not None), None)
    file = next((obj[k] for k in FILE_KEYS if isinstance(obj.get(k), str) and obj[k]), None)
    if image_id is None and file is None:
        raise DataError(f"{where}: no 'image_id' or 'file' field")
    return Prediction(caption=_clean(obj[cap_key]), image_id=None if image_id is None else str(image_id),
                      file=file, where=where)


def _read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_jsonl(path: Path, text: str) -> list[Prediction]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line")
        out.append(_from_mapping(obj, f"{path}:{lineno}"))
    return out


def _read_json(path: Path, text: str) -> list[Prediction]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict) and not any(k in data for k in ("annotations", "images")):
        items = [{"image_id": k, "caption": v} for k, v in data.items()]
    elif isinstance(data, list):
        items = data
    else:
        raise DataError(f"{path}: expected COCO results (a list of {{image_id, caption}}) "
                        f"or an {{image_id: caption}} mapping")
    out = []
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: item [{i}] is not an object")
        out.append(_from_mapping(obj, f"{path}[{i}]"))
    return out


def _read_table(path: Path, text: str, delimiter: str) -> list[Prediction]:
    rows = csv.reader(text.splitlines(), delimiter=delimiter)
    header = next(rows, None)
    if header is None:
        return []
    columns = [h.strip() for h in header]
    if not any(c in CAPTION_KEYS for c in columns):
        raise DataError(f"{path}:1: header has no caption column (columns: {', '.join(columns)})")
    out = []
    for lineno, row in enumerate(rows, 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            raise DataError(f"{path}:{lineno}: {len(row)} fields, the header has {len(columns)}")
        out.append(_from_mapping({c: v for c, v in zip(columns, row) if v != ""}, f"{path}:{lineno}"))
    return out


def _read_tab_lines(path: Path, text: str) -> list[Prediction]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"{path}:{lineno}: expected 'file<TAB>caption', got {line[:60]!r}")
        file, caption = line.split("\t", 1)
        out.append(Prediction(caption=_clean(caption), file=file.strip(), where=f"{path}:{lineno}"))
    return out


def _looks_like_header(line: str) -> bool:
    cells = [c.strip() for c in line.split("\t")]
    return any(c in CAPTION_KEYS for c in cells) and any(c in ID_KEYS + FILE_KEYS for c in cells)


def read_predictions(path) -> list[Prediction]:
    """All predictions of a file (format from the suffix, else sniffed from the first character)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    text = _read_text(path)
    fmt = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}.get(path.suffix.lower())
    if fmt is None and path.suffix.lower() not in (".tsv", ".txt"):
        fmt = {"{": "jsonl", "[": "json"}.get(text.lstrip()[:1])
    if fmt == "jsonl":
        preds = _read_jsonl(path, text)
    elif fmt == "json":
        preds = _read_json(path, text)
    elif fmt == "csv":
        preds = _read_table(path, text, ",")
    elif text.strip() and _looks_like_header(text.lstrip().splitlines()[0]):
        preds = _read_table(path, text, "\t")
    else:
        preds = _read_tab_lines(path, text)
    if not preds:
        raise DataError(f"{path}: no predictions")
    return preds


# --------------------------------------------------------------------------------------------
# matching predictions to references


@dataclass
class Matched:
    """Predictions paired with references, keyed by the reference's image id."""

    predictions: dict[str, str]
    references: dict[str, list[str]]
    images: dict[str, str | None]  # image file to score with the backbone (None: not found)
    unmatched_predictions: list[str] = field(default_factory=list)  # "where" of each
    missing_predictions: list[str] = field(default_factory=list)  # reference ids without one
    references_without_captions: int = 0

    def counts(self) -> dict:
        return {"evaluated": len(self.predictions),
                "unmatched_predictions": len(self.unmatched_predictions),
                "references_without_prediction": len(self.missing_predictions),
                "references_without_captions": self.references_without_captions}


def _index_folder(folder: Path) -> dict[str, str]:
    """name, stem and normalized stem -> path for every image file under `folder`."""
    from ..data.readers import is_image_file

    index: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and is_image_file(p):
            for key in (p.name, p.stem, normalize_id(p.stem)):
                index.setdefault(key, str(p))
    return index


def match_predictions(preds: list[Prediction], records: list[Record], images_dir: str | None = None,
                      source: str = "predictions") -> Matched:
    """Pair each prediction with the reference record of the same image.

    Order of attempts: normalized image id; the prediction file's name equal to the record's image
    file name; the prediction file's (normalized) stem equal to a record id. Two predictions for
    the same image are an error. Image files for the CLIP metrics: `images_dir` searched by the
    record's file name, then by id; else the record's file; else the prediction's file.
    """
    labeled = [r for r in records if r.captions]
    by_id = {normalize_id(r.image_id): r for r in labeled}
    by_name = {Path(r.file).name: r for r in labeled if r.file}
    folder = None
    if images_dir is not None:
        if not Path(images_dir).is_dir():
            raise DataError(f"{images_dir}: --images is not a directory")
        folder = _index_folder(Path(images_dir))

    out = Matched({}, {}, {}, references_without_captions=len(records) - len(labeled))
    seen: dict[str, str] = {}
    for p in preds:
        rec = by_id.get(normalize_id(p.image_id)) if p.image_id is not None else None
        if rec is None and p.file:
            name = Path(p.file).name
            rec = by_name.get(name) or by_id.get(normalize_id(Path(name).stem))
        if rec is None:
            out.unmatched_predictions.append(f"{p.where} (id {p.image_id or Path(p.file or '').stem})")
            continue
        if rec.image_id in seen:
            raise DataError(f"{p.where}: a second prediction for image {rec.image_id} "
                            f"(first at {seen[rec.image_id]})")
        seen[rec.image_id] = p.where
        out.predictions[rec.image_id] = p.caption
        out.references[rec.image_id] = list(rec.captions)
        image = None
        if folder is not None:
            keys = [Path(rec.file).name] if rec.file else []
            keys += [Path(p.file).name] if p.file else []
            keys += [rec.image_id, normalize_id(rec.image_id)]
            image = next((folder[k] for k in keys if k in folder), None)
        if image is None and rec.file and Path(rec.file).is_file():
            image = rec.file
        if image is None and p.file and Path(p.file).is_file():
            image = str(Path(p.file).resolve())
        out.images[rec.image_id] = image
    out.missing_predictions = [r.image_id for r in labeled if r.image_id not in seen]

    if not out.predictions:
        first = out.unmatched_predictions[0] if out.unmatched_predictions else "none"
        raise DataError(f"{source}: none of the {len(preds)} predictions matches a reference image "
                        f"with captions (first unmatched: {first})")
    if out.unmatched_predictions:
        log.warning("%d predictions match no reference image and are ignored (first: %s)",
                    len(out.unmatched_predictions), out.unmatched_predictions[0])
    if out.missing_predictions:
        log.warning("evaluating on a subset: %d of %d reference images have a prediction "
                    "(%d have none, first: %s)", len(out.predictions), len(labeled),
                    len(out.missing_predictions), out.missing_predictions[0])
    return out
