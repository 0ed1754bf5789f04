"""`pcmnet train CONFIG.yaml [key=value ...] [--resume]` (runs under `accelerate launch` unchanged)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a captioner from a YAML config",
        description="Train a captioner. Any config key can be overridden as key.sub=value. "
                    "Multi-process / multi-GPU / multi-node: `accelerate launch [...] -m pcmnet train CONFIG`.")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in run.output_dir from its last complete checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from ..config import load_config, to_dict
    from .config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from .trainer import train

    final = train(cfg, resume=args.resume)
    print(final)
    return 0
