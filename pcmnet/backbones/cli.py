"""`pcmnet align`: train the mini backbone's heads LiT-style (pcmnet.backbones.align)."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "align", help="train the mini backbone's image head (frozen towers, InfoNCE)",
        description="Train the image head of the offline `mini` backbone on image-caption pairs with a "
                    "symmetric InfoNCE loss (towers frozen, features cached), and report image<->text "
                    "retrieval of the ImageNet bridge alone and of the trained head on an eval set. "
                    "Steps and weight decay not given are chosen by cross-validation on the training "
                    "images only.")
    p.add_argument("--data", required=True, help="training corpus with images and captions")
    p.add_argument("--format", default="auto", help="corpus format (default: auto)")
    p.add_argument("--images", default=None, help="image root (default: next to the corpus file)")
    p.add_argument("--split-file", default=None, help="json {split: [ids]} or a list of image names")
    p.add_argument("--split", default=None, help="split of --split-file to train on (e.g. train)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--out", required=True, help="heads file to write (.safetensors)")
    p.add_argument("--steps", type=int, default=None, help="full-batch steps (default: cross-validated)")
    p.add_argument("--weight-decay", type=float, default=None, help="(default: cross-validated)")
    p.add_argument("--views", type=int, default=12, help="augmented views per training image (default 12)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--max-steps", type=int, default=100, help="largest step count cross-validation tries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true",
                   help="keep features in memory only (default: cache them next to --out)")
    p.add_argument("--eval-data", default=None, help="corpus to report retrieval on (never used to train)")
    p.add_argument("--eval-images", default=None, help="image root of --eval-data")
    p.add_argument("--eval-split-file", default=None, help="split file of --eval-data (default: --split-file)")
    p.add_argument("--eval-split", default=None, help="split of the eval split file (e.g. test)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from ..data.readers import CorpusConfig, load_corpus
    from ..errors import PcmnetError
    from .align import AlignConfig, align, format_recall, save_result
    from .mini import CLASS_PROMPTS, MiniBackbone

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise PcmnetError(f"--out {out}: the heads file must end in .safetensors")
    records = load_corpus(CorpusConfig(path=args.data, format=args.format, images=args.images,
                                       split_file=args.split_file, split=args.split, limit=args.limit),
                          require_captions=True, require_images=True)
    eval_records = None
    if args.eval_data:
        eval_records = load_corpus(CorpusConfig(path=args.eval_data, images=args.eval_images,
                                                split_file=args.eval_split_file or args.split_file,
                                                split=args.eval_split),
                                   require_captions=True, require_images=True)
    cfg = AlignConfig(steps=args.steps, views=args.views, lr=args.lr, weight_decay=args.weight_decay,
                      folds=args.folds, max_steps=args.max_steps, seed=args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = MiniBackbone.bridge_only().to(device).freeze()
    cache = eval_cache = None
    if not args.no_cache:
        cache = out.with_name(out.stem + ".train-features.pt")
        eval_cache = out.with_name(out.stem + ".eval-features.pt")
    result = align(backbone, records, cfg, eval_records, cache=cache, eval_cache=eval_cache)
    provenance = {"data": args.data, "split": args.split, "images": len(records), "views": args.views,
                  "lr": args.lr, "seed": args.seed, "class_prompts": list(CLASS_PROMPTS)}
    save_result(result, out, {"trained_on": provenance})
    print(f"wrote {out} (steps={result.steps}, weight_decay={result.weight_decay:g}, "
          f"temperature={1 / torch.tensor(result.logit_scale).exp().item():.4f})")
    if result.eval:
        print(f"retrieval on {args.eval_data} ({result.eval['images']} images, "
              f"{result.eval['captions']} captions), recall in %:")
        print(format_recall("bridge only", result.eval["bridge"]))
        print(format_recall("trained head", result.eval["trained"]))
    if result.cv_table:
        best = {f"{wd:g}": max(scores.values()) for wd, scores in result.cv_table.items()}
        print("cross-validation (train split only), best mean R-sum per weight decay: " + json.dumps(best))
    return 0
