"""Concept vocabulary: noun counting, prompt-ensemble embedding, files, CLI (METHODS.md section 3)."""
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from pcmnet.cli import main
from pcmnet.errors import CheckpointError, PcmnetError
from pcmnet.models.concepts import (DEFAULT_TEMPLATES, concept_meta, embed_concepts, frequent_nouns,
                                    has_tagger, heuristic_nouns, load_concepts, read_word_list,
                                    save_concepts, singular_candidates)

CORPUS = [
    "A dog sitting on a couch next to a cat.",
    "Two dogs playing with a frisbee in the park.",
    "A man riding a horse on the beach.",
    "A brown dog lying on a couch.",
    "A group of people standing in front of a bus.",
    "The cat is sleeping on the couch.",
    "A woman holding an umbrella in the rain.",
    "A man and a woman walking a dog on the beach.",
    "A bus parked on the street.",
    "Clothes hanging on a line.",
]
# Counted by hand: a plural counts as its singular when the singular occurs in the corpus
# ("dogs" -> "dog"; "people" stays, "person" never occurs; so does "clothes"):
#   dog 3+1 = 4, couch 3, then beach bus cat man woman 2 each, then clothes frisbee horse line park
#   people rain street umbrella 1 each ("front" and "group" are excluded by default)

needs_tagger = pytest.mark.skipif(not has_tagger(), reason="TextBlob (the offline tagger) is not installed")


@pytest.mark.parametrize("tagger", [pytest.param("textblob", marks=needs_tagger), "heuristic"])
def test_frequent_nouns_on_a_hand_counted_corpus(tagger):
    words = frequent_nouns(CORPUS, k=7, tagger=tagger)
    assert words == ["dog", "couch", "beach", "bus", "cat", "man", "woman"]  # count, then a-z
    every = frequent_nouns(CORPUS, k=100, tagger=tagger)
    for w in ("frisbee", "park", "horse", "umbrella", "rain", "street", "people", "clothes"):
        assert w in every, w
    for w in ("dogs", "sitting", "brown", "riding", "front", "group", "a", "the", "two"):
        assert w not in every, w
    kept = frequent_nouns(CORPUS, k=100, tagger=tagger, exclude=())
    assert "front" in kept and "group" in kept


def test_auto_falls_back_to_the_heuristic(monkeypatch, caplog):
    import pcmnet.models.concepts as concepts

    if has_tagger():
        assert frequent_nouns(CORPUS, tagger="auto") == frequent_nouns(CORPUS, tagger="textblob")
    monkeypatch.setattr(concepts, "has_tagger", lambda: False)
    with caplog.at_level("WARNING"):
        assert frequent_nouns(CORPUS, tagger="auto") == frequent_nouns(CORPUS, tagger="heuristic")
    assert "TextBlob is not installed" in caplog.text
    with pytest.raises(PcmnetError, match="pip install textblob"):
        frequent_nouns(CORPUS, tagger="textblob")


def test_heuristic_counts_heads_of_noun_phrases():
    counts = heuristic_nouns(["a large brown dog sitting on a couch", "a dog on a red couch",
                              "a couch", "a red bus"])
    assert counts == Counter({"dog": 2, "couch": 3, "bus": 1})


@needs_tagger
def test_tagger_correction_for_nouns_with_a_verb_reading():
    # the pattern.en lexicon reads "sink"/"bear" as verbs even after "a"; the correction fixes it
    words = frequent_nouns(["a white sink in a bathroom", "a brown bear in the grass",
                            "a teddy bear on a bed", "two bears stand in the water"], k=20, tagger="textblob")
    assert words[0] == "bear" and "sink" in words and "stand" not in words


def test_singular_candidates_and_word_lists(tmp_path):
    assert singular_candidates("people") == ["person"]
    assert singular_candidates("buses")[0] == "bus"
    assert "shoe" in singular_candidates("shoes") and singular_candidates("bus") == []
    assert singular_candidates("clothes") == ["clothes"]
    # of two attested singulars, the more frequent one wins ("horses" -> "horse", not "hors")
    corpus = ["two horses in a field", "a horse", "a horse in a barn", "hors"]
    assert frequent_nouns(corpus, tagger="heuristic")[:2] == ["horse", "barn"]
    f = tmp_path / "words.txt"
    f.write_text("dog\n\n# animals above\ncat  # a comment\ndog\n car \n")
    assert read_word_list(f) == ["dog", "cat", "car"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(Exception, match="no words"):
        read_word_list(tmp_path / "empty.txt")
    with pytest.raises(PcmnetError, match="unknown tagger"):
        frequent_nouns(CORPUS, tagger="spacy")


def test_embedding_is_the_normalized_mean_of_template_embeddings(toy_backbone):
    words = ["dog", "traffic light", "cat"]
    templates = ("a photo of a {}.", "a {} in the street", "{}")
    emb = embed_concepts(words, toy_backbone, templates)
    assert emb.shape == (3, toy_backbone.embed_dim)
    for i, w in enumerate(words):
        each = [toy_backbone.encode_text([t.replace("{}", w)]).embeds[0] for t in templates]
        mean = torch.stack(each).mean(0)
        assert torch.allclose(emb[i], mean / mean.norm(), atol=1e-5)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # one template: exactly the backbone's own embedding of the filled template
    one = embed_concepts(words, toy_backbone, ("a photo of a {}.",))
    assert torch.allclose(one, toy_backbone.embed_texts([f"a photo of a {w}." for w in words]), atol=1e-5)
    with pytest.raises(PcmnetError, match="exactly once"):
        embed_concepts(words, toy_backbone, ("no slot here",))
    assert len(DEFAULT_TEMPLATES) == 8 and all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)


def test_save_load_round_trip_and_backbone_check(tmp_path, toy_backbone):
    from toys import ToyBackbone

    words = ["dog", "cat", "bus"]
    emb = embed_concepts(words, toy_backbone)
    meta = concept_meta(toy_backbone, DEFAULT_TEMPLATES, data="corpus.json", k=3)
    out = save_concepts(tmp_path / "c", words, emb, meta)
    assert sorted(p.name for p in out.iterdir()) == ["concepts.json", "concepts.safetensors"]
    w2, e2, m2 = load_concepts(out, expect_backbone=toy_backbone)
    assert w2 == words and torch.equal(e2, emb) and m2 == json.loads(json.dumps(meta))
    assert m2["backbone"]["fingerprint"] == "toy-0" and m2["templates"] == list(DEFAULT_TEMPLATES)
    assert load_concepts(out / "concepts.json", expect_backbone="toy-0")[0] == words

    with pytest.raises(CheckpointError, match=r"embedded with backbone .*toy-0.*, not toy-1"):
        load_concepts(out, expect_backbone=ToyBackbone(seed=1))
    with pytest.raises(CheckpointError, match="missing"):
        load_concepts(tmp_path / "nowhere")
    doc = json.loads((out / "concepts.json").read_text())
    doc["words"].append("extra")
    (out / "concepts.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="different runs"):
        load_concepts(out)
    (out / "concepts.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not a pcmnet concept file"):
        load_concepts(out)


def test_concept_bank_feeds_pcm(tmp_path, toy_backbone):
    """The file format is what PCMTokens takes: load, build, run on toy features."""
    from pcmnet.models.pcm import PCMConfig, PCMTokens

    words = frequent_nouns(CORPUS, k=6, tagger="heuristic")
    save_concepts(tmp_path, words, embed_concepts(words, toy_backbone), concept_meta(toy_backbone))
    _, C, _ = load_concepts(tmp_path, expect_backbone=toy_backbone)
    tokens = PCMTokens(PCMConfig(top_k=3), C, toy_backbone.embed_dim, toy_backbone.patch_dim,
                       toy_backbone.num_patches, width=16)
    f = toy_backbone.encode_image(torch.randn(2, 3, 16, 16))
    feats = {"embeds": f.embeds, "patches": f.patches, "patch_embeds": f.patch_embeds}
    plan = tokens.mix_plan(feats, train=False)
    assert plan.concept_ids.shape == (2, 3) and plan.concept_ids.max() < len(words)
    assert torch.allclose(plan.concepts, F.normalize(C, dim=-1)[plan.concept_ids])


def test_cli_needs_a_source(capsys):
    with pytest.raises(SystemExit) as e:
        main(["concepts", "--out", "x"])
    assert e.value.code == 2
    assert "one of the arguments --data --words is required" in capsys.readouterr().err


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    empty = tmp_path / "words.txt"
    empty.write_text("\n")
    assert main(["concepts", "--words", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no words" in err and str(empty) in err


def test_cli_end_to_end_with_a_toy_backbone(tmp_path, capsys, monkeypatch):
    """The whole command (corpus -> nouns -> embeddings -> files) with the toy backbone swapped in
    for `load_backbone`, so it runs without any weights."""
    import pcmnet.backbones.base as base
    from toys import ToyBackbone

    asked = []
    monkeypatch.setattr(base, "load_backbone", lambda cfg, device=None: asked.append(cfg) or ToyBackbone())
    corpus = tmp_path / "caps.csv"
    corpus.write_text("caption\n" + "\n".join(f'"{c}"' for c in CORPUS) + "\n")
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\nthe {}\n")
    out = tmp_path / "concepts"
    assert main(["concepts", "--data", str(corpus), "--k", "3", "--tagger", "heuristic",
                 "--templates", str(templates), "--backbone", "open_clip", "--backbone-model",
                 "ViT-B-32", "--out", str(out)]) == 0
    assert asked[0].name == "open_clip" and asked[0].model == "ViT-B-32"
    assert "3 concepts (dog, couch, beach)" in capsys.readouterr().out
    words, emb, meta = load_concepts(out, expect_backbone="toy-0")
    assert words == ["dog", "couch", "beach"]
    assert torch.allclose(emb, embed_concepts(words, ToyBackbone(), ("a photo of a {}.", "the {}")))
    assert meta["templates"] == ["a photo of a {}.", "the {}"]
    assert meta["source"] == {"data": str(corpus), "format": "auto", "split": None, "captions": 10,
                              "k": 3, "tagger": "heuristic", "keep_all_nouns": False}


def _mini_or_skip():
    from pcmnet.errors import MissingWeightsError

    try:
        from pcmnet.backbones.base import load_backbone

        return load_backbone("mini", device="cpu")
    except (ImportError, MissingWeightsError) as e:
        pytest.skip(f"the offline `mini` backbone is not available yet ({type(e).__name__}: {e})")


@pytest.mark.slow
def test_cli_end_to_end_with_the_mini_backbone(tmp_path, capsys):
    bb = _mini_or_skip()
    corpus = tmp_path / "caps.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    out = tmp_path / "concepts"
    assert main(["concepts", "--data", str(corpus), "--k", "5", "--out", str(out), "--device", "cpu"]) == 0
    assert "5 concepts (dog, couch" in capsys.readouterr().out
    words, emb, meta = load_concepts(out, expect_backbone=bb)
    assert words == ["dog", "couch", "beach", "bus", "cat"]
    assert emb.shape == (5, bb.embed_dim)
    assert torch.allclose(emb, embed_concepts(words, bb), atol=1e-5)
    assert meta["source"]["k"] == 5 and meta["source"]["captions"] == len(CORPUS)

    wl = tmp_path / "w.txt"
    wl.write_text("zebra\ngiraffe\n")
    assert main(["concepts", "--words", str(wl), "--out", str(out), "--device", "cpu"]) == 0
    assert load_concepts(out)[0] == ["zebra", "giraffe"]
