"""Sentence decoder over a word vocabulary (METHODS.md section 4): a transformer decoder that
attends to the visual-semantic encoder's output. 3 layers, width 512, 8 heads, FFN 2048 by default;
output projection tied to the word embeddings."""
from __future__ import annotations

import torch
from torch import nn


class TransformerCaptionDecoder(nn.Module):
    def __init__(self, vocab_size: int, width: int = 512, layers: int = 3, heads: int = 8,
                 ffn: int = 2048, dropout: float = 0.1, max_len: int = 20, pad_id: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.pos = nn.Embedding(max_len + 2, width)  # bos + max_len words + eos
        layer = nn.TransformerDecoderLayer(width, heads, ffn, dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        # small init (GPT-2 style): the embedding doubles as the output projection (weight tying)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, memory_pad: torch.Tensor,
                token_pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B,t] (starting with bos) -> next-token logits [B,t,V]."""
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device).clamp(max=self.pos.num_embeddings - 1)
        x = self.drop(self.embed(tokens) + self.pos(pos))
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tokens.device), 1)
        x = self.layers(x, memory, tgt_mask=causal, tgt_key_padding_mask=token_pad,
                        memory_key_padding_mask=memory_pad, tgt_is_causal=True)
        return nn.functional.linear(self.norm(x), self.embed.weight)  # tied output projection
