"""`pcmnet synth` on the command line: the real CLI on a tiny random pipeline it builds itself,
killed with SIGKILL mid-run and resumed (the result equals an uninterrupted run)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcmnet.backbones.base import BackboneConfig
from pcmnet.cli import main
from pcmnet.data.readers import CorpusConfig, load_corpus
from pcmnet.synth import manifest as mf
from pcmnet.synth.config import SynthConfig
from pcmnet.synth.generate import generate

N = 24
ARGS = ["--steps", "4", "--batch-size", "2", "--backbone", "none", "--scheduler", "dpmpp"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-cli")
    assert main(["synth", "tiny", "--out", str(root / "tiny")]) == 0
    (root / "caps.txt").write_text("".join(f"a photo of object {i} on a table\n" for i in range(N)))
    return root


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def cli(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pcmnet.cli", "synth", "--captions", str(root / "caps.txt"),
            "--model", str(root / "tiny"), "--out", str(out), *ARGS]


def stable_rows(folder):
    return [{k: v for k, v in r.items() if k not in mf.TIME_FIELDS} for r in mf.read_jsonl(folder / mf.MANIFEST)]


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.parent != folder}


@pytest.mark.slow
def test_kill9_then_rerun_equals_uninterrupted_run(setup, tmp_path):
    out = tmp_path / "killed"
    part = mf.part_path(out, 0)
    proc = subprocess.Popen(cli(setup, out), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if part.exists() and part.read_text().count("\n") >= 4:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = len(mf.read_jsonl(part))
    assert 4 <= before < N and not (out / mf.MANIFEST).exists()

    rerun = subprocess.run(cli(setup, out), env=env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{before} already complete, {N - before} to generate" in rerun.stderr
    assert len(mf.read_jsonl(part)) == N  # every pair written exactly once: only missing work redone

    ref = tmp_path / "ref"  # the same job, uninterrupted (in this process)
    generate(SynthConfig(captions=CorpusConfig(path=str(setup / "caps.txt")), model=str(setup / "tiny"),
                         out=str(ref), steps=4, batch_size=2, scheduler="dpmpp", device="cpu",
                         backbone=BackboneConfig(name="none")))
    assert files(out) == files(ref) and len(files(ref)) == N
    assert stable_rows(out) == stable_rows(ref)
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_cli_jobs_and_one_line_errors(setup, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["synth", "--captions", str(setup / "caps.txt"), "--model", str(setup / "tiny"),
            "--out", str(out), "--limit", "3", *ARGS]
    assert main(base) == 0
    assert len(mf.read_jsonl(out / mf.MANIFEST)) == 3

    (out / mf.MANIFEST).unlink()
    assert main(["synth", "merge", "--manifest", str(out)]) == 0
    assert len(mf.read_jsonl(out / mf.MANIFEST)) == 3

    assert main(["synth", "export", "--manifest", str(out), "--out", str(tmp_path / "hf")]) == 0
    back = load_corpus(CorpusConfig(path=str(tmp_path / "hf")))
    assert [r.captions for r in back] == [r.captions for r in load_corpus(CorpusConfig(path=str(out)))]

    capsys.readouterr()
    cases = [
        (base[:4] + [str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")] + base[7:],
         "cannot load diffusion pipeline"),
        (base + ["--steps", "5"], "this folder was made with steps=4 (now 5)"),
        (base + ["--scheduler", "fastest"], "config key 'scheduler' is 'fastest'"),
        (["synth", "--model", "m", "--out", "o"], "config key 'captions.path' is empty"),
        (["synth", "score", "--manifest", str(out), "--backbone", "none"], "scores nothing"),
        (["synth", "score", "--manifest", str(out), "--backbone", "clip"], "'backbone.name' is 'clip'"),
        (["synth", "score", "--manifest", str(tmp_path), "--backbone", "mini"], "not a pcmnet synth folder"),
        (["synth", "merge", "--manifest", str(tmp_path / "nothing")], "not a pcmnet synth folder"),
        (["synth", "export", "--manifest", str(out), "--out", str(tmp_path / "hf")], "not empty"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pcmnet synth: error:") and message in err[0], err
