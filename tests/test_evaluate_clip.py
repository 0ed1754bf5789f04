"""CLIP-S, RefCLIP-S, retrieval and caption statistics against hand computations (toy backbone)."""
import pytest
import torch
from PIL import Image
from toys import make_images

from pcmnet.evaluate import clipscore as C

CAPTIONS = ["a dog runs on the grass", "two cats sleep on a bed", "a red bus on the street", "a man on a horse"]
REFS = [["a brown dog running", "a dog on grass"], ["cats sleeping on a bed"],
        ["a bus driving down a road", "a red bus", "a street with a bus"], ["a person riding a horse"]]


def image_embeds(backbone, paths):
    """Normalized image embeddings computed one at a time, straight from the backbone contract."""
    with torch.no_grad():
        g = torch.cat([backbone.encode_image(backbone.preprocess(Image.open(p).convert("RGB"))[None]).embeds
                       for p in paths])
    return g / g.norm(dim=-1, keepdim=True)


def text_embeds(backbone, texts):
    with torch.no_grad():
        t = torch.cat([backbone.encode_text([x]).embeds for x in texts])
    return t / t.norm(dim=-1, keepdim=True)


def hand_embeddings(backbone, paths, texts):
    return image_embeds(backbone, paths), text_embeds(backbone, texts)


@pytest.mark.parametrize("ref_weight", [1.0, 2.5])
def test_clip_s_and_refclip_s_match_hand_computation(tmp_path, toy_backbone, ref_weight):
    paths = make_images(tmp_path, n=4)
    out = C.clip_scores(CAPTIONS, toy_backbone, images=paths, references=REFS, ref_weight=ref_weight)

    g, t = hand_embeddings(toy_backbone, paths, [f"A photo depicts {c}" for c in CAPTIONS])
    clip = [2.5 * max(float(g[i] @ t[i]), 0.0) for i in range(4)]
    ref_side = []
    for i, refs in enumerate(REFS):
        r = text_embeds(toy_backbone, [f"A photo depicts {x}" for x in refs])
        ref_side.append(max(ref_weight * max(float(t[i] @ rj), 0.0) for rj in r))
    refclip = [0.0 if a + b == 0 else 2 * a * b / (a + b) for a, b in zip(clip, ref_side)]

    assert out["CLIP-S"] == pytest.approx(sum(clip) / 4, abs=1e-5)
    assert out["RefCLIP-S"] == pytest.approx(sum(refclip) / 4, abs=1e-5)
    assert out["num_images"] == 4 and out["skipped_images"] == []
    assert out["backbone"] == {"spec": toy_backbone.spec(), "fingerprint": toy_backbone.fingerprint()}
    # without the prompt prefix the captions are embedded as they are
    bare = C.clip_scores(CAPTIONS, toy_backbone, images=paths, prefix="")
    tb = text_embeds(toy_backbone, CAPTIONS)
    assert bare["CLIP-S"] == pytest.approx(sum(2.5 * max(float(g[i] @ tb[i]), 0) for i in range(4)) / 4, abs=1e-5)
    assert bare["RefCLIP-S"] is None


def test_clip_s_clamps_negative_cosines_and_harmonic_mean_of_zero():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.6, 0.8], [-1.0, 0.0], [0.0, 1.0]])
    assert C.clip_s(g, t).tolist() == pytest.approx([2.5 * 0.6, 0.0, 2.5])
    assert C.harmonic_mean(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 3.0])).tolist() == pytest.approx([0.0, 1.5])


def test_unreadable_and_missing_images_are_skipped_and_reported(tmp_path, toy_backbone):
    paths = make_images(tmp_path, n=3)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    images = [paths[0], bad, None, paths[2]]
    out = C.clip_scores(CAPTIONS, toy_backbone, images=images, references=REFS)
    assert out["num_images"] == 2 and len(out["skipped_images"]) == 2
    assert any("broken.jpg" in e for e in out["skipped_images"])
    assert any("no image file" in e for e in out["skipped_images"])
    only = C.clip_scores([CAPTIONS[0], CAPTIONS[3]], toy_backbone, images=[paths[0], paths[2]],
                         references=[REFS[0], REFS[3]])
    assert out["CLIP-S"] == pytest.approx(only["CLIP-S"], abs=1e-6)
    assert out["RefCLIP-S"] == pytest.approx(only["RefCLIP-S"], abs=1e-6)
    # PIL images work as well as paths
    pil = C.clip_scores([CAPTIONS[0]], toy_backbone, images=[Image.open(paths[0])])
    first = C.clip_scores([CAPTIONS[0]], toy_backbone, images=[paths[0]])
    assert pil["CLIP-S"] == pytest.approx(first["CLIP-S"], abs=1e-6)


def test_retrieval_recall_on_known_ranks():
    images = torch.eye(4)
    # caption i's similarity to image j is its j-th component
    captions = torch.tensor([[1.0, 0.0, 0.0, 0.0],    # own image first           -> rank 0
                             [0.9, 0.5, 0.0, 0.0],    # image 0 beats its own     -> rank 1
                             [0.3, 0.4, 0.1, 0.2],    # all three others beat it  -> rank 3
                             [0.0, 0.0, 0.0, 1.0]])   # own image first           -> rank 0
    assert C.retrieval_ranks(images, captions).tolist() == [0, 1, 3, 0]
    r = C.retrieval_recall(images, captions, ks=(1, 2, 3, 5))
    assert r == {"R@1": 0.5, "R@2": 0.75, "R@3": 0.75, "R@5": 1.0, "median_rank": 1.5}
    # two identical images: a tie counts against the query
    tie = C.retrieval_ranks(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert tie.tolist() == [1, 1]


def test_caption_stats_hand_counts():
    caps = ["A dog runs.", "a dog runs", "The dog's bed, a bed!", "two cats"]
    s = C.caption_stats(caps)
    # words: [a dog runs] [a dog runs] [the dog's bed a bed] [two cats]
    assert s["vocab_size"] == len({"a", "dog", "runs", "the", "dog's", "bed", "two", "cats"})
    assert s["unique_share"] == 3 / 4
    assert s["mean_length"] == (3 + 3 + 5 + 2) / 4


def test_distinctiveness_with_backbone_matches_its_parts(tmp_path, toy_backbone):
    paths = make_images(tmp_path, n=4)
    d = C.distinctiveness(CAPTIONS, toy_backbone, images=paths)
    g, t = hand_embeddings(toy_backbone, paths, [f"A photo depicts {c}" for c in CAPTIONS])
    ranks = [(int(((t[i] @ g.T) >= (t[i] @ g[i])).sum()) - 1) for i in range(4)]
    assert d["R@1"] == pytest.approx(sum(r < 1 for r in ranks) / 4)
    assert d["R@5"] == 1.0 and d["retrieval_images"] == 4
    assert d["vocab_size"] == C.caption_stats(CAPTIONS)["vocab_size"]
    text_only = C.distinctiveness(CAPTIONS)
    assert text_only["R@1"] is None and text_only["mean_length"] == d["mean_length"]


def test_evaluate_captions_with_toy_backbone(tmp_path, toy_backbone):
    from pcmnet.evaluate import evaluate_captions

    paths = make_images(tmp_path, n=4)
    ids = [5, 12, 7, 100]
    preds = dict(zip(ids, CAPTIONS))
    refs = dict(zip(ids, REFS))
    out = evaluate_captions(preds, refs, images=dict(zip(ids, paths)), backbone=toy_backbone,
                            metrics=("CIDEr-D",), max_length=6)
    m = out["metrics"]
    direct = C.clip_scores(CAPTIONS, toy_backbone, images=paths, references=REFS)
    assert m["CLIP-S"] == pytest.approx(direct["CLIP-S"], abs=1e-6)
    assert m["RefCLIP-S"] == pytest.approx(direct["RefCLIP-S"], abs=1e-6)
    assert m["R@1"] == pytest.approx(C.distinctiveness(CAPTIONS, toy_backbone, images=paths)["R@1"])
    assert out["clip"]["backbone"]["fingerprint"] == toy_backbone.fingerprint()
    assert out["clip"]["images_scored"] == 4
    assert m["truncated_share"] == 3 / 4  # all but "a man on a horse" have 6 words
    # string ids and precomputed embeddings give the same numbers
    with torch.no_grad():
        emb = {str(k): toy_backbone.encode_image(toy_backbone.preprocess(Image.open(p))[None]).embeds[0]
               for k, p in zip(ids, paths)}
    again = evaluate_captions({str(k): v for k, v in preds.items()}, refs, image_embeds=emb,
                              backbone=toy_backbone, metrics=("CIDEr-D",), max_length=6)
    for name in ("CIDEr-D", "CLIP-S", "RefCLIP-S", "R@1", "R@5", "median_rank"):
        assert again["metrics"][name] == pytest.approx(m[name], abs=1e-6), name
