"""`pcmnet memory`: build a projection memory (DeCap / FusionCap, METHODS.md section 6) from any
caption corpus, e.g. another domain's captions for cross-domain captioning.

    pcmnet memory --data flickr30k/dataset_flickr30k.json --split train --out flickr_memory.safetensors \\
        --backbone open_clip --backbone-model ViT-B-32 --backbone-pretrained openai
    pcmnet memory --data coco_30k.csv --caption-column prompt --out coco30k_memory.safetensors   # mini

Use the file in training with `model.text_only.memory_path=FILE`, or give a trained text-only model
another domain's memory without retraining:

    pcmnet memory --data flickr30k/dataset_flickr30k.json --split train --model runs/coco_decap/model \\
        --out runs/coco_decap/model_flickr_memory        # a copy of the model that projects onto Flickr30k

(with --model the backbone is the model's own, and --out is the new model directory). Caption
embeddings go through the feature cache (--cache), so an interrupted run resumes and a memory of
the training corpus reuses the embeddings `pcmnet train` already computed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

DEFAULT_CACHE = ".cache/pcmnet-features"  # the trainer's run.cache_dir default


def add_parser(sub) -> None:
    from ..cli_args import add_backbone_args, add_corpus_args

    p = sub.add_parser("memory", help="build a projection memory (DeCap / FusionCap) from a caption corpus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p, "caption corpus (any format pcmnet reads)", caption_column=True)
    p.add_argument("--out", required=True,
                   help="memory file (.safetensors), or with --model the new model directory")
    p.add_argument("--model", help="a trained text-only model directory: write a copy of it (--out) "
                                   "that uses this memory instead of its own")
    add_backbone_args(p, "mini | open_clip | hf-clip (default: mini; with --model: the model's backbone)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"feature cache directory (default {DEFAULT_CACHE})")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32", "bfloat16"),
                   help="memory storage (default float16: 500k x 512 = 512 MB)")
    p.add_argument("--temperature", type=float, default=1 / 150,
                   help="tau_p recorded in the file (default 1/150; a model's config value wins)")
    p.add_argument("--batch-size", type=int, default=256, help="captions per backbone batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def build_memory(records, backbone, cache_dir: str | Path | None = DEFAULT_CACHE, corpus: str = "",
                 dtype: str = "float16", temperature: float = 1 / 150, batch_size: int = 256,
                 progress: bool = True):
    """A ProjectionMemory of every caption of `records` (duplicates kept, as a DeCap memory).

    With `cache_dir` the embeddings come from the feature cache (computed only where missing, so
    the memory of a training corpus holds exactly the embeddings the trainer trained on); with
    None they are computed directly (`ProjectionMemory.from_texts`).
    """
    from ..data.records import iter_captions
    from ..errors import PcmnetError
    from .projection import ProjectionMemory

    items = list(iter_captions(records))
    if not items:
        raise PcmnetError(f"{corpus or 'corpus'}: no captions to build a projection memory from")
    if cache_dir is None:
        return ProjectionMemory.from_texts([it.caption for it in items], backbone, corpus=corpus,
                                           batch_size=batch_size, temperature=temperature, dtype=dtype)
    from ..features.cache import extract_text_features

    view = extract_text_features(items, backbone, cache_dir, fields=("embeds",), batch_size=batch_size,
                                 progress=progress)
    meta = {"corpus": corpus, "backbone": backbone.fingerprint(), "num_captions": len(items)}
    return ProjectionMemory(view.stack("embeds"), temperature, dtype=dtype, meta=meta)


def attach_memory(model_dir: str | Path, memory, out_dir: str | Path) -> Path:
    """Copy the text-only model in `model_dir` to `out_dir` with `memory` as its projection memory
    (saved inside the copy; `text_only.memory_path` cleared). The memory must come from the model's
    backbone. The copy is written next to `out_dir` and renamed into place when complete."""
    from ..errors import CheckpointError, PcmnetError
    from .captioner import MEMORY_FILE, read_model_config

    src, out = Path(model_dir), Path(out_dir)
    meta = read_model_config(src)
    to = (meta.get("model") or {}).get("text_only")
    if not to or not (to.get("projection") or to.get("projection_net")):
        raise PcmnetError(f"{src}: not a text-only model with a projection (text_only.projection or "
                          "projection_net); a memory would not be used")
    fingerprint = meta["backbone"]["fingerprint"]
    if memory.meta.get("backbone") != fingerprint:
        raise CheckpointError(f"{src}: the model was trained on backbone {fingerprint}, the memory was "
                              f"built with {memory.meta.get('backbone')}")
    if out.exists():
        raise PcmnetError(f"{out}: already exists; choose a new --out directory")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(MEMORY_FILE))
    memory.save(tmp / MEMORY_FILE)
    to["memory_path"] = None
    meta.setdefault("extras", {})["memory_corpus"] = memory.meta.get("corpus", "")
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out)
    return out


def run(args) -> int:
    import logging

    from ..backbones.base import load_backbone
    from ..cli_args import backbone_config, check_at_least, corpus_config
    from ..data.readers import load_corpus
    from ..errors import PcmnetError
    from .captioner import read_model_config

    log = logging.getLogger("pcmnet")
    check_at_least(("--batch-size", args.batch_size, 1))
    if args.temperature <= 0:
        raise PcmnetError(f"--temperature must be > 0, got {args.temperature}")
    if args.model is not None:
        spec = read_model_config(args.model)["backbone"]["spec"]
        if Path(args.out).exists():
            raise PcmnetError(f"{args.out}: already exists; choose a new --out directory")
    elif Path(args.out).is_dir():
        raise PcmnetError(f"{args.out}: is a directory; --out is the memory file (or pass --model)")
    records = load_corpus(corpus_config(args), require_captions=True)
    if args.model is not None:
        backbone = load_backbone(spec, device=args.device)
    else:
        backbone = load_backbone(backbone_config(args), device=args.device)
    memory = build_memory(records, backbone, args.cache, corpus=args.data, dtype=args.dtype,
                          temperature=args.temperature, batch_size=args.batch_size,
                          progress=not args.no_progress)
    if args.model is not None:
        out = attach_memory(args.model, memory, args.out)
        log.info("model %s with the memory of %s (%d captions) written to %s", args.model, args.data,
                 memory.size, out)
    else:
        memory.save(args.out)
        log.info("projection memory of %s: %d captions x %d dims (%s) written to %s", args.data,
                 memory.size, memory.dim, backbone.fingerprint(), args.out)
    print(args.out)
    return 0
