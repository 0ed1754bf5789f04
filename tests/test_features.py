"""Feature cache (pcmnet.features): round trips against the backbone, resuming, invalidation,
unreadable images, crash safety (kill -9 mid-run), reading while it grows, and 2-process runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from toys import ToyBackbone, make_images

from pcmnet.data.images import open_image, text_hash
from pcmnet.data.readers import load_corpus, read_folder
from pcmnet.data.records import CaptionItem, Record, iter_captions
from pcmnet.features import FeatureStore, extract_image_features, extract_text_features

TESTS = Path(__file__).resolve().parent
IMAGE_FIELDS = ("embeds", "patches", "patch_embeds")


class Counting(ToyBackbone):
    """ToyBackbone that counts the items it encodes."""

    def __init__(self, seed: int = 0, scale: float = 1.0):
        super().__init__(seed)
        self.image_items = 0
        self.text_items = 0
        self.scale = scale

    def encode_image(self, pixels):
        self.image_items += len(pixels)
        out = super().encode_image(pixels)
        out.patches = out.patches * self.scale
        return out

    def encode_text(self, texts):
        self.text_items += len(texts)
        return super().encode_text(texts)


def records_for(paths) -> list[Record]:
    return [Record(image_id=Path(p).stem, file=str(p)) for p in paths]


def reference_images(bb, records, batch_size):
    """Backbone outputs on the same consecutive batches the extractor uses."""
    out = {f: [] for f in IMAGE_FIELDS}
    with torch.no_grad():
        for b in range(0, len(records), batch_size):
            px = torch.stack([bb.preprocess(open_image(r.file)) for r in records[b: b + batch_size]])
            feats = bb.encode_image(px)
            for f in IMAGE_FIELDS:
                out[f].append(getattr(feats, f))
    return {f: torch.cat(v) for f, v in out.items()}


def shard_rows(root: Path) -> list[int]:
    rows = []
    for line in (root / "index-r0.jsonl").read_text().splitlines():
        rows.append(json.loads(line)["rows"])
    return rows


# ------------------------------------------------------------------------------------------------


def test_images_round_trip_equal_backbone_outputs(tmp_path):
    bb = Counting().freeze()
    recs = records_for(make_images(tmp_path / "img", 10))
    view = extract_image_features(recs, bb, tmp_path / "cache", batch_size=2, shard_size=4, progress=False)
    assert len(view) == 10 and view.valid == [True] * 10 and bb.image_items == 10
    ref = reference_images(bb, recs, 2)
    assert view.stats["computed"] == 10 and view.stats["cached"] == 0
    for i in range(10):
        item = view[i]
        assert torch.equal(item["embeds"], ref["embeds"][i])  # float32 exactly
        for f in ("patches", "patch_embeds"):  # stored float16, read back as float32
            assert item[f].dtype == torch.float32
            assert torch.equal(item[f], ref[f][i].half().float())
    b = view.batch([7, 2, 9])
    assert b["index"].tolist() == [7, 2, 9]
    assert torch.equal(b["patches"], ref["patches"][[7, 2, 9]].half().float())
    assert torch.equal(view.stack("embeds"), ref["embeds"])

    root = view.store.root
    assert root == tmp_path / "cache" / "toy-0" / "image"
    assert shard_rows(root) == [4, 4, 2]  # full shards, the small remainder last
    assert not list(root.rglob("*.tmp"))
    shard = sorted((root / "shards").iterdir())[0]
    with safe_open(str(shard), "pt") as f:
        assert f.get_slice("embeds").get_dtype() == "F32"
        assert f.get_slice("patches").get_dtype() == "F16"
        assert f.get_slice("patch_embeds").get_shape() == [4, 16, 24]


def test_rerun_recomputes_only_changed_files_and_other_backbones(tmp_path):
    paths = make_images(tmp_path / "img", 6)
    recs = records_for(paths)
    bb = Counting().freeze()
    first = extract_image_features(recs, bb, tmp_path / "c", batch_size=4, shard_size=4, progress=False)
    emb = first.stack("embeds")

    again = extract_image_features(recs, bb, tmp_path / "c", batch_size=4, shard_size=4, progress=False)
    assert bb.image_items == 6 and again.stats["cached"] == 6 and again.stats["computed"] == 0
    assert torch.equal(again.stack("embeds"), emb)

    make_images(tmp_path / "other", 4, seed=7)[3].replace(paths[3])  # same id, new content (a png)
    changed = extract_image_features(recs, bb, tmp_path / "c", batch_size=4, shard_size=4, progress=False)
    assert bb.image_items == 7 and changed.stats["computed"] == 1
    with torch.no_grad():
        new = bb.encode_image(bb.preprocess(open_image(paths[3]))[None])
    assert torch.equal(changed[3]["embeds"], new.embeds[0])
    keep = [0, 1, 2, 4, 5]
    assert torch.equal(changed.stack("embeds")[keep], emb[keep])

    other = Counting(seed=1).freeze()
    third = extract_image_features(recs, other, tmp_path / "c", batch_size=4, shard_size=4, progress=False)
    assert other.image_items == 6 and third.store.root.parent.name == "toy-1"
    assert not torch.allclose(third.stack("embeds"), changed.stack("embeds"))


def test_only_requested_fields_are_stored_and_missing_fields_recomputed(tmp_path):
    recs = records_for(make_images(tmp_path / "img", 5))
    bb = Counting().freeze()
    v = extract_image_features(recs, bb, tmp_path / "c", fields=("embeds",), batch_size=5, progress=False)
    (shard,) = (v.store.root / "shards").iterdir()
    with safe_open(str(shard), "pt") as f:
        assert set(f.keys()) == {"embeds"}
    assert set(v[0]) == {"embeds"}

    v2 = extract_image_features(recs, bb, tmp_path / "c", fields=("embeds", "patches"), batch_size=5,
                                progress=False)
    assert bb.image_items == 10 and v2.stats["computed"] == 5 and set(v2[0]) == {"embeds", "patches"}
    assert torch.equal(v2.stack("embeds"), v.stack("embeds"))
    for fields in (("embeds",), ("patches",)):
        v3 = extract_image_features(recs, bb, tmp_path / "c", fields=fields, batch_size=5, progress=False)
        assert v3.stats["computed"] == 0 and all(v3.valid)
    assert bb.image_items == 10


def test_unreadable_images_are_logged_once_and_skipped(tmp_path, caplog):
    paths = make_images(tmp_path / "img", 5)
    bad = tmp_path / "img" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    recs = records_for(paths)
    recs.insert(1, Record(image_id="broken", file=str(bad)))
    recs.insert(4, Record(image_id="gone", file=str(tmp_path / "img" / "gone.jpg")))
    recs.append(Record(image_id="text-only", captions=["no image here"]))
    bb = Counting().freeze()
    with caplog.at_level("WARNING", logger="pcmnet"):
        view = extract_image_features(recs, bb, tmp_path / "c", batch_size=3, shard_size=3, progress=False)
    assert view.valid == [True, False, True, True, False, True, True, False]
    assert view[1] is None and view[4] is None and view[7] is None
    assert view.stats["unreadable"] == 3 and view.stats["computed"] == 5 and bb.image_items == 5
    msgs = [r.getMessage() for r in caplog.records]
    for name in ("broken.jpg", "gone.jpg", "text-only"):
        assert sum(name in m for m in msgs) == 1, name
    b = view.batch([0, 1, 4, 5])
    assert b["index"].tolist() == [0, 5] and b["embeds"].shape == (2, 24)
    assert view.stack("embeds").shape == (5, 24)
    assert view.batch([1, 4])["patches"].shape == (0, 16, 32)

    good = records_for(paths)
    clean = extract_image_features(good, bb, tmp_path / "c2", batch_size=3, progress=False)
    ok = [i for i, v in enumerate(view.valid) if v]
    assert torch.equal(view.batch(ok)["patches"], clean.stack("patches"))  # batch-independent field
    assert torch.allclose(view.stack("embeds"), clean.stack("embeds"), atol=1e-6)


def test_text_features_pad_truncate_and_coexist(tmp_path):
    caps = [CaptionItem(f"c{i}", " ".join(["word"] * (i + 1) + [f"w{i}"]), f"im{i // 2}") for i in range(7)]
    bb = Counting().freeze()
    all_fields = ("embeds", "tokens", "mask")
    long = extract_text_features(caps, bb, tmp_path / "c", fields=all_fields, max_tokens=20, batch_size=4,
                                 shard_size=4, progress=False)
    short = extract_text_features(caps, bb, tmp_path / "c", fields=all_fields, max_tokens=4, batch_size=4,
                                  shard_size=4, progress=False)
    assert short.stats["computed"] == 7 and bb.text_items == 14
    with torch.no_grad():
        ref = [bb.encode_text([c.caption for c in caps[b: b + 4]]) for b in (0, 4)]
    emb = torch.cat([r.embeds for r in ref])
    tok = torch.cat([r.tokens for r in ref])  # [7, 16, 24] (toy max_len 16)
    mask = torch.cat([r.mask for r in ref])
    assert torch.equal(long.stack("embeds"), emb) and torch.equal(short.stack("embeds"), emb)
    assert long[0]["tokens"].shape == (20, 24) and short[0]["tokens"].shape == (4, 24)
    assert torch.equal(long.stack("tokens")[:, :16], tok.half().float())
    assert torch.equal(long.stack("tokens")[:, 16:], torch.zeros(7, 4, 24))
    assert torch.equal(long.stack("mask"), torch.cat([mask, torch.zeros(7, 4, dtype=torch.bool)], 1))
    assert torch.equal(short.stack("tokens"), tok[:, :4].half().float())
    assert torch.equal(short.stack("mask"), mask[:, :4])
    assert long.stack("mask").sum(1).tolist() == [min(i + 2, 16) for i in range(7)]

    caps[2] = CaptionItem("c2", "an edited caption", "im1")
    again = extract_text_features(caps, bb, tmp_path / "c", fields=all_fields, max_tokens=4, progress=False)
    assert again.stats["computed"] == 1 and bb.text_items == 14 + 7 + 1  # + the 7 reference encodes
    with torch.no_grad():
        assert torch.equal(again[2]["embeds"], bb.encode_text(["an edited caption"]).embeds[0])


def test_readers_ignore_incomplete_writes_and_writers_repair_them(tmp_path):
    recs = records_for(make_images(tmp_path / "img", 9))
    bb = Counting().freeze()
    v = extract_image_features(recs, bb, tmp_path / "c", batch_size=3, shard_size=3, progress=False)
    ref = {f: v.stack(f) for f in IMAGE_FIELDS}
    root = v.store.root
    index = root / "index-r0.jsonl"
    # a writer killed while writing a shard and while appending an index line
    (root / "shards" / "r0-dead-00000.safetensors.tmp").write_bytes(b"partial")
    with open(index, "a") as f:
        f.write('{"shard": "r0-dead-00001.safetensors", "rows": 3, "fie')
    # and a shard deleted by hand: its items are no longer cached
    gone = json.loads(index.read_text().splitlines()[1])
    (root / "shards" / gone["shard"]).unlink()

    partial = FeatureStore(tmp_path / "c", "toy-0", "image").view(v.keys, {f: f for f in IMAGE_FIELDS})
    assert partial.valid == [True] * 3 + [False] * 3 + [True] * 3

    again = extract_image_features(recs, bb, tmp_path / "c", batch_size=3, shard_size=3, progress=False)
    assert again.stats["computed"] == 3 and bb.image_items == 12 and all(again.valid)
    for f in IMAGE_FIELDS:
        assert torch.equal(again.stack(f), ref[f])
    lines = index.read_text().split("\n")
    assert lines[3].startswith('{"shard": "r0-dead') and json.loads(lines[4])["rows"] == 3


def test_float16_overflow_keeps_float32(tmp_path):
    recs = records_for(make_images(tmp_path / "img", 3))
    bb = Counting(scale=1e6).freeze()
    v = extract_image_features(recs, bb, tmp_path / "c", batch_size=3, progress=False)
    ref = reference_images(bb, recs, 3)
    assert ref["patches"].abs().max() > 65504
    assert torch.equal(v.stack("patches"), ref["patches"])  # kept float32, no inf
    assert torch.equal(v.stack("patch_embeds"), ref["patch_embeds"].half().float())


def test_view_pickles_for_dataloader_workers(tmp_path):
    import pickle

    recs = records_for(make_images(tmp_path / "img", 4))
    v = extract_image_features(recs, ToyBackbone().freeze(), tmp_path / "c", batch_size=2, progress=False)
    v[0]  # opens a shard handle
    w = pickle.loads(pickle.dumps(v))
    assert torch.equal(w.stack("patches"), v.stack("patches"))


# ------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def toy_loader(monkeypatch):
    """`load_backbone` returning the toy backbone (the CLI's own loading is tested elsewhere)."""
    import pcmnet.backbones.base as base

    seen = []

    def load(cfg, device=None):
        seen.append((cfg, device))
        return ToyBackbone().freeze()

    monkeypatch.setattr(base, "load_backbone", load)
    return seen


def test_cli_images_text_and_errors(tmp_path, toy_loader, capsys):
    from pcmnet.cli import main

    make_images(tmp_path / "img", 5)
    cache = str(tmp_path / "cache")
    argv = ["features", "--data", str(tmp_path / "img"), "--cache", cache, "--batch-size", "2",
            "--shard-size", "2", "--no-progress", "--backbone", "open_clip", "--backbone-model", "ViT-B-32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "5 images | cached before 0 | computed 5 | skipped unreadable 0" in out
    cfg, device = toy_loader[0]
    assert (cfg.name, cfg.model, device) == ("open_clip", "ViT-B-32", "cpu")
    assert main(argv) == 0
    assert "cached before 5 | computed 0" in capsys.readouterr().out

    txt = tmp_path / "caps.txt"
    txt.write_text("a dog on a bench\ntwo cats\na red bus on the street\n")
    targs = ["features", "--data", str(txt), "--kind", "text", "--cache", cache, "--no-progress",
             "--fields", "embeds,tokens,mask", "--max-tokens", "8"]
    assert main(targs) == 0
    assert "3 captions | cached before 0 | computed 3" in capsys.readouterr().out
    keys = [(c.caption_id, text_hash(c.caption)) for c in iter_captions(load_corpus(str(txt)))]
    view = FeatureStore(cache, "toy-0", "text").view(keys, {"embeds": "embeds", "mask": "mask@8"})
    assert view.stack("mask").sum(1).tolist() == [5, 2, 6]

    assert main(argv + ["--fields", "embeds,bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bogus" in err
    assert main(argv + ["--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
    assert main(["features", "--data", str(txt), "--cache", cache, "--no-progress"]) == 2
    assert "no images" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# crash safety and multi-process runs (real subprocesses)

CLI_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from toys import ToyBackbone
import pcmnet.backbones.base as base
from pcmnet.cli import main

log, delay = sys.argv[1], float(sys.argv[2])

class Slow(ToyBackbone):
    def encode_image(self, pixels):
        with open(log, "a") as f:  # logged before the work: a killed batch counts as computed
            f.write(f"{{len(pixels)}}\\n")
        time.sleep(delay)
        return super().encode_image(pixels)

base.load_backbone = lambda cfg, device=None: Slow().freeze()
sys.exit(main(sys.argv[3:]))
"""


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _count(log: Path) -> int:
    return sum(int(x) for x in log.read_text().split()) if log.exists() else 0


@pytest.mark.slow
def test_kill9_mid_run_resumes_and_matches_a_fresh_run(tmp_path):
    n, batch, shard = 40, 4, 8
    make_images(tmp_path / "img", n)
    recs = read_folder(tmp_path / "img")  # the records `pcmnet features --data img/` reads
    fresh = extract_image_features(recs, ToyBackbone().freeze(), tmp_path / "fresh", batch_size=batch,
                                   shard_size=shard, progress=False)
    ref = {f: fresh.stack(f) for f in IMAGE_FIELDS}
    keys, names = fresh.keys, fresh.fields

    script = tmp_path / "run.py"
    script.write_text(CLI_SCRIPT.format(tests=str(TESTS)))
    log = tmp_path / "run1.log"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(log), "0.25", "features", "--data", str(tmp_path / "img"),
         "--cache", str(tmp_path / "cache"), "--batch-size", str(batch), "--shard-size", str(shard),
         "--no-progress"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = FeatureStore(tmp_path / "cache", "toy-0", "image")
    seen = set()
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        view = store.view(keys, names)  # read while the other process writes
        ok = [i for i, v in enumerate(view.valid) if v]
        for f in IMAGE_FIELDS if ok else ():
            assert torch.equal(view.batch(ok)[f], ref[f][ok])
        seen.add(len(ok))
        if len(ok) >= 2 * shard:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    flushed = sum(store.view(keys, names).valid)
    started = _count(log)
    assert 2 * shard <= flushed < n and flushed % shard == 0
    assert started - flushed <= shard + batch  # work lost: the unflushed shard + the batch in flight
    assert len(seen - {0}) >= 1  # the cache was read while it was partly written

    bb = Counting().freeze()
    final = extract_image_features(recs, bb, tmp_path / "cache", batch_size=batch, shard_size=shard,
                                   progress=False)
    assert bb.image_items == n - flushed
    assert final.stats["cached"] == flushed and all(final.valid)
    for f in IMAGE_FIELDS:
        assert torch.equal(final.stack(f), ref[f])


def acc_captions() -> list[CaptionItem]:
    return [CaptionItem(f"c{i}", f"caption number {i} " + "x " * i, "img") for i in range(11)]


ACC_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from safetensors.torch import save_file
from toys import ToyBackbone
from pcmnet.data.readers import read_folder
from pcmnet.data.records import CaptionItem
from pcmnet.distributed import process_state
from pcmnet.features.cache import extract_image_features, extract_text_features
from test_features import acc_captions

img_dir, cache, out = sys.argv[1:4]
state = process_state()
rank = state.process_index

class Logged(ToyBackbone):
    def encode_text(self, texts):
        with open(f"{{out}}.text.r{{rank}}", "a") as f:
            f.write("".join(t + "\\n" for t in texts))
        return super().encode_text(texts)

bb = Logged().freeze()
records = read_folder(img_dir)
view = extract_image_features(records, bb, cache, batch_size=3, shard_size=4, progress=False,
                              accelerator=state)
caps = acc_captions()
text = extract_text_features(caps, bb, cache, fields=("embeds", "tokens", "mask"), max_tokens=6,
                             batch_size=2, shard_size=3, progress=False, accelerator=state)
tensors = {{f: view.stack(f) for f in view.fields}}
tensors.update({{"text_" + f: text.stack(f) for f in text.fields}})
save_file(tensors, f"{{out}}.r{{rank}}.safetensors")
with open(f"{{out}}.r{{rank}}.json", "w") as f:
    json.dump({{"valid": view.valid, "world": state.num_processes, "stats": view.stats,
               "text_stats": text.stats}}, f)
"""


@pytest.mark.slow
def test_two_processes_split_the_work_and_match_one_process(tmp_path):
    make_images(tmp_path / "img", 13)
    (tmp_path / "img" / "img005.png").write_bytes(b"broken")  # one unreadable image
    script = tmp_path / "acc.py"
    script.write_text(ACC_SCRIPT.format(tests=str(TESTS)))
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", str(script), str(tmp_path / "img"), str(tmp_path / "c2"),
                          str(tmp_path / "two")], env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    # the same extraction in one process
    bb = ToyBackbone().freeze()
    view = extract_image_features(read_folder(tmp_path / "img"), bb, tmp_path / "c1", batch_size=3,
                                  shard_size=4, progress=False)
    text = extract_text_features(acc_captions(), bb, tmp_path / "c1", fields=("embeds", "tokens", "mask"),
                                 max_tokens=6, batch_size=2, shard_size=3, progress=False)
    assert view.valid.count(False) == 1
    ref = {f: view.stack(f) for f in view.fields}
    ref.update({"text_" + f: text.stack(f) for f in text.fields})
    for rank in (0, 1):
        meta = json.loads((tmp_path / f"two.r{rank}.json").read_text())
        assert meta["world"] == 2 and meta["valid"] == view.valid
        assert meta["stats"]["computed"] == 12 and meta["text_stats"]["computed"] == 11
        with safe_open(str(tmp_path / f"two.r{rank}.safetensors"), "pt") as f:
            assert set(f.keys()) == set(ref)
            for k in ref:
                assert torch.equal(f.get_tensor(k), ref[k]), k

    # each rank wrote its own shards and index; together they cover every item exactly once
    for kind, total in (("image", 12), ("text", 11)):
        root = FeatureStore(tmp_path / "c2", "toy-0", kind).root
        per_rank = []
        for rank in (0, 1):
            lines = (root / f"index-r{rank}.jsonl").read_text().splitlines()
            per_rank.append([tuple(k) for line in lines for k in json.loads(line)["keys"]])
        assert per_rank[0] and per_rank[1]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert len(per_rank[0]) + len(per_rank[1]) == total
        assert {p.name[:3] for p in (root / "shards").iterdir()} == {"r0-", "r1-"}
    texts = [(tmp_path / f"two.text.r{r}").read_text().splitlines() for r in (0, 1)]
    assert texts[0] and texts[1] and not set(texts[0]) & set(texts[1]) and len(texts[0] + texts[1]) == 11
