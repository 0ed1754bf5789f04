"""CLIP-based caption metrics (METHODS.md section 8): CLIP-S, RefCLIP-S and distinctiveness.

With g the image embedding and t(.) the text embedding of the backbone (both normalized):

    CLIP-S(y, x)       = w * max(cos(g(x), t(y)), 0),  w = 2.5          (Hessel et al. 2021)
    ref(y, R)          = max over r in R of  ref_weight * max(cos(t(y), t(r)), 0)
    RefCLIP-S(y, x, R) = harmonic mean of CLIP-S(y, x) and ref(y, R)  (0 when both are 0)

each computed per image and averaged over the images that could be read. As in the reference
implementation, every caption (candidates and references) is embedded as "A photo depicts <caption>"
(`prefix`, "" to turn it off). The text side of RefCLIP-S is scaled by ref_weight = 2.5 as METHODS.md
section 8 defines it; Hessel et al.'s paper and code use the plain clipped cosine (ref_weight = 1),
so pass ref_weight=1 for numbers comparable with published RefCLIP-S.

Distinctiveness: text -> image retrieval of each image by its own caption among all evaluated
images (R@1/5/10, median rank), plus vocabulary size, share of unique captions and mean length.
The numbers are only comparable between runs scored by the same backbone: results carry its
spec() and fingerprint().
"""
from __future__ import annotations

import logging
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from .fluency import words

log = logging.getLogger("pcmnet")

CLIP_W = 2.5
REF_WEIGHT = 2.5  # METHODS.md 8; 1.0 = the CLIPScore paper / its released code
DEFAULT_PREFIX = "A photo depicts"
RECALL_KS = (1, 5, 10)


def backbone_info(backbone) -> dict:
    """What identifies the scorer: the backbone's spec() and fingerprint()."""
    return {"spec": backbone.spec(), "fingerprint": backbone.fingerprint()}


def backbone_label(info: dict) -> str:
    spec = info["spec"]
    parts = [str(spec.get(k)) for k in ("name", "model", "pretrained") if spec.get(k)]
    return f"{' '.join(parts)} [{info['fingerprint']}]"


# --------------------------------------------------------------------------------------------
# embeddings


@torch.no_grad()
def embed_images(backbone, images: list, batch_size: int = 32, names: list[str] | None = None):
    """Normalized image embeddings of the images that can be read.

    images: paths, PIL images or encoded bytes (None = no image). Returns (embeds [M,D] float on
    CPU, kept: indices into `images` of the M embedded ones, errors: one line per skipped image).
    """
    from tqdm.auto import tqdm

    from ..data.images import image_loader
    from ..data.records import Record

    names = names or [str(i) for i in range(len(images))]
    records, index, errors = [], [], []
    for i, (name, im) in enumerate(zip(names, images)):
        if im is None:
            errors.append(f"image {name}: no image file found")
        elif isinstance(im, (str, Path)):
            records.append(Record(image_id=name, file=str(im)))
            index.append(i)
        else:
            records.append(Record(image_id=name, image=im))
            index.append(i)
    embeds, kept = [], []
    bar = tqdm(total=len(records), desc="CLIP image embeddings", unit="img", disable=None)
    for idx, pixels, bad in image_loader(records, backbone.preprocess, batch_size=batch_size):
        errors.extend(err for _, err in bad)
        if pixels is not None:
            embeds.append(backbone.encode_image(pixels.to(backbone.device)).embeds.float().cpu())
            kept.extend(index[j] for j in idx)
        bar.update(len(idx) + len(bad))
    bar.close()
    embeds = torch.cat(embeds) if embeds else torch.zeros(0, backbone.embed_dim)
    return embeds, kept, errors


def embed_captions(backbone, captions: list[str], prefix: str = DEFAULT_PREFIX,
                   batch_size: int = 256) -> torch.Tensor:
    """Normalized text embeddings [B,D] of `prefix + " " + caption` (just the caption if no prefix)."""
    texts = [f"{prefix} {c}" if prefix else c for c in captions]
    return backbone.embed_texts(texts, batch_size=batch_size)


# --------------------------------------------------------------------------------------------
# scores on embeddings (pure functions: training rewards and benchmarks call these directly)


def clip_s(image_embeds: torch.Tensor, caption_embeds: torch.Tensor, w: float = CLIP_W) -> torch.Tensor:
    """Per-pair CLIP-S [B] = w * max(cos(g, t), 0) for aligned rows of [B,D] embeddings."""
    cos = (F.normalize(image_embeds.float(), dim=-1) * F.normalize(caption_embeds.float(), dim=-1)).sum(-1)
    return w * cos.clamp(min=0)


def ref_similarity(caption_embeds: torch.Tensor, ref_embeds: list[torch.Tensor],
                   ref_weight: float = REF_WEIGHT) -> torch.Tensor:
    """Per-caption [B] max over its references [R_i,D] of ref_weight * max(cos(t(y), t(r)), 0)."""
    cap = F.normalize(caption_embeds.float(), dim=-1)
    out = [(F.normalize(r.float(), dim=-1) @ c).max() for c, r in zip(cap, ref_embeds)]
    return ref_weight * torch.stack(out).clamp(min=0)


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    total = a + b
    return torch.where(total > 0, 2 * a * b / total.clamp(min=1e-12), torch.zeros_like(total))


def retrieval_ranks(image_embeds: torch.Tensor, caption_embeds: torch.Tensor) -> torch.Tensor:
    """0-based rank [B] of image i when caption i queries all B images by cosine similarity.

    rank = number of other images scoring at least as high as the true one (ties count against).
    """
    sims = F.normalize(caption_embeds.float(), dim=-1) @ F.normalize(image_embeds.float(), dim=-1).T
    own = sims.diagonal().unsqueeze(1)
    return (sims >= own).sum(1) - 1


def retrieval_recall(image_embeds: torch.Tensor, caption_embeds: torch.Tensor,
                     ks: tuple[int, ...] = RECALL_KS) -> dict:
    """{"R@k": share of images ranked within the top k, "median_rank": 1-based median rank}."""
    ranks = retrieval_ranks(image_embeds, caption_embeds)
    out = {f"R@{k}": float((ranks < k).float().mean()) for k in ks}
    out["median_rank"] = float(statistics.median((ranks + 1).tolist())) if len(ranks) else None
    return out


# --------------------------------------------------------------------------------------------
# metrics on captions + images


def _resolve_embeds(captions, backbone, images, image_embeds, caption_embeds, prefix, batch_size):
    """-> (image embeds [M,D], caption embeds [M,D], kept indices, errors) for the readable images."""
    if image_embeds is not None:
        image_embeds = torch.as_tensor(image_embeds).float()
        kept, errors = list(range(len(captions))), []
        if len(image_embeds) != len(captions):
            raise ValueError(f"{len(image_embeds)} image embeddings for {len(captions)} captions")
    else:
        if backbone is None or images is None:
            raise ValueError("give image_embeds, or a backbone and images")
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        image_embeds, kept, errors = embed_images(backbone, images, batch_size=batch_size)
    if caption_embeds is None:
        caption_embeds = embed_captions(backbone, [captions[i] for i in kept], prefix)
    else:
        caption_embeds = torch.as_tensor(caption_embeds).float()[kept]
    return image_embeds, caption_embeds, kept, errors


def clip_scores(captions: list[str], backbone=None, images: list | None = None,
                references: list[list[str]] | None = None, *, image_embeds=None, caption_embeds=None,
                prefix: str = DEFAULT_PREFIX, w: float = CLIP_W, ref_weight: float = REF_WEIGHT,
                batch_size: int = 32) -> dict:
    """Mean CLIP-S (and RefCLIP-S when `references` are given) over the readable images.

    captions[i] describes images[i] (a path, PIL image or None); `image_embeds` [B,D] (and
    `caption_embeds` [B,D], already including the prefix) may replace the backbone calls.
    Returns {"CLIP-S", "RefCLIP-S" (None without references), "num_images", "skipped_images"
    (one line per image that could not be read), "backbone" (spec + fingerprint, when given),
    "prefix", "w", "ref_weight"}.
    """
    g, t, kept, errors = _resolve_embeds(captions, backbone, images, image_embeds, caption_embeds,
                                         prefix, batch_size)
    out = {"CLIP-S": None, "RefCLIP-S": None, "num_images": len(kept), "skipped_images": errors,
           "prefix": prefix, "w": w, "ref_weight": ref_weight}
    if backbone is not None:
        out["backbone"] = backbone_info(backbone)
    if errors:
        log.warning("CLIP metrics: %d images skipped (first: %s)", len(errors), errors[0])
    if not kept:
        return out
    per_image = clip_s(g, t, w)
    out["CLIP-S"] = float(per_image.mean())
    if references is not None:
        refs = [references[i] for i in kept]
        flat = [r for rs in refs for r in rs]
        if backbone is None:
            raise ValueError("RefCLIP-S needs the backbone to embed the references")
        if not all(refs):
            raise ValueError("RefCLIP-S needs at least one reference per caption")
        flat_embeds = embed_captions(backbone, flat, prefix)
        ref_embeds = list(torch.split(flat_embeds, [len(rs) for rs in refs]))
        out["RefCLIP-S"] = float(harmonic_mean(per_image, ref_similarity(t, ref_embeds, ref_weight)).mean())
    return out


def caption_stats(captions: list[str]) -> dict:
    """Vocabulary size (distinct lowercased words over all captions), share of unique captions
    (compared as their lowercased word sequence) and mean length in words (see fluency.words)."""
    tokenized = [words(c) for c in captions]
    n = max(len(captions), 1)
    return {"vocab_size": len({w for ws in tokenized for w in ws}),
            "unique_share": len({" ".join(ws) for ws in tokenized}) / n,
            "mean_length": sum(len(ws) for ws in tokenized) / n}


def distinctiveness(captions: list[str], backbone=None, images: list | None = None, *,
                    image_embeds=None, caption_embeds=None, prefix: str = DEFAULT_PREFIX,
                    ks: tuple[int, ...] = RECALL_KS, batch_size: int = 32) -> dict:
    """caption_stats(captions) plus text->image retrieval R@k and median rank among the readable
    images (R@k None when neither a backbone with images nor image embeddings are given)."""
    out = caption_stats(captions)
    if image_embeds is None and (backbone is None or images is None):
        out.update({f"R@{k}": None for k in ks} | {"median_rank": None})
        return out
    g, t, kept, _ = _resolve_embeds(captions, backbone, images, image_embeds, caption_embeds,
                                    prefix, batch_size)
    if not kept:
        out.update({f"R@{k}": None for k in ks} | {"median_rank": None})
    else:
        out.update(retrieval_recall(g, t, ks))
    out["retrieval_images"] = len(kept)
    return out
