"""`pcmnet synth` under `accelerate launch` with 2 CPU processes (gloo): disjoint shards whose
union is every caption, one merged manifest, resumption across a change of process count, and
sharded `pcmnet synth score`. The launched script is the real CLI; only `load_backbone` is
pointed at the toy backbone (no CLIP weights offline)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pcmnet.backbones.base import BackboneConfig
from pcmnet.data.readers import CorpusConfig
from pcmnet.synth import manifest as mf
from pcmnet.synth.config import SynthConfig
from pcmnet.synth.generate import generate
from pcmnet.synth.score import score_folder
from pcmnet.synth.tiny import build_tiny_pipeline
from toys import ToyBackbone

TESTS = Path(__file__).resolve().parent
N = 9

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from toys import ToyBackbone
import pcmnet.backbones.base as base
from pcmnet.cli import main

# `--backbone mini` -> ToyBackbone(seed=3), `--backbone-model 4` -> ToyBackbone(seed=4)
base.load_backbone = lambda cfg, device=None: ToyBackbone(seed=int(cfg.model or 3)).freeze()
caps, tiny, out = sys.argv[1:4]
common = ["--steps", "2", "--batch-size", "1", "--scheduler", "ddim", "--backbone", "mini"]
assert main(["synth", "--captions", caps, "--model", tiny, "--out", out, "--images-per-caption", "2",
             *common]) == 0
assert main(["synth", "score", "--manifest", out, "--backbone", "mini", "--backbone-model", "4",
             "--batch-size", "3"]) == 0
"""


def stable_rows(rows):
    """Lines without wall-clock fields and CLIP scores (compared to float32 precision apart)."""
    return [{k: v for k, v in r.items() if k not in mf.TIME_FIELDS + ("clip_score",)} for r in rows]


@pytest.mark.slow
def test_two_processes_shard_merge_resume_and_score(tmp_path):
    build_tiny_pipeline(tmp_path / "tiny")
    caps = tmp_path / "caps.txt"
    caps.write_text("".join(f"a drawing of thing {i}\n" for i in range(N)))

    def cfg(out, **kw):
        return SynthConfig(captions=CorpusConfig(path=str(caps)), model=str(tmp_path / "tiny"), out=str(out),
                           steps=2, batch_size=1, scheduler="ddim", device="cpu", images_per_caption=2, **kw)

    # one process starts the job (3 captions), then two processes finish it
    out = tmp_path / "two"
    generate(cfg(out, limit=3, backbone=BackboneConfig(name="none")), backbone=ToyBackbone(seed=3).freeze())
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         str(script), str(caps), str(tmp_path / "tiny"), str(out)],
        env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"),
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    p0, p1 = mf.read_jsonl(mf.part_path(out, 0)), mf.read_jsonl(mf.part_path(out, 1))
    first = p0[:6]  # the single-process run: captions line1..line3, two images each
    assert [r["caption_id"] for r in first] == ["line1", "line1", "line2", "line2", "line3", "line3"]
    # the 2-process run: rank r owns caption positions p = r mod 2 and skipped what was done
    assert {r["caption_id"] for r in p0[6:]} == {"line5", "line7", "line9"}
    assert {r["caption_id"] for r in p1} == {"line4", "line6", "line8"}  # line2 was already done
    keys = [mf.pair_key(r) for r in p0 + p1]
    assert len(keys) == len(set(keys)) == 2 * N  # disjoint, and nothing generated twice
    merged = mf.read_jsonl(out / mf.MANIFEST)
    assert [mf.pair_key(r) for r in merged] == sorted((f"line{i}", k) for i in range(1, N + 1) for k in (0, 1))

    # pairs scored inline by ToyBackbone(3) (the 2-process part), then all re-scored by ToyBackbone(4),
    # split over the two processes
    s0, s1 = mf.read_jsonl(mf.part_path(out, 0, "scores")), mf.read_jsonl(mf.part_path(out, 1, "scores"))
    scored = [mf.pair_key(r) for r in s0 + s1]
    assert s0 and s1 and sorted(scored) == sorted(set(scored)) == [mf.pair_key(r) for r in merged]
    assert {r["clip_backbone"] for r in merged} == {"toy-4"}

    # the same job in one process, uninterrupted, scored the same way: identical corpus
    ref = tmp_path / "one"
    generate(cfg(ref), backbone=ToyBackbone(seed=3).freeze())
    score_folder(ref, ToyBackbone(seed=4).freeze())
    reference = mf.read_jsonl(ref / mf.MANIFEST)
    assert stable_rows(merged) == stable_rows(reference)
    # float32 sums over other batch compositions of the scorer: equal up to rounding
    assert [r["clip_score"] for r in merged] == pytest.approx([r["clip_score"] for r in reference], abs=1e-6)
    for r in merged:
        assert (out / r["image"]).read_bytes() == (ref / r["image"]).read_bytes()
    assert not (out / mf.TMP_DIR).exists()
