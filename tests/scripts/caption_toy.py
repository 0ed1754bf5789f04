"""`pcmnet caption` for models trained on the tests' ToyBackbone (the CLI only loads real backbones).

    python tests/scripts/caption_toy.py PATH... --model DIR [caption options]
    accelerate launch --multi_gpu --num_processes 2 ... tests/scripts/caption_toy.py PATH... -o out.jsonl
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (toys)

import pcmnet.backbones.base as base  # noqa: E402
from pcmnet.cli import main  # noqa: E402
from toys import ToyBackbone  # noqa: E402

_real = base.load_backbone


def load_backbone(spec=None, device=None):
    if isinstance(spec, dict) and spec.get("name") == "toy":
        return ToyBackbone(seed=int(spec["model"])).freeze()
    return _real(spec, device=device)


base.load_backbone = load_backbone

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
