"""Feature extraction throughput: the cache's batched extractor vs one image at a time.

Baseline (what research repos do): for each image, load it, preprocess it and run the backbone on
a batch of one. Measured against `pcmnet.features.extract_image_features` at batch 32 and 64 into
a fresh cache (hashing, loading, encoding and writing shards all included), and the warm-cache
rerun (everything already cached: hash the files, read the index). Same backbone, same images,
same process, same threads.

Backbone/images: the real `mini` backbone on the 150 coco-mini `test` photos when both are here
(with untrained heads if the bundled heads file is missing: same towers, same compute); otherwise the
toy backbone of the tests on generated images (the script says which and why).

    python bench/bench_features.py [--repeats 2] [--num-workers 0]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from pcmnet.data.images import load_record_image
from pcmnet.data.readers import CorpusConfig, load_corpus
from pcmnet.data.records import Record
from pcmnet.errors import PcmnetError
from pcmnet.features import extract_image_features

ROOT = Path(__file__).resolve().parents[1]
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"


def load_mini():
    """The mini backbone; with untrained heads (same towers, same compute) if the bundled heads are
    not there."""
    from pcmnet.backbones.base import load_backbone
    from pcmnet.errors import MissingWeightsError

    try:
        bb = load_backbone("mini", device="cpu")
        return bb, f"mini backbone ({bb.fingerprint()}, 4 TTA views)"
    except MissingWeightsError:
        from pcmnet.backbones.mini import MiniBackbone

        bb = MiniBackbone.bridge_only().freeze()
        return bb, (f"mini backbone with untrained heads ({bb.fingerprint()}, 4 TTA views; the bundled "
                    "heads are missing, the compute is the same)")


def setup(n_toy: int, tmp: Path):
    """-> (backbone, records, description)."""
    why = None
    if not (COCO_MINI / "captions.json").exists():
        why = f"coco-mini is absent ({COCO_MINI})"
    else:
        try:
            bb, name = load_mini()
            recs = load_corpus(CorpusConfig(path=str(COCO_MINI / "captions.json"),
                                            split_file=str(COCO_MINI / "splits.json"), split="test"))
            return bb, recs, f"{name} on {len(recs)} coco-mini test photos"
        except (ImportError, PcmnetError) as e:
            why = f"mini backbone not usable ({type(e).__name__}: {e})"
    sys.path.insert(0, str(ROOT / "tests"))
    from toys import ToyBackbone, make_images

    paths = make_images(tmp / "images", n_toy, size=(256, 192))
    recs = [Record(image_id=p.stem, file=str(p)) for p in paths]
    return ToyBackbone().freeze(), recs, f"toy backbone on {n_toy} generated 256x192 images ({why})"


@torch.inference_mode()
def one_at_a_time(bb, records: list[Record]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    embeds = [bb.encode_image(bb.preprocess(load_record_image(r))[None].to(bb.device)).embeds[0]
              for r in records]
    return time.perf_counter() - t0, torch.stack(embeds).float().cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1, help="best of N runs per row")
    ap.add_argument("--num-workers", type=int, default=0, help="image loading workers of the extractor")
    ap.add_argument("--toy-images", type=int, default=300)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bb, recs, what = setup(args.toy_images, tmp)
        n = len(recs)
        print(f"# {what}; torch threads {torch.get_num_threads()}, num_workers {args.num_workers}")
        with torch.inference_mode():  # warm-up: one-time initialisation is not part of any row
            bb.encode_image(bb.preprocess(load_record_image(recs[0]))[None].to(bb.device))

        rows = []
        best, ref = min((one_at_a_time(bb, recs) for _ in range(args.repeats)), key=lambda r: r[0])
        rows.append(("one image at a time (baseline)", 1, best))
        diffs = []
        for batch in (32, 64):
            times = []
            for k in range(args.repeats):
                cache = tmp / f"cache-b{batch}-{k}"
                view = extract_image_features(recs, bb, cache, batch_size=batch, num_workers=args.num_workers,
                                              progress=False)
                times.append(view.stats["seconds"])
            diffs.append((view.stack("embeds") - ref).abs().max().item())
            rows.append((f"extract_image_features, cold cache", batch, min(times)))
        warm = min(extract_image_features(recs, bb, cache, batch_size=64, num_workers=args.num_workers,
                                          progress=False).stats["seconds"] for _ in range(args.repeats))
        rows.append(("extract_image_features, warm rerun", 64, warm))

    print(f"\n{'method':36s} {'batch':>5s} {'seconds':>8s} {'images/s':>9s} {'vs baseline':>11s}")
    for name, batch, sec in rows:
        print(f"{name:36s} {batch:5d} {sec:8.2f} {n / sec:9.1f} {rows[0][2] / sec:10.1f}x")
    print(f"\nmax |embeds(cache) - embeds(baseline)| = {max(diffs):.2e} (same features, batched)")


if __name__ == "__main__":
    main()
