"""Visual-semantic encoder (METHODS.md section 4): a transformer over a set of input tokens.

The token set is built by a *token builder* from backbone features:

    VisualTokens (here)       global token Wg(g + n) and patch tokens Wv(P), and/or joint-space
                              local tokens Wl(L) (text-only FusionCap: word features in training,
                              projected patches P' at inference)
    PCMTokens (models/pcm.py) the same plus salient-concept mixing (METHODS.md section 3)

Every builder has the same call: `builder(feats, train) -> (tokens [B,T,W], pad_mask [B,T])` where
`feats` is a dict with "embeds" [B,D] (normalized g or t), optionally "patches" [B,N,Dv],
"patch_embeds" [B,N,D], "local" [B,L,D] + "local_mask" [B,L] (True = real token), and
`pad_mask` is True where a token must be ignored by attention.
"""
from __future__ import annotations

import torch
from torch import nn


def gaussian_noise_like(x: torch.Tensor, variance: float) -> torch.Tensor:
    """n ~ N(0, variance * I), same shape/dtype/device as x (noise injection, CapDec)."""
    if variance <= 0:
        return torch.zeros_like(x)
    return torch.randn_like(x) * variance ** 0.5


class VisualTokens(nn.Module):
    """Global token + patch tokens (+ joint-space local tokens), positions, token types, LN, dropout.

    Token order: [global, patch_1..patch_N] or [global, local_1..local_L]. Positions are learned
    (0 = global, 1.. = grid index); token type 0 = visual (1 is used by PCM's concept tokens, 2 by
    joint-space local tokens). Local tokens are a set: they all share position 0 (word order in
    text-only training and grid order at inference would not mean the same thing) and are told
    apart from the global token by their token type; at most `max_local` of them are used.
    """

    def __init__(self, embed_dim: int, patch_dim: int, num_patches: int, width: int,
                 use_patches: bool = True, use_local: bool = False, max_local: int = 64,
                 noise_variance: float = 0.016, dropout: float = 0.1):
        super().__init__()
        self.use_patches, self.use_local, self.max_local = use_patches, use_local, max_local
        self.noise_variance = noise_variance
        self.global_proj = nn.Linear(embed_dim, width)  # Wg
        self.patch_proj = nn.Linear(patch_dim, width) if use_patches else None  # Wv
        self.local_proj = nn.Linear(embed_dim, width) if use_local else None  # Wl
        n_pos = 1 + (num_patches if use_patches else 0)
        self.pos = nn.Embedding(n_pos, width)
        self.token_type = nn.Embedding(3, width)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)

    def global_token(self, g: torch.Tensor, train: bool) -> torch.Tensor:
        """Wg(g + n), noise only in training. [B,D] -> [B,1,W]."""
        if train:
            g = g + gaussian_noise_like(g, self.noise_variance)
        return self.global_proj(g).unsqueeze(1)

    def finish(self, tokens: torch.Tensor, positions: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """Add positions and token types, then LayerNorm and dropout."""
        return self.drop(self.norm(tokens + self.pos(positions) + self.token_type(types)))

    def forward(self, feats: dict, train: bool):
        g = feats["embeds"]
        B = g.shape[0]
        parts = [self.global_token(g, train)]
        masks = [torch.zeros(B, 1, dtype=torch.bool, device=g.device)]
        types = [torch.zeros(B, 1, dtype=torch.long, device=g.device)]
        if self.use_patches:
            p = self.patch_proj(feats["patches"])
            parts.append(p)
            masks.append(torch.zeros(B, p.shape[1], dtype=torch.bool, device=g.device))
            types.append(torch.zeros(B, p.shape[1], dtype=torch.long, device=g.device))
        if self.use_local:
            loc = feats["local"][:, : self.max_local]
            lmask = feats["local_mask"][:, : loc.shape[1]]
            parts.append(self.local_proj(loc))
            masks.append(~lmask.bool())
            types.append(torch.full(lmask.shape, 2, dtype=torch.long, device=g.device))
        tokens = torch.cat(parts, 1)
        positions = [torch.zeros(1, dtype=torch.long)]
        if self.use_patches:
            positions.append(torch.arange(1, parts[1].shape[1] + 1))
        if self.use_local:
            positions.append(torch.zeros(parts[-1].shape[1], dtype=torch.long))
        positions = torch.cat(positions).to(g.device)
        x = self.finish(tokens, positions.expand(B, -1), torch.cat(types, 1))
        return x, torch.cat(masks, 1)


class VisualSemanticEncoder(nn.Module):
    """Transformer encoder over the token set (3 layers, width 512, 8 heads, FFN 2048 by default)."""

    def __init__(self, width: int = 512, layers: int = 3, heads: int = 8, ffn: int = 2048,
                 dropout: float = 0.1):
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(tokens, src_key_padding_mask=pad_mask))
