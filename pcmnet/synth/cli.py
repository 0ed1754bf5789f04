"""`pcmnet synth`: make a synthetic image-caption corpus, score it, merge it, export it.

    pcmnet synth --captions CORPUS --model ID_OR_DIR --out DIR [--steps 20 --scheduler dpmpp ...]
    pcmnet synth score  --manifest DIR [--backbone mini|open_clip|hf-clip ...]
    pcmnet synth merge  --manifest DIR
    pcmnet synth export --manifest DIR --out DIR [--format hf|parquet] [--push-to-hub REPO]
    pcmnet synth tiny   --out DIR          (a tiny random pipeline: the offline path)

Multi-GPU / multi-node: `accelerate launch --num_processes N -m pcmnet.cli synth ...`.
Flags override the `--config` YAML, which overrides the defaults of SynthConfig.
"""
from __future__ import annotations

import argparse

# flag dest -> config key (dotted) for the generation command
_GEN_FLAGS = {
    "captions": "captions.path", "captions_format": "captions.format", "captions_split": "captions.split",
    "model": "model", "out": "out", "images_per_caption": "images_per_caption", "steps": "steps",
    "guidance": "guidance", "size": "size", "scheduler": "scheduler", "seed": "seed",
    "batch_size": "batch_size", "limit": "limit", "dtype": "dtype", "device": "device",
    "image_format": "image_format", "safety_checker": "safety_checker",
    "backbone": "backbone.name", "backbone_model": "backbone.model",
    "backbone_pretrained": "backbone.pretrained",
}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (SynthConfig keys; see configs/synth_coco_sd15.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set captions.split=train (repeatable)")


def _backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", help="CLIP-score backbone: mini | open_clip | hf-clip | none "
                                      "(default mini; none = score later with `pcmnet synth score`)")
    p.add_argument("--backbone-model", help="open_clip model name, HF id/dir, or mini heads file")
    p.add_argument("--backbone-pretrained", help="open_clip pretrained tag or checkpoint")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: accelerate's device)")


def add_parser(sub) -> None:
    p = sub.add_parser("synth", help="synthetic image-caption corpus with a diffusion model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(p)
    p.add_argument("--captions", help="caption corpus (any pcmnet format: coco, karpathy, csv, txt, hf...)")
    p.add_argument("--captions-format", help="corpus format (default: auto)")
    p.add_argument("--captions-split", help="corpus split (Karpathy split, HF split, ...)")
    p.add_argument("--model", help="diffusers pipeline: hub id or local diffusers-format folder")
    p.add_argument("--out", help="output folder")
    p.add_argument("--images-per-caption", type=int)
    p.add_argument("--steps", type=int, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--size", help="'512' or 'WIDTHxHEIGHT' (default: the pipeline's)")
    p.add_argument("--scheduler", help="default | dpmpp | ddim | euler | euler_a | pndm | unipc (default dpmpp)")
    p.add_argument("--seed", type=int, help="global seed (default 0)")
    p.add_argument("--batch-size", type=int, help="prompts per pipeline call (default 8)")
    p.add_argument("--limit", type=int, help="only the first N captions")
    p.add_argument("--dtype", help="auto | fp16 | bf16 | fp32 (CPU always fp32)")
    p.add_argument("--image-format", help="png (default) | jpg")
    p.add_argument("--no-safety-checker", dest="safety_checker", action="store_const", const=False,
                   help="drop the pipeline's NSFW filter")
    _backbone_args(p)
    p.set_defaults(func=run_generate)

    jobs = p.add_subparsers(dest="synth_command", metavar="{score,merge,export,tiny}")
    s = jobs.add_parser("score", help="CLIP-score the pairs of a synth folder (resumable)")
    s.add_argument("--manifest", required=True, help="synth output folder")
    _config_args(s)
    _backbone_args(s)
    s.add_argument("--batch-size", type=int, help="images per backbone call (default 64)")
    s.set_defaults(func=run_score)

    m = jobs.add_parser("merge", help="merge the manifest parts of a synth folder into manifest.jsonl")
    m.add_argument("--manifest", required=True, help="synth output folder")
    m.set_defaults(func=run_merge)

    e = jobs.add_parser("export", help="export a synth folder as a Hugging Face dataset or parquet shards")
    e.add_argument("--manifest", required=True, help="synth output folder")
    e.add_argument("--out", required=True, help="export folder")
    e.add_argument("--format", dest="export_format", choices=("hf", "parquet"), default="hf")
    e.add_argument("--include-nsfw", action="store_true", help="keep pairs flagged by the safety checker")
    e.add_argument("--max-shard-mb", type=float, default=500, help="target shard size (default 500 MB)")
    e.add_argument("--push-to-hub", metavar="REPO", help="also push the dataset to this hub repo")
    e.set_defaults(func=run_export)

    t = jobs.add_parser("tiny", help="save a tiny random SD pipeline (offline tests and smoke runs)")
    t.add_argument("--out", required=True, help="folder for the pipeline (diffusers format)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--kind", choices=("sd", "sdxl"), default="sd", help="shaped like SD 1.x (default) or SDXL")
    t.set_defaults(func=run_tiny)


def build_config(args, flags: dict[str, str]):
    """YAML (--config) + --set overrides + explicit flags -> SynthConfig."""
    from ..config import apply_overrides, from_dict, read_yaml
    from .config import SynthConfig

    data = read_yaml(args.config) if args.config else {}
    data = apply_overrides(data, args.set)
    for dest, key in flags.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        node = data
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return from_dict(SynthConfig, data)


def run_generate(args) -> int:
    from .generate import generate

    cfg = build_config(args, _GEN_FLAGS)
    generate(cfg)
    return 0


def run_score(args) -> int:
    from .generate import process_device
    from .manifest import check_folder
    from .score import load_scorer, score_folder
    from ..distributed import process_state

    flags = {k: v for k, v in _GEN_FLAGS.items() if k.startswith("backbone") or k == "device"}
    cfg = build_config(args, {**flags, "batch_size": "score_batch_size"})
    if cfg.backbone.name == "none":
        from ..errors import PcmnetError

        raise PcmnetError("synth score: --backbone none scores nothing (choose mini, open_clip or hf-clip)")
    folder = check_folder(args.manifest)  # before loading a backbone for nothing
    state = process_state()
    backbone = load_scorer(cfg.backbone, process_device(cfg.device, state))
    score_folder(folder, backbone, cfg.score_batch_size)
    return 0


def run_merge(args) -> int:
    from . import manifest as mf

    path = mf.write_merged(mf.check_folder(args.manifest))
    print(f"{path}: {sum(1 for _ in open(path))} pairs")
    return 0


def run_export(args) -> int:
    from .export import export

    path = export(args.manifest, args.out, fmt=args.export_format, include_nsfw=args.include_nsfw,
                  max_shard_mb=args.max_shard_mb, push_to_hub=args.push_to_hub)
    print(path)
    return 0


def run_tiny(args) -> int:
    from .tiny import build_tiny_pipeline

    build_tiny_pipeline(args.out, seed=args.seed, kind=args.kind)
    print(args.out)
    return 0
