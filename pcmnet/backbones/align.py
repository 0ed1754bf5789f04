"""`pcmnet align`: train the mini backbone's image head LiT-style (docs/backbones_mini.md).

Both towers stay frozen ("locked-image tuning" with the text side locked too): only the linear
residual of the image head (pcmnet.backbones.mini.MiniHead, zero at start so step 0 is the ImageNet
bridge) and a temperature are learned, with the symmetric InfoNCE loss of CLIP/LiT:

    s_ij = exp(logit_scale) * <normalize(head(x_i)), t_j>
    loss = ( CE(s, diag) over rows + CE(s^T, diag) over rows ) / 2

Each full-batch step pairs every training image with one random augmented view and one random
caption of its own. The tower outputs are computed once: per image the pooled grid features of its
`views` augmented views (training) and of the 4 fixed test views (evaluation), cached in a file next
to the output so a rerun (e.g. with other steps) skips the extraction. Images are embedded for
evaluation exactly like `MiniBackbone.encode_image` with TTA: the mean of the 4 views' normalized
head outputs, renormalized.

Steps and weight decay, unless given, are chosen by K-fold cross-validation on the TRAINING images
only (never on the evaluation set): train on K-1 folds, measure retrieval on the held-out fold every
few steps, pick the (weight decay, steps) with the best mean R@1+R@5+R@10 of both directions, then
train once more on all training images with that choice.

`retrieval_recall` is the retrieval protocol used everywhere in pcmnet (METHODS.md section 8).
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..data.images import ImageError, content_hash, load_record_image
from ..data.records import DataError, Record
from ..errors import PcmnetError
from .mini import IMAGE_SIZE, NUM_VIEWS, MiniBackbone, MiniHead, _to_tensor, fixed_views, save_heads

log = logging.getLogger("pcmnet")


@dataclass
class AlignConfig:
    """How to train the heads.

    steps:         full-batch steps (None: chosen by cross-validation on the training images)
    views:         augmented views per training image (the first up to 4 are the fixed test views)
    lr:            AdamW learning rate of the residual and the temperature
    weight_decay:  AdamW weight decay of the residual (None: chosen by cross-validation)
    temperature:   initial softmax temperature (learned; CLIP's 0.07)
    folds:         K of the cross-validation on the training images
    max_steps:     largest step count the cross-validation tries
    eval_every:    cross-validation checkpoints (every this many steps)
    wd_grid:       weight decays the cross-validation tries
    seed:          views, caption/view sampling and fold assignment
    """

    steps: int | None = None
    views: int = 12
    lr: float = 3e-4
    weight_decay: float | None = None
    temperature: float = 0.07
    folds: int = 5
    max_steps: int = 100
    eval_every: int = 5
    wd_grid: list[float] = field(default_factory=lambda: [0.0, 1.0, 10.0])
    seed: int = 0


# ------------------------------------------------------------------------------------------------
# retrieval and loss


def retrieval_recall(img_emb: torch.Tensor, txt_emb: torch.Tensor, txt_owner: torch.Tensor,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, dict[int, float]]:
    """Recall@K (in %) of cross-modal retrieval within one pool.

    img_emb [I,D], txt_emb [T,D] (cosine similarity: both are normalized here), txt_owner [T] the
    index of each caption's image. image->text: for each image rank all T captions; a hit if any of
    its own captions is in the top K. text->image: for each caption rank all I images; a hit if its
    own image is in the top K. Ties are broken against the query (a tied wrong item ranks first).
    Returns {"i2t": {k: %}, "t2i": {k: %}}.
    """
    img = F.normalize(img_emb.float(), dim=-1)
    txt = F.normalize(txt_emb.float(), dim=-1)
    owner = torch.as_tensor(txt_owner, dtype=torch.long)
    sim = img @ txt.T  # [I,T]
    own = owner[None, :] == torch.arange(img.shape[0])[:, None]  # [I,T]: caption j belongs to image i
    # image->text: rank of the best own caption = number of other captions scoring >= it
    best_own = sim.masked_fill(~own, -math.inf).max(1).values
    i2t_rank = (sim.masked_fill(own, -math.inf) >= best_own[:, None]).sum(1)
    # text->image: rank of the own image = number of other images scoring >= it
    own_score = sim.gather(0, owner[None, :]).squeeze(0)  # [T]
    t2i_rank = (sim.masked_fill(own, -math.inf) >= own_score[None, :]).sum(0)
    return {"i2t": {k: 100.0 * (i2t_rank < k).double().mean().item() for k in ks},
            "t2i": {k: 100.0 * (t2i_rank < k).double().mean().item() for k in ks}}


def rsum(recall: dict[str, dict[int, float]]) -> float:
    """Sum of all recalls of both directions (the usual single retrieval score)."""
    return sum(v for d in recall.values() for v in d.values())


def info_nce(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of paired rows: img [B,D], txt [B,D] normalized, pair i = (img_i, txt_i)."""
    logits = logit_scale.exp() * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ------------------------------------------------------------------------------------------------
# features


def random_view(img: Image.Image, rng: random.Random, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """A random resized crop (area fraction in `scale`, aspect in `ratio`) to 224 px, flipped half
    of the time: the usual Inception-style training augmentation, drawn from `rng`."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    x = _to_tensor(img.crop((left, top, left + cw, top + ch)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
    return x.flip(-1) if rng.random() < 0.5 else x


def training_views(img: Image.Image, views: int, seed: int) -> torch.Tensor:
    """[views,3,224,224]: the fixed test views first (up to 4), then random views seeded by `seed`."""
    rng = random.Random(seed)
    extra = [random_view(img, rng) for _ in range(views - NUM_VIEWS)]
    return torch.cat([fixed_views(img)[:views], *[x[None] for x in extra]])


@torch.no_grad()
def pooled_features(backbone: MiniBackbone, pixels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """[V,3,H,W] views -> their pooled grid features [V,1280]."""
    out = [backbone.grid(pixels[i: i + batch_size]).mean((2, 3)).cpu() for i in range(0, len(pixels), batch_size)]
    return torch.cat(out)


def extract_features(backbone: MiniBackbone, records: list[Record], views: int, seed: int,
                     cache: str | Path | None = None, desc: str = "features") -> dict[str, torch.Tensor]:
    """Pooled tower features of each record's training views and fixed test views.

    Returns {"train": [R,views,1280], "test": [R,4,1280], "keep": [R] bool (False: unreadable image)}.
    `cache`: a torch file of per-image features keyed by image content hash, views and seed; it is
    read first and rewritten atomically every few images, so a killed run resumes.
    """
    cache = Path(cache) if cache else None
    store: dict[str, dict] = {}
    if cache is not None and cache.is_file():
        try:
            store = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable feature cache %s (%s)", cache, e)
    tag = f"v{views}-s{seed}"
    train, test, keep = [], [], []
    dirty = 0

    def flush():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save(store, tmp)
        os.replace(tmp, cache)

    for rec in tqdm(records, desc=desc, unit="img", leave=False):
        try:
            key = f"{content_hash(rec)}-{tag}" if cache is not None else None
            if key is not None and key in store:
                f = store[key]
            else:
                img = load_record_image(rec)
                img_seed = seed * 1_000_003 + int(hashlib.sha1(rec.image_id.encode()).hexdigest()[:8], 16)
                pixels = torch.cat([training_views(img, views, img_seed), fixed_views(img)])
                pooled = pooled_features(backbone, pixels)
                f = {"train": pooled[:views], "test": pooled[views:]}
                if cache is not None:
                    store[key] = f
                    dirty += 1
                    if dirty >= 32:
                        flush()
                        dirty = 0
        except ImageError as e:
            log.warning("skipping %s", e)
            train.append(torch.zeros(views, backbone.patch_dim))
            test.append(torch.zeros(4, backbone.patch_dim))
            keep.append(False)
            continue
        train.append(f["train"])
        test.append(f["test"])
        keep.append(True)
    if cache is not None and dirty:
        flush()
    return {"train": torch.stack(train), "test": torch.stack(test), "keep": torch.tensor(keep)}


def caption_table(backbone: MiniBackbone, records: list[Record]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized sentence embeddings of all captions [T,D] and their record index [T]."""
    texts, owner = [], []
    for i, r in enumerate(records):
        texts += r.captions
        owner += [i] * len(r.captions)
    return backbone.embed_texts(texts), torch.tensor(owner, dtype=torch.long)


def embed_fixed_views(head: MiniHead, test_feats: torch.Tensor, bridge: torch.Tensor | None = None) -> torch.Tensor:
    """[R,4,1280] pooled fixed-view features (and optionally their precomputed bridge outputs) ->
    TTA image embeddings [R,D], computed as encode_image does."""
    with torch.no_grad():
        return F.normalize(F.normalize(head(test_feats, bridge), dim=-1).mean(1), dim=-1)


@torch.no_grad()
def with_bridge(head: MiniHead, feats: dict) -> dict:
    """Add the (frozen) bridge outputs of the cached features: "train_bridge", "test_bridge"."""
    return {**feats, "train_bridge": head.bridge(feats["train"]), "test_bridge": head.bridge(feats["test"])}


# ------------------------------------------------------------------------------------------------
# training


def train_head(head: MiniHead, feats: torch.Tensor, bridge: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor,
               steps: int, lr: float, weight_decay: float, temperature: float, seed: int, eval_every: int = 0,
               evaluate=None, progress: bool = False) -> tuple[float, dict[int, float]]:
    """Train `head.residual` (and a temperature) for `steps` full-batch InfoNCE steps.

    feats [R,V,1280] pooled features of R images' training views and bridge [R,V,D] their bridge
    outputs (head.bridge(feats), precomputed: it is frozen); txt [T,D] caption embeddings with
    owner [T] in 0..R-1. Each step draws one view and one caption per image (images without captions
    are left out). If `evaluate` is given it is called as evaluate(head) -> score at step 0 and every
    `eval_every` steps. Returns (learned logit scale, {step: score}).
    """
    gen = torch.Generator().manual_seed(seed)
    caps_of = [torch.nonzero(owner == i).flatten() for i in range(feats.shape[0])]
    images = torch.tensor([i for i, c in enumerate(caps_of) if len(c)], dtype=torch.long)
    if len(images) < 2:
        raise DataError(f"align needs at least 2 images with captions, got {len(images)}")
    logit_scale = torch.tensor(math.log(1 / temperature), requires_grad=True)
    opt = torch.optim.AdamW([{"params": head.residual.parameters(), "weight_decay": weight_decay},
                             {"params": [logit_scale], "weight_decay": 0.0}], lr=lr)
    scores = {}
    if evaluate is not None:
        scores[0] = evaluate(head)
    bar = tqdm(range(1, steps + 1), desc="align", unit="step", disable=not progress, leave=False)
    for step in bar:
        view = torch.randint(feats.shape[1], (len(images),), generator=gen)
        pick = torch.stack([caps_of[i][torch.randint(len(caps_of[i]), (1,), generator=gen)][0]
                            for i in images.tolist()])
        x = F.normalize(head(feats[images, view], bridge[images, view]), dim=-1)
        loss = info_nce(x, txt[pick], logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}", T=f"{1 / logit_scale.exp().item():.3f}")
        if evaluate is not None and eval_every and step % eval_every == 0:
            scores[step] = evaluate(head)
    return logit_scale.item(), scores


def fresh_head(bridge: MiniHead) -> MiniHead:
    """A copy of `bridge` with a zero residual (the classifier is shared, frozen)."""
    head = MiniHead(bridge.classifier, bridge.class_text)
    head.classifier.requires_grad_(False)
    return head


def cross_validate(bridge: MiniHead, feats: dict, txt: torch.Tensor, owner: torch.Tensor,
                   cfg: AlignConfig) -> tuple[float, int, dict]:
    """Choose (weight decay, steps) by K-fold CV on these (training) images; returns (wd, steps, table)
    where table[wd][step] = mean held-out R@1+R@5+R@10 (both directions) over folds."""
    n = feats["train"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))
    folds = [order[k::cfg.folds] for k in range(cfg.folds)]
    wds = [cfg.weight_decay] if cfg.weight_decay is not None else list(cfg.wd_grid)
    table: dict[float, dict[int, float]] = {}
    bar = tqdm(total=len(wds) * len(folds), desc="cross-validation", unit="fit", leave=False)
    for wd in wds:
        per_fold = []
        for k, held in enumerate(folds):
            is_held = torch.zeros(n, dtype=torch.bool)
            is_held[held] = True
            tr, te = torch.nonzero(~is_held).flatten(), held.sort().values
            tr_txt, tr_owner = _subset_captions(txt, owner, tr)
            te_txt, te_owner = _subset_captions(txt, owner, te)

            def evaluate(head, te=te, te_txt=te_txt, te_owner=te_owner):
                img = embed_fixed_views(head, feats["test"][te], feats["test_bridge"][te])
                return rsum(retrieval_recall(img, te_txt, te_owner))

            head = fresh_head(bridge)
            _, scores = train_head(head, feats["train"][tr], feats["train_bridge"][tr], tr_txt, tr_owner,
                                   cfg.max_steps, cfg.lr, wd,
                                   cfg.temperature, cfg.seed + 10 + k, cfg.eval_every, evaluate)
            per_fold.append(scores)
            bar.update(1)
        table[wd] = {s: sum(f[s] for f in per_fold) / len(per_fold) for s in per_fold[0]}
    bar.close()
    best = max(((wd, s) for wd in table for s in table[wd]), key=lambda ws: (table[ws[0]][ws[1]], -ws[1]))
    return best[0], best[1], table


def _subset_captions(txt, owner, idx):
    """Captions of the images `idx` with owners renumbered 0..len(idx)-1."""
    remap = torch.full((int(owner.max()) + 1,), -1, dtype=torch.long)
    remap[idx] = torch.arange(len(idx))
    sel = remap[owner] >= 0
    return txt[sel], remap[owner][sel]


def usable(records: list[Record], feats: dict, where: str) -> tuple[list[Record], dict]:
    """Drop records whose image could not be read or that have no caption."""
    keep = [i for i, r in enumerate(records) if feats["keep"][i] and r.captions]
    if len(keep) < 2:
        raise DataError(f"{where}: needs at least 2 readable images with captions, found {len(keep)}")
    idx = torch.tensor(keep)
    return [records[i] for i in keep], {k: v[idx] for k, v in feats.items()}


@dataclass
class AlignResult:
    head: MiniHead
    steps: int
    weight_decay: float
    logit_scale: float
    cv_table: dict | None
    eval: dict[str, dict] = field(default_factory=dict)  # {"bridge": recall, "trained": recall}


def align(backbone: MiniBackbone, records: list[Record], cfg: AlignConfig, eval_records: list[Record] | None = None,
          cache: str | Path | None = None, eval_cache: str | Path | None = None) -> AlignResult:
    """Train a head on `records` (cross-validating steps/weight decay on them if not given) and, if
    `eval_records` are given, measure bridge-only and trained retrieval on them."""
    if cfg.views < 1:
        raise PcmnetError(f"align: views must be >= 1, got {cfg.views}")
    feats = extract_features(backbone, records, cfg.views, cfg.seed, cache, desc="train features")
    records, feats = usable(records, feats, "training data")
    txt, owner = caption_table(backbone, records)
    bridge = copy.deepcopy(backbone.head).cpu()  # the head is trained on CPU (cached features)
    feats = with_bridge(bridge, feats)
    table = None
    if cfg.steps is None or cfg.weight_decay is None:
        if len(records) < 2 * cfg.folds:
            raise DataError(f"training data: {len(records)} images are too few for {cfg.folds}-fold "
                            "cross-validation; give --steps and --weight-decay")
        wd, steps, table = cross_validate(bridge, feats, txt, owner, cfg)
        steps = cfg.steps if cfg.steps is not None else steps
        log.info("cross-validation chose weight_decay=%g steps=%d", wd, steps)
    else:
        wd, steps = cfg.weight_decay, cfg.steps
    head = fresh_head(bridge)
    scale, _ = train_head(head, feats["train"], feats["train_bridge"], txt, owner, steps, cfg.lr, wd, cfg.temperature, cfg.seed,
                          progress=True)
    result = AlignResult(head=head, steps=steps, weight_decay=wd, logit_scale=scale, cv_table=table)
    if eval_records:
        ef = extract_features(backbone, eval_records, 0, 0, eval_cache, desc="eval features")
        eval_records, ef = usable(eval_records, ef, "eval data")
        etxt, eowner = caption_table(backbone, eval_records)
        result.eval = {"bridge": retrieval_recall(embed_fixed_views(fresh_head(bridge), ef["test"]), etxt, eowner),
                       "trained": retrieval_recall(embed_fixed_views(head, ef["test"]), etxt, eowner),
                       "images": len(eval_records), "captions": len(etxt)}
    return result


def format_recall(name: str, r: dict) -> str:
    i, t = r["i2t"], r["t2i"]
    return (f"{name:<14} i2t R@1 {i[1]:5.1f}  R@5 {i[5]:5.1f}  R@10 {i[10]:5.1f}   "
            f"t2i R@1 {t[1]:5.1f}  R@5 {t[5]:5.1f}  R@10 {t[10]:5.1f}")


def save_result(result: AlignResult, path: str | Path, extra: dict | None = None) -> None:
    meta = {"format": "pcmnet-mini-heads", "steps": result.steps, "weight_decay": result.weight_decay,
            "logit_scale": result.logit_scale, **(extra or {})}
    if result.eval:
        meta["eval"] = {k: ({d: {K: round(v, 2) for K, v in r.items()} for d, r in v.items()}
                            if isinstance(v, dict) else v) for k, v in result.eval.items()}
    save_heads(result.head, path, meta)
