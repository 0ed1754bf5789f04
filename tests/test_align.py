"""`pcmnet align`: InfoNCE, the retrieval protocol, head training, and the command end to end."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pcmnet.backbones.align import (cross_validate, info_nce, retrieval_recall, rsum, train_head,
                                    training_views, with_bridge, AlignConfig)
from pcmnet.backbones.mini import MiniHead, fixed_views
from pcmnet.cli import main


def test_info_nce_by_hand():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[0.8, 0.6], [1.0, 1.0], [-0.2, 1.0]]), dim=-1)
    scale = 10.0
    s = [[scale * sum(a * b for a, b in zip(img[i].tolist(), txt[j].tolist())) for j in range(3)] for i in range(3)]
    rows = [-s[i][i] + math.log(sum(math.exp(v) for v in s[i])) for i in range(3)]
    cols = [-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(3))) for j in range(3)]
    expect = (sum(rows) / 3 + sum(cols) / 3) / 2
    got = info_nce(img, txt, torch.tensor(math.log(scale)))
    assert got.item() == pytest.approx(expect, rel=1e-5)


def _pool_with_similarity(S: torch.Tensor):
    """Unit vectors whose image-caption cosine matrix is exactly S [I,T] (columns of norm <= 1)."""
    n_img, n_txt = S.shape
    img = torch.cat([torch.eye(n_img), torch.zeros(n_img, 1)], 1)
    txt = torch.cat([S.T, (1 - (S ** 2).sum(0)).clamp(min=0).sqrt()[:, None]], 1)
    return img, txt


def test_retrieval_recall_hand_made_matrix():
    S = torch.tensor([[0.9, 0.1, 0.3, 0.2, 0.5],
                      [0.2, 0.4, 0.1, 0.6, 0.3],
                      [0.1, 0.2, 0.5, 0.3, 0.4]])
    owner = torch.tensor([0, 0, 1, 1, 2])
    img, txt = _pool_with_similarity(S)
    r = retrieval_recall(img, txt, owner, ks=(1, 2, 3))
    # image->text: images 0 and 1 rank an own caption first; image 2's caption (0.4) is beaten by 0.5
    assert r["i2t"] == pytest.approx({1: 200 / 3, 2: 100.0, 3: 100.0})
    # text->image ranks of the own image: [0, 2, 2, 0, 1]
    assert r["t2i"] == pytest.approx({1: 40.0, 2: 60.0, 3: 100.0})
    assert rsum(r) == pytest.approx(200 / 3 + 200 + 200)


def test_retrieval_recall_ties_count_against_the_query():
    S = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    img, txt = _pool_with_similarity(S)
    r = retrieval_recall(img, txt, torch.tensor([0, 1]), ks=(1, 2))
    assert r == {"i2t": {1: 0.0, 2: 100.0}, "t2i": {1: 0.0, 2: 100.0}}


def test_retrieval_recall_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(7, 5, generator=g), torch.randn(16, 5, generator=g)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6, 1, 3, 5, 0])
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    for k in (1, 3, 5):
        i2t = [any(owner[j] == i for j in sim[i].argsort(descending=True)[:k]) for i in range(7)]
        t2i = [owner[j] in sim[:, j].argsort(descending=True)[:k] for j in range(16)]
        r = retrieval_recall(img, txt, owner, ks=(k,))
        assert r["i2t"][k] == pytest.approx(100 * sum(i2t) / 7)
        assert r["t2i"][k] == pytest.approx(100 * sum(t2i) / 16)


def test_training_views_start_with_the_fixed_views_and_are_seeded():
    img = Image.new("RGB", (90, 60))
    img.paste((200, 30, 30), (0, 0, 30, 60))
    a, b, c = training_views(img, 7, seed=1), training_views(img, 7, seed=1), training_views(img, 7, seed=2)
    assert a.shape == (7, 3, 224, 224) and torch.equal(a, b) and not torch.equal(a[4:], c[4:])
    assert torch.equal(a[:4], fixed_views(img)) and torch.equal(training_views(img, 2, 0), fixed_views(img)[:2])


def _synthetic(n=24, views=3, dim=16, seed=0):
    """A small head (random 'classifier' and class texts) and captions that depend on the features."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = MiniHead(nn.Linear(dim, 5), F.normalize(torch.randn(5, 8, generator=g), dim=-1))
    head.classifier.requires_grad_(False)
    base = torch.randn(n, dim, generator=g)
    feats = {"train": base[:, None] + 0.3 * torch.randn(n, views, dim, generator=g),
             "test": base[:, None] + 0.3 * torch.randn(n, 4, dim, generator=g)}
    A = torch.randn(8, dim, generator=g)
    owner = torch.arange(n).repeat_interleave(2)
    txt = F.normalize(base[owner] @ A.T + 0.3 * torch.randn(2 * n, 8, generator=g), dim=-1)
    return head, with_bridge(head, feats), txt, owner


def test_train_head_learns_the_pairing():
    head, feats, txt, owner = _synthetic()
    bridge_img = F.normalize(F.normalize(head(feats["test"]), dim=-1).mean(1), dim=-1)
    before = rsum(retrieval_recall(bridge_img, txt, owner))

    def evaluate(h):
        with torch.no_grad():
            return rsum(retrieval_recall(F.normalize(F.normalize(h(feats["test"]), dim=-1).mean(1), dim=-1),
                                         txt, owner))

    scale, scores = train_head(head, feats["train"], feats["train_bridge"], txt, owner, steps=60, lr=1e-2,
                               weight_decay=0.0, temperature=0.07, seed=0, eval_every=20, evaluate=evaluate)
    assert sorted(scores) == [0, 20, 40, 60] and scores[0] == pytest.approx(before)
    assert scores[60] > before + 100  # out of 600
    assert scale != pytest.approx(math.log(1 / 0.07))  # the temperature is learned too
    assert head.residual.weight.abs().sum() > 0


def test_cross_validate_returns_the_best_cell():
    head, feats, txt, owner = _synthetic(n=20)
    cfg = AlignConfig(folds=4, max_steps=20, eval_every=5, wd_grid=[0.0, 5.0], lr=1e-2)
    wd, steps, table = cross_validate(head, feats, txt, owner, cfg)
    assert set(table) == {0.0, 5.0} and sorted(table[0.0]) == [0, 5, 10, 15, 20]
    assert table[wd][steps] == max(v for row in table.values() for v in row.values())
    assert head.residual.weight.abs().sum() == 0  # the bridge head it starts from is left untouched


def test_align_rejects_bad_input(tmp_path, capsys):
    assert main(["align", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "h.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none.csv" in err
    (tmp_path / "c.csv").write_text("image,caption\na.jpg,a cat\n")
    assert main(["align", "--data", str(tmp_path / "c.csv"), "--out", str(tmp_path / "h.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_align_end_to_end_writes_loadable_heads(tmp_path, capsys):
    from toys import make_images

    from pcmnet.backbones.base import load_backbone
    from pcmnet.backbones.mini import read_heads

    paths = make_images(tmp_path / "imgs", n=6, size=(64, 48))
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    rows = ["image,caption"] + [f"imgs/{p.name},picture number {i} {w}" for i, p in enumerate(paths)
                                for w in ("red", "blue")] + ["imgs/broken.jpg,never seen"]
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "heads" / "mine.safetensors"
    argv = ["align", "--data", str(tmp_path / "caps.csv"), "--out", str(out), "--steps", "3",
            "--weight-decay", "0", "--views", "5", "--lr", "1e-2", "--eval-data", str(tmp_path / "caps.csv")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "bridge only" in printed and "trained head" in printed and "6 images, 12 captions" in printed
    tensors, meta = read_heads(out)
    assert meta["steps"] == "3" and tensors["residual.weight"].abs().sum() > 0
    cache = out.with_name("mine.train-features.pt")
    stamp = os.stat(cache).st_mtime_ns
    assert main(argv) == 0  # rerun: every image's features come from the cache, same heads
    capsys.readouterr()
    assert os.stat(cache).st_mtime_ns == stamp
    again, _ = read_heads(out)
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    bb = load_backbone({"name": "mini", "model": str(out)}, device="cpu")
    with torch.no_grad():
        f = bb.encode_image(torch.stack([bb.preprocess(Image.open(paths[0]))]))
    assert f.embeds.shape == (1, 384) and bb.spec()["model"] == str(out)
    assert torch.equal(bb.head.residual.weight, tensors["residual.weight"])
