"""Word vocabulary built from the training captions (METHODS.md section 4).

Captions are lowercased and split into words (letters/digits of any script, with in-word
apostrophes kept: "man's", "café"); punctuation is dropped, as in the usual COCO preprocessing. Ids 0-3 are the specials
<pad>, <bos>, <eos>, <unk>.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Vocab:
    """Word <-> id map with the interface every decoder's tokenizer offers:
    `encode(text, max_len) -> [bos, w1.., eos]`, `decode(ids) -> text`, and the special ids."""

    def __init__(self, itos: list[str]):
        if itos[:4] != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions, min_count: int = 5, max_size: int | None = 10000) -> "Vocab":
        """Most frequent words (count >= min_count), ties broken alphabetically, at most max_size ids."""
        counts = Counter(w for c in captions for w in words(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            kept = kept[: max(0, max_size - len(SPECIALS))]
        return cls(SPECIALS + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int = 20) -> list[int]:
        """[bos] + up to max_len word ids + [eos]."""
        ids = [self.stoi.get(w, self.unk_id) for w in words(text)][:max_len]
        return [self.bos_id] + ids + [self.eos_id]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return " ".join(out)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"itos": self.itos}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        return cls(json.loads(Path(path).read_text())["itos"])
