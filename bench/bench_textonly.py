"""Text-only captioning ablation on coco-mini (METHODS.md sections 6 and 8, docs/textonly.md).

Every generative row is a captioner trained on CAPTIONS ONLY (the COCO 2017 val captions shipped in
coco-mini/text/, 22,818 captions, none of them of a coco-mini image) with the offline mini
backbone, then applied to the coco-mini photos. Rows:

    retrieval baseline   each image gets the nearest caption of the same training corpus
                         (argmax_i g . t_i over the corpus): the named baseline to beat
    no noise             decoder trained on clean caption embeddings t(c), applied to g
    noise (auto)         CapDec: t(c) + n, sigma^2 measured on the coco-mini TRAIN split pairs
    noise 0.016          CapDec's published CLIP ViT-B/32 value (too wide for the mini space)
    projection (DeCap)   the no-noise model with g replaced by its projection onto the memory of
                         the training captions (DeCap trains on clean embeddings: the same model)
    noise + projection   the noise (auto) model with the projection at inference
    FusionCap            learned noise + projection network (configs/coco_mini_textonly_fusioncap.yaml:
                         local features off, see that file)
    FusionCap + local    the same + the local-feature module (words in training, patches at test)
    FusionCap - X        FusionCap with one piece switched off (ablations)

Columns: BLEU-4, METEOR, CIDEr-D (x100, pycocoevalcap), CLIP-S (x100, mini backbone; "A photo
depicts" prefix), R@1 text->image (the image retrieved by its own caption among the split's images),
unique captions %. Models are trained once into bench/out/textonly/<row>/run and reused (a rerun only
evaluates); they are configs/coco_mini_textonly_*.yaml plus the overrides listed below.

Tuning uses `--split train` (the 269 coco-mini train images, held out from the test split);
the table in docs/textonly.md is `--split test` (150 images), run once with the chosen settings.

    OMP_NUM_THREADS=1 python bench/bench_textonly.py [--split test] [--rows all|main|name,name]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"
OUT = ROOT / "bench" / "out" / "textonly"
CACHE = ROOT / ".cache" / "pcmnet-features"
CFG = {v: ROOT / "configs" / f"coco_mini_textonly_{v}.yaml" for v in ("capdec", "decap", "fusioncap")}

# name -> (label, config, training overrides, inference change: None | {"projection": True, ...}, base row)
# A row with a base row reuses that row's trained model and only changes how images are fed to it.
ROWS = {
    "no_noise": ("no noise", "capdec", ["model.text_only.noise_variance=0"], None, None),
    "noise_auto": ("noise (CapDec, auto)", "capdec", [], None, None),
    "noise_0.016": ("noise 0.016 (published)", "capdec", ["model.text_only.noise_variance=0.016"], None, None),
    "decap": ("projection (DeCap)", None, None, {"projection": True}, "no_noise"),
    "noise_proj": ("noise (auto) + projection", None, None, {"projection": True}, "noise_auto"),
    "fusioncap": ("FusionCap (offline twin: no local features)", "fusioncap", [], None, None),
    "fusioncap_local": ("FusionCap + local features (words / patches)", "fusioncap",
                        ["model.inputs=global_local", "model.text_only.local_features=true"], None, None),
    "fusioncap_no_noise_net": ("FusionCap - noise network (fixed noise)", "fusioncap",
                               ["model.text_only.noise_net=false"], None, None),
    "fusioncap_no_projection_net": ("FusionCap - projection network", "fusioncap",
                                    ["model.text_only.projection_net=false"], None, None),
}
MAIN = ["no_noise", "noise_auto", "noise_0.016", "decap", "noise_proj", "fusioncap", "fusioncap_local"]
COLUMNS = [("BLEU-4", 100), ("METEOR", 100), ("CIDEr-D", 100), ("CLIP-S", 100), ("R@1", 100),
           ("unique_share", 100)]


def split_records(split: str):
    from pcmnet.data.readers import CorpusConfig, load_corpus

    return load_corpus(CorpusConfig(path=str(COCO_MINI / "captions.json"), split_file=str(COCO_MINI / "splits.json"),
                                    split=split), require_captions=True, require_images=True)


def train_row(name: str, backbone, extra: list[str], tag: str = "") -> Path:
    """The row's model directory, trained now unless a finished run is already there."""
    from pcmnet.config import load_config
    from pcmnet.train.config import TrainConfig
    from pcmnet.train.trainer import train

    _, variant, overrides, _, _ = ROWS[name]
    cfg = load_config(TrainConfig, CFG[variant], overrides + extra + [
        f"run.output_dir=bench/out/textonly/{name}{'@' + tag if tag else ''}/run", f"run.cache_dir={CACHE}", "run.tensorboard=false"])
    run = ROOT / cfg.run.output_dir
    if (run / "model" / "config.json").is_file():  # finished: reuse it if it was trained with this config
        import yaml

        from pcmnet.config import to_dict

        saved, now = yaml.safe_load((run / "config.yaml").read_text()), to_dict(cfg)
        if any(saved.get(k) != now[k] for k in now if k != "run"):
            sys.exit(f"bench_textonly: {run} was trained with another config; delete it or use --tag")
        return run / "model"
    t0 = time.time()
    final = ROOT / train(cfg, resume=True, backbone=backbone)
    print(f"# {name}: trained {final.relative_to(ROOT)} in {time.time() - t0:.0f} s", flush=True)
    return final


def load_row_model(name: str, backbone, trained: dict[str, Path], temperature: float | None):
    """The captioner of a row: its own trained model, or its base row's model with the inference
    change (the projection onto the memory of the training captions, built from their cached
    embeddings exactly as the trainer builds it)."""
    import dataclasses

    from pcmnet.models.captioner import Captioner
    from pcmnet.models.projection import ProjectionMemory

    _, _, _, change, base = ROWS[name]
    model = Captioner.from_pretrained(trained[base or name], backbone=backbone).eval()
    if change:
        to = dataclasses.replace(model.cfg.text_only, **change)
        view, _ = training_captions(model, backbone)
        model.cfg.text_only = model.text_only.cfg = to
        model.text_only.memory = ProjectionMemory(
            view.stack("embeds"), to.projection_temperature, to.projection_top_k, to.memory_budget_mb,
            to.memory_dtype, meta={"corpus": model.extras["train_corpus"], "backbone": backbone.fingerprint()})
    if temperature is not None and model.text_only.memory is not None:
        model.cfg.text_only.projection_temperature = model.text_only.memory.temperature = temperature
    return model


def training_captions(model, backbone):
    """(cached text features view, captions) of a model's training corpus."""
    from pcmnet.data.readers import load_corpus
    from pcmnet.data.records import iter_captions
    from pcmnet.features.cache import extract_text_features

    items = list(iter_captions(load_corpus(model.extras["train_corpus"], require_captions=True)))
    view = extract_text_features(items, backbone, CACHE, fields=("embeds",), progress=False)
    return view, [it.caption for it in items]


@torch.no_grad()
def caption_split(model, feats: dict, beam_size: int, batch_size: int = 50) -> list[str]:
    """Captions of every image from its cached features, as `pcmnet caption` makes them
    (model.image_inputs then beam search)."""
    out = []
    n = feats["embeds"].shape[0]
    for i in range(0, n, batch_size):
        part = {k: v[i: i + batch_size] for k, v in feats.items() if k in model.image_fields()}
        out += model.generate(model.image_inputs(part), beam_size=beam_size)
    return out


def score(preds: list[str], records, g: torch.Tensor, backbone) -> dict:
    from pcmnet.evaluate import evaluate_captions

    ids = [r.image_id for r in records]
    res = evaluate_captions(dict(zip(ids, preds)), {r.image_id: r.captions for r in records},
                            backbone=backbone, image_embeds=dict(zip(ids, g)),
                            metrics=("BLEU", "METEOR", "CIDEr-D"))
    return res["metrics"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=("test", "train"),
                    help="coco-mini split to caption (train: for tuning; test: the reported table)")
    ap.add_argument("--rows", default="main", help="main | all | comma-separated row names")
    ap.add_argument("--beam-size", type=int, default=3)
    ap.add_argument("--temperature", type=float, help="projection temperature at inference (default: config)")
    ap.add_argument("--train-only", action="store_true", help="train the rows' models, do not evaluate")
    ap.add_argument("--override", action="append", default=[],
                    help="extra training override (key=value) for every trained row; use with --tag")
    ap.add_argument("--tag", default="", help="train into <row>@<tag> run directories (tuning runs)")
    args = ap.parse_args()
    if not (COCO_MINI / "captions.json").exists():
        sys.exit(f"bench_textonly: needs the shared coco-mini data at {COCO_MINI}")
    os.chdir(ROOT)  # the configs' data paths are relative to the repository root
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import logging

    logging.basicConfig(level=logging.WARNING)
    from pcmnet.backbones.base import load_backbone
    from pcmnet.features.cache import extract_image_features

    rows = list(ROWS) if args.rows == "all" else MAIN if args.rows == "main" else args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"bench_textonly: unknown rows {unknown} (rows: {', '.join(ROWS)})")
    backbone = load_backbone("mini", device="cpu")
    bb_name = f"mini {backbone.fingerprint()}"

    trained = {}
    for name in rows:
        base = ROWS[name][4] or name
        if base not in trained:
            trained[base] = train_row(base, backbone, args.override, args.tag)
    if args.train_only:
        return

    records = split_records(args.split)
    view = extract_image_features(records, backbone, CACHE, fields=("embeds", "patch_embeds"), progress=False)
    feats = {"embeds": view.stack("embeds"), "patch_embeds": view.stack("patch_embeds")}
    g = feats["embeds"]
    print(f"# coco-mini {args.split}: {len(records)} images; backbone {bb_name}; threads {torch.get_num_threads()}")

    results = {}
    # the retrieval baseline: the nearest training caption of the same corpus
    any_model = load_row_model(rows[0], backbone, trained, None)
    tview, captions = training_captions(any_model, backbone)
    T = torch.nn.functional.normalize(tview.stack("embeds"), dim=-1)
    best = (torch.nn.functional.normalize(g, dim=-1) @ T.T).argmax(1)
    preds = {"retrieval": [captions[i] for i in best.tolist()]}
    results["retrieval"] = score(preds["retrieval"], records, g, backbone)
    labels = {"retrieval": f"retrieval baseline (nearest of {len(captions)} training captions)"}
    info = {}
    for name in rows:
        model = load_row_model(name, backbone, trained, args.temperature)
        t0 = time.time()
        preds[name] = caption_split(model, feats, args.beam_size)
        results[name] = score(preds[name], records, g, backbone)
        labels[name] = ROWS[name][0]
        info[name] = {"noise_variance": float(model.text_only.noise_variance),
                      "projection": model.cfg.text_only.projection or model.cfg.text_only.projection_net,
                      "temperature": model.cfg.text_only.projection_temperature,
                      "caption_seconds": round(time.time() - t0, 1)}

    head = "| row | " + " | ".join(c if c != "unique_share" else "unique %" for c, _ in COLUMNS) + " |"
    print(f"\n{head}\n|---|" + "---|" * len(COLUMNS))
    for name, m in results.items():
        cells = [f"{m[c] * f:.1f}" if m.get(c) is not None else "n/a" for c, f in COLUMNS]
        print(f"| {labels[name]} | " + " | ".join(cells) + " |")
    print(f"\nCLIP-S and R@1 scored by the {bb_name} backbone; noise variances:",
          ", ".join(f"{k} {v['noise_variance']:.4g}" for k, v in info.items()))
    for name in results:
        print(f"  {name}: {preds[name][0]!r} | {preds[name][1]!r}")
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"results_{args.split}{'@' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({"split": args.split, "backbone": bb_name, "rows": results, "info": info,
                               "labels": labels, "beam_size": args.beam_size, "temperature": args.temperature,
                               "predictions": {k: dict(zip([r.image_id for r in records], v))
                                               for k, v in preds.items()}}, indent=1))
    print(f"# written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
