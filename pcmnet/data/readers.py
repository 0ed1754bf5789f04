"""Readers for every caption / image format pcmnet accepts. Each returns a list of `Record`s.

    coco      COCO caption json (`images` + optional `annotations`); also image lists without captions
    karpathy  Karpathy `dataset_{coco,flickr8k,flickr30k}.json` (split "train" includes "restval")
    flickr    Flickr8k/30k token files: `image.jpg#N<TAB>caption`, optional image-list split file
    csv, tsv  one row per caption (or per image); choose the caption / image / id columns
    txt       plain text, one caption per line
    folder    a directory of images (walked recursively), no captions
    hf        a Hugging Face `datasets` dataset: a `save_to_disk` directory or a hub id
    manifest  a pcmnet synthetic-corpus directory or its manifest.jsonl (see pcmnet.synth)

`load_corpus(CorpusConfig(...))` picks the reader (format "auto" guesses from the path) and applies
the split filter and the limit. Bad input raises `DataError` with a one-line message naming the
file (and the line where there is one).
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .records import DataError, Record

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FORMATS = ("auto", "coco", "karpathy", "flickr", "csv", "tsv", "txt", "folder", "hf", "manifest")


@dataclass
class CorpusConfig:
    """Where a corpus lives and how to read it (the `data.*` sections of every config)."""

    path: str = ""
    format: str = "auto"
    images: str | None = None  # image root (default: next to the annotation file)
    split: str | None = None  # Karpathy split, split-file key, or HF split
    split_file: str | None = None  # json {split: [ids]} or a Flickr-style list of image names
    caption_column: str | None = None  # csv/tsv/hf (default: caption, captions, prompt, text, sentence)
    image_column: str | None = None  # csv/tsv/hf (default: image, file, file_name, filename, filepath)
    id_column: str | None = None  # csv/tsv/hf (default: image_id, id; else the row number)
    limit: int | None = None  # keep the first N records (after the split filter)


# --------------------------------------------------------------------------------------------
# helpers


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _clean(caption) -> str:
    return " ".join(str(caption).split())


def _resolve(root: Path, name: str | None) -> str | None:
    if not name:
        return None
    p = Path(name)
    return str(p if p.is_absolute() else (root / p).resolve())


def _pick(columns, wanted: str | None, candidates: tuple[str, ...], path, what: str, required=True):
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{path}: no {what} column '{wanted}' (columns: {', '.join(map(str, columns))})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    if required:
        raise DataError(
            f"{path}: no {what} column found (looked for {', '.join(candidates)}; "
            f"columns: {', '.join(map(str, columns))}); choose one with the {what}_column option"
        )
    return None


CAPTION_COLUMNS = ("caption", "captions", "prompt", "text", "sentence", "sentences", "raw")
IMAGE_COLUMNS = ("image", "file", "file_name", "filename", "filepath", "image_path", "path")
ID_COLUMNS = ("image_id", "id", "caption_id", "img_id")


# --------------------------------------------------------------------------------------------
# readers


def read_coco(path, images: str | None = None) -> list[Record]:
    """COCO caption json. Images without annotations are kept with no captions (unlabeled sets)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{path}: not a COCO json (no 'images' list)")
    root = Path(images) if images else path.parent
    records: dict[str, Record] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im:
            raise DataError(f"{path}: images[{i}] has no 'id'")
        name = im.get("file") or im.get("file_name")
        if name and images and im.get("file_name"):
            name = im["file_name"]  # an explicit image root holds the COCO file names
        meta = {k: im[k] for k in ("width", "height", "coco_split") if k in im}
        records[str(im["id"])] = Record(image_id=str(im["id"]), file=_resolve(root, name), meta=meta)
    for i, ann in enumerate(data.get("annotations") or []):
        try:
            rec = records[str(ann["image_id"])]
            cap = _clean(ann["caption"])
        except KeyError as e:
            raise DataError(f"{path}: annotations[{i}] has no image or field {e}") from None
        if cap:
            rec.captions.append(cap)
            rec.caption_ids.append(str(ann.get("id", f"{rec.image_id}#{len(rec.captions) - 1}")))
    return list(records.values())


def read_karpathy(path, images: str | None = None, split: str | None = None) -> list[Record]:
    """Karpathy split json. `split='train'` includes 'restval' (the usual convention)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{path}: not a Karpathy dataset json (no 'images' list)")
    wanted = None if split is None else ({"train", "restval"} if split == "train" else {split})
    root = Path(images) if images else path.parent
    out = []
    for i, im in enumerate(data["images"]):
        if wanted is not None and im.get("split") not in wanted:
            continue
        try:
            name = os.path.join(im.get("filepath", ""), im["filename"])
        except KeyError:
            raise DataError(f"{path}: images[{i}] has no 'filename'") from None
        image_id = im.get("cocoid", im.get("imgid", Path(im["filename"]).stem))
        caps, ids = [], []
        for j, s in enumerate(im.get("sentences", [])):
            if not isinstance(s, dict):
                raise DataError(f"{path}: images[{i}].sentences[{j}] is not an object with 'raw' or 'tokens'")
            cap = _clean(s.get("raw") or " ".join(s.get("tokens", [])))
            if cap:
                caps.append(cap)
                ids.append(str(s.get("sentid", f"{image_id}#{j}")))
        out.append(Record(image_id=str(image_id), file=_resolve(root, name), captions=caps,
                          caption_ids=ids, meta={"split": im.get("split")}))
    return out


_TOKEN_LINE = re.compile(r"^(?P<name>[^\t#]+)#(?P<n>\d+)\t(?P<cap>.*)$")


def read_flickr(path, images: str | None = None, split_file: str | None = None) -> list[Record]:
    """Flickr8k/30k token file (`name.jpg#N<TAB>caption`); `split_file` lists the image names to keep."""
    path = Path(path)
    keep = None
    if split_file:
        keep = {ln.strip() for ln in _read_lines(Path(split_file)) if ln.strip()}
    root = Path(images) if images else path.parent
    records: dict[str, Record] = {}
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        m = _TOKEN_LINE.match(line)
        if not m:
            raise DataError(f"{path}:{lineno}: expected 'image.jpg#N<TAB>caption', got {line[:60]!r}")
        name = m["name"].strip()
        if keep is not None and name not in keep:
            continue
        cap = _clean(m["cap"])
        if not cap:
            continue
        image_id = Path(name).stem
        rec = records.get(image_id)
        if rec is None:
            rec = records[image_id] = Record(image_id=image_id, file=_resolve(root, name))
        rec.captions.append(cap)
        rec.caption_ids.append(f"{name}#{m['n']}")
    return list(records.values())


def read_table(path, delimiter: str | None = None, caption_column=None, image_column=None,
               id_column=None, images: str | None = None) -> list[Record]:
    """CSV/TSV with a header row. Rows sharing an id (or image) are grouped into one record."""
    path = Path(path)
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    root = Path(images) if images else path.parent
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        try:
            return _read_table_rows(path, f, delimiter, caption_column, image_column, id_column, root)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_table_rows(path: Path, f, delimiter, caption_column, image_column, id_column, root) -> list[Record]:
    reader = csv.DictReader(f, delimiter=delimiter)
    columns = reader.fieldnames or []
    if not columns:
        raise DataError(f"{path}: empty file (no header row)")
    cap_col = _pick(columns, caption_column, CAPTION_COLUMNS, path, "caption", required=False)
    img_col = _pick(columns, image_column, IMAGE_COLUMNS, path, "image", required=False)
    if cap_col is None and img_col is None:
        raise DataError(f"{path}: found neither a caption nor an image column "
                        f"(columns: {', '.join(columns)}); set caption_column or image_column")
    id_col = _pick(columns, id_column, ID_COLUMNS, path, "id", required=False)
    records: dict[str, Record] = {}
    try:
        for row in reader:
            lineno = reader.line_num
            if None in row:
                raise DataError(f"{path}:{lineno}: more fields than the header has")
            img = row.get(img_col) if img_col else None
            key = row.get(id_col) if id_col else None
            key = key or (Path(img).stem if img else f"row{lineno - 1}")
            rec = records.get(key)
            if rec is None:
                rec = records[key] = Record(image_id=key, file=_resolve(root, img))
            if cap_col:
                cap = _clean(row.get(cap_col) or "")
                if cap:
                    rec.captions.append(cap)
                    rec.caption_ids.append(f"{key}#{len(rec.captions) - 1}" if id_col or img_col
                                           else key)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: bad CSV ({e})") from None
    return list(records.values())


def read_txt(path) -> list[Record]:
    """One caption per line; blank lines are skipped. Ids are 'line{N}' (1-based)."""
    path = Path(path)
    out = []
    for lineno, line in enumerate(_read_lines(path), 1):
        cap = _clean(line)
        if cap:
            out.append(Record(image_id=f"line{lineno}", captions=[cap], caption_ids=[f"line{lineno}"]))
    return out


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_folder(path) -> list[Record]:
    """All image files under `path` (recursive, sorted). Id = path relative to the folder, no suffix."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p))
    return [Record(image_id=p.relative_to(root).with_suffix("").as_posix(), file=str(p.resolve()))
            for p in files]


def read_hf(path, split: str | None = None, caption_column=None, image_column=None,
            id_column=None) -> list[Record]:
    """A `datasets` dataset: a `save_to_disk` directory (Dataset or DatasetDict) or a hub id."""
    import datasets

    p = Path(path)
    saved = p.is_dir() and any((p / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json"))
    if p.exists() and not saved:  # parquet: one file, or a folder of shards (data/train-*.parquet)
        files = [str(p)] if p.is_file() else sorted(str(f) for f in p.rglob("*.parquet"))
        try:
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        except Exception as e:  # datasets raises several types here
            raise DataError(f"{p}: cannot read parquet ({type(e).__name__}: {e})") from None
    elif p.exists():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise DataError(f"{p}: not a saved Hugging Face dataset ({e})") from None
    else:
        try:
            ds = datasets.load_dataset(str(path), split=split)
        except Exception as e:
            raise DataError(f"{path}: cannot load Hugging Face dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        name = split or ("train" if "train" in ds else next(iter(ds)))
        if name not in ds:
            raise DataError(f"{path}: no split '{name}' (splits: {', '.join(ds)})")
        ds = ds[name]
    columns = ds.column_names
    cap_col = _pick(columns, caption_column, CAPTION_COLUMNS, path, "caption", required=False)
    img_col = _pick(columns, image_column, IMAGE_COLUMNS, path, "image", required=False)
    id_col = _pick(columns, id_column, ID_COLUMNS, path, "id", required=False)
    cid_col = "caption_id" if "caption_id" in columns and id_col != "caption_id" else None
    if img_col and isinstance(ds.features.get(img_col), datasets.Image):
        ds = ds.cast_column(img_col, datasets.Image(decode=False))  # keep bytes; decode lazily
    out = []
    for i, row in enumerate(ds):
        image_id = str(row[id_col]) if id_col else str(i)
        caps = row.get(cap_col) if cap_col else []
        if isinstance(caps, str):
            caps = [caps]
        caps = [_clean(c["raw"] if isinstance(c, dict) else c) for c in (caps or [])]
        caps = [c for c in caps if c]
        file, image = None, None
        if img_col:
            v = row[img_col]
            if isinstance(v, dict):  # datasets.Image(decode=False): {"bytes", "path"}
                if v.get("bytes") is not None:
                    image = v["bytes"]
                else:
                    file = v.get("path")
            elif isinstance(v, str):
                file = v
            else:
                image = v
        cids = []
        if cid_col and row[cid_col] is not None:  # one caption per row with its own id (synth exports)
            cids = list(row[cid_col]) if isinstance(row[cid_col], list) else [str(row[cid_col])]
            if len(cids) != len(caps):
                cids = []
        meta = {k: row[k] for k in columns if k not in (cap_col, img_col, id_col, cid_col)
                and isinstance(row[k], (int, float, str, bool))}
        out.append(Record(image_id=image_id, file=file, captions=caps, caption_ids=cids, image=image,
                          meta=meta))
    return out


# --------------------------------------------------------------------------------------------
# dispatch


LOCAL_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".tab", ".txt", ".token", ".parquet", ".arrow", ".yaml"}


def detect_format(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        if (p / "manifest.jsonl").exists():
            return "manifest"
        if any((p / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return "hf"
        if any(p.glob("*.parquet")) or any((p / "data").glob("*.parquet")):
            return "hf"  # parquet shards (e.g. `pcmnet synth export --format parquet`)
        return "folder"
    if not p.exists():
        # "user/name" is a hub id, unless it names a file (known suffix) or a local folder
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and p.suffix.lower() not in LOCAL_SUFFIXES \
                and not p.parent.exists():
            return "hf"
        raise DataError(f"{path}: no such file or directory")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return "manifest"
    if suffix == ".json":
        data = _read_json(p)
        if isinstance(data, dict) and data.get("images") and isinstance(data["images"], list):
            first = data["images"][0]
            if isinstance(first, dict) and "sentences" in first:
                return "karpathy"
            return "coco"
        if isinstance(data, dict) and "annotations" in data:
            return "coco"
        raise DataError(f"{p}: json is neither COCO captions nor a Karpathy split file")
    if suffix == ".csv":
        return "csv"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".token" or p.name.endswith(".token.txt"):
        return "flickr"
    if suffix in (".txt", ".text", ""):
        head = [ln for ln in _read_lines(p)[:5] if ln.strip()]
        if head and all(_TOKEN_LINE.match(ln) for ln in head):
            return "flickr"
        return "txt"
    if suffix in (".parquet", ".arrow"):
        return "hf"
    if is_image_file(p):
        raise DataError(f"{p}: is an image; pass its folder, or use `pcmnet caption` for single images")
    raise DataError(f"{p}: unknown corpus format (set format: coco|karpathy|flickr|csv|tsv|txt|folder|hf|manifest)")


def _apply_split_file(records: list[Record], split_file: str, split: str | None) -> list[Record]:
    path = Path(split_file)
    if path.suffix.lower() == ".json":
        data = _read_json(path)
        if isinstance(data, dict):
            if split is None:
                raise DataError(f"{path}: a split name is needed (splits: {', '.join(map(str, data))})")
            if split not in data:
                raise DataError(f"{path}: no split '{split}' (splits: {', '.join(map(str, data))})")
            ids = data[split]
        else:
            ids = data
        keep = [str(i) for i in ids]
    else:
        keep = [Path(ln.strip()).stem for ln in _read_lines(path) if ln.strip()]
    by_id = {r.image_id: r for r in records}
    missing = [i for i in keep if i not in by_id]
    if missing:
        raise DataError(f"{path}: {len(missing)} ids of split '{split}' are not in the corpus "
                        f"(first: {missing[0]})")
    return [by_id[i] for i in keep]


def load_corpus(cfg: CorpusConfig | str, require_captions: bool = False,
                require_images: bool = False) -> list[Record]:
    """Read a corpus described by `cfg` (or just a path) into records."""
    if isinstance(cfg, (str, os.PathLike)):
        cfg = CorpusConfig(path=str(cfg))
    if not cfg.path:
        raise DataError("corpus path is empty (set data.<name>.path)")
    if cfg.limit is not None and cfg.limit < 0:
        raise DataError(f"{cfg.path}: limit {cfg.limit} is negative")
    fmt = cfg.format
    if fmt not in FORMATS:
        raise DataError(f"unknown corpus format '{fmt}' (one of: {', '.join(FORMATS)})")
    if fmt == "auto":
        fmt = detect_format(cfg.path)
    path = cfg.path
    if fmt != "hf" and not Path(path).exists():
        raise DataError(f"{path}: no such file or directory")
    split_file_used = False
    if fmt == "coco":
        records = read_coco(path, cfg.images)
    elif fmt == "karpathy":
        records = read_karpathy(path, cfg.images, cfg.split)
    elif fmt == "flickr":  # a Flickr-style image list filters while reading; a json split file after
        list_file = cfg.split_file and Path(cfg.split_file).suffix.lower() != ".json"
        records = read_flickr(path, cfg.images, cfg.split_file if list_file else None)
        split_file_used = bool(list_file)
    elif fmt in ("csv", "tsv"):
        records = read_table(path, "\t" if fmt == "tsv" else ",", cfg.caption_column,
                             cfg.image_column, cfg.id_column, cfg.images)
    elif fmt == "txt":
        records = read_txt(path)
    elif fmt == "folder":
        records = read_folder(path)
    elif fmt == "hf":
        records = read_hf(path, cfg.split, cfg.caption_column, cfg.image_column, cfg.id_column)
    else:  # manifest
        from ..synth.manifest import read_manifest_records

        records = read_manifest_records(path)
    if cfg.split and not cfg.split_file and fmt not in ("karpathy", "hf"):
        raise DataError(f"{path}: split '{cfg.split}' needs a split file for a {fmt} corpus "
                        "(set split_file; Karpathy json and HF datasets carry their own splits)")
    if cfg.split_file and not split_file_used:
        records = _apply_split_file(records, cfg.split_file, cfg.split)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    if not records:
        raise DataError(f"{path}: no records found")
    if require_captions and not any(r.captions for r in records):
        raise DataError(f"{path}: no captions found")
    if require_images and not any(r.has_image for r in records):
        raise DataError(f"{path}: no images found (set the `images` root or use an image corpus)")
    return records
