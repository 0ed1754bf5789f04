"""pcmnet.synth through its Python API, on a tiny random Stable Diffusion pipeline built here.

The command line, accelerate sharding and kill -9 resumption are in test_synth_cli.py.
"""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pcmnet.backbones.base import BackboneConfig
from pcmnet.config import ConfigError, load_config
from pcmnet.data.jsonl import PartWriter
from pcmnet.data.readers import CorpusConfig, load_corpus
from pcmnet.data.records import DataError
from pcmnet.errors import MissingWeightsError, PcmnetError
from pcmnet.synth import manifest as mf
from pcmnet.synth.config import SynthConfig, parse_size
from pcmnet.synth.export import export
from pcmnet.synth.generate import generate, load_pipeline, resolve_dtype, set_scheduler, shard_pairs
from pcmnet.synth.score import score_folder
from pcmnet.synth.shard import pair_seed
from pcmnet.synth.tiny import build_tiny_pipeline
from toys import ToyBackbone

CAPTIONS = [f"a {c} {o} on a {p}" for c, o, p in [
    ("red", "dog", "beach"), ("small", "cat", "sofa"), ("green", "bus", "street"), ("tall", "man", "hill"),
    ("blue", "boat", "lake"), ("old", "clock", "wall"), ("white", "horse", "field")]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline(path)
    return path


@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir):
    pipe, _ = load_pipeline(SynthConfig(model=str(tiny_dir), scheduler="dpmpp", dtype="fp32"), "cpu")
    return pipe


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return path


def make_cfg(corpus, tiny_dir, out, **kw) -> SynthConfig:
    kw.setdefault("backbone", BackboneConfig(name="none"))
    return SynthConfig(captions=CorpusConfig(path=str(corpus)), model=str(tiny_dir), out=str(out),
                       steps=2, batch_size=3, device="cpu", **kw)


def stable_rows(folder):
    """Manifest lines without the fields that record wall-clock time."""
    return [{k: v for k, v in r.items() if k not in mf.TIME_FIELDS}
            for r in mf.read_jsonl(folder / mf.MANIFEST)]


def image_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted((folder / "images").rglob("*.png"))}


# --------------------------------------------------------------------------------------------
# seeds, shards, config


def test_pair_seed_is_sha256_of_its_inputs():
    expected = int.from_bytes(hashlib.sha256("7\x1fline3\x1f1".encode()).digest()[:8], "big") & (2**63 - 1)
    assert pair_seed(7, "line3", 1) == expected
    seeds = {pair_seed(s, c, k) for s in (0, 1) for c in ("a", "b") for k in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_shards_partition_the_caption_list():
    items = [(f"cap{i}", f"caption {i}") for i in range(11)]
    cfg = SynthConfig(images_per_caption=2)
    shards = [shard_pairs(items, cfg, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [8, 8, 6]  # captions 0,3,6,9 | 1,4,7,10 | 2,5,8; 2 images each
    keys = [p.key for s in shards for p in s]
    assert sorted(keys) == sorted((c, k) for c, _ in items for k in (0, 1)) and len(set(keys)) == 22
    assert {p.caption_id for p in shards[1]} == {"cap1", "cap4", "cap7", "cap10"}
    assert [p.key for p in shard_pairs(items, cfg, 0, 1)] == [(c, k) for c, _ in items for k in (0, 1)]


def test_config_file_and_checks(tmp_path):
    cfg = load_config(SynthConfig, "configs/synth_coco_sd15.yaml")
    assert (cfg.captions.format, cfg.captions.split, cfg.scheduler, cfg.steps, cfg.dtype) == \
        ("karpathy", "train", "dpmpp", 20, "fp16")
    assert parse_size(cfg.size) == (512, 512) and parse_size("768x512") == (768, 512)
    with pytest.raises(ConfigError, match="'scheduler'"):
        SynthConfig(captions=CorpusConfig(path="x"), model="m", out="o", scheduler="fast").check()
    with pytest.raises(ConfigError, match="'size'"):
        SynthConfig(captions=CorpusConfig(path="x"), model="m", out="o", size="500").check()
    with pytest.raises(ConfigError, match="'captions.path'"):
        SynthConfig(model="m", out="o").check()
    bad = tmp_path / "bad.yaml"
    bad.write_text("captions: {path: x}\nstep: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'step'"):
        load_config(SynthConfig, bad)


def test_dtype_on_cpu_falls_back_to_fp32():
    with pytest.warns(UserWarning, match="fp16 requested on CPU"):
        assert resolve_dtype("fp16", "cpu") == (torch.float32, "fp32")
    assert resolve_dtype("auto", "cpu")[1] == "fp32"
    assert resolve_dtype("auto", "cuda:0") == (torch.float16, "fp16")
    assert resolve_dtype("bf16", "cuda") == (torch.bfloat16, "bf16")


def test_scheduler_names():
    pipe = build_tiny_pipeline()
    for name, cls in [("dpmpp", "DPMSolverMultistepScheduler"), ("ddim", "DDIMScheduler"),
                      ("euler", "EulerDiscreteScheduler"), ("euler_a", "EulerAncestralDiscreteScheduler"),
                      ("pndm", "PNDMScheduler"), ("unipc", "UniPCMultistepScheduler")]:
        set_scheduler(pipe, name)
        assert type(pipe.scheduler).__name__ == cls
        assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # the model's schedule is kept
    set_scheduler(pipe, "dpmpp")
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"


def test_missing_weights_are_one_line_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match="no model_index.json"):
        load_pipeline(SynthConfig(model=str(tmp_path)), "cpu")
    with pytest.raises(MissingWeightsError) as e:  # no hub access here, and not in the cache
        load_pipeline(SynthConfig(model="nobody-has/this-pipeline"), "cpu")
    assert "nobody-has/this-pipeline" in str(e.value) and "\n" not in str(e.value)


def test_unreachable_hub_is_looked_up_in_the_cache_only_and_said(monkeypatch):
    """The hint is only added when the load ran in offline (cache-only) mode."""
    from pcmnet.backbones import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(MissingWeightsError, match="hub is not reachable from here, so pass a local diffusers folder"):
        load_pipeline(SynthConfig(model="nobody-has/this-pipeline"), "cpu")


# --------------------------------------------------------------------------------------------
# generation


def test_generate_writes_pairs_reproducible_from_their_seed(corpus, tiny_dir, tiny_pipe, tmp_path):
    out = tmp_path / "out"
    counts = generate(make_cfg(corpus, tiny_dir, out, images_per_caption=2), pipe=tiny_pipe)
    assert counts["generated"] == 2 * len(CAPTIONS) and counts["skipped"] == 0
    rows = mf.read_jsonl(out / mf.MANIFEST)
    assert [(r["caption_id"], r["image_index"]) for r in rows] == \
        sorted((f"line{i + 1}", k) for i in range(len(CAPTIONS)) for k in (0, 1))
    settings = json.loads((out / mf.SETTINGS).read_text())
    for r in rows:
        assert r["caption"] == CAPTIONS[int(r["caption_id"][4:]) - 1]
        assert r["seed"] == pair_seed(0, r["caption_id"], r["image_index"])
        assert (r["model"], r["scheduler"], r["steps"], r["guidance"], r["size"], r["dtype"]) == \
            (str(tiny_dir.resolve()), "dpmpp", 2, 7.5, "32x32", "fp32")
        data = (out / r["image"]).read_bytes()
        assert (len(data), hashlib.sha1(data).hexdigest()) == (r["bytes"], r["sha1"])
        assert r["nsfw"] is False and r["clip_score"] is None and r["gen_seconds"] > 0
    assert settings["seed"] == 0 and settings["steps"] == 2
    assert len({r["sha1"] for r in rows}) == len(rows)  # every seed gives its own image
    assert_redrawn(tiny_pipe, out, rows[:3])  # the first batch (batch_size 3)


def assert_redrawn(pipe, folder, batch):
    """A bare pipeline call with the manifest's captions, seeds and settings redraws the images:
    bit-exact for the same batch; alone, equal up to float rounding (other batch shapes may take
    other kernel paths)."""
    r = batch[0]
    kw = dict(num_inference_steps=r["steps"], guidance_scale=r["guidance"])
    same = pipe([b["caption"] for b in batch], **kw,
                generator=[torch.Generator("cpu").manual_seed(b["seed"]) for b in batch]).images
    for image, b in zip(same, batch):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(folder / b["image"])))
    alone = pipe(r["caption"], **kw, generator=torch.Generator("cpu").manual_seed(r["seed"])).images[0]
    diff = np.abs(np.asarray(alone, dtype=int) - np.asarray(Image.open(folder / r["image"]), dtype=int))
    assert diff.max() <= 2


def test_sdxl_pipeline(corpus, tmp_path):
    """An SDXL-shaped folder loads through the same code (AutoPipelineForText2Image) and works."""
    build_tiny_pipeline(tmp_path / "xl", kind="sdxl")
    out = tmp_path / "out"
    cfg = make_cfg(corpus, tmp_path / "xl", out, limit=3, scheduler="euler")
    assert generate(cfg)["generated"] == 3
    pipe, _ = load_pipeline(cfg, "cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    rows = mf.read_jsonl(out / mf.MANIFEST)
    assert [r["size"] for r in rows] == ["32x32"] * 3 and not any(r["nsfw"] for r in rows)
    assert_redrawn(pipe, out, rows)


def test_same_inputs_same_bytes(corpus, tiny_dir, tiny_pipe, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(make_cfg(corpus, tiny_dir, a), pipe=tiny_pipe)
    generate(make_cfg(corpus, tiny_dir, b), pipe=tiny_pipe)
    assert image_bytes(a) == image_bytes(b) and len(image_bytes(a)) == len(CAPTIONS)
    assert stable_rows(a) == stable_rows(b)
    c = tmp_path / "c"
    generate(make_cfg(corpus, tiny_dir, c, seed=1), pipe=tiny_pipe)
    assert not set(image_bytes(c).values()) & set(image_bytes(a).values())


def test_resume_redoes_only_missing_or_partial_pairs(corpus, tiny_dir, tiny_pipe, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    generate(make_cfg(corpus, tiny_dir, ref), pipe=tiny_pipe)
    assert generate(make_cfg(corpus, tiny_dir, out, limit=4), pipe=tiny_pipe)["generated"] == 4
    counts = generate(make_cfg(corpus, tiny_dir, out), pipe=tiny_pipe)
    assert (counts["skipped"], counts["generated"]) == (4, len(CAPTIONS) - 4)

    rows = mf.read_jsonl(out / mf.MANIFEST)
    (out / rows[0]["image"]).unlink()  # a lost image
    (out / rows[1]["image"]).write_bytes((out / rows[1]["image"]).read_bytes()[:100])  # a cut one
    with open(mf.part_path(out, 0), "a") as f:
        f.write('{"caption_id": "line2", "image_ind')  # a line torn by a kill inside write()
    counts = generate(make_cfg(corpus, tiny_dir, out), pipe=tiny_pipe)
    assert (counts["skipped"], counts["generated"]) == (len(CAPTIONS) - 2, 2)
    assert image_bytes(out) == image_bytes(ref)
    assert stable_rows(out) == stable_rows(ref)
    assert mf.part_path(out, 0).read_text().endswith("}\n")  # torn tail was cut before appending
    assert not (out / mf.TMP_DIR).exists()


def test_rerun_with_other_settings_is_refused(corpus, tiny_dir, tiny_pipe, tmp_path):
    out = tmp_path / "out"
    generate(make_cfg(corpus, tiny_dir, out, limit=1), pipe=tiny_pipe)
    cfg = make_cfg(corpus, tiny_dir, out, limit=1)
    cfg.steps = 3
    with pytest.raises(PcmnetError, match=r"steps=2 \(now 3\)"):
        generate(cfg, pipe=tiny_pipe)
    # a folder left by a first run that never made a pair (its pipeline failed to load) is re-set
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / mf.SETTINGS).write_text(json.dumps({"model": "somewhere/else", "steps": 50}))
    generate(make_cfg(corpus, tiny_dir, fresh, limit=1), pipe=tiny_pipe)
    assert json.loads((fresh / mf.SETTINGS).read_text())["steps"] == 2


def test_duplicate_caption_ids_are_refused(tiny_dir, tiny_pipe, tmp_path):
    import datasets

    # two rows with the same id: the hf reader gives both captions the id 'x#0'
    datasets.Dataset.from_dict({"id": ["x", "x"], "caption": ["a dog", "a cat"]}).save_to_disk(
        str(tmp_path / "hf"))
    with pytest.raises(DataError, match="caption id 'x#0' appears twice"):
        generate(make_cfg(tmp_path / "hf", tiny_dir, tmp_path / "out"), pipe=tiny_pipe)


class FlaggingPipe:
    """The tiny pipeline behind a fake safety checker that flags prompts containing a word, the
    way diffusers' StableDiffusionSafetyChecker does (black image + nsfw_content_detected)."""

    def __init__(self, pipe, word: str):
        self.pipe, self.word = pipe, word

    def __call__(self, prompt, **kw):
        out = self.pipe(prompt, **kw)
        out.nsfw_content_detected = [self.word in p for p in prompt]
        out.images = [Image.new("RGB", im.size) if f else im for im, f in zip(out.images, out.nsfw_content_detected)]
        return out


def test_safety_checker_hits_are_recorded_and_excluded(corpus, tiny_dir, tiny_pipe, tmp_path):
    out = tmp_path / "out"
    counts = generate(make_cfg(corpus, tiny_dir, out), pipe=FlaggingPipe(tiny_pipe, "cat"))
    assert counts["nsfw"] == 1
    rows = {r["caption"]: r for r in mf.read_jsonl(out / mf.MANIFEST)}
    flagged = rows["a small cat on a sofa"]
    assert flagged["nsfw"] is True and flagged["image"] is None
    assert len(list((out / "images").rglob("*.png"))) == len(CAPTIONS) - 1
    records = load_corpus(CorpusConfig(path=str(out)))
    assert len(records) == len(CAPTIONS) - 1 and all("cat" not in r.captions[0] for r in records)
    assert len(mf.read_manifest_records(out, include_nsfw=True)) == len(CAPTIONS)
    # a flagged pair is complete: a rerun does not try it again
    assert generate(make_cfg(corpus, tiny_dir, out), pipe=tiny_pipe)["generated"] == 0


# --------------------------------------------------------------------------------------------
# CLIP scores


def independent_scores(folder, rows, backbone):
    """cos(g(x), t(c)) computed with numpy from the image files."""
    out = []
    for r in rows:
        pixels = backbone.preprocess(Image.open(folder / r["image"]).convert("RGB"))[None]
        g = backbone.encode_image(pixels).embeds[0].double().numpy()
        t = backbone.encode_text([r["caption"]]).embeds[0].double().numpy()
        out.append(float(g @ t / np.linalg.norm(g) / np.linalg.norm(t)))
    return out


def test_inline_and_later_scores_are_clipped_cosines(corpus, tiny_dir, tiny_pipe, tmp_path):
    later = tmp_path / "later"
    generate(make_cfg(corpus, tiny_dir, later), pipe=tiny_pipe)
    unscored = mf.read_jsonl(later / mf.MANIFEST)
    # a random toy scorer for which both sides of max(cos, 0) occur on these images
    toy = next(t for t in (ToyBackbone(seed=s).freeze() for s in range(50))
               if len({c > 0 for c in independent_scores(later, unscored, t)}) == 2)

    inline = tmp_path / "inline"
    generate(make_cfg(corpus, tiny_dir, inline), pipe=tiny_pipe, backbone=toy)
    rows = mf.read_jsonl(inline / mf.MANIFEST)
    raw = independent_scores(inline, rows, toy)
    assert any(c < 0 for c in raw) and any(c > 0 for c in raw)
    assert [r["clip_score"] for r in rows] == pytest.approx([max(c, 0.0) for c in raw], abs=1e-6)
    assert {r["clip_backbone"] for r in rows} == {toy.fingerprint()}

    # an interrupted earlier scoring run left two scores behind: only the rest are computed
    first = mf.read_jsonl(later / mf.MANIFEST)[:2]
    with PartWriter(mf.part_path(later, 0, "scores")) as w:
        w.append([{"caption_id": r["caption_id"], "image_index": 0, "clip_score": max(c, 0.0),
                   "clip_backbone": toy.fingerprint(), "scored_at": 1.0} for r, c in zip(first, raw)])
    assert score_folder(later, toy, batch_size=4)["scored"] == len(CAPTIONS) - 2
    assert score_folder(later, toy, batch_size=4)["scored"] == 0
    scored = mf.read_jsonl(later / mf.MANIFEST)
    assert [r["clip_score"] for r in scored] == pytest.approx([r["clip_score"] for r in rows], abs=1e-6)
    # another backbone replaces the scores
    other = ToyBackbone(seed=toy.seed + 1).freeze()
    assert score_folder(later, other)["scored"] == len(CAPTIONS)
    rescored = mf.read_jsonl(later / mf.MANIFEST)
    assert {r["clip_backbone"] for r in rescored} == {other.fingerprint()}
    assert [r["clip_score"] for r in rescored] == pytest.approx(
        [max(c, 0.0) for c in independent_scores(later, rescored, other)], abs=1e-6)
    records = load_corpus(CorpusConfig(path=str(later)))
    assert [r.meta["clip_score"] for r in records] == [r["clip_score"] for r in rescored]


# --------------------------------------------------------------------------------------------
# manifest merging and reading


def test_merge_rules():
    gen = [
        {"caption_id": "b", "image_index": 0, "created": 1.0, "caption": "old", "clip_score": None},
        {"caption_id": "a", "image_index": 1, "created": 1.0, "caption": "a1", "clip_score": 0.2,
         "clip_backbone": "x", "scored_at": 5.0},
        {"caption_id": "b", "image_index": 0, "created": 2.0, "caption": "new", "clip_score": None},
        {"caption_id": "a", "image_index": 0, "created": 1.0, "caption": "a0"},
    ]
    scores = [{"caption_id": "a", "image_index": 1, "clip_score": 0.1, "clip_backbone": "y", "scored_at": 3.0},
              {"caption_id": "b", "image_index": 0, "clip_score": 0.7, "clip_backbone": "y", "scored_at": 4.0},
              {"caption_id": "zz", "image_index": 0, "clip_score": 0.7, "clip_backbone": "y", "scored_at": 4.0}]
    rows = mf.merge_rows(gen, scores)
    assert [(r["caption_id"], r["image_index"], r["caption"]) for r in rows] == \
        [("a", 0, "a0"), ("a", 1, "a1"), ("b", 0, "new")]
    assert [(r["clip_score"], r["clip_backbone"]) for r in rows] == [(None, None), (0.2, "x"), (0.7, "y")]


def test_read_jsonl_torn_and_bad_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"caption_id": "a", "image_index": 0}\n{"caption_id": "b", "ima')
    assert [r["caption_id"] for r in mf.read_jsonl(path)] == ["a"]
    w = PartWriter(path)
    w.append([{"caption_id": "c", "image_index": 0}])
    w.close()
    assert path.read_text() == '{"caption_id": "a", "image_index": 0}\n{"caption_id": "c", "image_index": 0}\n'
    path.write_text('{"caption_id": "a", "image_index": 0}\nnot json\n{"caption_id": "c", "image_index": 0}\n')
    with pytest.raises(DataError, match=r"m.jsonl:2: not a manifest line"):
        mf.read_jsonl(path)


def test_load_corpus_reads_manifest_dir_and_file(corpus, tiny_dir, tiny_pipe, tmp_path):
    out = tmp_path / "out"
    generate(make_cfg(corpus, tiny_dir, out, images_per_caption=2, limit=2), pipe=tiny_pipe)
    by_dir = load_corpus(CorpusConfig(path=str(out)))
    by_file = load_corpus(CorpusConfig(path=str(out / mf.MANIFEST)))
    assert [(r.image_id, r.file, r.captions, r.caption_ids) for r in by_dir] == \
        [(r.image_id, r.file, r.captions, r.caption_ids) for r in by_file]
    assert [r.image_id for r in by_dir] == ["line1#0", "line1#1", "line2#0", "line2#1"]
    assert all(r.caption_ids == [r.image_id.split("#")[0]] for r in by_dir)
    assert all(r.captions == [CAPTIONS[int(r.caption_ids[0][4:]) - 1]] for r in by_dir)
    assert all(open(r.file, "rb").read()[:4] == b"\x89PNG" for r in by_dir)
    assert by_dir[1].meta["seed"] == pair_seed(0, "line1", 1)
    # parts alone (no merged manifest yet, e.g. a killed run) are read the same way
    (out / mf.MANIFEST).unlink()
    parts_only = load_corpus(CorpusConfig(path=str(out), format="manifest"))
    assert [r.file for r in parts_only] == [r.file for r in by_dir]


# --------------------------------------------------------------------------------------------
# export


def test_export_round_trip(corpus, tiny_dir, tiny_pipe, tmp_path, monkeypatch):
    out = tmp_path / "out"
    generate(make_cfg(corpus, tiny_dir, out), pipe=FlaggingPipe(tiny_pipe, "bus"),
             backbone=ToyBackbone(seed=3).freeze())
    synth = {r.image_id: r for r in load_corpus(CorpusConfig(path=str(out)))}
    assert len(synth) == len(CAPTIONS) - 1

    hf = export(out, tmp_path / "hf", fmt="hf")
    back = load_corpus(CorpusConfig(path=str(hf)))  # format auto -> hf (save_to_disk folder)
    assert sorted(r.image_id for r in back) == sorted(synth)
    for r in back:
        s = synth[r.image_id]
        assert r.captions == s.captions
        assert r.image == open(s.file, "rb").read()
        assert (r.meta["clip_score"], r.meta["seed"], r.caption_ids[0]) == \
            (s.meta["clip_score"], s.meta["seed"], s.caption_ids[0])

    import datasets

    pq = export(out, tmp_path / "pq", fmt="parquet", max_shard_mb=0.01)  # tiny shards: several files
    files = sorted(str(p) for p in (pq / "data").glob("train-*.parquet"))
    assert len(files) > 1
    ds = datasets.load_dataset("parquet", data_files=files, split="train").cast_column(
        "image", datasets.Image(decode=False))
    assert sorted(ds["image_id"]) == sorted(synth)
    for row in ds:
        s = synth[row["image_id"]]
        assert row["image"]["bytes"] == open(s.file, "rb").read() and row["caption"] == s.captions[0]
        assert (row["clip_score"], row["seed"]) == (s.meta["clip_score"], s.meta["seed"])
    back = load_corpus(CorpusConfig(path=str(pq)))  # format auto -> hf (parquet shards)
    assert sorted(r.image_id for r in back) == sorted(synth)
    for r in back:
        s = synth[r.image_id]
        assert (r.captions, r.caption_ids, r.image) == (s.captions, s.caption_ids, open(s.file, "rb").read())
        assert r.meta["clip_score"] == s.meta["clip_score"]

    with pytest.raises(PcmnetError, match="not empty"):
        export(out, tmp_path / "hf")
    assert not list(tmp_path.glob(".*.tmp-*"))

    # push_to_hub (no network here): the local export is kept, the failure is one line, and the
    # shard size reaches `datasets` as a number of bytes
    calls = []

    def no_network(self, repo, **kw):
        calls.append((repo, kw))
        raise ConnectionError("Couldn't reach the Hub\n(offline)")

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", no_network)
    with pytest.raises(PcmnetError) as e:
        export(out, tmp_path / "pushed", fmt="hf", push_to_hub="me/synth", max_shard_mb=500)
    assert "\n" not in str(e.value) and "exported, but pushing to the hub as 'me/synth' failed" in str(e.value)
    assert calls == [("me/synth", {"max_shard_size": 500 * 2**20})]
    assert sorted(r.image_id for r in load_corpus(CorpusConfig(path=str(tmp_path / "pushed")))) == sorted(synth)
    assert not list(tmp_path.glob(".*.tmp-*"))
