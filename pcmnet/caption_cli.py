"""`pcmnet caption PATH... [--model DIR] [--beam-size N] [--batch-size N] [--output FILE | --sidecar]`

Prints `file<TAB>caption`, or writes JSONL / COCO results json / CSV / TSV by the output's
extension, or a .txt file next to each image with --sidecar. With --output, results are streamed
to `<output>.parts/rank-N.jsonl` as they are made (one part per process under `accelerate launch`)
and merged into the output at the end, so `--resume` after a kill skips what was already captioned.
"""
from __future__ import annotations



def add_parser(sub) -> None:
    p = sub.add_parser("caption", help="caption images (files or folders) with a trained model",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("paths", nargs="+", help="image files and/or folders (walked recursively)")
    p.add_argument("--model", default=None, help="model directory (default: the bundled offline model)")
    p.add_argument("--beam-size", type=int, default=None, help="beam size (default: the model's, 3)")
    p.add_argument("--max-len", type=int, default=None, help="maximum caption length in tokens")
    p.add_argument("--length-penalty", type=float, default=None, help="beam score / length**p (default 0)")
    p.add_argument("--no-repeat-ngram", type=int, default=None, help="forbid repeating n-grams of this size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0, help="image loading worker processes")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--output", "-o", default=None, help="write .jsonl, .json (COCO results), .csv or .tsv")
    out.add_argument("--sidecar", action="store_true", help="write IMAGE.txt next to every image (IMAGE.jpg.txt when IMAGE.png is there too)")
    p.add_argument("--resume", action="store_true", help="keep results already written by an interrupted run")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging
    import shutil
    import time
    from pathlib import Path

    from .caption import (caption_records, collect_images, load_captioner, output_format, render,
                          sidecar_paths, write_atomic, CaptionResult)
    from .cli_args import check_at_least
    from .data.jsonl import PartWriter, read_rows
    from .data.records import DataError
    from .distributed import process_state
    from .errors import PcmnetError

    log = logging.getLogger("pcmnet")
    state = process_state()
    rank, world = state.process_index, state.num_processes
    check_at_least(("--batch-size", args.batch_size, 1), ("--num-workers", args.num_workers, 0),
                   ("--beam-size", args.beam_size, 1), ("--max-len", args.max_len, 1),
                   ("--no-repeat-ngram", args.no_repeat_ngram, 0))
    if world > 1 and not (args.output or args.sidecar):
        raise PcmnetError("with several processes, write results with --output FILE or --sidecar")
    fmt = output_format(args.output) if args.output else None
    records = collect_images(args.paths)
    model, backbone = load_captioner(args.model, device=args.device or str(state.device))
    gen = {k: v for k, v in dict(beam_size=args.beam_size, max_len=args.max_len,
                                 length_penalty=args.length_penalty,
                                 no_repeat_ngram=args.no_repeat_ngram).items() if v is not None}
    main = state.is_main_process

    def run_share(todo):
        return caption_records(todo[rank::world], model, backbone, args.batch_size, progress=main,
                               num_workers=args.num_workers, **gen)

    t0, n_ok, n_bad = time.time(), 0, 0
    if args.sidecar:
        sidecars = sidecar_paths(records)
        todo = [r for r in records if not (args.resume and r.file and sidecars[r.file].exists())]
        for res in run_share(todo):
            if res.caption is None:
                n_bad += 1
                continue
            write_atomic(sidecars[res.file], res.caption + "\n")
            n_ok += 1
    elif args.output:
        out = Path(args.output)
        parts = out.with_name(out.name + ".parts")
        if main and not args.resume:
            shutil.rmtree(parts, ignore_errors=True)
        state.wait_for_everyone()
        parts.mkdir(parents=True, exist_ok=True)
        done = {}  # a line cut by a kill is skipped (that image is simply redone)
        for part in sorted(parts.glob("rank-*.jsonl")):
            done.update((row["file"], row) for row in read_rows(part))
        state.wait_for_everyone()
        # images that failed before (unreadable then) are tried again
        todo = [r for r in records if r.file not in done or done[r.file].get("caption") is None]
        with PartWriter(parts / f"rank-{rank:05d}.jsonl") as writer:  # cuts a torn last line first
            for res in run_share(todo):
                writer.append([res.__dict__])
                n_ok += res.caption is not None
                n_bad += res.caption is None
        state.wait_for_everyone()
        if main:
            for part in sorted(parts.glob("rank-*.jsonl")):
                done.update((row["file"], row) for row in read_rows(part))
            ordered = [CaptionResult(**done[r.file]) for r in records if r.file in done]
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out, render(ordered, fmt))
            shutil.rmtree(parts, ignore_errors=True)
    else:
        for res in run_share(records):
            if res.caption is None:
                n_bad += 1
                continue
            print(f"{res.file}\t{res.caption}", flush=True)
            n_ok += 1
    dt = time.time() - t0
    log.info("rank %d: captioned %d images (%d unreadable, skipped) in %.1f s (%.1f img/s)",
             rank, n_ok, n_bad, dt, n_ok / max(dt, 1e-9))
    state.wait_for_everyone()
    if world == 1 and n_bad and not n_ok and not (args.resume and n_bad < len(records)):
        raise DataError(f"none of the {n_bad} images could be read (see the warnings above)")
    return 0
