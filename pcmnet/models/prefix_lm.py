"""ClipCap-style decoder (METHODS.md section 4, second family): a pretrained causal LM (GPT-2 class)
reads `prefix_len` learned vectors mapped from the global embedding g, then the caption tokens.

    mapper "mlp":         g -> Linear(D, P*H/2) -> tanh -> Linear(P*H/2, P*H) -> [P, H]
    mapper "transformer": g -> Linear(D, P*H) -> [P, H]; these P tokens plus P learned constants go
                          through a small transformer; the outputs at the constants are the prefix
The LM is frozen (only the mapper learns) or fine-tuned (`freeze_lm: false`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class LMTokenizer:
    """A Hugging Face tokenizer behind the same small interface as `Vocab`."""

    def __init__(self, tok):
        self.tok = tok
        eos = tok.eos_token_id
        if eos is None:
            raise ValueError("the LM tokenizer has no eos token")
        self.eos_id = eos
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else eos
        self.pad_id = eos  # inputs are padded with eos; targets past the end are ignored, not eos

    def __len__(self):
        return len(self.tok)

    def encode(self, text: str, max_len: int = 20) -> list[int]:
        ids = self.tok(" " + text.strip(), add_special_tokens=False)["input_ids"][:max_len]
        return [self.bos_id] + ids + [self.eos_id]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def save(self, path: str | Path) -> None:
        self.tok.save_pretrained(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "LMTokenizer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))


class PrefixLMDecoder(nn.Module):
    def __init__(self, lm: nn.Module, embed_dim: int, prefix_len: int = 10, mapper: str = "mlp",
                 mapper_layers: int = 2, freeze_lm: bool = True):
        super().__init__()
        self.lm = lm
        self.prefix_len = prefix_len
        self.freeze_lm = freeze_lm
        H = lm.get_input_embeddings().embedding_dim
        self.hidden = H
        self.mapper_kind = mapper
        if mapper == "mlp":
            self.mapper = nn.Sequential(nn.Linear(embed_dim, prefix_len * H // 2), nn.Tanh(),
                                        nn.Linear(prefix_len * H // 2, prefix_len * H))
        elif mapper == "transformer":
            self.mapper = nn.Linear(embed_dim, prefix_len * H)
            self.const = nn.Parameter(torch.randn(prefix_len, H) * 0.02)
            heads = next(h for h in (8, 4, 2, 1) if H % h == 0)
            layer = nn.TransformerEncoderLayer(H, heads, 4 * H, 0.0, batch_first=True, norm_first=True)
            self.mapper_tf = nn.TransformerEncoder(layer, mapper_layers, enable_nested_tensor=False)
        else:
            raise ValueError(f"unknown prefix mapper '{mapper}' (mlp or transformer)")
        if freeze_lm:
            for p in self.lm.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_lm:
            self.lm.eval()  # a frozen LM keeps its dropout off
        return self

    def prefix(self, g: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, prefix_len, H]."""
        x = self.mapper(g).view(g.shape[0], self.prefix_len, self.hidden)
        if self.mapper_kind == "transformer":
            x = torch.cat([x, self.const.expand(g.shape[0], -1, -1)], 1)
            x = self.mapper_tf(x)[:, self.prefix_len:]
        return x

    def forward(self, tokens: torch.Tensor, prefix: torch.Tensor,
                token_pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B,t] (starting with bos) -> next-token logits [B,t,V] (prefix positions dropped)."""
        emb = self.lm.get_input_embeddings()(tokens)
        x = torch.cat([prefix.to(emb.dtype), emb], 1)
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        if token_pad is not None:
            mask[:, self.prefix_len:] = (~token_pad).long()
        out = self.lm(inputs_embeds=x, attention_mask=mask)
        return out.logits[:, self.prefix_len:]


def build_lm(name_or_path: str | None = None, config: dict | None = None):
    """A causal LM and its tokenizer: from a hub id / local dir, or built randomly from a config
    dict (tests: `{"model_type": "gpt2", "n_layer": 1, ...}` plus `tokenizer` = a local dir)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..errors import MissingWeightsError

    if config is not None:
        cfg = dict(config)
        tok_path = cfg.pop("tokenizer", name_or_path)
        model_type = cfg.pop("model_type")
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
        tok = AutoTokenizer.from_pretrained(tok_path)
        return lm, LMTokenizer(tok)
    try:
        lm = AutoModelForCausalLM.from_pretrained(name_or_path)
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise MissingWeightsError(
            f"causal LM '{name_or_path}' is not available on this machine ({str(e).splitlines()[0]}); "
            "pass a local directory in Hugging Face format as model.lm") from None
    return lm, LMTokenizer(tok)
