"""Noise injection for text-only training (METHODS.md section 6; CapDec and FusionCap).

A decoder trained on caption embeddings t must caption image embeddings g at test time. CapDec
trains on t + n, n ~ N(0, sigma^2 I), so that everything in a ball around t decodes to the same
caption; the ball should be as wide as the gap between an image and its own caption.

    estimate_noise_variance(g, t)   the gap: mean over dimensions of E[(g - t)_d^2]  ("auto")
    gap_pairs(records, backbone)    (g, t) for every (image, caption) pair of paired records
    inject_noise(x, variance)       x + n, fixed isotropic Gaussian (CapDec)
    NoiseNetwork                    x + sigma(x) * eps, learned per-dimension std (FusionCap),
                                    regularized toward the measured gap by a Gaussian KL

Noise is added to the normalized embedding and the result is NOT renormalized (as CapDec does):
the decoder sees points off the unit sphere in training and unit vectors at test time, exactly as
in the published recipe.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..data.records import Record
from ..errors import PcmnetError
from .encoder import gaussian_noise_like


# -- the measured gap ("auto") ------------------------------------------------------------------
def estimate_noise_variance(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                            centered: bool = False) -> float:
    """The per-dimension spread of the image/text gap over n true pairs.

    With d_i = normalize(g_i) - normalize(t_i) [n,D]:
      centered=False (default): (1 / (n D)) sum_i sum_d d_id^2, the mean squared gap per dimension,
          so that zero-mean noise of this variance moves t as far (in expectation,
          E||n||^2 = D sigma^2 = E||g - t||^2) as the real image is from its caption. This is
          what CapDec's zero-mean noise must cover: the whole gap, its constant offset included.
      centered=True: (1 / D) sum_d var_d(d), the unbiased per-dimension variance around the mean
          gap vector (n - 1 denominator); the right value if the mean gap is removed separately.
    """
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
        raise ValueError(f"need two [n,D] tensors of equal shape, got {tuple(image_embeds.shape)} "
                         f"and {tuple(text_embeds.shape)}")
    n = image_embeds.shape[0]
    if n < (2 if centered else 1):
        raise PcmnetError(f"noise_variance=auto: needs paired image-caption examples, got {n} pair(s)")
    d = F.normalize(image_embeds.double(), dim=-1) - F.normalize(text_embeds.double(), dim=-1)
    if centered:
        return float(d.var(dim=0, unbiased=True).mean())
    return float(d.pow(2).mean())


@torch.no_grad()
def gap_pairs(records: list[Record], backbone, image_embeds: Mapping[str, torch.Tensor] | None = None,
              max_images: int | None = None, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(g [n,D], t [n,D]): every caption of every paired record, next to its own image's embedding.

    A record with c captions gives c pairs (its image embedding repeated). `image_embeds` maps
    image_id -> g [D] (e.g. from a feature cache); without it the images are read and encoded
    here (unreadable ones are skipped with a warning). Records without captions or without an
    image (or cached embedding) are ignored; `max_images` keeps the first that many paired images.
    """
    paired = [r for r in records if r.captions and
              (r.image_id in image_embeds if image_embeds is not None else r.has_image)]
    paired = paired[:max_images] if max_images is not None else paired
    if image_embeds is not None:
        g = {r.image_id: image_embeds[r.image_id].float().cpu() for r in paired}
    else:
        from ..data.images import image_loader

        g = {}
        for idx, pixels, _ in image_loader(paired, backbone.preprocess, batch_size=batch_size):
            if pixels is None:
                continue
            emb = backbone.encode_image(pixels.to(backbone.device)).embeds.float().cpu()
            for i, e in zip(idx, emb):
                g[paired[i].image_id] = e
    imgs, caps = [], []
    for r in paired:
        if r.image_id in g:
            imgs += [g[r.image_id]] * len(r.captions)
            caps += r.captions
    if not caps:
        return torch.zeros(0, backbone.embed_dim), torch.zeros(0, backbone.embed_dim)
    return torch.stack(imgs), backbone.embed_texts(caps)


# -- fixed noise (CapDec) -----------------------------------------------------------------------
def inject_noise(x: torch.Tensor, variance: float) -> torch.Tensor:
    """x + n, n ~ N(0, variance I) elementwise; no renormalization. variance 0 returns x itself."""
    if variance == 0:
        return x
    if variance < 0:
        raise ValueError(f"noise variance must be >= 0, got {variance}")
    return x + gaussian_noise_like(x, variance)


# -- learned noise (FusionCap) ------------------------------------------------------------------
def gaussian_kl(log_std: torch.Tensor, target_variance: float) -> torch.Tensor:
    """Mean over all entries of KL( N(0, sigma^2) || N(0, sigma0^2) ), sigma = exp(log_std).

    Per dimension: log(sigma0 / sigma) + sigma^2 / (2 sigma0^2) - 1/2, zero iff sigma = sigma0. It
    grows without bound as sigma -> 0, which is the collapse the decoder loss pushes toward (less
    noise is always easier to decode), and quadratically in sigma above the target.
    """
    log_std0 = 0.5 * math.log(target_variance)
    return (log_std0 - log_std + torch.exp(2 * log_std) / (2 * target_variance) - 0.5).mean()


class NoiseNetwork(nn.Module):
    """Input-conditioned Gaussian noise: x -> x + exp(s(x)) * eps, eps ~ N(0, I) (reparameterized).

    s(x) = MLP(x) [B,D] is the per-dimension log-std predicted from the clean embedding (2-layer
    MLP, GELU). The last layer starts at weight 0 and bias log(sqrt(init_variance)), so the network
    starts as CapDec's fixed noise of `init_variance` and learns where to deviate from it. Used in
    training only; the trainer adds `reg_weight * gaussian_kl(log_std, gap_variance)` to the loss.
    """

    def __init__(self, dim: int, hidden: int = 512, init_variance: float = 0.016):
        super().__init__()
        if init_variance <= 0:
            raise ValueError(f"NoiseNetwork needs a positive init_variance, got {init_variance}")
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, 0.5 * math.log(init_variance))

    def log_std(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x + sigma(x) * eps, log sigma(x)); gradients reach the network through the sample."""
        log_std = self.log_std(x)
        return x + torch.exp(log_std) * torch.randn_like(x), log_std

