"""Command-line options several `pcmnet` commands share: which corpus to read, which backbone to
load. Each command adds them with one call and turns the parsed flags back into the same config
objects the Python API takes (CorpusConfig, BackboneConfig)."""
from __future__ import annotations

import argparse


def add_corpus_args(p: argparse.ArgumentParser, data_help: str, images: bool = False,
                    caption_column: bool = False, required: bool = True) -> None:
    """--data, --format, [--images], --split-file, --split, [--caption-column], --limit."""
    from .data.readers import FORMATS

    if data_help:  # "" when the caller adds --data itself (e.g. in a mutually exclusive group)
        p.add_argument("--data", required=required, help=data_help)
    p.add_argument("--format", default="auto", choices=FORMATS, help="corpus format (default: guess)")
    if images:
        p.add_argument("--images", help="image root (default: next to the annotation file)")
    p.add_argument("--split-file", help="json {split: [ids]} or a list of image names")
    p.add_argument("--split", help="split name (Karpathy split, split-file key, HF split)")
    if caption_column:
        p.add_argument("--caption-column", help="csv/tsv/hf caption column (default: caption, prompt, text, ...)")
    p.add_argument("--limit", type=int, help="keep the first N records")


def corpus_config(args: argparse.Namespace):
    """The CorpusConfig the corpus flags describe."""
    from .data.readers import CorpusConfig

    return CorpusConfig(path=args.data, format=args.format, images=getattr(args, "images", None),
                        split=args.split, split_file=args.split_file,
                        caption_column=getattr(args, "caption_column", None), limit=args.limit)


def add_backbone_args(p: argparse.ArgumentParser, backbone_help: str = "mini | open_clip | hf-clip (default: mini)",
                      device_help: str = "cpu, cuda, ... (default: cuda if available)") -> None:
    """--backbone, --backbone-model, --backbone-pretrained, --device."""
    p.add_argument("--backbone", default="mini", help=backbone_help)
    p.add_argument("--backbone-model", help="open_clip model name, HF id or dir, or mini heads file")
    p.add_argument("--backbone-pretrained", help="open_clip pretrained tag or checkpoint")
    p.add_argument("--device", help=device_help)


def backbone_config(args: argparse.Namespace):
    """The BackboneConfig the backbone flags describe."""
    from .backbones.base import BackboneConfig

    return BackboneConfig(name=args.backbone, model=args.backbone_model, pretrained=args.backbone_pretrained)


def check_at_least(*checks: tuple[str, int | None, int]) -> None:
    """One-line error for the first (flag, value, least) whose value is given and below least."""
    from .errors import PcmnetError

    for flag, value, least in checks:
        if value is not None and value < least:
            raise PcmnetError(f"{flag} must be at least {least}, got {value}")
