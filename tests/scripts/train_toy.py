"""`pcmnet train` (any mode, semi included) with the tests' ToyBackbone (the CLI only knows real
backbones).

    python tests/scripts/train_toy.py CONFIG.yaml [key=value ...] [--resume]
    accelerate launch --multi_gpu --num_processes 2 ... tests/scripts/train_toy.py CONFIG.yaml

TOY_STEP_SLEEP=seconds makes every optimizer step (supervised steps and semi's reward steps) that
much slower (no effect on the numbers), so a test can kill the run at a chosen checkpoint.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (toys)

from pcmnet.config import load_config  # noqa: E402
from pcmnet.train import semi, trainer  # noqa: E402
from pcmnet.train.config import TrainConfig  # noqa: E402
from toys import ToyBackbone  # noqa: E402


def slowed(fn, pause: float):
    def slow(*args, **kw):
        time.sleep(pause)
        return fn(*args, **kw)

    return slow


def main(argv):
    resume = "--resume" in argv
    args = [a for a in argv if a != "--resume"]
    cfg = load_config(TrainConfig, args[0], args[1:])
    pause = float(os.environ.get("TOY_STEP_SLEEP", "0"))
    if pause:
        trainer.supervised_step = slowed(trainer.supervised_step, pause)
        semi.RewardStep.__call__ = slowed(semi.RewardStep.__call__, pause)
    print(trainer.train(cfg, resume=resume, backbone=ToyBackbone().freeze()))


if __name__ == "__main__":
    main(sys.argv[1:])
