"""Caption rewards of the semi-supervised stage 2 (METHODS.md section 7; docs/semi.md).

    CLIP reward   r_clip(y, x) = cos(g(x), t(prefix + " " + y))   the backbone's cosine, unclipped
    CIDEr-D       r_cider(y, R) = CIDEr-D of y against the references R of x (only images that have
                  references: the labeled ones), document frequencies from the labeled references
    reward        r = clip_weight * r_clip + cider_weight * r_cider

`CaptionReward` scores decoded captions (SCST). `SoftText` is the differentiable twin of r_clip for
the Gumbel path: it feeds a straight-through one-hot word distribution of the decoder to the text
tower through its input embeddings, using a fixed word -> text-token embedding map.

Words for CIDEr-D are `pcmnet.models.vocab.words` (lowercased, punctuation dropped), the tokenization
the word vocabulary uses.
"""
from __future__ import annotations

import logging
import math
from collections import Counter

import torch
import torch.nn.functional as F

from ..errors import PcmnetError
from ..models.vocab import words

log = logging.getLogger("pcmnet")


# ------------------------------------------------------------------------------------------------
# CIDEr-D


def ngram_counts(text: str, n: int = 4) -> Counter:
    """Counts of the 1..n-grams of a caption's words."""
    ws = words(text)
    return Counter(tuple(ws[i: i + k]) for k in range(1, n + 1) for i in range(len(ws) - k + 1))


class CiderD:
    """CIDEr-D (Vedantam et al. 2015) as the coco-caption scorer computes it, with the document
    frequencies fixed once from a reference corpus (SCST's "cider-df"): for n = 1..4

        v_n(s)[w] = count_s(w) * (log(#docs) - log(max(1, df(w))))       tf-idf of the n-grams w
        sim_n     = sum_w min(v_n(y)[w], v_n(r)[w]) * v_n(r)[w] / (|v_n(y)| |v_n(r)|)
                    * exp(-(len(y) - len(r))^2 / (2 sigma^2)),  sigma = 6
        CIDEr-D   = 10 * mean_n mean_{r in R} sim_n

    where a document is the reference set of one image and, as in coco-caption, the length of a
    sentence is its number of bigrams. Equal to pycocoevalcap's Cider when the document frequencies
    come from the scored set itself (tested).
    """

    def __init__(self, corpus: list[list[str]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.df: Counter = Counter()
        for refs in corpus:
            self.df.update({g for r in refs for g in ngram_counts(r, n)})
        self.log_docs = math.log(max(len(corpus), 1))

    def _vector(self, counts: Counter):
        vec = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        for g, tf in counts.items():
            k = len(g) - 1
            vec[k][g] = tf * (self.log_docs - math.log(max(1.0, self.df[g])))
            norm[k] += vec[k][g] ** 2
        length = sum(tf for g, tf in counts.items() if len(g) == 2)
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, candidate: str, references: list[str]) -> float:
        if not references:
            raise ValueError("CIDEr-D needs at least one reference")
        vy, ny, ly = self._vector(ngram_counts(candidate, self.n))
        total = 0.0
        for ref in references:
            vr, nr, lr = self._vector(ngram_counts(ref, self.n))
            penalty = math.exp(-((ly - lr) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                val = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vy[k].items())
                if ny[k] and nr[k]:
                    val /= ny[k] * nr[k]
                total += val * penalty
        return 10.0 * total / (self.n * len(references))


# ------------------------------------------------------------------------------------------------
# the reward of decoded captions


def with_prefix(prefix: str, caption: str) -> str:
    """The text the backbone embeds: `prefix + " " + caption` (the caption alone without a prefix),
    exactly as CLIP-S embeds candidates (pcmnet.evaluate.clipscore.embed_captions)."""
    return f"{prefix} {caption}" if prefix else caption


class CaptionReward:
    """r = clip_weight * cos(g, t(prefix + y)) + cider_weight * CIDEr-D(y, refs) per caption; the
    CIDEr-D term only for captions whose image has references (an empty list: none)."""

    def __init__(self, backbone, clip_weight: float = 1.0, cider_weight: float = 0.0,
                 prefix: str = "A photo depicts", cider: CiderD | None = None):
        if cider_weight and cider is None:
            raise ValueError("a CIDEr-D weight needs the CIDEr-D scorer (document frequencies)")
        self.backbone, self.clip_weight, self.cider_weight = backbone, clip_weight, cider_weight
        self.prefix, self.cider = prefix, cider

    @torch.no_grad()
    def clip(self, captions: list[str], image_embeds: torch.Tensor) -> torch.Tensor:
        """cos(g, t(prefix + y)) [M] for captions [M] and normalized image embeddings [M,D]."""
        t = self.backbone.encode_text([with_prefix(self.prefix, c) for c in captions]).embeds.float()
        return (F.normalize(image_embeds.float(), dim=-1).to(t.device) * t).sum(-1).to(image_embeds.device)

    @torch.no_grad()
    def __call__(self, captions: list[str], image_embeds: torch.Tensor,
                 references: list[list[str]]) -> torch.Tensor:
        r = torch.zeros(len(captions), device=image_embeds.device)
        if self.clip_weight:
            r += self.clip_weight * self.clip(captions, image_embeds)
        if self.cider_weight:
            cider = [self.cider.score(c, refs) if refs else 0.0 for c, refs in zip(captions, references)]
            r += self.cider_weight * torch.tensor(cider, device=r.device)
        return r


# ------------------------------------------------------------------------------------------------
# the differentiable CLIP reward (Gumbel path)

SENTINEL = "x"  # a word every text tokenizer keeps as one token


def text_template(backbone, prefix: str) -> tuple[list[int], list[int]]:
    """(head ids, tail ids) the text tower puts around the words of `prefix + " " + caption`: the
    specials (CLS/SOT ...) plus the prefix's tokens before, the specials (SEP/EOT ...) after. Found
    by tokenizing the prefix followed by one and by two sentinel words and comparing."""
    one = backbone.tokenize([with_prefix(prefix, SENTINEL), with_prefix(prefix, f"{SENTINEL} {SENTINEL}")])
    ids, mask = one["input_ids"].tolist(), one["attention_mask"].tolist()
    a, b = [i for i, m in zip(ids[0], mask[0]) if m], [i for i, m in zip(ids[1], mask[1]) if m]
    common = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    h = common - 1
    if len(b) != len(a) + 1 or h < 0 or a[h] != b[h + 1]:
        raise PcmnetError(f"backbone {backbone.kind}: cannot locate the caption words in its tokenization "
                          f"(the word '{SENTINEL}' is not one token); the gumbel optimizer needs that")
    return a[:h], a[h + 1:]


class SoftText:
    """Differentiable t(prefix + y) for decoder word distributions (straight-through Gumbel-softmax).

    Fixed word -> text-token embedding map (built once from the frozen backbone): every vocabulary
    word w is tokenized by the text tower alone; its row is the mean of its pieces' input embeddings
    (one piece for most words: "dog" -> [dog]; "skateboarder" -> mean of [skate, ##board, ##er]).
    A caption of k words becomes head + k word positions + tail, position j holding y_j @ table,
    where y_j is the straight-through one-hot of word j (its forward value is the one-hot of the
    sampled word, its gradient the Gumbel-softmax's). The ids passed alongside (for positions / EOT
    pooling) are each word's first piece. With single-piece words the forward value is exactly the
    text tower's embedding of the decoded caption; a multi-piece word is one averaged position
    instead of its pieces (an approximation of the SCST reward, reported as `single_piece_share`).
    Tokens that are not words (pad, bos) are left out, as `Vocab.decode` leaves them out; eos ends.
    """

    def __init__(self, backbone, vocab, prefix: str = "A photo depicts"):
        self.backbone = backbone
        emb = backbone.token_embedding().weight.detach()
        self.head, self.tail = text_template(backbone, prefix)
        head0, tail0 = text_template(backbone, "")
        enc = backbone.tokenize(list(vocab.itos))
        table = torch.zeros(len(vocab), emb.shape[1], device=emb.device, dtype=emb.dtype)
        first = torch.zeros(len(vocab), dtype=torch.long, device=emb.device)
        single = 0
        for i, (ids, mask) in enumerate(zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())):
            real = [t for t, m in zip(ids, mask) if m]
            pieces = real[len(head0): len(real) - len(tail0)]
            if not pieces:
                raise PcmnetError(f"backbone {backbone.kind}: vocabulary word '{vocab.itos[i]}' has no text token")
            table[i] = emb[pieces].mean(0)
            first[i] = pieces[0]
            single += len(pieces) == 1
        self.table, self.first = table, first
        self.head_embeds = emb[torch.tensor(self.head, dtype=torch.long, device=emb.device)]
        self.tail_embeds = emb[torch.tensor(self.tail, dtype=torch.long, device=emb.device)]
        self.single_piece_share = single / max(len(vocab), 1)

    def __call__(self, y: torch.Tensor, ids: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """y [M,T,V] word distributions, ids [M,T] the sampled words, word_mask [M,T] (True at the
        caption's words) -> normalized text embeddings [M,D], differentiable in y."""
        dev = self.table.device
        soft = y.to(dev) @ self.table  # [M,T,E]
        rows, row_ids = [], []
        for m in range(y.shape[0]):
            sel = word_mask[m].nonzero().squeeze(1).to(dev)
            rows.append(torch.cat([self.head_embeds, soft[m, sel], self.tail_embeds]))
            row_ids.append(torch.cat([torch.tensor(self.head, dtype=torch.long, device=dev),
                                      self.first[ids[m].to(dev)[sel]],
                                      torch.tensor(self.tail, dtype=torch.long, device=dev)]))
        L = max(len(r) for r in rows)
        embeds = torch.stack([F.pad(r, (0, 0, 0, L - len(r))) for r in rows])
        input_ids = torch.stack([F.pad(i, (0, L - len(i))) for i in row_ids])
        mask = torch.stack([torch.arange(L, device=dev) < len(i) for i in row_ids])
        return self.backbone.encode_tokens(input_ids, mask, inputs_embeds=embeds).embeds.float()
