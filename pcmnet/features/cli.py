"""`pcmnet features`: extract backbone features of an image set or caption corpus into the cache.

    pcmnet features --data captions.json --kind image --cache feats/ --backbone mini
    accelerate launch ... -m pcmnet.cli features --data ... --kind text --cache feats/

Interrupted runs resume (rerun the same command); see docs/features.md.
"""
from __future__ import annotations

import argparse

DEFAULTS = {  # kind -> (fields, batch size, shard size)
    "image": ("embeds,patches,patch_embeds", 64, 1024),
    "text": ("embeds", 256, 8192),
}


def add_parser(sub) -> None:
    from ..cli_args import add_backbone_args, add_corpus_args

    p = sub.add_parser("features", help="extract backbone features into a resumable cache",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p, "corpus path (any format pcmnet reads)", images=True)
    p.add_argument("--kind", choices=("image", "text"), default="image",
                   help="image features of the images, or text features of the captions")
    p.add_argument("--cache", required=True, help="cache directory")
    add_backbone_args(p, device_help="cpu, cuda, ... (default: the process's accelerate device)")
    p.add_argument("--fields", help="comma-separated: embeds,patches,patch_embeds (image; default "
                                    "all) or embeds,tokens,mask (text; default embeds)")
    p.add_argument("--batch-size", type=int, help="default 64 (image) / 256 (text)")
    p.add_argument("--shard-size", type=int, help="rows per shard file: default 1024 (image) / 8192 (text)")
    p.add_argument("--num-workers", type=int, default=0, help="image loading worker processes")
    p.add_argument("--max-tokens", type=int, default=32, help="text tokens kept per caption (text)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..backbones.base import load_backbone
    from ..cli_args import backbone_config, check_at_least, corpus_config
    from ..data.readers import load_corpus
    from ..data.records import iter_captions
    from ..errors import PcmnetError
    from ..distributed import process_state
    from .cache import extract_image_features, extract_text_features

    check_at_least(("--batch-size", args.batch_size, 1), ("--shard-size", args.shard_size, 1),
                   ("--num-workers", args.num_workers, 0), ("--max-tokens", args.max_tokens, 1))
    state = process_state()
    fields, batch_size, shard_size = DEFAULTS[args.kind]
    fields = tuple(f.strip() for f in (args.fields or fields).split(",") if f.strip())
    records = load_corpus(corpus_config(args))
    backbone = load_backbone(backbone_config(args), device=args.device or str(state.device))
    common = dict(batch_size=batch_size if args.batch_size is None else args.batch_size,
                  shard_size=shard_size if args.shard_size is None else args.shard_size,
                  progress=not args.no_progress, accelerator=state)
    if args.kind == "image":
        records = [r for r in records if r.has_image]
        if not records:
            raise PcmnetError(f"{args.data}: no images in this corpus (use --kind text for its captions)")
        view = extract_image_features(records, backbone, args.cache, fields=fields,
                                      num_workers=args.num_workers, **common)
        unit = "images"
    else:
        captions = list(iter_captions(records))
        if not captions:
            raise PcmnetError(f"{args.data}: no captions in this corpus (use --kind image for its images)")
        view = extract_text_features(captions, backbone, args.cache, fields=fields,
                                     max_tokens=args.max_tokens, **common)
        unit = "captions"
    s = view.stats
    if state.is_main_process:
        rate = s["computed"] / s["seconds"] if s["seconds"] > 0 else 0.0
        print(f"features: {s['total']} {unit} | cached before {s['cached']} | computed {s['computed']} | "
              f"skipped unreadable {s['unreadable']} | {rate:.1f} {unit}/s | backbone {s['backbone']} | "
              f"{s['cache']}", flush=True)
    return 0
