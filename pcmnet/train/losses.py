"""Caption losses: CLIP-weighted, label-smoothed cross entropy (METHODS.md section 5).

One loss for every training mode. For a batch of B captions of length L:

    w_b     = clamp(alpha * max(cos(g(x_b), t(c_b)), 0), 0, 1)     per pair, alpha = 2.5
    l_bt    = (1 - eps) * (-log p_bt[y_bt]) + eps * mean_v(-log p_bt[v])   label smoothing eps = 0.1
    l_bt   *= (1 - p_bt[y_bt]) ** gamma                             optional focal term (gamma = 0)
    loss    = sum_{b,t not pad} w_b * l_bt  /  #(non-pad tokens)

The mean is over tokens, not over weights: a batch of low-weight pairs gives a smaller loss (and
smaller gradients) than the same batch with weight 1, which is the point of the weighting. With
all weights 1 (or None, plain data) and gamma 0 this is exactly
`F.cross_entropy(logits, targets, ignore_index=pad_id, label_smoothing=eps)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossConfig:
    """The caption loss settings (the `loss:` section of a training config).

    smoothing:   label smoothing eps
    focal_gamma: focal exponent gamma (0 = off)
    clip_weight: weight each pair by its CLIP score s = max(cos(g(x), t(c)), 0), computed once per
                 pair from the cached backbone features (PCM-Net on synthetic pairs)
    clip_alpha:  alpha of the weight clamp(alpha * cos, 0, 1)
    """

    smoothing: float = 0.1
    focal_gamma: float = 0.0
    clip_weight: bool = False
    clip_alpha: float = 2.5


def clip_pair_weights(cos: torch.Tensor, alpha: float = 2.5) -> torch.Tensor:
    """w = clamp(alpha * max(cos, 0), 0, 1) per pair. `cos` may also be the stored CLIP score
    s = max(cos, 0) of a synthetic pair (the same w)."""
    return (alpha * cos.clamp(min=0)).clamp(0.0, 1.0)


def weighted_label_smoothed_ce(logits: torch.Tensor, targets: torch.Tensor,
                               weights: torch.Tensor | None, pad_id: int, smoothing: float = 0.1,
                               focal_gamma: float = 0.0) -> torch.Tensor:
    """logits [B,L,V], targets [B,L] (pad_id where there is no token), weights [B] or None -> scalar.

    Computed in float32. A batch with no real token gives 0 (not NaN), so a rank of a distributed
    run whose shard happens to be all padding does not poison the reduction.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    real = targets != pad_id
    safe_targets = targets.masked_fill(~real, 0)  # pad_id may be outside [0, V), e.g. -100
    nll = -logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # [B,L]
    token_loss = (1.0 - smoothing) * nll + smoothing * (-logp.mean(dim=-1))
    if focal_gamma > 0:
        token_loss = token_loss * (1.0 - torch.exp(-nll)) ** focal_gamma
    if weights is not None:
        token_loss = token_loss * weights.to(token_loss.dtype).unsqueeze(1)
    return (token_loss * real).sum() / real.sum().clamp(min=1)
