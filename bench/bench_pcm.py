"""PCM-Net ablation on coco-mini: PCM off / on x CLIP-weighted loss off / on (METHODS.md 3-5).

REAL IMAGES STAND IN FOR SYNTHETIC ONES. PCM-Net trains on Stable Diffusion images of training
captions; no diffusion weights exist offline (the tiny random pipeline of `pcmnet synth tiny` makes
32x32 noise, not training data), so a synthetic run is impossible here. The training pairs are the
real COCO photos of the coco-mini `train` split (269 images x 5 human captions = 1,345 pairs).
Every number below therefore measures the method on real pairs, where the CLIP weight mostly
re-weights good human captions, not bad synthetic images.

    training pairs  coco-mini `train` split (real images, 1,345 pairs)
    evaluation      coco-mini `test` split (150 images, 5 captions each): only scored, never tuned on
    backbone        offline `mini` (EfficientNet-Lite0 + MiniLM, bundled heads); also scores CLIP-S
    baseline        row "PCM off, CLIP weight off": the plain captioner (global + patch tokens,
                    label-smoothed cross entropy), trained in the same run with the same settings
    rows            the 4 combinations, each with --seeds seeds (mean and standard deviation)
    extra rows      PCM on, CLIP weight off / on, with 30% of the training captions moved to other
                    images (a controlled stand-in for synthetic images that failed their caption);
                    seed 0 only (--mismatched-seeds), for time

The model settings (shared by all rows) are the published ones (METHODS.md 3-5: 400 concepts,
top-k 5, tau 0.01, M 5, noise 0.016, label smoothing 0.1, alpha 2.5, beam 3, max length 20) except
the size and schedule, scaled to 1,345 pairs on 2 CPU cores (width 256, 2+2 layers, 4 heads,
FFN 1024, dropout 0.3, lr 5e-4 with a 400-step Noam warm-up, batch 32). The epoch count (30) was
chosen with `--tune`: the baseline row trained on 219 train images and scored (CIDEr-D) on the
other 50 train images after 5, 10, 15, 20, 30 and 40 epochs; the test split plays no part in it.

    OMP_NUM_THREADS=1 python bench/bench_pcm.py                  # the table (6 rows x 2 seeds)
    OMP_NUM_THREADS=1 python bench/bench_pcm.py --tune           # epochs on held-out train images
    python bench/bench_pcm.py --backbone toy --seeds 0 --epochs 1   # smoke run of the script only

Runs, features and results go to --workdir (bench/out/pcm): a rerun reuses the feature cache and
finished models (resuming unfinished ones), so it only redoes what is missing; e.g. train the
seeds in two processes (`--seeds 0` and `--seeds 1`), or the rows (`--rows 0 1 --mismatched 0` and
`--rows 2 3 --mismatched 0`), then print the table with `--seeds 0 1`.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"
ROWS = [("PCM off, CLIP weight off (baseline)", False, False), ("PCM off, CLIP weight on", False, True),
        ("PCM on,  CLIP weight off", True, False), ("PCM on,  CLIP weight on", True, True)]
METRICS = [("BLEU-4", 100), ("METEOR", 100), ("CIDEr-D", 100), ("CLIP-S", 100)]


def corpus(split: str, limit: int | None = None, skip: int = 0) -> dict:
    """A `data.*` section for a coco-mini split (optionally a slice of its images)."""
    return {"path": str(COCO_MINI / "captions.json"), "split_file": str(COCO_MINI / "splits.json"),
            "split": split, "limit": limit, "_skip": skip}


def load_records(section: dict):
    from pcmnet.data.readers import CorpusConfig, load_corpus

    cfg = {k: v for k, v in section.items() if not k.startswith("_")}
    return load_corpus(CorpusConfig(**cfg), require_captions=True, require_images=True)[section["_skip"]:]


def noisy_corpus(workdir: Path, fraction: float, seed: int = 0) -> dict:
    """The coco-mini train pairs with `fraction` of the captions moved to other images (a seeded
    cyclic shift over randomly chosen pairs, never onto the caption's own image): a stand-in for
    synthetic images that failed their caption, which is what the CLIP weight is for. Written
    once as a COCO json with absolute image paths; returns its `data.*` section."""
    records = load_records(corpus("train"))
    pairs = [(i, cid, cap) for i, r in enumerate(records) for cid, cap in zip(r.caption_ids, r.captions)]
    g = torch.Generator().manual_seed(seed)
    while True:
        chosen = torch.randperm(len(pairs), generator=g)[: round(fraction * len(pairs))].tolist()
        moved = {chosen[k]: pairs[chosen[k - 1]][2] for k in range(len(chosen))}
        if all(pairs[j][0] != pairs[chosen[chosen.index(j) - 1]][0] for j in chosen):
            break
    anns = [{"id": f"{cid}-moved" if j in moved else cid, "image_id": records[i].image_id,
             "caption": moved.get(j, cap)} for j, (i, cid, cap) in enumerate(pairs)]
    images = [{"id": r.image_id, "file": r.file} for r in records]
    path = workdir / f"train_mismatched_{int(round(fraction * 100))}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"images": images, "annotations": anns}))
        tmp.replace(path)
    return {"path": str(path), "_skip": 0}


def train_config(args, out: Path, data: dict, pcm: bool, clip_weight: bool, seed: int, epochs: int):
    from pcmnet.config import from_dict
    from pcmnet.train.config import TrainConfig

    return from_dict(TrainConfig, {
        "mode": "pcm",
        "data": {"train": {k: v for k, v in data.items() if not k.startswith("_")}},
        "model": {"inputs": "pcm", "width": args.width, "encoder_layers": args.layers,
                  "decoder_layers": args.layers, "heads": 4, "ffn": 4 * args.width, "dropout": args.dropout,
                  "max_len": 20, "noise_variance": 0.016, "vocab_min_count": args.vocab_min_count,
                  "concepts_k": 400, "beam_size": 3,
                  "pcm": {"enabled": pcm, "variant": "top", "top_k": 5, "tau": 0.01, "replace_m": 5}},
        "loss": {"smoothing": 0.1, "clip_weight": clip_weight, "clip_alpha": 2.5},
        "optim": {"lr": args.lr, "warmup_steps": args.warmup, "schedule": "noam", "batch_size": 32,
                  "epochs": epochs},
        "run": {"output_dir": str(out), "seed": seed, "save_every": 0, "keep_checkpoints": 1,
                "log_every": 10, "cache_dir": str(args.workdir / "cache"), "tensorboard": False},
    })


def train_once(cfg, backbone) -> Path:
    """Train (or reuse a finished / resume an interrupted run in the same directory)."""
    from pcmnet.train.trainer import checkpoints, train

    out = Path(cfg.run.output_dir)
    if (out / "model" / "config.json").exists():
        return out / "model"
    # a run directory the data slice changed under is not resumable: start it again
    if checkpoints(out) and _config_changed(cfg, out):
        import shutil

        shutil.rmtree(out)
    return train(cfg, resume=bool(checkpoints(out)), backbone=backbone)


def _config_changed(cfg, out: Path) -> bool:
    import yaml

    from pcmnet.config import to_dict

    saved = out / "config.yaml"
    return not saved.exists() or yaml.safe_load(saved.read_text()) != yaml.safe_load(yaml.safe_dump(to_dict(cfg)))


@torch.no_grad()
def caption_features(model, view, batch_size: int = 50) -> list[str]:
    """Beam-search captions (the model's beam 3, max length 20) from cached image features."""
    model.eval()
    out = []
    for s in range(0, len(view), batch_size):
        feats = view.batch(list(range(s, min(s + batch_size, len(view)))))
        out += model.generate(model.image_inputs({k: feats[k] for k in model.image_fields()}))
    return out


def score(captions: list[str], records, view, backbone) -> dict:
    from pcmnet.evaluate.clipscore import clip_scores
    from pcmnet.evaluate.metrics import caption_metrics

    preds = {r.image_id: c for r, c in zip(records, captions)}
    refs = {r.image_id: r.captions for r in records}
    m = caption_metrics(preds, refs, metrics=("BLEU", "METEOR", "CIDEr-D"))
    m["CLIP-S"] = clip_scores(captions, backbone, image_embeds=view.stack("embeds"))["CLIP-S"]
    m["empty"] = sum(not c for c in captions)
    return m


def evaluate_model(model_dir: Path, records, view, backbone) -> tuple[dict, list[str]]:
    from pcmnet.models.captioner import Captioner

    model = Captioner.from_pretrained(model_dir, backbone=backbone)
    captions = caption_features(model, view)
    return score(captions, records, view, backbone), captions


def features(records, backbone, args):
    from pcmnet.features.cache import extract_image_features

    view = extract_image_features(records, backbone, args.workdir / "cache",
                                  fields=("embeds", "patches", "patch_embeds"), progress=True)
    if not all(view.valid):
        raise SystemExit("some evaluation images could not be read")
    return view


def load_backbone(name: str):
    from pcmnet.backbones.base import load_backbone as load

    if name == "toy":
        sys.path.insert(0, str(ROOT / "tests"))
        from toys import ToyBackbone

        return ToyBackbone().freeze(), "toy backbone of the tests (random weights: numbers mean nothing)"
    bb = load("mini", device="cpu")
    return bb, f"mini ({bb.fingerprint()}, 4 test-time views)"


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:6.2f}"
    return f"{mean:6.2f} ± {statistics.stdev(values):4.2f}"


def tune(args, backbone) -> None:
    """Baseline row (PCM off, CLIP weight off) trained on the first --train-images train images and
    scored on the other train images after each epoch count in --tune-epochs. One run of the
    largest count: the Noam learning rate and the data order depend only on the step, so its
    end-of-epoch checkpoint after e epochs is the model an e-epoch run would give."""
    import json as js

    from pcmnet.train.trainer import checkpoints

    held = corpus("train", skip=args.train_images)
    part = corpus("train", limit=args.train_images)
    records = load_records(held)
    view = features(records, backbone, args)
    print(f"\n# tuning: train on {len(load_records(part))} train images, score on {len(records)} other "
          f"train images (coco-mini test split not used)")
    cfg = train_config(args, args.workdir / "tune" / "baseline", part, False, False, 0, max(args.tune_epochs))
    cfg.run.keep_checkpoints = 10_000
    train_once(cfg, backbone)
    at_epoch = {}
    for ckpt in checkpoints(Path(cfg.run.output_dir)):
        state = js.loads((ckpt / "trainer_state.json").read_text())
        if state["batch"] == 0:  # an end-of-epoch checkpoint: `epoch` epochs done
            at_epoch[state["epoch"]] = ckpt / "model"
    at_epoch[max(args.tune_epochs)] = Path(cfg.run.output_dir) / "model"
    print(f"{'epochs':>6s} {'BLEU-4':>7s} {'METEOR':>7s} {'CIDEr-D':>8s} {'CLIP-S':>7s}")
    for epochs in sorted(args.tune_epochs):
        m, _ = evaluate_model(at_epoch[epochs], records, view, backbone)
        print(f"{epochs:6d} {m['BLEU-4'] * 100:7.2f} {m['METEOR'] * 100:7.2f} {m['CIDEr-D'] * 100:8.2f} "
              f"{m['CLIP-S'] * 100:7.2f}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rows", type=int, nargs="+", default=None,
                    help="only these of the 4 main rows (0-3, in table order): train them in parallel "
                         "processes, then print the table with a run over all rows")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=400)
    ap.add_argument("--vocab-min-count", type=int, default=2)
    ap.add_argument("--mismatched", type=float, default=0.3,
                    help="extra rows: PCM on, CLIP weight off/on, with this share of the training captions "
                         "moved to other images (0: no extra rows)")
    ap.add_argument("--mismatched-seeds", type=int, nargs="+", default=[0], help="seeds of the extra rows")
    ap.add_argument("--backbone", choices=("mini", "toy"), default="mini")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "pcm")
    ap.add_argument("--tune", action="store_true", help="choose epochs on held-out train images instead")
    ap.add_argument("--tune-epochs", type=int, nargs="+", default=[5, 10, 15, 20, 30, 40])
    ap.add_argument("--train-images", type=int, default=219, help="--tune: images trained on (rest held out)")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if not (COCO_MINI / "captions.json").exists():
        raise SystemExit(f"needs the shared coco-mini data at {COCO_MINI}")
    torch.set_num_threads(1)  # 2 shared cores: more intra-op threads only add contention
    logging.basicConfig(level=logging.WARNING)
    backbone, what = load_backbone(args.backbone)
    args.workdir = args.workdir / args.backbone
    print("# PCM-Net ablation on coco-mini. REAL coco-mini train photos stand in for synthetic "
          "(Stable Diffusion) images: no diffusion weights exist offline, so no synthetic run is possible.")
    print(f"# backbone: {what}; CLIP-S scored by the same backbone")
    if args.tune:
        return tune(args, backbone)

    train_data, test_data = corpus("train"), corpus("test")
    test_records = load_records(test_data)
    view = features(test_records, backbone, args)
    n_pairs = sum(len(r.captions) for r in load_records(train_data))
    print(f"# train: coco-mini train split, {len(load_records(train_data))} real images, {n_pairs} pairs; "
          f"test: coco-mini test split, {len(test_records)} images; seeds {args.seeds}")
    print(f"# model: width {args.width}, {args.layers}+{args.layers} layers, dropout {args.dropout}, "
          f"{args.epochs} epochs, lr {args.lr} (Noam, warm-up {args.warmup}), batch 32, beam 3\n")

    rows = [(name, pcm, weight, train_data, f"pcm{int(pcm)}-w{int(weight)}", args.seeds)
            for i, (name, pcm, weight) in enumerate(ROWS) if args.rows is None or i in args.rows]
    if args.mismatched:
        pct = int(round(args.mismatched * 100))
        noisy = noisy_corpus(args.workdir, args.mismatched)
        rows += [(f"PCM on,  CLIP weight {w}, {pct}% mismatched", True, w == "on", noisy,
                  f"pcm1-w{int(w == 'on')}-mis{pct}", args.mismatched_seeds) for w in ("off", "on")]
    results, t_start = {}, time.time()
    for name, pcm, weight, data, tag, seeds in rows:
        for seed in seeds:
            key = f"{tag}-s{seed}"
            t0 = time.time()
            cfg = train_config(args, args.workdir / "runs" / key, data, pcm, weight, seed, args.epochs)
            model_dir = train_once(cfg, backbone)
            m, captions = evaluate_model(model_dir, test_records, view, backbone)
            results[key] = {"row": name, "seed": seed, **m, "captions": captions[:5],
                            "seconds": round(time.time() - t0, 1)}
            print(f"{key}: " + ", ".join(f"{k} {m[k] * f:.2f}" for k, f in METRICS)
                  + f" ({m['empty']} empty captions, {time.time() - t0:.0f} s)", flush=True)
    part = "" if args.rows is None else f"-rows-{'-'.join(map(str, args.rows))}"
    results_file = args.workdir / f"results-seeds-{'-'.join(map(str, args.seeds))}{part}.json"
    results_file.write_text(json.dumps(results, indent=1))

    print(f"\nmean ± standard deviation over seeds {args.seeds} (mismatched rows: seeds "
          f"{args.mismatched_seeds}); scores x100; CLIP-S = 2.5 * max(cos, 0) with {what}")
    print(f"| {'model':41s} | " + " | ".join(f"{k:>13s}" for k, _ in METRICS) + " |")
    print(f"| {'-' * 41} | " + " | ".join("-" * 12 + ":" for _ in METRICS) + " |")
    for name, pcm, weight, data, tag, seeds in rows:
        runs = [results[f"{tag}-s{s}"] for s in seeds]
        print(f"| {name:41s} | " + " | ".join(f"{spread([r[k] * f for r in runs]):>13s}" for k, f in METRICS)
              + " |")
    base = [results[f"pcm0-w0-s{s}"]["CIDEr-D"] * 100 for s in args.seeds if f"pcm0-w0-s{s}" in results]
    print(f"\nbaseline (PCM off, CLIP weight off) CIDEr-D per seed: {', '.join(f'{v:.2f}' for v in base)}; "
          f"total {time.time() - t_start:.0f} s; per-run numbers and sample captions in {results_file}")


if __name__ == "__main__":
    main()
