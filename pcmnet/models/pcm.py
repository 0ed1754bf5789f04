"""Salient concepts and PCM, Patch-wise Cross-modal feature Mix-up (METHODS.md section 3).

PCM-Net's token builder. From backbone features of an image (synthetic in training, real at test
time) and a fixed concept vocabulary C [K,D] (see models/concepts.py):

    1. concept probs    q = softmax(normalize(g) C^T / tau); keep the top-k concepts T [B,k,D];
                        a kept concept whose prob is <= threshold is masked out (m [B,k] False)
    2. similarity       S = normalize(P') normalize(T)^T                          [B,N,k]
    3. concept feature  A_i = sum_j softmax_j(S_ij / tau) T_j                      [B,N,D]
    4. replace mask     softmax over all N*k entries of S / tau, top M entries; patch i is replaced
                        if it appears in any selected entry                       r [B,N]
    5. tokens           V = Wv(P), U = Wt(A)
                        training:  X = V*(1-r) + U*r            (1+N tokens with the global token)
                        inference: X = [V ; U], U of non-replaced patches masked    (1+2N tokens)
    6. global token     Wg(g + n), n ~ N(0, sigma^2 I) in training; learned positions, token types
                        (0 visual, 1 concept), LayerNorm, dropout

Steps 1-4 have no trainable weights (`mix_plan` returns all their results for tests and
visualisations); steps 5-6 reuse `VisualTokens` (models/encoder.py) and add one projection Wt.
The call follows the token-builder convention: `PCMTokens(feats, train) -> (tokens, pad_mask)`.
Choices where the paper is silent are listed in docs/pcm.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..errors import CheckpointError
from .encoder import VisualTokens

VARIANTS = ("top", "random")


@dataclass
class PCMConfig:
    """PCM settings (the `pcm:` section of a PCM-Net config). Defaults are the published ones.

    enabled:         False turns PCM off: the builder is then exactly VisualTokens (global + patches)
    variant:         "top" (replace the patches of the top-M patch-concept entries) or "random"
                     (ablation: in training replace a random `random_fraction` of the patches)
    top_k:           concepts kept per image (k)
    threshold:       a kept concept with prob q <= threshold is masked out
    tau:             temperature of the three softmaxes (concept probs, per-patch mixture, replace)
    replace_m:       M, entries of the N*k patch-concept grid selected; 0 < M < 1 is a fraction of N*k
    random_fraction: share of the N patches replaced in training by the "random" variant
    """

    enabled: bool = True
    variant: str = "top"
    top_k: int = 5
    threshold: float = 0.0
    tau: float = 0.01
    replace_m: float = 5
    random_fraction: float = 0.1

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"pcm.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.top_k < 1:
            raise ConfigError(f"pcm.top_k must be >= 1, got {self.top_k}")
        if self.tau <= 0:
            raise ConfigError(f"pcm.tau must be > 0, got {self.tau}")
        if self.replace_m < 0 or (self.replace_m >= 1 and self.replace_m != int(self.replace_m)):
            raise ConfigError(f"pcm.replace_m must be a whole number >= 0 or a fraction in (0, 1), "
                              f"got {self.replace_m}")
        if not 0 <= self.random_fraction <= 1:
            raise ConfigError(f"pcm.random_fraction must be in [0, 1], got {self.random_fraction}")

    def num_entries(self, num_patches: int, k: int) -> int:
        """M as a count of patch-concept entries (a fraction is of N*k, at least 1)."""
        total = num_patches * k
        if 0 < self.replace_m < 1:
            return max(1, round(self.replace_m * total))
        return min(int(self.replace_m), total)


@dataclass
class PCMPlan:
    """Everything steps 1-4 compute for a batch (no trainable weights involved)."""

    probs: torch.Tensor  # q [B,K], concept probabilities
    concept_ids: torch.Tensor  # [B,k] indices of the top-k concepts in the bank
    concepts: torch.Tensor  # T [B,k,D], their (normalized) embeddings
    concept_mask: torch.Tensor  # m [B,k] bool, True = concept kept (prob > threshold)
    similarity: torch.Tensor  # S [B,N,k], cos(P'_i, T_j)
    mixture: torch.Tensor  # A [B,N,D], per-patch concept feature
    replace_probs: torch.Tensor  # [B,N,k], softmax over the N*k entries of S / tau (masked: 0)
    replace: torch.Tensor  # r [B,N] bool, True = patch replaced / its concept token attended


class PCMTokens(VisualTokens):
    """Global token + patch tokens mixed with salient-concept tokens (METHODS.md section 3).

    Token order, training:  [global, x_1..x_N], x_i = U_i if patch i is replaced (type 1) else V_i
    Token order, inference: [global, V_1..V_N, U_1..U_N]; U_i has patch i's position, type 1, and
    is masked out of attention (pad_mask True) unless patch i is selected.
    """

    def __init__(self, cfg: PCMConfig, concepts: torch.Tensor | None, embed_dim: int, patch_dim: int,
                 num_patches: int, width: int, noise_variance: float = 0.016, dropout: float = 0.1):
        super().__init__(embed_dim, patch_dim, num_patches, width, use_patches=True, use_local=False,
                         noise_variance=noise_variance, dropout=dropout)
        self.cfg = cfg
        if not cfg.enabled:
            self.concept_proj = None
            self.register_buffer("concepts", None)
            return
        if concepts is None or concepts.ndim != 2 or concepts.shape[0] < 1:
            raise CheckpointError("PCM needs a concept bank [K, D] (build one with `pcmnet concepts`)")
        if concepts.shape[1] != embed_dim:
            raise CheckpointError(f"the concept bank has D={concepts.shape[1]} but the backbone embeds "
                                  f"in D={embed_dim}: it was built for another backbone")
        self.concept_proj = nn.Linear(embed_dim, width)  # Wt
        # C [K,D]: a frozen buffer, saved in the state dict so a checkpoint carries its vocabulary.
        self.register_buffer("concepts", F.normalize(concepts.detach().float(), dim=-1))

    # ------------------------------------------------------------------ steps 1-4
    def salient_concepts(self, g: torch.Tensor):
        """Step 1: q [B,K], top-k ids [B,k], T [B,k,D] and the threshold mask m [B,k]."""
        C = self.concepts.to(g.dtype)
        q = torch.softmax(F.normalize(g, dim=-1) @ C.T / self.cfg.tau, dim=-1)
        top_q, ids = q.topk(min(self.cfg.top_k, C.shape[0]), dim=-1)
        return q, ids, C[ids], top_q > self.cfg.threshold

    def mix_plan(self, feats: dict, train: bool) -> PCMPlan:
        """Steps 1-4 for a batch; `train` only matters for the "random" variant."""
        tau = self.cfg.tau
        q, ids, T, m = self.salient_concepts(feats["embeds"])  # step 1
        B, k = m.shape

        # step 2: patch-concept similarity
        S = F.normalize(feats["patch_embeds"], dim=-1) @ F.normalize(T, dim=-1).transpose(1, 2)
        N = S.shape[1]
        valid = m.unsqueeze(1).expand(B, N, k)  # masked concepts take part in nothing below

        # step 3: per-patch concept feature, a softmax over the kept concepts
        w = torch.softmax((S / tau).masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
        A = w @ T

        # step 4: replace mask from the top-M entries of the N*k grid
        logits = (S / tau).masked_fill(~valid, float("-inf")).flatten(1)
        replace_probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).view(B, N, k)
        top_logits, top_idx = logits.topk(self.cfg.num_entries(N, k), dim=-1)
        picked = torch.zeros(B, N * k, dtype=torch.bool, device=S.device)
        picked.scatter_(1, top_idx, torch.isfinite(top_logits))  # never pick a masked entry
        replace = picked.view(B, N, k).any(-1)

        if train and self.cfg.variant == "random":
            # ablation: the same number of random patches per image (round(fraction * N)),
            # each replaced by its own A_i as usual
            n = round(self.cfg.random_fraction * N)
            chosen = torch.rand(B, N, device=S.device).argsort(dim=1)[:, :n]
            replace = torch.zeros(B, N, dtype=torch.bool, device=S.device).scatter_(1, chosen, True)
            replace &= m.any(1, keepdim=True)  # an image without kept concepts has no A to mix in

        return PCMPlan(probs=q, concept_ids=ids, concepts=T, concept_mask=m, similarity=S,
                       mixture=A, replace_probs=replace_probs, replace=replace)

    # ------------------------------------------------------------------ steps 5-6
    def forward(self, feats: dict, train: bool):
        if not self.cfg.enabled:
            return super().forward(feats, train)  # exactly VisualTokens: [global, patches]
        g = feats["embeds"]
        plan = self.mix_plan(feats, train)
        B, N = plan.replace.shape
        dev = g.device

        # step 5: patch tokens V and concept tokens U
        V = self.patch_proj(feats["patches"])
        U = self.concept_proj(plan.mixture.to(V.dtype))
        patch_pos = torch.arange(1, N + 1, device=dev)
        zero = torch.zeros(1, dtype=torch.long, device=dev)

        # step 6 (global token with training noise), then the two token layouts
        glob = self.global_token(g, train)
        if train:
            r = plan.replace.unsqueeze(-1).to(V.dtype)
            tokens = torch.cat([glob, V * (1 - r) + U * r], 1)
            positions = torch.cat([zero, patch_pos])
            types = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), plan.replace.long()], 1)
            pad = torch.zeros(B, 1 + N, dtype=torch.bool, device=dev)
        else:
            tokens = torch.cat([glob, V, U], 1)
            positions = torch.cat([zero, patch_pos, patch_pos])
            types = torch.cat([torch.zeros(B, 1 + N, dtype=torch.long, device=dev),
                               torch.ones(B, N, dtype=torch.long, device=dev)], 1)
            pad = torch.cat([torch.zeros(B, 1 + N, dtype=torch.bool, device=dev), ~plan.replace], 1)
        return self.finish(tokens, positions.expand(B, -1), types), pad

