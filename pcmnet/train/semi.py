"""Semi-supervised captioning with a CLIP reward (METHODS.md section 7; Jin 2023; docs/semi.md).

    stage 1  cross entropy on a labeled subset of data.train: the supervised recipe (METHODS.md 4-5)
             on `labeled_fraction` or `labeled_count` of its captioned images, each image with all
             its captions. The subset depends only on (subset_seed, the pool's image ids): images
             are ranked by sha256("<seed>:<image id>") and the first k kept, so for one seed a
             smaller fraction is a subset of a larger one.
    stage 2  the stage-1 model keeps learning on data.unlabeled (whose captions, if it has any, are
             never read) by raising the reward (rewards.py) of its own captions y of image x,
                 r = clip_weight * cos(g(x), t(prefix + y))  (+ cider_weight * CIDEr-D(y, refs)
                     for images with references: the labeled ones, with reward_on_labeled)
               scst    n samples per image; advantage r - b, b = the reward of the greedy caption or
                       the mean reward of the image's other n-1 samples (leave-one-out);
                       loss = -mean over samples of (r - b) * sum_t log p(y_t | y_<t, x)
                       (a sum over the caption's tokens, eos included: SCST's normalization)
               gumbel  straight-through Gumbel-softmax words fed to the text tower through its input
                       embeddings (rewards.SoftText): loss = -clip_weight * mean cos(g, t_soft(y))
             plus the fluency guard, on by default (each switch off with a 0 weight):
                 ce_weight * label-smoothed cross entropy on labeled pairs mixed into every batch,
                     `ce_ratio` pairs per reward image (MixedSampler);
                 kl_weight * KL(p_model || p_stage1) per sampled token, against the frozen stage-1
                     model (mean over the sampled captions' tokens).
             Stage 2 runs the captioner without dropout or feature noise, so the policy that samples
             is the one whose log-probabilities are differentiated.

Run directory (besides the trainer's config.yaml and tokenizer/):
    labeled.json      the labeled subset: seed, fraction / count, pool size, image ids, pair count
    stage1/, stage2/  trainer run directories: checkpoints/, model/, train_log.jsonl, logs/
    model/            the final model (a copy of the last stage's model)
`--resume` continues the stage that was running from its last checkpoint, exactly (model, optimizer,
RNG, position in the epoch); a finished stage 1 is not redone. Every model's extras record the
labeled image ids and the number of labeled pairs it saw.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data.readers import load_corpus
from ..data.records import DataError, Record
from ..errors import PcmnetError
from ..models.captioner import IGNORE_INDEX, Captioner, read_model_config
from .losses import weighted_label_smoothed_ce
from .rewards import CaptionReward, CiderD, SoftText

log = logging.getLogger("pcmnet")

STAGES = ("both", "stage1", "stage2")
OPTIMIZERS = ("scst", "gumbel")
BASELINES = ("greedy", "loo")


@dataclass
class SemiConfig:
    """The `semi:` section of mode semi.

    stages:            "both", "stage1" (stop after it) or "stage2" (start from stage1_model)
    stage1_model:      the stage-1 model of `stages: stage2` (a model dir; its extras' labeled_ids
                       are the labeled subset, else the selection below is used)
    labeled_fraction / labeled_count: share or number of data.train's captioned images that are
                       labeled (at most one of them; neither: all)
    subset_seed:       the seed of that choice
    optimizer:         "scst" or "gumbel"
    num_samples:       captions sampled per image in stage 2 (scst: n of the baseline)
    baseline:          scst baseline: "greedy" or "loo" (leave-one-out, needs num_samples >= 2)
    gumbel_tau:        Gumbel-softmax temperature
    clip_weight, cider_weight: reward = clip_weight * cos + cider_weight * CIDEr-D
    clip_prefix:       text put before a caption for the backbone (CLIP-S's "A photo depicts")
    reward_on_labeled: stage 2 also samples and rewards captions of the labeled images (needed for
                       the CIDEr-D term: only they have references)
    ce_ratio, ce_weight: fluency guard: labeled pairs per reward image in every stage-2 batch, and
                       their cross entropy's weight (0 turns it off)
    kl_weight:         fluency guard: weight of KL(p_model || p_stage1) (0 turns it off)
    lr, warmup_steps, batch_size, epochs, max_steps: stage 2's optimizer (constant lr after a linear
                       warm-up; batch_size counts reward images; betas, weight decay and gradient
                       clipping come from `optim:`, which is stage 1's optimizer)
    """

    stages: str = "both"
    stage1_model: str | None = None
    labeled_fraction: float | None = None
    labeled_count: int | None = None
    subset_seed: int = 0
    optimizer: str = "scst"
    num_samples: int = 5
    baseline: str = "greedy"
    gumbel_tau: float = 1.0
    clip_weight: float = 1.0
    cider_weight: float = 0.0
    clip_prefix: str = "A photo depicts"
    reward_on_labeled: bool = False
    ce_ratio: float = 0.5
    ce_weight: float = 1.0
    kl_weight: float = 0.1
    lr: float = 1e-5
    warmup_steps: int = 20
    batch_size: int = 16
    epochs: int = 5
    max_steps: int | None = None

    def validate(self) -> "SemiConfig":
        def bad(key, why):
            raise ConfigError(f"semi.{key}: {why}")

        for key, value, allowed in (("stages", self.stages, STAGES), ("optimizer", self.optimizer, OPTIMIZERS),
                                    ("baseline", self.baseline, BASELINES)):
            if value not in allowed:
                bad(key, f"'{value}' is not one of {', '.join(allowed)}")
        if self.labeled_fraction is not None and self.labeled_count is not None:
            bad("labeled_fraction", "set labeled_fraction or labeled_count, not both")
        if self.labeled_fraction is not None and not 0 < self.labeled_fraction <= 1:
            bad("labeled_fraction", f"{self.labeled_fraction} is not in (0, 1]")
        if self.labeled_count is not None and self.labeled_count < 1:
            bad("labeled_count", f"{self.labeled_count} is not a positive number of images")
        if self.num_samples < 1 or (self.baseline == "loo" and self.num_samples < 2
                                    and self.optimizer == "scst"):
            bad("num_samples", f"{self.num_samples} samples (the loo baseline needs at least 2)")
        for key in ("clip_weight", "cider_weight", "ce_ratio", "ce_weight", "kl_weight", "lr"):
            if getattr(self, key) < 0:
                bad(key, "must not be negative")
        if not self.clip_weight and not self.cider_weight:
            bad("clip_weight", "both reward weights are 0 (no reward)")
        if self.cider_weight and not self.reward_on_labeled:
            bad("cider_weight", "the CIDEr-D reward needs reward_on_labeled: true (only labeled images "
                                "have references)")
        if self.optimizer == "gumbel" and self.cider_weight:
            bad("cider_weight", "CIDEr-D is not differentiable; use optimizer: scst")
        if self.gumbel_tau <= 0:
            bad("gumbel_tau", "must be positive")
        if self.batch_size < 1 or self.epochs < 1:
            bad("batch_size" if self.batch_size < 1 else "epochs", "must be at least 1")
        if self.stage1_model is not None and self.stages != "stage2":
            bad("stage1_model", "is only read with stages: stage2")
        if not self.ce_weight and not self.kl_weight and self.stages != "stage1":
            log.warning("semi: ce_weight and kl_weight are both 0: stage 2 runs without a fluency guard "
                        "(METHODS.md 7 always keeps one; use this for ablations only)")
        return self


# ------------------------------------------------------------------------------------------------
# the labeled subset and the unlabeled images


def select_labeled(pool: list[Record], fraction: float | None = None, count: int | None = None,
                   seed: int = 0) -> list[Record]:
    """The labeled images of `pool` (those with captions and an image), in pool order: the k with the
    smallest sha256("<seed>:<image id>"), k = count, round(fraction * n) (at least 1), or n."""
    images = [r for r in pool if r.captions and r.has_image]
    n = len(images)
    if count is not None and count > n:
        raise ConfigError(f"semi.labeled_count={count} but data.train has {n} captioned images")
    k = count if count is not None else max(1, round(fraction * n)) if fraction is not None else n
    ranked = sorted(images, key=lambda r: (hashlib.sha256(f"{seed}:{r.image_id}".encode()).hexdigest(),
                                           r.image_id))
    chosen = {r.image_id for r in ranked[:k]}
    return [r for r in images if r.image_id in chosen]


def labeled_subset(semi: SemiConfig, pool: list[Record], corpus: str, ids: list[str] | None = None):
    """(labeled records, subset info for labeled.json and the model extras). `ids` (a stage-1 model's
    labeled_ids) fixes the subset instead of the selection settings."""
    if ids is None:
        labeled = select_labeled(pool, semi.labeled_fraction, semi.labeled_count, semi.subset_seed)
    else:
        by_id = {r.image_id: r for r in pool if r.captions and r.has_image}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"{corpus}: {len(missing)} labeled images of the stage-1 model are not captioned "
                            f"images of data.train (first: {missing[0]})")
        labeled = [by_id[i] for i in ids]
    info = {"subset_seed": semi.subset_seed, "labeled_fraction": semi.labeled_fraction,
            "labeled_count": semi.labeled_count,
            "pool_images": sum(1 for r in pool if r.captions and r.has_image),
            "labeled_images": len(labeled), "labeled_pairs": sum(len(r.captions) for r in labeled),
            "labeled_ids": [r.image_id for r in labeled]}
    if ids is not None:
        info["labeled_from"] = "stage1_model"
    return labeled, info


def unlabeled_images(records: list[Record]) -> list[Record]:
    """Image-only copies of the unlabeled records: their captions (and meta, which may quote a
    caption) are never read, so nothing of them reaches the model, the reward or the logs."""
    return [Record(image_id=r.image_id, file=r.file, image=r.image) for r in records if r.has_image]


# ------------------------------------------------------------------------------------------------
# stage-2 data: reward images, with labeled pairs mixed in


@dataclass
class RewardItem:
    view: int  # 0: the unlabeled images' feature view, 1: the labeled images'
    row: int
    refs: tuple[str, ...] = ()  # references (labeled images only, for CIDEr-D)


class MixedSampler(torch.utils.data.Sampler):
    """Position p of epoch e -> (reward item, labeled pair ids). The reward items come in an order
    that depends only on (seed, epoch) (as trainer.EpochSampler); position p carries the pairs
    k in [floor((e*n + p) * ratio), floor((e*n + p + 1) * ratio)) of an endless stream of seeded
    permutations of the pairs: `ratio` pairs per reward item, every pair once per cycle. A resumed
    run regenerates exactly the same batches."""

    def __init__(self, n: int, num_pairs: int, ratio: float, seed: int):
        self.n, self.num_pairs, self.ratio, self.seed, self.epoch = n, num_pairs, ratio, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def _perm(self, n: int, salt: int) -> list[int]:
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + salt)).tolist()

    def __iter__(self):
        order = self._perm(self.n, self.epoch)
        cycles: dict[int, list[int]] = {}

        def pair(k: int) -> int:
            c = k // self.num_pairs
            if c not in cycles:
                cycles[c] = self._perm(self.num_pairs, 500_009 + c)
            return cycles[c][k % self.num_pairs]

        for p, i in enumerate(order):
            start = self.epoch * self.n + p
            lo, hi = (math.floor(start * self.ratio), math.floor((start + 1) * self.ratio)) \
                if self.num_pairs else (0, 0)
            yield i, tuple(pair(k) for k in range(lo, hi))


class Stage2Dataset(torch.utils.data.Dataset):
    """(image features, references, [(labeled features, caption, weight), ...]) per MixedSampler key."""

    def __init__(self, views: list, items: list[RewardItem], pairs: list):
        self.views, self.items, self.pairs = views, items, pairs

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        i, pair_ids = key
        it = self.items[i]
        return (self.views[it.view][it.row], it.refs,
                [(self.views[1][self.pairs[j].row], self.pairs[j].caption, self.pairs[j].weight)
                 for j in pair_ids])


class Stage2Collate:
    """-> {"feats", "refs", "ce" (the labeled pairs as a supervised batch; absent without pairs)}."""

    def __init__(self, pair_collate):
        self.pair_collate = pair_collate  # trainer.Collate

    def __call__(self, items):
        batch = {"feats": {k: torch.stack([f[k] for f, _, _ in items]) for k in items[0][0]},
                 "refs": [list(refs) for _, refs, _ in items]}
        pairs = [p for _, _, ps in items for p in ps]
        if pairs:
            batch["ce"] = self.pair_collate(pairs)
        return batch


# ------------------------------------------------------------------------------------------------
# losses


def sequence_targets(ids: torch.Tensor, bos: int, eos: int, pad: int):
    """Sampled captions [M,T] (no bos; ending in eos, padded after it) -> teacher-forcing inputs
    [M,T] (bos + ids[:-1]), targets [M,T] (the ids up to the first eos, IGNORE_INDEX after) and the
    input pad mask [M,T], as `caption_batch` gives them for written captions."""
    is_eos = (ids == eos).long()
    valid = (is_eos.cumsum(1) - is_eos) == 0  # no eos before this position
    inputs = torch.cat([torch.full_like(ids[:, :1], bos), ids[:, :-1]], 1).masked_fill(~valid, pad)
    return inputs, ids.masked_fill(~valid, IGNORE_INDEX), ~valid


def token_logp(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p of each target token [M,T] (0 where the target is IGNORE_INDEX)."""
    valid = targets != IGNORE_INDEX
    return logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid


def scst_baseline(rewards: torch.Tensor, n: int, kind: str, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """b per sample [B*n] (rows b*n .. b*n+n-1 are image b's samples): the greedy caption's reward
    `greedy` [B] of the image, or the mean reward of the image's other n-1 samples."""
    if kind == "greedy":
        return greedy.repeat_interleave(n)
    r = rewards.view(-1, n)
    return ((r.sum(1, keepdim=True) - r) / (n - 1)).view(-1)


def scst_loss(seq_logp: torch.Tensor, rewards: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """-(1/M) sum_i (r_i - b_i) log p(y_i): descending it raises the log-probability of the samples
    that beat their baseline and lowers the others'. seq_logp [M] = sum of the tokens' log p."""
    return -((rewards - baseline).detach() * seq_logp).mean()


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid positions [M,T] of KL(p || q) = sum_v p_v (log p_v - log q_v)."""
    kl = (logp.exp() * (logp - ref_logp)).sum(-1)
    return (kl * valid).sum() / valid.sum().clamp(min=1)


def straight_through(logp: torch.Tensor, noise: torch.Tensor, ids: torch.Tensor, tau: float) -> torch.Tensor:
    """Straight-through Gumbel-softmax [M,T,V]: forward value one_hot(ids) (the words that
    argmax(logp + noise) picked), gradient that of softmax((logp + noise) / tau)."""
    soft = torch.softmax((logp + noise) / tau, dim=-1)
    hard = F.one_hot(ids, logp.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


@torch.no_grad()
def gumbel_sample(net: Captioner, feats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-max sampling (a sample of softmax(logits)) keeping the noise: ids [M,T] (no bos,
    padded after eos, eos forced after max_len words) and the Gumbel noise [M,T,V] of every step."""
    tok, max_len = net.tokenizer, net.cfg.max_len
    memory, pad = net.encode(feats, train=False)
    M = feats["embeds"].shape[0]
    tokens = torch.full((M, 1), tok.bos_id, dtype=torch.long, device=feats["embeds"].device)
    finished = torch.zeros(M, dtype=torch.bool, device=tokens.device)
    noises = []
    for t in range(max_len + 1):
        logp = torch.log_softmax(net.decode(memory, pad, tokens)[:, -1].float(), -1)
        noise = -torch.empty_like(logp).exponential_().log()
        nxt = (logp + noise).argmax(-1) if t < max_len else torch.full_like(finished, tok.eos_id, dtype=torch.long)
        nxt = torch.where(finished, torch.full_like(nxt, tok.pad_id), nxt)
        tokens = torch.cat([tokens, nxt.unsqueeze(1)], 1)
        noises.append(noise)
        finished |= nxt == tok.eos_id
        if bool(finished.all()):
            break
    return tokens[:, 1:], torch.stack(noises, 1)


def _widen(x: torch.Tensor, length: int, value) -> torch.Tensor:
    extra = torch.full((x.shape[0], length - x.shape[1]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, extra], 1)


def joint_forward(model, feats: dict, inputs, pad, ce: dict | None, pad_id: int):
    """One call of the (accelerate-wrapped) model on the sampled captions and the labeled pairs
    together -> (logits of the samples [M,T,V], logits of the pairs or None). The decoder is causal,
    so the padding that brings both to one length changes no logit that is used."""
    if ce is None:
        return model(feats, inputs, pad), None
    M, T = inputs.shape
    Tc = ce["inputs"].shape[1]
    L = max(T, Tc)
    logits = model({k: torch.cat([feats[k], ce["feats"][k]]) for k in feats},
                   torch.cat([_widen(inputs, L, pad_id), _widen(ce["inputs"], L, pad_id)]),
                   torch.cat([_widen(pad, L, True), _widen(ce["input_pad"], L, True)]))
    return logits[:M, :T], logits[M:, :Tc]


class RewardStep:
    """One stage-2 batch -> loss, called by trainer.run_loop as `step(model, batch, cfg)`. Sampling
    runs without gradient on the unwrapped model; everything differentiated runs in one call of the
    wrapped model (so multi-process gradient sync sees it)."""

    def __init__(self, semi: SemiConfig, accelerator, reward: CaptionReward, reference: Captioner | None,
                 soft_text: SoftText | None = None):
        self.semi, self.accelerator, self.reward = semi, accelerator, reward
        self.reference, self.soft_text = reference, soft_text
        self.calls, self.stats = 0, {}

    def __call__(self, model, batch, cfg):
        semi, net = self.semi, self.accelerator.unwrap_model(model)
        model.eval()  # no dropout / feature noise: the sampling policy is the differentiated one
        tok, n = net.tokenizer, semi.num_samples
        feats, refs = batch["feats"], batch["refs"]
        rep = {k: v.repeat_interleave(n, 0) for k, v in feats.items()}
        if semi.optimizer == "gumbel":
            ids, noise = gumbel_sample(net, rep)
        else:
            ids = net.sample_ids(feats, n)
        inputs, targets, pad = sequence_targets(ids, tok.bos_id, tok.eos_id, tok.pad_id)
        ce = batch.get("ce")
        logits, ce_logits = joint_forward(model, rep, inputs, pad, ce, tok.pad_id)
        logp = torch.log_softmax(logits.float(), -1)
        valid = targets != IGNORE_INDEX
        stats = {}
        if semi.optimizer == "gumbel":
            y = straight_through(logp, noise, ids, semi.gumbel_tau)
            words = valid & (targets != tok.eos_id) & (targets != tok.pad_id) & (targets != tok.bos_id)
            t = self.soft_text(y, ids, words)
            cos = (F.normalize(rep["embeds"].float(), dim=-1).to(t.device) * t).sum(-1)
            loss = -semi.clip_weight * cos.mean()
            stats["reward"] = semi.clip_weight * cos.detach().mean()
        else:
            captions = [tok.decode(row) for row in ids.tolist()]
            r = self.reward(captions, rep["embeds"], [rs for rs in refs for _ in range(n)])
            greedy = None
            if semi.baseline == "greedy":
                g_ids, _ = net.generate_ids(feats, beam_size=1, length_penalty=0.0, no_repeat_ngram=0)
                greedy = self.reward([tok.decode(row) for row in g_ids.tolist()], feats["embeds"], refs)
            b = scst_baseline(r, n, semi.baseline, greedy)
            loss = scst_loss(token_logp(logp, targets).sum(1), r, b)
            stats.update(reward=r.mean(), advantage=(r - b).abs().mean())
        if self.reference is not None and semi.kl_weight:
            with torch.no_grad():
                ref_logp = torch.log_softmax(self.reference(rep, inputs, pad).float(), -1)
            kl = sequence_kl(logp, ref_logp, valid)
            loss = loss + semi.kl_weight * kl
            stats["kl"] = kl.detach()
        if ce_logits is not None and semi.ce_weight:
            xe = weighted_label_smoothed_ce(ce_logits, ce["targets"], ce["weights"], IGNORE_INDEX,
                                            smoothing=cfg.loss.smoothing, focal_gamma=cfg.loss.focal_gamma)
            loss = loss + semi.ce_weight * xe
            stats["ce"] = xe.detach()
        self._log(stats, cfg.run.log_every)
        return loss

    def _log(self, stats: dict, every: int) -> None:
        self.calls += 1
        for k, v in stats.items():
            self.stats.setdefault(k, []).append(float(v))
        if every and self.calls % every == 0 and self.accelerator.is_main_process:
            log.info("stage 2: " + ", ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in self.stats.items()))
            self.stats = {}


# ------------------------------------------------------------------------------------------------
# the stages


def _last_checkpoint(stage_dir: Path, resume: bool) -> Path | None:
    from .trainer import checkpoints

    found = checkpoints(stage_dir)
    return found[-1] if resume and found else None


def _enter_stage(accelerator, stage_dir: Path) -> None:
    """Create the stage's run directory; the stage logs to its own TensorBoard directory (its steps
    start at 1 again)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    accelerator.project_configuration.logging_dir = str(stage_dir / "logs")


def run_stage1(cfg, accelerator, backbone, out: Path, labeled: list[Record], extras: dict,
               resume: bool, last_stage: bool) -> Path:
    """Supervised training on the labeled subset into out/stage1; returns its model dir."""
    from . import trainer

    stage = out / "stage1"
    if (stage / "model" / "config.json").exists():
        log.info("stage 1 is complete (%s)", stage / "model")
        return stage / "model"
    captions = [c for r in labeled for c in r.captions]
    model = trainer.build_model(cfg, backbone, captions, out, accelerator, extras)
    _, view, pairs = trainer.paired_data(cfg, backbone, accelerator, model.image_fields(), labeled)
    model.extras.update(stage=1, train_images=sum(view.valid), train_pairs=len(pairs),
                        clip_weighted=cfg.loss.clip_weight)
    collate = trainer.Collate(model.tokenizer, cfg.model.max_len)
    loader = torch.utils.data.DataLoader(trainer.PairDataset(view, pairs), batch_size=cfg.optim.batch_size,
                                         sampler=trainer.EpochSampler(len(pairs), cfg.run.seed),
                                         collate_fn=collate, num_workers=cfg.run.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.run.seed))
    val_loader = None
    if cfg.data.val is not None:
        _, val_view, val_pairs = trainer.paired_data(
            cfg, backbone, accelerator, model.image_fields(),
            load_corpus(cfg.data.val, require_captions=True, require_images=True))
        val_loader = accelerator.prepare_data_loader(torch.utils.data.DataLoader(
            trainer.PairDataset(val_view, val_pairs), batch_size=cfg.optim.batch_size, collate_fn=collate,
            generator=torch.Generator().manual_seed(cfg.run.seed)))
    _enter_stage(accelerator, stage)
    return trainer.run_loop(cfg, accelerator, model, loader, trainer.supervised_step, stage,
                            _last_checkpoint(stage, resume), val_loader, end_training=last_stage)


def run_stage2(cfg, accelerator, backbone, out: Path, init: Path, labeled: list[Record], info: dict,
               resume: bool) -> Path:
    """Reward training from the model in `init` on data.unlabeled into out/stage2."""
    from accelerate.utils import set_seed

    from ..features.cache import extract_image_features
    from . import trainer

    semi = cfg.semi or SemiConfig()
    stage = out / "stage2"
    if semi.batch_size % accelerator.num_processes:
        raise ConfigError(f"semi.batch_size={semi.batch_size} is not divisible by the "
                          f"{accelerator.num_processes} processes")
    accelerator.free_memory()  # stage 1's model / optimizer must not enter stage 2's checkpoints
    set_seed(cfg.run.seed + 1)  # the same stream whether stage 1 ran in this process or not
    model = Captioner.from_pretrained(init, backbone=backbone).to(accelerator.device)
    reference = None
    if semi.kl_weight:
        reference = Captioner.from_pretrained(init, backbone=backbone).to(accelerator.device).requires_grad_(False)
    soft_text = None
    if semi.optimizer == "gumbel":
        soft_text = SoftText(backbone, model.tokenizer, semi.clip_prefix)
        log.info("gumbel: %.1f%% of the vocabulary is one text token each", 100 * soft_text.single_piece_share)

    fields = tuple(dict.fromkeys(("embeds",) + model.image_fields()))
    unlabeled = unlabeled_images(load_corpus(cfg.data.unlabeled, require_images=True))
    u_view = extract_image_features(unlabeled, backbone, cfg.run.cache_dir, fields=fields,
                                    accelerator=accelerator, progress=accelerator.is_main_process)
    items = [RewardItem(0, i) for i, ok in enumerate(u_view.valid) if ok]
    if not items:
        raise DataError(f"{cfg.data.unlabeled.path}: no readable unlabeled image")
    _, l_view, pairs = trainer.paired_data(cfg, backbone, accelerator, model.image_fields(), labeled)
    if semi.reward_on_labeled:
        items += [RewardItem(1, i, tuple(r.captions)) for i, r in enumerate(labeled) if l_view.valid[i]]
    cider = CiderD([r.captions for r in labeled]) if semi.cider_weight else None
    reward = CaptionReward(backbone, semi.clip_weight, semi.cider_weight, semi.clip_prefix, cider)
    step = RewardStep(semi, accelerator, reward, reference, soft_text)

    ratio = semi.ce_ratio if semi.ce_weight else 0.0
    loader = torch.utils.data.DataLoader(
        Stage2Dataset([u_view, l_view], items, pairs), batch_size=semi.batch_size,
        sampler=MixedSampler(len(items), len(pairs) if ratio else 0, ratio, cfg.run.seed),
        collate_fn=Stage2Collate(trainer.Collate(model.tokenizer, model.cfg.max_len)),
        num_workers=cfg.run.num_workers, generator=torch.Generator().manual_seed(cfg.run.seed))
    unlabeled_used = sum(1 for it in items if it.view == 0)
    model.extras.update(mode="semi", **info)
    model.extras.update(stage=2, unlabeled_corpus=cfg.data.unlabeled.path, unlabeled_images=unlabeled_used,
                        stage2={k: getattr(semi, k) for k in (
                            "optimizer", "num_samples", "baseline", "gumbel_tau", "clip_weight",
                            "cider_weight", "clip_prefix", "reward_on_labeled", "ce_ratio", "ce_weight",
                            "kl_weight")})
    log.info("stage 2: %d unlabeled images%s, %d labeled pairs for the fluency guard (%s)", unlabeled_used,
             f" + {len(items) - unlabeled_used} labeled" if semi.reward_on_labeled else "",
             len(pairs) if ratio else 0, semi.optimizer)
    stage_cfg = replace(cfg, optim=replace(cfg.optim, lr=semi.lr, warmup_steps=semi.warmup_steps,
                                           schedule="constant", batch_size=semi.batch_size,
                                           epochs=semi.epochs, max_steps=semi.max_steps))
    _enter_stage(accelerator, stage)
    return trainer.run_loop(stage_cfg, accelerator, model, loader, step, stage,
                            _last_checkpoint(stage, resume), end_training=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def train_semi(cfg, accelerator, backbone, out: Path, resume: bool = False) -> Path:
    """Mode semi (called by trainer.train after the run directory is prepared); returns out/model."""
    semi = (cfg.semi or SemiConfig()).validate()
    if cfg.model.text_only is not None or cfg.model.inputs == "pcm":
        raise ConfigError("mode semi trains an image captioner: remove model.text_only and use "
                          "model.inputs global, global_patches or global_local")
    if semi.optimizer == "gumbel" and cfg.model.decoder != "transformer":
        raise ConfigError("semi.optimizer=gumbel needs model.decoder=transformer (a word vocabulary)")
    if semi.stages != "stage1" and cfg.data.unlabeled is None:
        raise ConfigError("mode semi: stage 2 needs data.unlabeled (images; their captions are not read)")
    init = Path(semi.stage1_model) if semi.stage1_model else out / "stage1" / "model"
    ids = None
    if semi.stages == "stage2":
        if not (init / "config.json").exists():
            raise ConfigError(f"semi.stages=stage2 needs a stage-1 model: semi.stage1_model ({init} is not one)")
        ids = read_model_config(init).get("extras", {}).get("labeled_ids")
    pool = load_corpus(cfg.data.train, require_captions=True, require_images=True)
    labeled, info = labeled_subset(semi, pool, cfg.data.train.path, ids)
    saved = out / "labeled.json"
    if resume and saved.exists() and json.loads(saved.read_text())["labeled_ids"] != info["labeled_ids"]:
        raise PcmnetError(f"{saved}: the labeled subset of this run differs from the one now selected "
                          "(data.train changed?); start a new run.output_dir")
    if accelerator.is_main_process:
        _write_json(saved, info)
    log.info("labeled: %d of %d images (%d pairs)", info["labeled_images"], info["pool_images"],
             info["labeled_pairs"])

    final = init
    if semi.stages != "stage2":
        extras = {"mode": "semi", "train_corpus": cfg.data.train.path, **info}
        final = run_stage1(cfg, accelerator, backbone, out, labeled, extras, resume,
                           last_stage=semi.stages == "stage1")
    if semi.stages != "stage1":
        final = run_stage2(cfg, accelerator, backbone, out, init, labeled, info, resume)
    # the last run_loop ended the process group: the main process publishes the model alone
    published = out / "model"
    if accelerator.is_main_process:
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(final, tmp)
        shutil.rmtree(published, ignore_errors=True)
        tmp.replace(published)
    return published
