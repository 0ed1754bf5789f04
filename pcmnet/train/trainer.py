"""`pcmnet train`: one training loop for every mode, run under `accelerate launch` unchanged.

Data flow (supervised / pcm):
    corpus records --(feature cache, frozen backbone)--> features per image
    (image, caption, weight) pairs --(DataLoader, epoch-seeded order)--> batches
    batch --(Captioner, teacher forcing)--> logits --(weighted label-smoothed CE)--> loss
text_only replaces "features per image" by the text features of each caption, so no image is
ever opened. semi (pcmnet.train.semi) adds a reward stage after this one.

Run directory:
    output_dir/config.yaml                 the resolved config
    output_dir/tokenizer/                  the vocabulary, fixed at the first start
    output_dir/checkpoints/step-XXXXXXXX/  accelerate state + trainer_state.json + model/
    output_dir/model/                      the final model (`pcmnet caption --model ...`)
    output_dir/train_log.jsonl, logs/      metrics (console, jsonl, TensorBoard)
A checkpoint directory only gets its final name once every file is written, so a kill at any
moment leaves the last complete checkpoint to resume from (`--resume`); resuming restores model,
optimizer, scheduler, RNG states and the position inside the epoch, so the run continues exactly.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..backbones.base import load_backbone
from ..config import ConfigError, to_dict
from ..data.readers import load_corpus
from ..data.records import iter_captions
from ..errors import PcmnetError
from ..models.captioner import IGNORE_INDEX, Captioner, caption_batch
from ..models.vocab import Vocab
from .config import MODES, TrainConfig
from .losses import clip_pair_weights, weighted_label_smoothed_ce

log = logging.getLogger("pcmnet")


# ------------------------------------------------------------------------------------------------
# data


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of range(n) that depends only on (seed, epoch): the same on every process and
    after a resume, so `skip_first_batches` lands on exactly the batches that were not yet seen."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


@dataclass
class Pair:
    row: int  # row of the feature view
    caption: str
    weight: float = 1.0


class PairDataset(torch.utils.data.Dataset):
    """(features of one image or caption, target caption, pair weight)."""

    def __init__(self, view, pairs: list[Pair]):
        self.view, self.pairs = view, pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        p = self.pairs[i]
        return self.view[p.row], p.caption, p.weight


class Collate:
    """Stack features, tokenize captions (targets padded with IGNORE_INDEX), stack weights."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, items):
        feats = {k: torch.stack([f[k] for f, _, _ in items]) for k in items[0][0]}
        inp, tgt, pad = caption_batch(self.tokenizer, [c for _, c, _ in items], self.max_len)
        weights = torch.tensor([w for _, _, w in items], dtype=torch.float32)
        return {"feats": feats, "inputs": inp, "targets": tgt, "input_pad": pad, "weights": weights}


def paired_data(cfg: TrainConfig, backbone, accelerator, fields: tuple[str, ...], records):
    """Image features (`fields`) of the corpus and one Pair per (image, caption); with
    loss.clip_weight each pair is weighted by its CLIP score (`pair_clip_scores`)."""
    from ..features.cache import extract_image_features

    fields = tuple(dict.fromkeys(("embeds",) + tuple(fields)))  # the CLIP score needs g
    view = extract_image_features(records, backbone, cfg.run.cache_dir, fields=fields,
                                  accelerator=accelerator, progress=accelerator.is_main_process)
    rows = [(i, cid, cap) for i, r in enumerate(records) if view.valid[i]
            for cid, cap in zip(r.caption_ids, r.captions)]
    if not rows:
        raise PcmnetError(f"{cfg.data.train.path}: no readable image with a caption")
    weights = [1.0] * len(rows)
    if cfg.loss.clip_weight:
        scores = pair_clip_scores(cfg, backbone, accelerator, view, rows, records)
        weights = clip_pair_weights(scores, cfg.loss.clip_alpha).tolist()
    return records, view, [Pair(i, cap, w) for (i, _, cap), w in zip(rows, weights)]


def pair_clip_scores(cfg: TrainConfig, backbone, accelerator, view, rows, records=None) -> torch.Tensor:
    """s = max(cos(g(x), t(c)), 0) of every (image row, caption id, caption), METHODS.md 5, computed
    once per pair. A synthetic pair already scored by this very backbone (`pcmnet synth` / `synth
    score` record meta clip_score with clip_backbone == its fingerprint) keeps that stored score;
    the others are scored from the feature cache (g of each image and t of each caption are computed
    once and cached), so no score costs a backbone call again across epochs, runs or resumes."""
    from ..data.records import CaptionItem
    from ..features.cache import extract_text_features

    fingerprint = backbone.fingerprint()
    scores = torch.full((len(rows),), float("nan"))
    for j, (i, _, _) in enumerate(rows):
        meta = records[i].meta if records is not None else {}
        # a stored score belongs to the record's one (synthesized) caption, not to merged extras
        if meta.get("clip_score") is not None and meta.get("clip_backbone") == fingerprint \
                and len(records[i].captions) == 1:
            scores[j] = float(meta["clip_score"])
    todo = scores.isnan().nonzero().flatten().tolist()
    log.info("CLIP weights: %d pairs keep their synthesis score by %s, %d are scored from the feature cache",
             len(rows) - len(todo), fingerprint, len(todo))
    if todo:
        items = [CaptionItem(caption_id=rows[j][1], caption=rows[j][2], image_id=str(rows[j][0])) for j in todo]
        text = extract_text_features(items, backbone, cfg.run.cache_dir, fields=("embeds",),
                                     accelerator=accelerator, progress=accelerator.is_main_process)
        g = torch.nn.functional.normalize(view.batch([rows[j][0] for j in todo])["embeds"], dim=-1)
        t = torch.nn.functional.normalize(text.stack("embeds"), dim=-1)
        scores[todo] = (g * t).sum(-1).clamp(min=0)
    return scores


def text_only_data(cfg: TrainConfig, backbone, accelerator, records):
    """Text features of every caption (no image is read) and one Pair per caption: the caption is
    both the input (through its embedding) and the target."""
    from ..features.cache import extract_text_features

    items = list(iter_captions(records))
    fields = ("embeds", "tokens", "mask") if cfg.model.text_only.local_features else ("embeds",)
    view = extract_text_features(items, backbone, cfg.run.cache_dir, fields=fields,
                                 max_tokens=cfg.model.text_only.max_local, accelerator=accelerator,
                                 progress=accelerator.is_main_process)
    return view, [Pair(i, it.caption) for i, it in enumerate(items)]


def text_only_parts(cfg: TrainConfig, backbone, accelerator, view, corpus: str) -> dict:
    """The resolved noise level (a number, or measured on data.paired for "auto") and the projection
    memory (cfg.memory_path, or the cached embeddings of the training captions)."""
    from ..features.cache import extract_image_features
    from ..models.projection import ProjectionMemory
    from ..models.textonly import resolve_noise_variance

    to = cfg.model.text_only.validate("model.text_only")
    paired, image_embeds = None, None
    if to.noise_variance == "auto":
        if cfg.data.paired is None:
            raise ConfigError("model.text_only.noise_variance=auto measures the image/caption gap on "
                              "data.paired (image-caption pairs); set data.paired or a number")
        paired = load_corpus(cfg.data.paired, require_captions=True, require_images=True)
        pv = extract_image_features(paired[: to.noise_auto_max_images], backbone, cfg.run.cache_dir,
                                    fields=("embeds",), accelerator=accelerator,
                                    progress=accelerator.is_main_process)
        image_embeds = {r.image_id: pv[i]["embeds"] for i, r in enumerate(paired[: to.noise_auto_max_images])
                        if pv.valid[i]}
    variance = resolve_noise_variance(to, paired, backbone, image_embeds)
    memory = None
    if to.uses_memory:
        if to.memory_path:
            from ..models.captioner import load_memory

            memory = load_memory(to, Path(to.memory_path), backbone.fingerprint())
        else:
            memory = ProjectionMemory(view.stack("embeds"), to.projection_temperature, to.projection_top_k,
                                      to.memory_budget_mb, to.memory_dtype,
                                      meta={"corpus": corpus, "backbone": backbone.fingerprint(),
                                            "num_captions": len(view)})
        memory.to(backbone.device)
    log.info("text-only: noise variance %.5g%s, projection memory %s", variance,
             " (measured on data.paired)" if to.noise_variance == "auto" else "",
             f"{memory.size} captions" if memory is not None else "off")
    return {"noise_variance": variance, "memory": memory}


def concept_bank(cfg: TrainConfig, backbone, captions: list[str], out: Path, accelerator):
    """PCM's concept vocabulary: model.concepts (from `pcmnet concepts`), or the concepts_k most
    frequent nouns of the training captions, built once at the first start into out/concepts/."""
    from ..models.concepts import concept_meta, embed_concepts, frequent_nouns, load_concepts, save_concepts

    path = Path(cfg.model.concepts) if cfg.model.concepts else out / "concepts"
    if not cfg.model.concepts and not (path / "concepts.json").exists():
        if accelerator.is_main_process:
            words = frequent_nouns(captions, k=cfg.model.concepts_k)
            save_concepts(path, words, embed_concepts(words, backbone),
                          concept_meta(backbone, corpus=cfg.data.train.path, k=cfg.model.concepts_k))
        accelerator.wait_for_everyone()
    words, bank, _ = load_concepts(path, expect_backbone=backbone)
    return words, bank


# ------------------------------------------------------------------------------------------------
# state, schedule, checkpoints


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch: int = 0  # batches done in the current epoch
    stage: str = "main"
    history: list = field(default_factory=list)


def lr_factor(step: int, warmup: int, schedule: str, total: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (1-based in effect)."""
    s = step + 1
    if schedule == "noam":
        return min(s / max(warmup, 1), math.sqrt(max(warmup, 1) / s))
    warm = min(1.0, s / max(warmup, 1))
    if schedule == "constant":
        return warm
    if schedule == "cosine":
        if s <= warmup:
            return warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup))))
    raise ConfigError(f"unknown optim.schedule '{schedule}' (noam, constant or cosine)")


def checkpoints(out: Path) -> list[Path]:
    d = out / "checkpoints"
    return sorted(p for p in d.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) if d.exists() else []


def save_checkpoint(accelerator, out: Path, state: TrainState, model, keep: int) -> Path:
    final = out / "checkpoints" / f"step-{state.step:08d}"
    if (final / "trainer_state.json").exists() and \
            json.loads((final / "trainer_state.json").read_text()) == state.__dict__:
        return final  # this exact state is saved already (e.g. save_every hit the epoch end)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp / "model")
        (tmp / "trainer_state.json").write_text(json.dumps(state.__dict__))
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        for old in checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------
# the loop


def _prepare_run_dir(cfg: TrainConfig, resume: bool, accelerator) -> tuple[Path, Path | None]:
    out = Path(cfg.run.output_dir)
    existing = checkpoints(out)
    # stage runs of mode semi live in out/stage*/ (each a run directory of its own)
    started = bool(existing) or any(out.glob("*/checkpoints/step-*"))
    if started and not resume:
        raise PcmnetError(f"{out} already holds checkpoints; pass --resume to continue that run, "
                          "or choose another run.output_dir")
    saved = out / "config.yaml"
    if resume and saved.exists():
        before = yaml.safe_load(saved.read_text())
        now = to_dict(cfg)
        diff = [k for k in now if k != "run" and before.get(k) != now[k]]
        if before.get("run", {}).get("seed") != now["run"]["seed"]:  # the batch order depends on it
            diff.append("run.seed")
        if diff:
            raise PcmnetError(f"{saved}: --resume with a different config (sections: {', '.join(diff)}); "
                              "resume with the same settings or start a new run.output_dir")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not started:
            # nothing to resume: what a run killed before its first checkpoint derived from its
            # data (vocabulary, concepts, labeled subset) may belong to another config; rebuild it
            for name in ("tokenizer", "concepts"):
                shutil.rmtree(out / name, ignore_errors=True)
            (out / "labeled.json").unlink(missing_ok=True)
        saved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    accelerator.wait_for_everyone()
    return out, (existing[-1] if resume and existing else None)


def _tokenizer_for(cfg: TrainConfig, out: Path, captions: list[str], accelerator):
    """The word vocabulary is built once, at the first start, and reused on resume."""
    if cfg.model.decoder != "transformer":
        return None
    path = out / "tokenizer" / "vocab.json"
    if accelerator.is_main_process and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        Vocab.build(captions, cfg.model.vocab_min_count, cfg.model.vocab_max_size).save(tmp)
        tmp.replace(path)
    # every process waits here: a rank that already sees the file must not skip the barrier
    accelerator.wait_for_everyone()
    return Vocab.load(path)


def build_model(cfg: TrainConfig, backbone, captions: list[str], out: Path, accelerator, extras=None,
                **parts):
    """The captioner to train; parts: concepts (PCM), memory + noise_variance (text-only)."""
    vocab = _tokenizer_for(cfg, out, captions, accelerator)
    if vocab is None:
        return Captioner.build(cfg.model, backbone, extras=extras, **parts)
    from ..models.captioner import BackboneInfo

    return Captioner(cfg.model, BackboneInfo.of(backbone), vocab, extras=extras, **parts)


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    from ..distributed import BARRIER_TIMEOUT, needs_cpu_backend

    out = Path(cfg.run.output_dir)
    return Accelerator(
        cpu=needs_cpu_backend(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=BARRIER_TIMEOUT)],
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with="tensorboard" if cfg.run.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def train(cfg: TrainConfig, resume: bool = False, backbone=None) -> Path:
    """Train a captioner as `cfg` says; returns the final model directory. `backbone` overrides
    `cfg.backbone` with an already built one (Python API, tests)."""
    from accelerate.utils import set_seed

    if cfg.mode not in MODES:
        raise ConfigError(f"unknown mode '{cfg.mode}' (one of: {', '.join(MODES)})")
    if cfg.mode == "pcm" and cfg.model.inputs != "pcm":  # before loading a backbone of gigabytes
        raise ConfigError("mode pcm needs model.inputs: pcm (turn PCM off with model.pcm.enabled: false)")
    cfg.optim.validate()
    cfg.run.validate()
    accelerator = make_accelerator(cfg)
    if cfg.optim.batch_size % accelerator.num_processes:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is not divisible by the "
                          f"{accelerator.num_processes} processes")
    out, last = _prepare_run_dir(cfg, resume, accelerator)
    set_seed(cfg.run.seed)
    if backbone is None:
        backbone = load_backbone(cfg.backbone, device=str(accelerator.device))

    extras = {"mode": cfg.mode, "train_corpus": cfg.data.train.path}
    if cfg.mode == "semi":
        from .semi import train_semi

        return train_semi(cfg, accelerator, backbone, out, resume)
    if cfg.mode == "text_only":
        if cfg.model.text_only is None:
            raise ConfigError("mode text_only needs a model.text_only section (noise / projection settings)")
        if cfg.data.val is not None:
            raise ConfigError("data.val is not used in text_only mode (there are no images in training); "
                              "evaluate the saved model with `pcmnet evaluate`")
        records = load_corpus(cfg.data.train, require_captions=True)
        view, pairs = text_only_data(cfg, backbone, accelerator, records)
        parts = text_only_parts(cfg, backbone, accelerator, view, cfg.data.train.path)
        extras.update(train_captions=len(pairs), noise_variance=parts["noise_variance"])
        model = build_model(cfg, backbone, [p.caption for p in pairs], out, accelerator, extras, **parts)
        step_fn = supervised_step
    elif cfg.mode in ("supervised", "pcm"):
        if cfg.model.text_only is not None:
            raise ConfigError(f"model.text_only is set but mode is '{cfg.mode}' (use mode: text_only)")
        records = load_corpus(cfg.data.train, require_captions=True, require_images=True)
        captions = [c for r in records for c in r.captions]
        parts = {}
        if cfg.model.inputs == "pcm" and cfg.model.pcm.enabled:
            words, parts["concepts"] = concept_bank(cfg, backbone, captions, out, accelerator)
            extras["concept_words"] = words
        model = build_model(cfg, backbone, captions, out, accelerator, extras, **parts)
        records, view, pairs = paired_data(cfg, backbone, accelerator, model.image_fields(), records)
        model.extras.update(train_images=sum(view.valid), train_pairs=len(pairs),
                            clip_weighted=cfg.loss.clip_weight)
        step_fn = supervised_step
    else:
        raise ConfigError(f"mode '{cfg.mode}' is not available in this build")

    collate = Collate(model.tokenizer, cfg.model.max_len)
    # Each DataLoader iterator draws its worker base seed from `generator`; without its own
    # generator that draw comes from the global torch RNG, and the iterator a resumed run creates
    # mid-epoch would shift the dropout / noise stream away from the uninterrupted run's.
    loader = torch.utils.data.DataLoader(PairDataset(view, pairs), batch_size=cfg.optim.batch_size,
                                         sampler=EpochSampler(len(pairs), cfg.run.seed), collate_fn=collate,
                                         num_workers=cfg.run.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.run.seed))
    val_loader = None
    if cfg.data.val is not None:
        _, val_view, val_pairs = paired_data(cfg, backbone, accelerator, model.image_fields(),
                                             load_corpus(cfg.data.val, require_captions=True, require_images=True))
        val_loader = accelerator.prepare_data_loader(torch.utils.data.DataLoader(
            PairDataset(val_view, val_pairs), batch_size=cfg.optim.batch_size, collate_fn=collate,
            generator=torch.Generator().manual_seed(cfg.run.seed)))
    return run_loop(cfg, accelerator, model, loader, step_fn, out, last, val_loader)


def supervised_step(model, batch, cfg: TrainConfig):
    """Teacher-forced weighted label-smoothed cross entropy on one batch (plus the auxiliary losses
    of text-only models: the noise network's regularizer, the projection network's alignment)."""
    logits, aux = model(batch["feats"], batch["inputs"], batch["input_pad"], return_aux=True)
    loss = weighted_label_smoothed_ce(logits, batch["targets"], batch["weights"], IGNORE_INDEX,
                                      smoothing=cfg.loss.smoothing, focal_gamma=cfg.loss.focal_gamma)
    return loss + sum(aux.values()) if aux else loss


def run_loop(cfg: TrainConfig, accelerator, model, loader, step_fn, out: Path, last: Path | None,
             val_loader=None, end_training: bool = True) -> Path:
    """end_training=False: another run_loop follows on this accelerator (the stages of mode semi),
    so only the trackers are closed and the process group stays up."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    steps_per_epoch = math.ceil(len(loader.dataset) / cfg.optim.batch_size)
    total = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps is not None:
        total = min(total, cfg.optim.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.optim.warmup_steps, cfg.optim.schedule, total))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    state = TrainState()
    if last is not None:
        accelerator.load_state(str(last))
        state = TrainState(**json.loads((last / "trainer_state.json").read_text()))
        log.info("resumed from %s (step %d, epoch %d, batch %d)", last, state.step, state.epoch, state.batch)
    if cfg.run.tensorboard:
        flat = {k: v for k, v in _flatten(to_dict(cfg)).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("pcmnet", config=flat)

    log_path = out / "train_log.jsonl"
    if accelerator.is_main_process:  # a fresh start (step 0) also drops a never-checkpointed run's log
        _truncate_log(log_path, state.step)
    t0, seen = time.time(), 0
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=state.step, desc=f"train ({cfg.mode})", unit="step",
               disable=not accelerator.is_main_process)
    done = state.step >= total
    finished_before = done and (out / "model" / "config.json").is_file()  # --resume of a finished run
    while not done and state.epoch < cfg.optim.epochs:
        loader.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(loader, state.batch) if state.batch else loader
        model.train()
        for batch in batches:
            loss = step_fn(model, batch, cfg)
            accelerator.backward(loss)
            if cfg.optim.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the lr this step used (logged with it)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batch += 1
            seen += 1
            bar.update(1)
            if (cfg.run.log_every and state.step % cfg.run.log_every == 0) or state.step == total:
                mean_loss = accelerator.reduce(loss.detach(), "mean").item()
                rec = {"step": state.step, "epoch": state.epoch, "loss": round(mean_loss, 5),
                       "lr": lr, "steps_per_s": round(seen / (time.time() - t0), 3)}
                bar.set_postfix(loss=f"{mean_loss:.3f}")
                accelerator.log({"train/loss": mean_loss, "train/lr": rec["lr"]}, step=state.step)
                if accelerator.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
            if state.step >= total:
                done = True
                break
            if val_loader is not None and cfg.run.eval_every and state.step % cfg.run.eval_every == 0:
                _validate(cfg, accelerator, model, val_loader, step_fn, state)
            if cfg.run.save_every and state.step % cfg.run.save_every == 0 and state.batch < len(loader):
                save_checkpoint(accelerator, out, state, model, cfg.run.keep_checkpoints)
        if not done:
            state.epoch += 1
            state.batch = 0
            if val_loader is not None and not cfg.run.eval_every:
                _validate(cfg, accelerator, model, val_loader, step_fn, state)
            save_checkpoint(accelerator, out, state, model, cfg.run.keep_checkpoints)
    bar.close()
    final = out / "model"
    if finished_before:
        log.info("already finished (%d steps); the model is %s", state.step, final)
    elif val_loader is not None:
        _validate(cfg, accelerator, model, val_loader, step_fn, state)
    if not finished_before:
        save_checkpoint(accelerator, out, state, model, cfg.run.keep_checkpoints)
    if accelerator.is_main_process and not finished_before:
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        log.info("trained %d steps; model saved to %s", state.step, final)
    accelerator.wait_for_everyone()
    if end_training:
        accelerator.end_training()
    else:
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers.clear()
    return final


@torch.no_grad()
def _validate(cfg, accelerator, model, val_loader, step_fn, state: TrainState) -> float:
    model.eval()
    losses = [accelerator.reduce(step_fn(model, b, cfg).detach(), "mean").item() for b in val_loader]
    model.train()
    val = sum(losses) / max(len(losses), 1)
    accelerator.log({"val/loss": val}, step=state.step)
    state.history.append({"step": state.step, "val_loss": val})
    if accelerator.is_main_process:
        log.info("step %d: val loss %.4f", state.step, val)
    return val


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after the starting checkpoint (written before a kill, and about
    to be redone; all of them when starting at step 0) and a last line cut by the kill, so the log
    holds each step once."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
