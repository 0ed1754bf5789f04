"""`pcmnet train` with the ToyBackbone: learning, determinism, exact resume after kill -9,
run-directory safety, CLI errors, 2 CPU processes under `accelerate launch`."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pcmnet.cli import main as cli_main
from pcmnet.config import ConfigError, load_config
from pcmnet.errors import PcmnetError
from pcmnet.models.captioner import Captioner
from pcmnet.train.config import TrainConfig
from pcmnet.train.trainer import EpochSampler, lr_factor, train
from toys import (WORDS, ToyBackbone, assert_same_weights, kill_mid_epoch, logged_steps, toy_coco_corpus,
                  weights)

TESTS = Path(__file__).resolve().parent
TOY_SCRIPT = TESTS / "scripts" / "train_toy.py"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 images x 2 captions = 12 pairs; every caption has 4 words (equal token counts per batch)."""
    d = tmp_path_factory.mktemp("corpus")
    toy_coco_corpus(d, 6)
    return d


def write_config(corpus, out: Path, epochs=4, **sections) -> Path:
    cfg = {
        "mode": "supervised",
        "data": {"train": {"path": str(corpus / "caps.json")}},
        "model": {"width": 32, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn": 64,
                  "dropout": 0.1, "noise_variance": 0.016, "vocab_min_count": 1, "max_len": 12},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "batch_size": 4, "epochs": epochs},
        "run": {"output_dir": str(out / "run"), "seed": 0, "save_every": 2, "log_every": 1,
                "keep_checkpoints": 2, "cache_dir": str(corpus / "cache")},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def same_numbers(log):
    return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in log]


# ------------------------------------------------------------------------------------------------
# pure pieces


def test_lr_factor_matches_the_formulas():
    lr, w = 5e-4, 10
    for s in (1, 5, 10, 11, 40, 1000):  # s = 1-based optimizer step
        assert lr * lr_factor(s - 1, w, "noam", 100) == pytest.approx(lr * min(s / w, math.sqrt(w / s)))
        assert lr_factor(s - 1, w, "constant", 100) == pytest.approx(min(1.0, s / w))
    assert lr_factor(9, 10, "cosine", 110) == pytest.approx(1.0)
    assert lr_factor(59, 10, "cosine", 110) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(109, 10, "cosine", 110) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="optim.schedule"):
        lr_factor(0, 10, "linear", 100)


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    first = list(a)
    assert first == list(b) == list(a) and sorted(first) == list(range(50))
    b.set_epoch(3)
    assert list(b) != first
    assert list(EpochSampler(50, seed=4)) != list(EpochSampler(50, seed=3))
    assert list(EpochSampler(5, 0, shuffle=False)) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------
# Python API


def run_api(corpus, out: Path, resume=False, overrides=(), **kw) -> Path:
    cfg = load_config(TrainConfig, write_config(corpus, out, **kw), list(overrides))
    return train(cfg, resume=resume, backbone=ToyBackbone().freeze())


def with_val(corpus):
    return {"train": {"path": str(corpus / "caps.json")}, "val": {"path": str(corpus / "caps.json")}}


@pytest.fixture(scope="module")
def seeded_runs(corpus, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    val = with_val(corpus)
    a = run_api(corpus, base / "a", epochs=6, data=val)
    b = run_api(corpus, base / "b", epochs=6, data=val)
    c = run_api(corpus, base / "c", epochs=6, data=val, overrides=["run.seed=1"])
    return a, b, c


def test_training_learns_and_is_deterministic(seeded_runs):
    a, b, c = seeded_runs
    run = a.parent
    log = read_log(run)
    assert [r["step"] for r in log] == list(range(1, 19))  # 12 pairs / batch 4 = 3 steps x 6 epochs
    losses = [r["loss"] for r in log]
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3  # 2.63 -> 2.12 (label smoothing 0.1)
    # the logged lr is the Noam lr the step used
    for r in log:
        s = r["step"]
        assert r["lr"] == pytest.approx(3e-3 * min(s / 5, math.sqrt(5 / s)))
    # same seed: bit-identical weights and logs; another seed: different
    assert_same_weights(weights(a), weights(b))
    assert same_numbers(read_log(run)) == same_numbers(read_log(b.parent))
    wc = weights(c)
    assert any(not torch.equal(wc[k], weights(a)[k]) for k in wc)
    # the run directory
    assert (run / "config.yaml").exists() and (run / "tokenizer" / "vocab.json").exists()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000016", "step-00000018"]  # keep_checkpoints=2, no .tmp left over
    events = list((run / "logs").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    state = json.loads((run / "checkpoints" / "step-00000018" / "trainer_state.json").read_text())
    assert state["step"] == 18 and [h["step"] for h in state["history"]] == [3, 6, 9, 12, 15, 18]
    assert all(h["val_loss"] > 0 for h in state["history"])


def test_trained_model_loads_and_captions(seeded_runs):
    a, _, _ = seeded_runs
    m = Captioner.from_pretrained(a, backbone=ToyBackbone())
    assert m.extras["train_images"] == 6 and m.extras["train_pairs"] == 12
    assert m.extras["mode"] == "supervised"
    g = torch.nn.functional.normalize(torch.randn(2, 24), dim=-1)
    caps = m.generate({"embeds": g, "patches": torch.randn(2, 16, 32)}, beam_size=2)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    with pytest.raises(Exception, match="toy-0"):
        Captioner.from_pretrained(a, backbone=ToyBackbone(seed=1))


def test_run_directory_safety(seeded_runs, corpus):
    a, _, _ = seeded_runs
    out = a.parent.parent  # the dir holding cfg.yaml and run/
    with pytest.raises(PcmnetError) as e:
        run_api(corpus, out, epochs=6)
    msg = str(e.value)
    assert "\n" not in msg and "already holds checkpoints" in msg and "--resume" in msg
    with pytest.raises(PcmnetError) as e:
        run_api(corpus, out, resume=True, epochs=6, overrides=["model.width=16"])
    msg = str(e.value)
    assert "\n" not in msg and "different config" in msg and "model" in msg and "optim" not in msg
    with pytest.raises(PcmnetError, match="sections: data, optim"):
        run_api(corpus, out, resume=True, epochs=7, overrides=["data.train.limit=3"])
    # a change of run.* settings only is fine: the finished run is found complete
    before = (out / "run" / "train_log.jsonl").read_text()
    files = sorted(p for d in ("model", "checkpoints") for p in (out / "run" / d).rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    assert run_api(corpus, out, resume=True, epochs=6, data=with_val(corpus),
                   overrides=["run.log_every=5"]) == a
    assert (out / "run" / "train_log.jsonl").read_text() == before
    # ... and left as it was: neither the final model nor the last checkpoint is written again
    assert sorted(p for d in ("model", "checkpoints") for p in (out / "run" / d).rglob("*") if p.is_file()) == files
    assert [str(p.relative_to(out)) for p, a, b in zip(files, stamps, [p.stat().st_mtime_ns for p in files])
            if a != b] == []


@pytest.mark.parametrize("override, key", [("optim.batch_size=0", "optim.batch_size"),
                                           ("optim.lr=-1", "optim.lr"),
                                           ("optim.betas=[0.9]", "optim.betas"),
                                           ("optim.schedule=linear", "optim.schedule"),
                                           ("run.log_every=-1", "run.log_every")])
def test_bad_optim_and_run_values_are_one_line_errors(corpus, tmp_path, override, key):
    with pytest.raises(ConfigError) as e:
        run_api(corpus, tmp_path, overrides=[override])
    assert str(e.value).startswith(key) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_eval_every_log_every_0_and_a_stale_vocabulary(corpus, tmp_path):
    # a run killed before its first checkpoint left another corpus's vocabulary behind
    (tmp_path / "run" / "tokenizer").mkdir(parents=True)
    (tmp_path / "run" / "tokenizer" / "vocab.json").write_text(json.dumps(["<pad>", "<bos>", "<eos>", "<unk>", "zebra"]))
    final = run_api(corpus, tmp_path, epochs=6, data=with_val(corpus),
                    run={"eval_every": 4, "log_every": 0, "save_every": 0})
    vocab = json.loads((final / "vocab.json").read_text())
    words = vocab if isinstance(vocab, list) else vocab.get("words", vocab)
    assert "zebra" not in json.dumps(vocab) and "red" in json.dumps(words)
    assert [r["step"] for r in read_log(tmp_path / "run")] == [18]  # log_every 0: the last step only
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000018" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [4, 8, 12, 16, 18]  # every 4 steps, and at the end
    # a resume must not change the seed (it fixes the batch order a mid-epoch resume relies on)
    with pytest.raises(PcmnetError, match="run.seed"):
        run_api(corpus, tmp_path, resume=True, epochs=6, data=with_val(corpus),
                run={"eval_every": 4, "log_every": 0, "save_every": 0, "seed": 7})


def test_max_steps_and_a_stale_log(corpus, tmp_path):
    # a first attempt killed before its first checkpoint left log lines behind
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n{"st')
    final = run_api(corpus, tmp_path, epochs=6, optim={"max_steps": 5, "schedule": "cosine"},
                    run={"save_every": 0})
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and all(r["loss"] < 9 for r in log)
    # cosine over the 5 steps of the run (warm-up 5): the last step is the end of the warm-up
    assert [r["lr"] for r in log] == pytest.approx([3e-3 * s / 5 for s in range(1, 6)])
    assert json.loads((run / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())["step"] == 5
    assert (final / "model.safetensors").exists()


@pytest.mark.parametrize("variant", ["global", "global_local", "prefix_lm"])
def test_other_architectures_train_save_and_load(corpus, tmp_path, variant):
    if variant == "prefix_lm":
        from test_captioner import word_level_lm_tokenizer

        n = word_level_lm_tokenizer(tmp_path / "tok", [f"a {w} {v} thing" for w in WORDS for v in WORDS])
        model = {"decoder": "prefix_lm", "prefix_len": 4, "freeze_lm": False,
                 "lm_config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2,
                               "vocab_size": n, "n_positions": 32, "bos_token_id": 0, "eos_token_id": 0,
                               "tokenizer": str(tmp_path / "tok")}}
    else:
        model = {"inputs": variant}
    final = run_api(corpus, tmp_path, epochs=2, model=model)
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(1, 7)) and log[-1]["loss"] < log[0]["loss"]
    m = Captioner.from_pretrained(final, backbone=ToyBackbone())
    assert m.image_fields() == {"global": ("embeds",), "global_local": ("embeds", "patch_embeds"),
                                "prefix_lm": ("embeds",)}[variant]
    f = ToyBackbone().encode_image(torch.randn(2, 3, 16, 16))
    caps = m.generate(m.image_inputs({"embeds": f.embeds, "patches": f.patches,
                                      "patch_embeds": f.patch_embeds}), beam_size=2, max_len=5)
    assert len(caps) == 2


def test_unknown_mode(corpus, tmp_path):
    with pytest.raises(ConfigError, match="unknown mode 'magic'"):
        run_api(corpus, tmp_path, overrides=["mode=magic"])


def test_cli_unknown_key_and_print_config(corpus, tmp_path, capsys):
    cfg = write_config(corpus, tmp_path)
    assert cli_main(["train", str(cfg), "model.widht=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'model.widht'" in err and err.startswith("pcmnet train: error:")
    assert cli_main(["train", str(cfg), "optim.lr=1e-4", "--print-config"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == pytest.approx(1e-4) and printed["model"]["width"] == 32
    assert cli_main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    # the real entry point: exit status 2 and one line on stderr
    res = subprocess.run([sys.executable, "-m", "pcmnet", "train", str(cfg), "model.widht=3"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "'model.widht'" in res.stderr


# ------------------------------------------------------------------------------------------------
# exact resume after kill -9


@pytest.mark.slow
def test_exact_resume_after_kill(corpus, tmp_path):
    epochs = 8  # 24 steps; checkpoints every 2 steps fall mid-epoch at steps 2, 4, 8, 10, ...
    a = run_api(corpus, tmp_path / "a", epochs=epochs)

    b_cfg = write_config(corpus, tmp_path / "b", epochs=epochs)
    run_b = tmp_path / "b" / "run"
    killed_at = kill_mid_epoch([TOY_SCRIPT, b_cfg], run_b, tmp_path, min_step=4)
    assert not (run_b / "model").exists()
    assert max(logged_steps(run_b)) > killed_at  # steps after it were logged and are redone

    b = run_api(corpus, tmp_path / "b", resume=True, epochs=epochs)
    assert_same_weights(weights(a), weights(b))
    # the log continues: every step once, the same numbers as the uninterrupted run
    assert same_numbers(read_log(run_b)) == same_numbers(read_log(a.parent))


# ------------------------------------------------------------------------------------------------
# 2 CPU processes


def free_port() -> int:
    """A free TCP port for the gloo rendezvous (other jobs on this box may hold the default 29500)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(cwd, args, timeout=300) -> subprocess.CompletedProcess:
    """`accelerate launch` with 2 CPU processes; on a timeout the whole process group is killed
    (no stray ranks left waiting in a barrier)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *args]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"accelerate launch did not finish in {timeout} s: {err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(corpus, tmp_path):
    # No dropout / noise (2 processes draw their own random streams) and captions of equal length,
    # so the mean of the two half-batch token means is the full batch's token mean: the runs differ
    # only by floating-point summation order.
    det = {"dropout": 0.0, "noise_variance": 0.0}
    one = run_api(corpus, tmp_path / "one", model=det)
    cfg = write_config(corpus, tmp_path / "two", model=det)
    res = launch_two(tmp_path, [str(TOY_SCRIPT), str(cfg)])
    assert res.returncode == 0, res.stderr[-3000:]
    two_dir = tmp_path / "two" / "run"
    m = Captioner.from_pretrained(two_dir / "model", backbone=ToyBackbone())
    assert m.extras["train_pairs"] == 12
    log1, log2 = read_log(one.parent), read_log(two_dir)
    # one log, written once (by the main process), with the same steps: the processes did join
    assert [r["step"] for r in log2] == [r["step"] for r in log1] == list(range(1, 13))
    for r1, r2 in zip(log1, log2):
        assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-4)
    w1, w2 = weights(one), weights(two_dir / "model")
    diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    # Nearly every weight agrees to float rounding. Adam divides by sqrt(v) + eps, so parameters
    # whose true gradient is 0 (e.g. attention key biases: softmax ignores them) turn rounding noise
    # into steps of up to ~lr each; over 12 steps such a weight can drift by at most ~12 * lr.
    assert (diff > 1e-5).float().mean() < 0.01
    assert diff.max() < 12 * 3e-3
