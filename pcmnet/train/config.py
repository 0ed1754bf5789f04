"""The `pcmnet train` config: one dataclass tree, loaded from YAML with strict keys.

    mode: supervised | text_only | pcm | semi
    backbone: {...}      pcmnet.backbones.base.BackboneConfig
    data: {train, val, unlabeled}   pcmnet.data.readers.CorpusConfig each
    model: {...}         pcmnet.models.captioner.CaptionerConfig
    loss: {...}          pcmnet.train.losses.LossConfig (label smoothing, focal term, CLIP weights)
    optim: {...}         OptimConfig below
    run: {...}           RunConfig below
    textonly / pcm / semi: the settings of those modes (see their modules)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..backbones.base import BackboneConfig
from ..config import ConfigError
from ..data.readers import CorpusConfig
from ..models.captioner import CaptionerConfig
from .losses import LossConfig
from .semi import SemiConfig

MODES = ("supervised", "text_only", "pcm", "semi")
SCHEDULES = ("noam", "constant", "cosine")


@dataclass
class OptimConfig:
    """Adam with a Noam warm-up (METHODS.md section 4): lr_t = lr * min(t / warmup, sqrt(warmup / t)),
    i.e. linear warm-up to `lr` over `warmup_steps`, then inverse-square-root decay.
    schedule "constant" keeps lr after the warm-up; "cosine" decays to 0 at the last step."""

    lr: float = 5e-4
    warmup_steps: int = 10000
    schedule: str = "noam"
    batch_size: int = 32  # global batch (split across processes)
    epochs: int = 12
    max_steps: int | None = None  # stop early at this many optimizer steps
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])

    def validate(self) -> "OptimConfig":
        checks = [("lr", self.lr >= 0, "must not be negative"),
                  ("warmup_steps", self.warmup_steps >= 0, "must not be negative"),
                  ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
                  ("batch_size", self.batch_size >= 1, "must be at least 1"),
                  ("epochs", self.epochs >= 1, "must be at least 1"),
                  ("max_steps", self.max_steps is None or self.max_steps >= 1, "must be at least 1 (or null)"),
                  ("grad_clip", self.grad_clip >= 0, "must not be negative (0: off)"),
                  ("weight_decay", self.weight_decay >= 0, "must not be negative"),
                  ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                   "two numbers in [0, 1)")]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"optim.{key}: {getattr(self, key)!r} {why}")
        return self


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    save_every: int = 1000  # optimizer steps between checkpoints (and at the end of every epoch)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept (0: all)
    log_every: int = 50  # steps between log lines (0: only the last step)
    cache_dir: str = ".cache/pcmnet-features"
    num_workers: int = 0
    tensorboard: bool = True
    eval_every: int = 0  # steps between validation losses (0: at the end of every epoch, if data.val)

    def validate(self) -> "RunConfig":
        for key in ("save_every", "log_every", "eval_every", "num_workers", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise ConfigError(f"run.{key}: {getattr(self, key)} must not be negative")
        return self


@dataclass
class DataConfig:
    """train: the training corpus (image-caption pairs; captions only for text_only).
    val: optional pairs for a validation loss. unlabeled: images without captions (semi).
    paired: image-caption pairs used only to measure the image/text gap for
    `model.text_only.noise_variance: auto` (text_only)."""

    train: CorpusConfig = field(default_factory=CorpusConfig)
    val: CorpusConfig | None = None
    unlabeled: CorpusConfig | None = None
    paired: CorpusConfig | None = None


@dataclass
class TrainConfig:
    mode: str = "supervised"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: CaptionerConfig = field(default_factory=CaptionerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    semi: SemiConfig | None = None  # mode semi (None: its defaults, pcmnet.train.semi)
