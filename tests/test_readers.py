"""Corpus readers (every format), split files, limits, one-line errors; safe image loading."""
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from pcmnet.data.images import ImageError, content_hash, image_loader, load_record_image, open_image
from pcmnet.data.readers import CorpusConfig, detect_format, load_corpus
from pcmnet.data.records import DataError, Record, iter_captions
from toys import ToyBackbone, make_images


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def coco_json(tmp_path, with_annotations=True, name="caps.json"):
    data = {"images": [{"id": 7, "file_name": "img000.jpg", "width": 40, "height": 30},
                       {"id": 3, "file_name": "img001.png"},
                       {"id": 12, "file_name": "img002.jpg"}]}
    if with_annotations:
        data["annotations"] = [
            {"image_id": 7, "id": 100, "caption": "A  red\tbus on the street."},
            {"image_id": 3, "id": 101, "caption": "two dogs"},
            {"image_id": 7, "id": 102, "caption": "a bus"},
            {"image_id": 3, "id": 103, "caption": "   "},  # blank: dropped
        ]
    p = tmp_path / name
    p.write_text(json.dumps(data, indent=1))
    return p


# ------------------------------------------------------------------------------------------------
# COCO


def test_coco_with_annotations(tmp_path):
    p = coco_json(tmp_path)
    recs = load_corpus(str(p))
    assert [r.image_id for r in recs] == ["7", "3", "12"]  # file order
    assert recs[0].captions == ["A red bus on the street.", "a bus"]  # whitespace collapsed
    assert recs[0].caption_ids == ["100", "102"]
    assert recs[1].captions == ["two dogs"] and recs[1].caption_ids == ["101"]
    assert recs[2].captions == []  # an image without annotations is kept, unlabeled
    assert recs[0].file == str((tmp_path / "img000.jpg").resolve())
    assert recs[0].meta == {"width": 40, "height": 30}
    # explicit image root
    recs = load_corpus(CorpusConfig(path=str(p), images="/data/coco/val2017"))
    assert recs[0].file == "/data/coco/val2017/img000.jpg"
    # flattened captions keep their ids
    items = list(iter_captions(recs))
    assert [(i.caption_id, i.image_id) for i in items] == [("100", "7"), ("102", "7"), ("101", "3")]


def test_coco_without_annotations(tmp_path):
    p = coco_json(tmp_path, with_annotations=False)
    assert detect_format(str(p)) == "coco"
    recs = load_corpus(str(p), require_images=True)
    assert len(recs) == 3 and all(not r.captions for r in recs)
    with pytest.raises(DataError) as e:
        load_corpus(str(p), require_captions=True)
    assert str(p) in one_line(e) and "no captions" in str(e.value)


def test_coco_structure_errors(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"images": [{"file_name": "a.jpg"}]}))
    with pytest.raises(DataError, match=r"images\[0\] has no 'id'"):
        load_corpus(CorpusConfig(path=str(p), format="coco"))
    p.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 2, "caption": "x"}]}))
    with pytest.raises(DataError, match=r"annotations\[0\]"):
        load_corpus(CorpusConfig(path=str(p), format="coco"))
    p.write_text(json.dumps({"foo": 1}))
    with pytest.raises(DataError) as e:
        load_corpus(str(p))
    assert str(p) in one_line(e)


def test_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n "images": [\n  {"id": 1,}\n ]\n}\n')
    with pytest.raises(DataError) as e:
        load_corpus(str(p))
    assert one_line(e).startswith(f"{p}:3:")
    with pytest.raises(DataError) as e:
        load_corpus(CorpusConfig(path=str(p), format="coco"))
    assert one_line(e).startswith(f"{p}:3:")


# ------------------------------------------------------------------------------------------------
# Karpathy


def test_karpathy_splits(tmp_path):
    def im(i, split):
        return {"filepath": "val2014", "filename": f"COCO_{i}.jpg", "cocoid": i, "split": split,
                "sentences": [{"raw": f"caption {i} a", "tokens": ["x"], "sentid": 10 * i},
                              {"tokens": ["only", "tokens", str(i)], "sentid": 10 * i + 1}]}

    data = {"images": [im(1, "train"), im(2, "restval"), im(3, "val"), im(4, "test"), im(5, "train")],
            "dataset": "coco"}
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps(data))
    assert detect_format(str(p)) == "karpathy"
    ids = lambda cfg: [r.image_id for r in load_corpus(cfg)]  # noqa: E731
    assert ids(CorpusConfig(path=str(p), split="train")) == ["1", "2", "5"]  # train + restval
    assert ids(CorpusConfig(path=str(p), split="restval")) == ["2"]
    assert ids(CorpusConfig(path=str(p), split="test")) == ["4"]
    assert ids(CorpusConfig(path=str(p))) == ["1", "2", "3", "4", "5"]
    r = load_corpus(CorpusConfig(path=str(p), split="val"))[0]
    assert r.captions == ["caption 3 a", "only tokens 3"] and r.caption_ids == ["30", "31"]
    assert r.file == str((tmp_path / "val2014" / "COCO_3.jpg").resolve()) and r.meta["split"] == "val"
    with pytest.raises(DataError, match="no records"):
        load_corpus(CorpusConfig(path=str(p), split="nosuch"))


# ------------------------------------------------------------------------------------------------
# Flickr


def test_flickr_token_file_and_split_list(tmp_path):
    lines = []
    for name in ("1000_a.jpg", "2000_b.jpg", "3000_c.jpg"):
        lines += [f"{name}#{n}\t{name[:4]} caption {n} ." for n in range(5)]
    tok = tmp_path / "Flickr8k.token.txt"
    tok.write_text("\n".join(lines) + "\n\n")
    split = tmp_path / "Flickr_8k.trainImages.txt"
    split.write_text("3000_c.jpg\n1000_a.jpg\n\n")
    assert detect_format(str(tok)) == "flickr"
    recs = load_corpus(str(tok))
    assert [r.image_id for r in recs] == ["1000_a", "2000_b", "3000_c"]
    assert recs[1].captions[2] == "2000 caption 2 ." and recs[1].caption_ids[2] == "2000_b.jpg#2"
    assert recs[0].file == str((tmp_path / "1000_a.jpg").resolve())
    recs = load_corpus(CorpusConfig(path=str(tok), split_file=str(split), images="/imgs"))
    assert sorted(r.image_id for r in recs) == ["1000_a", "3000_c"]
    assert all(len(r.captions) == 5 for r in recs) and recs[0].file == "/imgs/1000_a.jpg"
    # a json split file ({split: [ids]}) filters a Flickr corpus like any other
    (tmp_path / "splits.json").write_text(json.dumps({"test": ["2000_b"], "train": ["3000_c", "1000_a"]}))
    recs = load_corpus(CorpusConfig(path=str(tok), split_file=str(tmp_path / "splits.json"), split="train"))
    assert [r.image_id for r in recs] == ["3000_c", "1000_a"]
    # a plain .txt whose lines look like token lines is detected as flickr too
    other = tmp_path / "captions.txt"
    other.write_text("\n".join(lines[:3]))
    assert detect_format(str(other)) == "flickr"


def test_flickr_bad_line_names_file_and_line(tmp_path):
    tok = tmp_path / "x.token"
    tok.write_text("a.jpg#0\tA cat\n\na.jpg 1 a dog\n")
    with pytest.raises(DataError) as e:
        load_corpus(str(tok))
    assert one_line(e).startswith(f"{tok}:3:")


# ------------------------------------------------------------------------------------------------
# CSV / TSV / txt


def test_csv_grouping_and_columns(tmp_path):
    p = tmp_path / "caps.csv"
    p.write_text('file,caption,other\nimg0.jpg,a cat,1\nimg1.jpg,"a dog, running",2\nimg0.jpg,the cat,3\n')
    recs = load_corpus(str(p))
    assert [r.image_id for r in recs] == ["img0", "img1"]  # grouped by image (id = file stem)
    assert recs[0].captions == ["a cat", "the cat"] and recs[1].captions == ["a dog, running"]
    assert recs[0].caption_ids == ["img0#0", "img0#1"]
    assert recs[0].file == str((tmp_path / "img0.jpg").resolve())
    # choose another column as the caption
    recs = load_corpus(CorpusConfig(path=str(p), caption_column="other"))
    assert recs[0].captions == ["1", "3"]
    with pytest.raises(DataError) as e:
        load_corpus(CorpusConfig(path=str(p), caption_column="text"))
    assert "'text'" in one_line(e) and "file, caption, other" in str(e.value)


def test_csv_id_column_and_caption_only(tmp_path):
    p = tmp_path / "prompts.csv"
    p.write_text("image_id,prompt,seed\n5,a red car,1\n9,a boat,2\n5,a car,3\n")
    recs = load_corpus(str(p))
    assert [(r.image_id, r.captions) for r in recs] == [("5", ["a red car", "a car"]), ("9", ["a boat"])]
    assert all(r.file is None for r in recs)
    with pytest.raises(DataError, match="no images found"):
        load_corpus(str(p), require_images=True)
    # no id and no image column: one record per row, id from the row number
    q = tmp_path / "plain.csv"
    q.write_text("text\nfirst one\nsecond one\n")
    recs = load_corpus(str(q))
    assert [(r.image_id, r.captions, r.caption_ids) for r in recs] == [
        ("row1", ["first one"], ["row1"]), ("row2", ["second one"], ["row2"])]
    q.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="neither a caption nor an image column"):
        load_corpus(str(q))


def test_tsv_and_explicit_format(tmp_path):
    p = tmp_path / "caps.tsv"
    p.write_text("id\tsentence\tpath\nA\thello there\tx/a.png\nB\tgood bye\tx/b.png\n")
    assert detect_format(str(p)) == "tsv"
    recs = load_corpus(str(p))
    assert [(r.image_id, r.captions) for r in recs] == [("A", ["hello there"]), ("B", ["good bye"])]
    assert recs[1].file == str((tmp_path / "x" / "b.png").resolve())
    q = tmp_path / "caps.data"  # unknown suffix, format given
    q.write_text(p.read_text())
    with pytest.raises(DataError, match="unknown corpus format"):
        load_corpus(str(q))
    assert len(load_corpus(CorpusConfig(path=str(q), format="tsv"))) == 2


def test_csv_extra_field_names_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("image,caption\na.jpg,a cat\nb.jpg,a dog\nc.jpg,a bird,extra\n")
    with pytest.raises(DataError) as e:
        load_corpus(str(p))
    assert one_line(e).startswith(f"{p}:4:")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty file"):
        load_corpus(str(empty))


def test_txt(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\ufeffA cat sits.\n\n  two   dogs \nlast line")
    recs = load_corpus(str(p))
    assert [(r.image_id, r.captions) for r in recs] == [
        ("line1", ["A cat sits."]), ("line3", ["two dogs"]), ("line4", ["last line"])]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError) as e:
        load_corpus(str(empty))
    assert str(empty) in one_line(e) and "no records" in str(e.value)
    with pytest.raises(DataError, match="no images found"):
        load_corpus(str(p), require_images=True)


# ------------------------------------------------------------------------------------------------
# folders and Hugging Face datasets


def test_folder_recursive_ids(tmp_path):
    root = tmp_path / "photos"
    make_images(root, 2)
    make_images(root / "sub" / "deeper", 1)
    (root / "notes.txt").write_text("not an image")
    (root / "UPPER.JPG").write_bytes((root / "img000.jpg").read_bytes())
    assert detect_format(str(root)) == "folder"
    recs = load_corpus(str(root))
    assert [r.image_id for r in recs] == ["UPPER", "img000", "img001", "sub/deeper/img000"]
    assert recs[3].file == str((root / "sub" / "deeper" / "img000.jpg").resolve())
    with pytest.raises(DataError, match="no captions"):
        load_corpus(str(root), require_captions=True)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no records"):
        load_corpus(str(tmp_path / "none"))
    with pytest.raises(DataError, match="is an image"):
        load_corpus(str(root / "img000.jpg"))


def _png_bytes(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def test_hf_dataset_with_image_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png_bytes(c), "path": None} for c in colors],
         "captions": [["red square", "a red one"], ["green  square"], []],
         "image_id": [10, 11, 12], "score": [0.5, 0.25, 1.0]},
        features=datasets.Features({"image": datasets.Image(),
                                    "captions": datasets.Sequence(datasets.Value("string")),
                                    "image_id": datasets.Value("int64"),
                                    "score": datasets.Value("float32")}))
    d = tmp_path / "hfds"
    ds.save_to_disk(str(d))
    assert detect_format(str(d)) == "hf"
    recs = load_corpus(str(d))
    assert [r.image_id for r in recs] == ["10", "11", "12"]
    assert recs[0].captions == ["red square", "a red one"] and recs[1].captions == ["green square"]
    assert recs[2].captions == [] and recs[0].meta == {"score": 0.5}
    for r, c in zip(recs, colors):
        assert isinstance(r.image, bytes) and r.file is None and r.has_image
        assert load_record_image(r).getpixel((3, 3)) == c  # the real pixels come back
    # a DatasetDict: the split is chosen by name
    dd = datasets.DatasetDict({"train": ds.select([0, 1]), "test": ds.select([2])})
    dd.save_to_disk(str(tmp_path / "hfdict"))
    assert [r.image_id for r in load_corpus(str(tmp_path / "hfdict"))] == ["10", "11"]  # train default
    test = load_corpus(CorpusConfig(path=str(tmp_path / "hfdict"), split="test"))
    assert [r.image_id for r in test] == ["12"]
    with pytest.raises(DataError, match="no split 'val'"):
        load_corpus(CorpusConfig(path=str(tmp_path / "hfdict"), split="val"))


def test_hf_text_only_dataset_and_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"caption": ["a", "b c"], "key": ["x1", "x2"]})
    ds.save_to_disk(str(tmp_path / "t"))
    recs = load_corpus(CorpusConfig(path=str(tmp_path / "t"), id_column="key"))
    assert [(r.image_id, r.captions, r.has_image) for r in recs] == [("x1", ["a"], False), ("x2", ["b c"], False)]
    with pytest.raises(DataError, match="no id column 'nope'"):
        load_corpus(CorpusConfig(path=str(tmp_path / "t"), id_column="nope"))


# ------------------------------------------------------------------------------------------------
# split files, limits, dispatch errors


def test_split_file_json_and_list(tmp_path):
    p = coco_json(tmp_path)
    sf = tmp_path / "splits.json"
    sf.write_text(json.dumps({"train": [12, 7], "test": [3]}))
    recs = load_corpus(CorpusConfig(path=str(p), split_file=str(sf), split="train"))
    assert [r.image_id for r in recs] == ["12", "7"]  # the split file's order
    assert [r.image_id for r in load_corpus(CorpusConfig(path=str(p), split_file=str(sf), split="test"))] == ["3"]
    with pytest.raises(DataError) as e:
        load_corpus(CorpusConfig(path=str(p), split_file=str(sf)))
    assert str(sf) in one_line(e) and "split name is needed" in str(e.value) and "train, test" in str(e.value)
    with pytest.raises(DataError, match="no split 'val'"):
        load_corpus(CorpusConfig(path=str(p), split_file=str(sf), split="val"))
    sf.write_text(json.dumps({"train": [7, 99]}))
    with pytest.raises(DataError) as e:
        load_corpus(CorpusConfig(path=str(p), split_file=str(sf), split="train"))
    assert "1 ids of split 'train' are not in the corpus (first: 99)" in one_line(e)
    # a bare json list and a text list of file names
    sf.write_text("[3]")
    assert [r.image_id for r in load_corpus(CorpusConfig(path=str(p), split_file=str(sf)))] == ["3"]
    lst = tmp_path / "keep.txt"
    lst.write_text("12.jpg\n3\n")
    assert [r.image_id for r in load_corpus(CorpusConfig(path=str(p), split_file=str(lst)))] == ["12", "3"]


def test_limit_and_dispatch_errors(tmp_path):
    p = coco_json(tmp_path)
    assert [r.image_id for r in load_corpus(CorpusConfig(path=str(p), limit=2))] == ["7", "3"]
    sf = tmp_path / "s.json"
    sf.write_text(json.dumps({"a": [12, 3, 7]}))
    # the limit applies after the split filter
    assert [r.image_id for r in load_corpus(CorpusConfig(path=str(p), split_file=str(sf), split="a",
                                                         limit=1))] == ["12"]
    with pytest.raises(DataError, match="unknown corpus format 'xml'"):
        load_corpus(CorpusConfig(path=str(p), format="xml"))
    with pytest.raises(DataError, match="path is empty"):
        load_corpus(CorpusConfig())
    with pytest.raises(DataError) as e:
        load_corpus(str(tmp_path / "missing.json"))
    assert "missing.json: no such file" in one_line(e)
    with pytest.raises(DataError, match="no such file"):
        load_corpus(CorpusConfig(path=str(tmp_path / "missing.csv"), format="csv"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_corpus(str(bad))
    assert "not UTF-8" in one_line(e)
    bad_csv = tmp_path / "latin1.csv"
    bad_csv.write_bytes("image,caption\na.jpg,un caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_corpus(str(bad_csv))
    assert "latin1.csv: not UTF-8" in one_line(e)
    # a split name without a split file is an error for corpora that carry no splits
    with pytest.raises(DataError) as e:
        load_corpus(CorpusConfig(path=str(p), split="tset"))
    assert "split 'tset' needs a split file" in one_line(e)


def test_missing_local_paths_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for path in ("data/captions.csv", "coco-mini/captions.json", "data/folder"):
        with pytest.raises(DataError, match="no such file"):
            detect_format(path)
    assert detect_format("nlphuji/flickr30k") == "hf"  # a hub id (not fetched here)


def test_karpathy_sentences_must_be_objects(tmp_path):
    p = tmp_path / "k.json"
    p.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": ["a dog"]}]}))
    with pytest.raises(DataError) as e:
        load_corpus(CorpusConfig(path=str(p), format="karpathy"))
    assert "images[0].sentences[0] is not an object" in one_line(e)


# ------------------------------------------------------------------------------------------------
# the real coco-mini files


def test_coco_mini_files_load(coco_mini):
    recs = load_corpus(str(coco_mini / "captions.json"), require_captions=True, require_images=True)
    assert len(recs) == 419 and all(len(r.captions) >= 5 for r in recs)
    assert all(Path(r.file).exists() for r in recs[:20])
    split = str(coco_mini / "splits.json")
    test = load_corpus(CorpusConfig(path=str(coco_mini / "captions.json"), split_file=split, split="test"))
    train = load_corpus(CorpusConfig(path=str(coco_mini / "captions.json"), split_file=split, split="train"))
    assert (len(test), len(train)) == (150, 269)
    assert not {r.image_id for r in test} & {r.image_id for r in train}
    unl = load_corpus(str(coco_mini / "unlabeled.json"), require_images=True)
    assert len(unl) == 444 and not any(r.captions for r in unl)
    assert all(Path(r.file).exists() for r in unl[:20])
    flickr = coco_mini / "text" / "flickr8k"
    tr = load_corpus(CorpusConfig(path=str(flickr / "Flickr8k.token.txt"),
                                  split_file=str(flickr / "Flickr_8k.trainImages.txt")))
    assert len(tr) == 6000 and all(len(r.captions) == 5 for r in tr)
    csv30k = load_corpus(str(coco_mini / "text" / "coco_30k.csv"))
    assert sum(len(r.captions) for r in csv30k) == 29604
    assert csv30k[0].captions == ["A bicycle replica with a clock as the front wheel."]  # column prompt


# ------------------------------------------------------------------------------------------------
# images


def test_unreadable_images_are_one_line_errors(tmp_path):
    good = make_images(tmp_path, 1)[0]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "text.jpg"
    text.write_text("this is not a jpeg")
    for bad in (truncated, text):
        with pytest.raises(ImageError) as e:
            open_image(bad)
        assert one_line(e).startswith(f"{bad}: unreadable image")
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "absent.jpg")
    with pytest.raises(ImageError, match="image 5: unreadable"):
        load_record_image(Record(image_id="5", image=b"garbage"))
    with pytest.raises(ImageError, match="has no image"):
        load_record_image(Record(image_id="5"))
    assert open_image(good).mode == "RGB"


def test_image_loader_skips_and_reports(tmp_path, caplog):
    paths = make_images(tmp_path, 5)
    bad = tmp_path / "broken.jpg"
    bad.write_text("nope")
    recs = [Record(image_id=p.stem, file=str(p)) for p in paths]
    recs.insert(2, Record(image_id="broken", file=str(bad)))
    bb = ToyBackbone()
    with caplog.at_level(logging.WARNING, logger="pcmnet"):
        batches = list(image_loader(recs, bb.preprocess, batch_size=4))
    idx = [i for b in batches for i in b[0]]
    errors = [e for b in batches for e in b[2]]
    assert idx == [0, 1, 3, 4, 5]  # the batch holding the bad image still yields the good ones
    assert [i for i, _ in errors] == [2] and str(bad) in errors[0][1]
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    # the pixels are those of the right images
    first = batches[0][1]
    assert first.shape == (3, 3, 16, 16)
    assert torch.equal(first[2], bb.preprocess(open_image(paths[2])))
    # a batch of only unreadable images
    only_bad = list(image_loader([recs[2]], bb.preprocess, batch_size=4))
    assert only_bad[0][0] == [] and only_bad[0][1] is None and len(only_bad[0][2]) == 1


def test_content_hash_follows_the_bytes(tmp_path):
    p = make_images(tmp_path, 1)[0]
    r = Record(image_id="a", file=str(p))
    h1 = content_hash(r)
    assert h1 == content_hash(Record(image_id="other", file=str(p)))  # the id does not matter
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    assert content_hash(r) != h1
    assert content_hash(Record(image_id="m", image=b"abc")) == content_hash(Record(image_id="n", image=b"abc"))
    assert content_hash(Record(image_id="m", image=b"abc")) != content_hash(Record(image_id="m", image=b"abd"))
    with pytest.raises(ImageError, match="cannot read"):
        content_hash(Record(image_id="x", file=str(tmp_path / "gone.jpg")))
