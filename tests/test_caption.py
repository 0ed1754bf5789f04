"""Captioning images (pcmnet.caption API and the `pcmnet caption` CLI) with a trained toy model.

The CLI loads the backbone a model records ("toy" here, which is not a real backbone), so the CLI
tests swap `pcmnet.backbones.base.load_backbone` for one that returns the ToyBackbone.
"""
import csv
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from pcmnet.caption import caption_images, collect_images, coco_id, output_format
from pcmnet.cli import main as cli_main
from pcmnet.data.records import DataError
from pcmnet.models.captioner import IGNORE_INDEX, Captioner, CaptionerConfig
from toys import ToyBackbone, make_images

TESTS = Path(__file__).resolve().parent
CAPTIONS = ["a red bus", "two brown dogs", "a man on a horse", "a small green boat"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A toy captioner that learned one caption per image of `make_images(..., 4)`."""
    d = tmp_path_factory.mktemp("model")
    paths = make_images(d / "train_imgs", 4)
    bb = ToyBackbone().freeze()
    from pcmnet.data.images import open_image

    with torch.no_grad():
        f = bb.encode_image(torch.stack([bb.preprocess(open_image(p)) for p in paths]))
    torch.manual_seed(0)
    cfg = CaptionerConfig(width=32, encoder_layers=1, decoder_layers=1, heads=2, ffn=64, dropout=0.0,
                          noise_variance=0.0, vocab_min_count=1, max_len=10)
    m = Captioner.build(cfg, bb, CAPTIONS)
    feats = m.image_inputs({"embeds": f.embeds, "patches": f.patches, "patch_embeds": f.patch_embeds})
    inp, tgt, pad = m.tokenize_captions(CAPTIONS)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(250):
        loss = torch.nn.functional.cross_entropy(m(feats, inp, pad).transpose(1, 2), tgt,
                                                 ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    assert m.generate(feats) == CAPTIONS
    return m.save_pretrained(d / "model")


@pytest.fixture
def photos(tmp_path, model_dir):
    """photos/ with the 4 training images (two of them in a subfolder), an unreadable .jpg and a
    text file; returns (folder, {absolute file: expected caption}, broken file)."""
    src = sorted((model_dir.parent / "train_imgs").iterdir())
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    expected = {}
    for i, p in enumerate(src):
        dst = (root / "sub" if i >= 2 else root) / p.name
        shutil.copy(p, dst)
        expected[str(dst.resolve())] = CAPTIONS[i]
    broken = root / "broken.jpg"
    broken.write_text("not an image")
    (root / "notes.txt").write_text("ignored")
    return root, expected, str(broken.resolve())


def walk_order(root: Path) -> list[str]:
    """The readable images of `photos` in walk order (sorted paths, subfolder after the files)."""
    r = root.resolve()
    return [str(r / "img000.jpg"), str(r / "img001.png"), str(r / "sub" / "img002.jpg"),
            str(r / "sub" / "img003.png")]


@pytest.fixture
def toy_cli(monkeypatch):
    """`load_backbone` that understands the toy spec recorded in the model's config.json."""
    import pcmnet.backbones.base as base

    real = base.load_backbone

    def load(spec=None, device=None):
        if isinstance(spec, dict) and spec.get("name") == "toy":
            return ToyBackbone(seed=int(spec["model"])).freeze()
        return real(spec, device=device)

    monkeypatch.setattr(base, "load_backbone", load)


# ------------------------------------------------------------------------------------------------
# Python API


def test_caption_images_api(model_dir, photos, caplog):
    root, expected, broken = photos
    with caplog.at_level(logging.WARNING, logger="pcmnet"):
        results = caption_images([root], model=Captioner.from_pretrained(model_dir),
                                 backbone=ToyBackbone().freeze(), batch_size=2)
    # the folder walked recursively, sorted, every image once (the unreadable one included)
    assert [r.file for r in results] == [broken] + walk_order(root)
    for r in results:
        if r.file == broken:
            assert r.caption is None and broken in r.error and "\n" not in r.error
        else:
            assert r.error is None and r.caption == expected[r.file]
    assert [r.image_id for r in results][-1] == "sub/img003"
    assert any(broken in rec.getMessage() for rec in caplog.records)
    # greedy and a model directory path work too; explicit files keep the order given
    files = [f for f in sorted(expected)][::-1]
    res = caption_images(files, model=model_dir, backbone=ToyBackbone().freeze(), beam_size=1)
    assert [r.caption for r in res] == [expected[f] for f in files]
    assert [r.image_id for r in res] == [Path(f).stem for f in files]


def test_wrong_backbone_refused(model_dir, photos):
    from pcmnet.errors import CheckpointError

    with pytest.raises(CheckpointError, match="toy-0"):
        caption_images([photos[0]], model=model_dir, backbone=ToyBackbone(seed=2))


def test_collect_images_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jpg: no such file"):
        collect_images([tmp_path / "nope.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images to caption"):
        collect_images([tmp_path / "empty"])


def test_output_format_and_coco_id():
    assert [output_format(f"x{s}") for s in (".jsonl", ".json", ".csv", ".tsv", ".txt")] == \
        ["jsonl", "coco", "csv", "tsv", "tsv"]
    with pytest.raises(DataError, match="unknown output format"):
        output_format("out.xml")
    assert coco_id("000000000139") == 139 and coco_id("img_7") == "img_7"


# ------------------------------------------------------------------------------------------------
# CLI


def run_cli(capsys, *args):
    code = cli_main(["caption", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_stdout_tsv(toy_cli, model_dir, photos, capsys, caplog):
    root, expected, broken = photos
    with caplog.at_level(logging.WARNING, logger="pcmnet"):
        code, out, err = run_cli(capsys, root, "--model", model_dir, "--batch-size", "3")
    assert code == 0
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows == [[f, expected[f]] for f in walk_order(root)]
    assert broken not in out  # skipped, and reported:
    assert any(broken in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".tsv"])
def test_cli_output_files(toy_cli, model_dir, photos, tmp_path, capsys, ext):
    root, expected, broken = photos
    out = tmp_path / "results" / f"caps{ext}"
    code, stdout, _ = run_cli(capsys, root, "--model", model_dir, "--output", out, "--beam-size", "2")
    assert code == 0 and stdout == ""
    assert not out.with_name(out.name + ".parts").exists()  # merged and cleaned up
    text = out.read_text()
    order = walk_order(root)
    ids = [Path(f).relative_to(root.resolve()).with_suffix("").as_posix() for f in order]
    if ext == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines()]
        assert [(r["image_id"], r["file"], r["caption"]) for r in rows] == \
            [(i, f, expected[f]) for i, f in zip(ids, order)]
    elif ext == ".json":
        rows = json.loads(text)
        assert rows == [{"image_id": i, "caption": expected[f]} for i, f in zip(ids, order)]
    elif ext == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        assert rows[0] == ["image_id", "file", "caption"]
        assert rows[1:] == [[i, f, expected[f]] for i, f in zip(ids, order)]
    else:
        assert [line.split("\t") for line in text.splitlines()] == [[f, expected[f]] for f in order]


def test_cli_coco_results_use_int_ids(toy_cli, model_dir, photos, tmp_path, capsys):
    root, expected, _ = photos
    coco = tmp_path / "coco"
    coco.mkdir()
    src = sorted(expected)[:2]
    for n, f in zip((139, 42), src):
        shutil.copy(f, coco / f"{n:012d}{Path(f).suffix}")
    out = tmp_path / "res.json"
    assert run_cli(capsys, coco, "--model", model_dir, "-o", out)[0] == 0
    rows = json.loads(out.read_text())
    assert rows == [{"image_id": 42, "caption": expected[src[1]]}, {"image_id": 139, "caption": expected[src[0]]}]


def test_cli_sidecar(toy_cli, model_dir, photos, capsys):
    root, expected, broken = photos
    code, out, _ = run_cli(capsys, root, "--model", model_dir, "--sidecar")
    assert code == 0 and out == ""
    for f, cap in expected.items():
        assert Path(f).with_suffix(".txt").read_text() == cap + "\n"
    assert not Path(broken).with_suffix(".txt").exists()
    # --resume keeps existing sidecars
    first = sorted(expected)[0]
    Path(first).with_suffix(".txt").write_text("kept\n")
    assert run_cli(capsys, root, "--model", model_dir, "--sidecar", "--resume")[0] == 0
    assert Path(first).with_suffix(".txt").read_text() == "kept\n"
    assert run_cli(capsys, root, "--model", model_dir, "--sidecar")[0] == 0
    assert Path(first).with_suffix(".txt").read_text() == expected[first] + "\n"


def test_same_stem_images_get_distinct_ids_and_sidecars(toy_cli, model_dir, photos, tmp_path, capsys):
    root, expected, _ = photos
    a, b = sorted(expected)[:2]
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(a, twin / "photo.png")
    shutil.copy(b, twin / "photo.jpg")
    recs = collect_images([twin, twin / "photo.png"])  # the same file twice counts once
    assert sorted(r.image_id for r in recs) == ["photo.jpg", "photo.png"]
    assert run_cli(capsys, twin, "--model", model_dir, "--sidecar")[0] == 0
    assert (twin / "photo.png.txt").read_text() == expected[a] + "\n"
    assert (twin / "photo.jpg.txt").read_text() == expected[b] + "\n"
    assert not (twin / "photo.txt").exists()


def test_cli_resume_from_parts(toy_cli, model_dir, photos, tmp_path, capsys):
    root, expected, broken = photos
    Path(broken).unlink()  # so the first row appended after the torn line is a real image's
    out = tmp_path / "caps.jsonl"
    parts = tmp_path / "caps.jsonl.parts"
    parts.mkdir()
    files = sorted(expected)
    done = files[1]
    # an interrupted run: one finished image (with a marker caption to prove it is not redone),
    # then a line cut by the kill
    (parts / "rank-00000.jsonl").write_text(
        json.dumps({"image_id": "x", "file": done, "caption": "from the first run", "error": None})
        + "\n" + '{"image_id": "y", "file": "' + files[2][:10])
    code, _, _ = run_cli(capsys, root, "--model", model_dir, "-o", out, "--resume")
    assert code == 0 and not parts.exists()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = {**expected, done: "from the first run"}
    assert [r["file"] for r in rows] == walk_order(root)  # complete, in input order
    assert {r["file"]: r["caption"] for r in rows} == want
    # without --resume an old part is thrown away
    parts.mkdir()
    (parts / "rank-00000.jsonl").write_text(
        json.dumps({"image_id": "x", "file": done, "caption": "stale", "error": None}) + "\n")
    assert run_cli(capsys, root, "--model", model_dir, "-o", out)[0] == 0
    assert {json.loads(line)["file"]: json.loads(line)["caption"] for line in out.read_text().splitlines()} \
        == expected


def test_cli_errors_are_one_line(toy_cli, model_dir, photos, tmp_path, capsys):
    root = photos[0]
    code, out, err = run_cli(capsys, root, "--model", model_dir, "-o", tmp_path / "caps.xml")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "caps.xml" in err
    assert "unknown output format" in err
    code, out, err = run_cli(capsys, tmp_path / "missing_dir", "--model", model_dir)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "missing_dir: no such file" in err
    code, out, err = run_cli(capsys, root, "--model", tmp_path / "not_a_model")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not_a_model" in err
    for flag, value in (("--batch-size", "0"), ("--num-workers", "-1"), ("--beam-size", "0")):
        code, out, err = run_cli(capsys, root, "--model", model_dir, flag, value)
        assert code == 2 and err.strip().endswith(f"{flag} must be at least {1 if value == '0' else 0}, got {value}")
    # nothing readable at all: an error (exit 2), not an empty success
    code, out, err = run_cli(capsys, photos[2], "--model", model_dir)
    assert code == 2 and out == "" and "none of the 1 images could be read" in err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------
# 2 CPU processes


@pytest.mark.slow
def test_cli_two_processes_share_the_work(model_dir, photos, tmp_path):
    from test_train import launch_two

    root, expected, broken = photos
    out = tmp_path / "caps.jsonl"
    res = launch_two(tmp_path, [str(TESTS / "scripts" / "caption_toy.py"), str(root), "--model",
                                str(model_dir), "-o", str(out), "--batch-size", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["file"] for r in rows) == sorted(expected)  # each image once
    assert {r["file"]: r["caption"] for r in rows} == expected
    # each process captioned its own share (5 images: 3 + 2, the unreadable one among them)
    assert "rank 0: captioned" in res.stderr and "rank 1: captioned" in res.stderr
    counts = sorted(int(line.split("rank ")[1].split(": captioned ")[1].split()[0]) +
                    int(line.split("(")[1].split()[0])
                    for line in res.stderr.splitlines() if ": captioned " in line)
    assert counts == [2, 3]
