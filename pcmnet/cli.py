"""`pcmnet` command line. Each job's arguments live next to its code in a small `cli.py`
(`add_parser(subparsers)` + a `run(args)` that imports the heavy modules only when called), so
`pcmnet --help` stays fast. Known input errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (command, module holding add_parser). Listed explicitly: this is the whole CLI.
COMMANDS = [
    ("caption", "pcmnet.caption_cli"),
    ("evaluate", "pcmnet.evaluate.cli"),
    ("train", "pcmnet.train.cli"),
    ("features", "pcmnet.features.cli"),
    ("align", "pcmnet.backbones.cli"),
    ("concepts", "pcmnet.models.concepts_cli"),
    ("memory", "pcmnet.models.memory_cli"),
    ("synth", "pcmnet.synth.cli"),
]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (printed as one line), not a bug (printed with a traceback)."""
    from .config import ConfigError
    from .data.images import ImageError
    from .data.records import DataError
    from .errors import PcmnetError

    return (ConfigError, DataError, ImageError, PcmnetError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcmnet", description="Image captioning with little or no paired data, built on CLIP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _, module in COMMANDS:
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as e:  # a job whose module is not installed in this build
            if e.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("pcmnet: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs just below
        if isinstance(e, user_errors()):
            print(f"pcmnet {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
