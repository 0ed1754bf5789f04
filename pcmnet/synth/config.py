"""Configuration of a synthetic-corpus job (METHODS.md section 2).

Loadable from YAML with `pcmnet.config.load_config(SynthConfig, "configs/synth_coco_sd15.yaml")`;
every CLI flag of `pcmnet synth` maps to one key here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..backbones.base import BackboneConfig
from ..config import ConfigError
from ..data.readers import CorpusConfig

SCHEDULERS = ("default", "dpmpp", "ddim", "euler", "euler_a", "pndm", "unipc")
DTYPES = ("auto", "fp16", "bf16", "fp32")
IMAGE_FORMATS = ("png", "jpg")

# Settings that change the bytes of a generated image. An output folder holds pairs made with one
# value of each; a rerun into it with another value is refused instead of mixing two corpora.
GENERATION_KEYS = ("model", "scheduler", "steps", "guidance", "size", "dtype", "seed", "image_format")


@dataclass
class SynthConfig:
    """One `pcmnet synth` job.

    captions:           the caption corpus (any pcmnet reader; `captions.path` is required)
    model:              diffusers text-to-image pipeline: hub id or local diffusers-format dir
                        (Stable Diffusion 1.x/2.x, SDXL, anything AutoPipelineForText2Image loads)
    out:                output folder (images/, manifest parts, manifest.jsonl)
    images_per_caption: images generated per caption, each with its own seed
    steps, guidance:    denoising steps and classifier-free guidance scale
    size:               "512" or "WIDTHxHEIGHT"; null = the pipeline's default size
    scheduler:          default (the pipeline's own) | dpmpp (DPMSolver++ multistep) | ddim |
                        euler | euler_a (Euler ancestral) | pndm | unipc
    seed:               global seed; pair seed = hash(seed, caption id, image index)
    batch_size:         prompts per pipeline call
    limit:              use only the first N captions of the corpus
    dtype:              auto (fp16 on GPU, fp32 on CPU) | fp16 | bf16 | fp32 (CPU always runs fp32)
    device:             null = accelerate's device for this process (cuda:LOCAL_RANK or cpu)
    image_format:       png (lossless, default) | jpg (quality 95, ~5x smaller)
    safety_checker:     keep the pipeline's NSFW filter (flagged pairs are recorded, not saved)
    backbone:           backbone for the inline CLIP score; name "none" = score later with
                        `pcmnet synth score`
    score_batch_size:   images per backbone call in `pcmnet synth score`
    """

    captions: CorpusConfig = field(default_factory=CorpusConfig)
    model: str = ""
    out: str = ""
    images_per_caption: int = 1
    steps: int = 20
    guidance: float = 7.5
    size: str | None = None
    scheduler: str = "dpmpp"
    seed: int = 0
    batch_size: int = 8
    limit: int | None = None
    dtype: str = "auto"
    device: str | None = None
    image_format: str = "png"
    safety_checker: bool = True
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    score_batch_size: int = 64

    def check(self) -> "SynthConfig":
        """Raise ConfigError (one line, naming the key) for values that cannot work."""
        if not self.captions.path:
            raise ConfigError("config key 'captions.path' is empty (the caption corpus to synthesize)")
        if not self.model:
            raise ConfigError("config key 'model' is empty (a diffusers hub id or local pipeline dir)")
        if not self.out:
            raise ConfigError("config key 'out' is empty (the output folder)")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"config key 'scheduler' is '{self.scheduler}' (one of: {', '.join(SCHEDULERS)})")
        if self.dtype not in DTYPES:
            raise ConfigError(f"config key 'dtype' is '{self.dtype}' (one of: {', '.join(DTYPES)})")
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(f"config key 'image_format' is '{self.image_format}' "
                              f"(one of: {', '.join(IMAGE_FORMATS)})")
        for key in ("images_per_caption", "steps", "batch_size", "score_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"config key 'limit' must be >= 1, got {self.limit}")
        parse_size(self.size)
        return self


def parse_size(size: str | int | None) -> tuple[int, int] | None:
    """'512' -> (512, 512); '768x512' -> (768, 512) as (width, height); None -> None."""
    if size is None or size == "":
        return None
    text = str(size).lower().replace(" ", "")
    parts = text.split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or any(d < 8 or d % 8 for d in dims):
        raise ConfigError(f"config key 'size' is '{size}' (use '512' or 'WIDTHxHEIGHT', multiples of 8)")
    return (dims[0], dims[-1])
