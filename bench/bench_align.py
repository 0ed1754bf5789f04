"""Benchmark: image<->text retrieval of the `mini` backbone on coco-mini test (150 images, 750 captions).

Compares, in one run, the ImageNet bridge alone (baseline: the untrained head) with the trained heads
(default: the bundled ones, trained by `pcmnet align` on the coco-mini train split only), each with a
single centre-crop view and with the 4-view test-time augmentation, all through the public
`encode_image` path; and prints the image extraction speed of both paths.

    python bench/bench_align.py [--heads HEADS.safetensors] [--data-dir ../shared/data/coco-mini]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pcmnet.backbones.align import retrieval_recall
from pcmnet.backbones.mini import MiniBackbone
from pcmnet.data.images import load_record_image
from pcmnet.data.readers import CorpusConfig, load_corpus

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


@torch.no_grad()
def embed_images(bb: MiniBackbone, images: list, tta: bool, batch_size: int) -> tuple[torch.Tensor, float]:
    """Image embeddings [N,D] through preprocess + encode_image, and images per second."""
    bb.tta = tta
    start, out = time.perf_counter(), []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([bb.preprocess(im) for im in images[i: i + batch_size]])
        out.append(bb.encode_image(pixels).embeds.cpu())
    return torch.cat(out), len(images) / (time.perf_counter() - start)


def sub_pool_recall(emb: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, keep: torch.Tensor) -> dict:
    """Retrieval restricted to the images `keep` and their captions."""
    remap = torch.full((len(emb),), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    sel = remap[owner] >= 0
    return retrieval_recall(emb[keep], txt[sel], remap[owner][sel])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default=None, help="heads file (default: the bundled heads)")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pool", type=int, default=114, help="also report the mean over random sub-pools of this "
                    "many images (114 = the prototype's test pools)")
    ap.add_argument("--pool-draws", type=int, default=200)
    args = ap.parse_args()
    data = Path(args.data_dir)
    records = load_corpus(CorpusConfig(path=str(data / "captions.json"), split_file=str(data / "splits.json"),
                                       split=args.split), require_captions=True, require_images=True)
    images = [load_record_image(r) for r in records]
    texts = [c for r in records for c in r.captions]
    owner = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    print(f"coco-mini {args.split}: {len(records)} images, {len(texts)} captions; heads: {args.heads or 'bundled'}")

    bb = MiniBackbone.load(heads=args.heads).freeze()
    txt = bb.embed_texts(texts)
    trained = {k: v.clone() for k, v in bb.head.head_state().items()}
    bridge = {**trained, "residual.weight": torch.zeros_like(trained["residual.weight"]),
              "residual.bias": torch.zeros_like(trained["residual.bias"])}
    rows, speed = [], {}
    for name, heads in (("bridge only (baseline)", bridge), ("trained heads", trained)):
        bb.set_heads(heads)
        for tta in (False, True):
            emb, ips = embed_images(bb, images, tta, args.batch_size)
            speed[tta] = ips
            rows.append((f"{name}, {'4-view TTA' if tta else '1 view'}", retrieval_recall(emb, txt, owner), emb))

    print(f"\n{'model':<36} {'i2t R@1':>8} {'R@5':>6} {'R@10':>6} {'t2i R@1':>8} {'R@5':>6} {'R@10':>6}")
    for name, r, _ in rows:
        i, t = r["i2t"], r["t2i"]
        print(f"{name:<36} {i[1]:8.1f} {i[5]:6.1f} {i[10]:6.1f} {t[1]:8.1f} {t[5]:6.1f} {t[10]:6.1f}")
    if args.pool < len(records):
        print(f"\nmean over {args.pool_draws} random {args.pool}-image sub-pools (smaller pool = easier):")
        gen = torch.Generator().manual_seed(0)
        draws = [torch.randperm(len(records), generator=gen)[: args.pool] for _ in range(args.pool_draws)]
        for name, _, emb in rows:
            rs = [sub_pool_recall(emb, txt, owner, d) for d in draws]
            i = [sum(r["i2t"][k] for r in rs) / len(rs) for k in (1, 5, 10)]
            t = [sum(r["t2i"][k] for r in rs) / len(rs) for k in (1, 5, 10)]
            print(f"{name:<36} {i[0]:8.1f} {i[1]:6.1f} {i[2]:6.1f} {t[0]:8.1f} {t[1]:6.1f} {t[2]:6.1f}")
    base, best = rows[1][1], rows[3][1]
    print(f"\ntrained vs bridge (both TTA): i2t R@1 {best['i2t'][1] - base['i2t'][1]:+.1f}, "
          f"t2i R@1 {best['t2i'][1] - base['t2i'][1]:+.1f} points")
    print(f"image extraction ({torch.get_num_threads()} threads, batch {args.batch_size}, incl. preprocessing): "
          f"1 view {speed[False]:.1f} img/s, 4-view TTA {speed[True]:.1f} img/s")


if __name__ == "__main__":
    main()
