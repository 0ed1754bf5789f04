"""A tiny random Stable Diffusion pipeline, built from configs: the offline path of `pcmnet synth`.

No diffusion weights exist offline, so tests, the benchmark and offline users build this
pipeline (UNet, VAE, CLIP text encoder, a byte-level CLIP tokenizer and a DDIM scheduler, all
random) and save it in diffusers format. `pcmnet synth --model DIR` then loads it exactly like a
downloaded Stable Diffusion 1.x checkpoint, so every line of the real generation code runs.
Its images are noise-like 32x32 pictures: it is for exercising the pipeline, not for training.

    pcmnet synth tiny --out DIR [--kind sdxl]     # or build_tiny_pipeline(DIR) from Python
"""
from __future__ import annotations

from pathlib import Path


def tiny_tokenizer(max_length: int = 77):
    """A CLIP tokenizer whose vocabulary is the 256 byte-level symbols (plain and word-final) plus
    the two CLIP special tokens, with no merges: every word becomes its characters."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_tiny_pipeline(out_dir: str | Path | None = None, seed: int = 0, kind: str = "sd"):
    """Build a random pipeline shaped like Stable Diffusion 1.x (`kind="sd"`, DDIM scheduler) or
    SDXL (`kind="sdxl"`: two text encoders, size/crop conditioning, Euler scheduler, no safety
    checker); 32x32 images from 16x16 latents.

    With `out_dir`, the pipeline is also saved there with `save_pretrained` (7-9 MB).
    Returns the pipeline.
    """
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind not in ("sd", "sdxl"):
        raise ValueError(f"tiny pipeline kind '{kind}' (one of: sd, sdxl)")
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, projection_dim=32)
    blocks = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=32)
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if kind == "sd":
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=8, **blocks)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=unet,
            scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **schedule),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        # SDXL: the UNet attends to both encoders' hidden states (32 + 32) and is conditioned on the
        # pooled text embedding (32) plus 6 size/crop numbers embedded in 8 dims each (32 + 48 = 80).
        unet = UNet2DConditionModel(cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=80, **blocks)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
            scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **schedule))
    if out_dir is not None:
        pipe.save_pretrained(str(out_dir))
    return pipe
