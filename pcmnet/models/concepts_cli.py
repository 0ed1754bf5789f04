"""`pcmnet concepts`: build a concept vocabulary (METHODS.md section 3) for PCM-Net.

    pcmnet concepts --data captions.json --k 400 --out concepts/            # K most frequent nouns
    pcmnet concepts --words my_words.txt --out concepts/ --backbone open_clip \\
        --backbone-model ViT-B-32 --backbone-pretrained openai               # your own word list

Writes concepts/concepts.json (words, backbone, templates, source) and concepts/concepts.safetensors
(embeddings [K,D]). The vectors only make sense with the backbone that made them; models check.
"""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from ..cli_args import add_backbone_args, add_corpus_args

    p = sub.add_parser("concepts", help="build the concept vocabulary of PCM-Net",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="caption corpus to take the most frequent nouns from")
    src.add_argument("--words", help="a word list instead: one concept per line")
    add_corpus_args(p, "")  # --format, --split-file, --split, --limit for --data
    p.add_argument("--k", type=int, default=400, help="number of nouns (default 400)")
    p.add_argument("--tagger", default="auto", choices=("auto", "textblob", "heuristic"),
                   help="part-of-speech tagger (default: textblob if installed, else a heuristic)")
    p.add_argument("--keep-all-nouns", action="store_true",
                   help="also keep nouns such as 'front', 'group', 'picture' (dropped by default)")
    p.add_argument("--templates", help="prompt templates, one per line with {} for the word "
                                       "(default: 8 CLIP ImageNet templates, see docs/pcm.md)")
    p.add_argument("--out", required=True, help="output directory")
    add_backbone_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..backbones.base import load_backbone
    from ..cli_args import backbone_config, corpus_config
    from ..data.readers import load_corpus
    from ..data.records import iter_captions
    from ..errors import PcmnetError
    from .concepts import (DEFAULT_TEMPLATES, NON_CONCEPT_NOUNS, concept_meta, embed_concepts,
                           frequent_nouns, has_tagger, read_word_list, save_concepts)

    if args.k < 1:
        raise PcmnetError(f"--k must be at least 1, got {args.k}")
    templates = read_word_list(args.templates) if args.templates else DEFAULT_TEMPLATES
    if args.words:
        words = read_word_list(args.words)
        source = {"words_file": str(args.words)}
    else:
        records = load_corpus(corpus_config(args), require_captions=True)
        captions = [c.caption for c in iter_captions(records)]
        tagger = args.tagger if args.tagger != "auto" else ("textblob" if has_tagger() else "heuristic")
        words = frequent_nouns(captions, args.k, tagger=tagger,
                               exclude=() if args.keep_all_nouns else NON_CONCEPT_NOUNS)
        if not words:
            raise PcmnetError(f"{args.data}: no nouns found in its captions")
        source = {"data": str(args.data), "format": args.format, "split": args.split,
                  "captions": len(captions), "k": args.k, "tagger": tagger,
                  "keep_all_nouns": args.keep_all_nouns}
    backbone = load_backbone(backbone_config(args), device=args.device)
    emb = embed_concepts(words, backbone, templates)
    out = save_concepts(args.out, words, emb, concept_meta(backbone, templates, **source))
    shown = ", ".join(words[:12]) + (", ..." if len(words) > 12 else "")
    print(f"{len(words)} concepts ({shown}) embedded with {backbone.spec()} -> {out}")
    return 0
