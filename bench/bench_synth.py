"""Overhead of `pcmnet synth` on top of the diffusion pipeline itself.

Baseline: bare `pipe(prompts, generator=[...])` calls on the same batches, nothing saved (what a
throwaway script does before it writes anything). Measured against `generate()` (the code behind
`pcmnet synth`) with the same pipeline object already loaded: corpus reading, the completion
scan, PNG encoding, atomic image writes (temp + rename), fsync'd manifest appends, the
inline CLIP score and the final merge are all included. The pipeline's own time inside a run is
the sum of the recorded `gen_seconds`; overhead = wall time - that.

The tiny random pipeline (32x32 images, CPU) makes generation ~1000x cheaper than SD 1.5 on a
GPU, so its overhead *share* is a worst case. The second table therefore times the per-image
bookkeeping at the real 512x512 size, and the third puts it next to real GPU generation times.

    python bench/bench_synth.py [--captions 48] [--batch-size 8] [--steps 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pcmnet.backbones.base import BackboneConfig
from pcmnet.data.readers import CorpusConfig
from pcmnet.synth import manifest as mf
from pcmnet.synth.config import SynthConfig
from pcmnet.synth.generate import PNG_COMPRESS_LEVEL, encode_image, generate, load_pipeline
from pcmnet.synth.score import clip_scores
from pcmnet.synth.shard import pair_seed
from pcmnet.synth.tiny import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
COCO_TEXT = ROOT.parent / "shared" / "data" / "coco-mini" / "text" / "coco_30k.csv"


def captions(n: int, tmp: Path) -> tuple[Path, str]:
    """A caption file of n real COCO captions (coco-mini) or, without it, generated sentences."""
    path = tmp / "caps.txt"
    if COCO_TEXT.exists():
        import csv

        with open(COCO_TEXT, newline="", encoding="utf-8") as f:
            rows = [r["prompt"] for _, r in zip(range(n), csv.DictReader(f))]
        src = f"first {n} captions of {COCO_TEXT.name}"
    else:
        rows = [f"a photo of a small object number {i} on a wooden table" for i in range(n)]
        src = f"{n} generated captions (coco-mini text is absent)"
    path.write_text("\n".join(" ".join(r.split()) for r in rows) + "\n")
    return path, src


def scorer(name: str):
    """-> (backbone or None, description)."""
    if name == "none":
        return None, "none"
    if name == "mini":
        from pcmnet.backbones.base import load_backbone
        from pcmnet.errors import PcmnetError

        try:
            return load_backbone("mini", device="cpu"), "mini"
        except (PcmnetError, ImportError) as e:
            print(f"(mini backbone unavailable: {e}; using the tests' toy backbone)")
    sys.path.insert(0, str(ROOT / "tests"))
    from toys import ToyBackbone

    return ToyBackbone().freeze(), "toy"


def bare(pipe, prompts: list[str], batch_size: int, steps: int) -> float:
    """Baseline: the pipeline calls alone. Returns seconds."""
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i: i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(pair_seed(0, f"line{i + j + 1}", 0)) for j in range(len(batch))]
        with torch.no_grad():
            pipe(prompt=batch, generator=gens, num_inference_steps=steps, output_type="pil")
    return time.perf_counter() - start


def run(pipe, cfg: SynthConfig, backbone) -> tuple[float, float]:
    """generate() into a fresh folder -> (wall seconds, pipeline seconds inside)."""
    start = time.perf_counter()
    generate(cfg, pipe=pipe, backbone=backbone)
    wall = time.perf_counter() - start
    gen = sum(r["gen_seconds"] for r in mf.read_jsonl(Path(cfg.out) / mf.MANIFEST))
    return wall, gen


def ms(fn, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-seconds", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.6, 2.5],
                    help="GPU s/img to compare the per-image bookkeeping with (default 0.3,0.6,2.5)")
    ap.add_argument("--backbone", default="mini", choices=("mini", "toy", "none"),
                    help="inline scorer (mini falls back to toy when its weights are absent)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        build_tiny_pipeline(tmp / "tiny")
        caps, src = captions(args.captions, tmp)
        prompts = caps.read_text().splitlines()
        pipe, _ = load_pipeline(SynthConfig(model=str(tmp / "tiny"), scheduler="dpmpp", dtype="fp32"), "cpu")
        backbone, bb_name = scorer(args.backbone)
        n = len(prompts)

        def cfg(out: str) -> SynthConfig:
            return SynthConfig(captions=CorpusConfig(path=str(caps)), model=str(tmp / "tiny"), out=str(tmp / out),
                               steps=args.steps, batch_size=args.batch_size, scheduler="dpmpp", device="cpu",
                               backbone=BackboneConfig(name="none"))

        bare(pipe, prompts[: args.batch_size], args.batch_size, args.steps)  # warm-up
        res = {"bare": [], "synth": [], "synth+score": []}
        for r in range(args.repeats):  # interleaved, so load changes on a shared box hit all alike
            res["bare"].append((bare(pipe, prompts, args.batch_size, args.steps), None))
            res["synth"].append(run(pipe, cfg(f"a{r}"), None))
            if backbone is not None:
                res["synth+score"].append(run(pipe, cfg(f"b{r}"), backbone))

        print(f"\npcmnet synth overhead: tiny random SD pipeline on CPU ({torch.get_num_threads()} thread), "
              f"32x32, {args.steps} DPM++ steps, batch {args.batch_size}, {n} captions ({src}); "
              f"median of {args.repeats}")
        print(f"inline scorer: {bb_name}" + (" (the tests' ToyBackbone, 16x16 input: far cheaper than a CLIP)"
                                             if bb_name == "toy" else ""))
        print(f"{'run':<34}{'wall s/img':>11}{'pipe s/img':>11}{'overhead ms/img':>17}{'share':>8}")
        base = statistics.median(w for w, _ in res["bare"]) / n
        print(f"{'bare pipe() calls (baseline)':<34}{base:>11.4f}{base:>11.4f}{'-':>17}{'-':>8}")
        for key, label in (("synth", "pcmnet synth, no score"), ("synth+score", f"pcmnet synth + score [{bb_name}]")):
            if not res[key]:
                continue
            wall = statistics.median(w for w, _ in res[key]) / n
            gen = statistics.median(g for _, g in res[key]) / n
            over = wall - gen
            print(f"{label:<34}{wall:>11.4f}{gen:>11.4f}{1000 * over:>17.2f}{over / gen:>8.1%}")
        print(f"(vs the bare baseline: pcmnet synth wall time is "
              f"{statistics.median(w for w, _ in res['synth']) / n / base - 1:+.1%} per image)")

        # per-image bookkeeping at the real size, on a photo (coco-mini) or, without it, noise
        photos = sorted((COCO_TEXT.parents[1] / "images").glob("*.jpg"))
        if photos:
            big, what = Image.open(photos[0]).convert("RGB").resize((512, 512)), f"coco-mini photo {photos[0].name}"
        else:
            rng = np.random.default_rng(0)
            big, what = Image.fromarray((rng.random((512, 512, 3)) * 255).astype(np.uint8)), "noise (no coco-mini)"
        png, jpg = encode_image(big, "png"), encode_image(big, "jpg")
        out_dir = tmp / "io"
        rows = [{"caption_id": f"c{i}", "image_index": 0, "caption": prompts[i % n], "created": 0.0}
                for i in range(args.batch_size)]
        writer = mf.PartWriter(out_dir / "part.jsonl")
        t_png = ms(lambda: encode_image(big, "png"), 5)
        t_png6 = ms(lambda: big.save(io.BytesIO(), format="PNG"), 5)
        size6 = len((lambda b: (big.save(b, format="PNG"), b.getvalue())[1])(io.BytesIO()))
        t_jpg = ms(lambda: encode_image(big, "jpg"), 5)
        t_write = ms(lambda: mf.atomic_write(out_dir / "images" / "x.png", png, out_dir / ".tmp", fsync=False))
        t_write_sync = ms(lambda: mf.atomic_write(out_dir / "images" / "x.png", png, out_dir / ".tmp"))
        t_append = ms(lambda: writer.append(rows)) / args.batch_size
        writer.close()
        t_score = ms(lambda: clip_scores(backbone, [big] * args.batch_size, prompts[: args.batch_size]), 3) \
            / args.batch_size if backbone is not None else 0.0
        print(f"\nper-image bookkeeping at 512x512, {what} (median ms)")
        items = [(f"PNG encode, zlib level {PNG_COMPRESS_LEVEL} (pcmnet; {len(png) >> 10} KB)", f"{t_png:.1f}"),
                 (f"PNG encode, PIL default level 6 ({size6 >> 10} KB)", f"{t_png6:.1f}"),
                 (f"JPEG q95 encode (image_format: jpg; {len(jpg) >> 10} KB)", f"{t_jpg:.1f}"),
                 ("atomic write: temp + rename (pcmnet)", f"{t_write:.1f}"),
                 ("  same with an fsync per image (not done; for reference)", f"{t_write_sync:.1f}"),
                 (f"manifest append + fsync (batch of {args.batch_size}, per image)", f"{t_append:.2f}"),
                 (f"CLIP score on CPU [{bb_name}] (per image)", f"{t_score:.1f}")]
        for name, v in items:
            print(f"  {name:<58}{v:>12}")
        per_image = (t_png + t_write + t_append + t_score) / 1000
        print(f"  {'total with PNG (encode + write + append + score)':<58}{1000 * per_image:>12.1f}")

        print("\nthat bookkeeping as a share of GPU generation time per image (SD 1.5, 512 px, 20 steps,"
              " fp16; the s/img are assumptions, not measured here: pass yours with --gpu-seconds)")
        for g in args.gpu_seconds:
            print(f"  {g:>5.2f} s/img  ->  +{per_image / g:.1%}")


if __name__ == "__main__":
    main()
