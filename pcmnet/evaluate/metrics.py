"""Caption metrics through pycocoevalcap, and `evaluate_captions`, which runs every metric of
METHODS.md section 8 (plus the fluency report of section 7) on one set of captions.

Scorers (pycocoevalcap 1.2, called one by one on PTB-tokenized captions exactly as
`COCOEvalCap.evaluate()` calls them; that method is not used because it builds SPICE up front):

    BLEU-1..4  Bleu(4), corpus-level, "closest" reference length
    METEOR     Meteor() (meteor-1.5.jar, `-l en -norm`), corpus-level
    ROUGE-L    Rouge(), beta 1.2, mean over images
    CIDEr-D    Cider(): pycocoevalcap's `Cider` *is* CIDEr-D (Gaussian length penalty sigma=6,
               clipped n-gram counts, n=1..4, x10); document frequencies come from the references
               of the evaluated images, so CIDEr-D depends on which images are evaluated
    SPICE      Spice() only when its Stanford CoreNLP 3.6.0 jars are installed; else None + reason

Values are returned raw (BLEU/METEOR/ROUGE-L/SPICE in [0,1], CIDEr-D in [0,10]); the CLI table
prints them x100, the convention of papers' tables.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..errors import MissingWeightsError, PcmnetError

log = logging.getLogger("pcmnet")

NGRAM_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
JAVA_HINT = "install a Java runtime, e.g. `apt-get install default-jre-headless`"


def require_java() -> None:
    """METEOR and the PTB tokenizer (needed by every n-gram metric) are Java programs."""
    if shutil.which("java") is None:
        raise PcmnetError(f"java not found: the PTB tokenizer and METEOR need it ({JAVA_HINT})")


def spice_unavailable_reason() -> str | None:
    """None if SPICE can run here, else why not (never downloads the jars)."""
    import pycocoevalcap.spice as spice_pkg

    lib = Path(spice_pkg.__file__).parent / "lib"
    missing = [j for j in SPICE_JARS if not (lib / j).exists()]
    if missing:
        return (f"Stanford CoreNLP jars missing ({', '.join(missing)} in {lib}); run "
                f"`python -m pycocoevalcap.spice.get_stanford_models` where there is internet")
    return None


def _sort_key(k: str):
    return (0, int(k), "") if k.isdigit() else (1, 0, k)


_METEOR = None


def _meteor():
    """One METEOR JVM per process, reused: loading its paraphrase table takes 10-40 s."""
    global _METEOR
    if _METEOR is None:
        import atexit

        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
        atexit.register(_close_meteor)
    return _METEOR


def _close_meteor():
    global _METEOR
    if _METEOR is not None:
        _METEOR.meteor_p.stdin.close()
        _METEOR.meteor_p.kill()
        _METEOR.meteor_p.wait()
        _METEOR = None


ALL_SCORERS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")


def caption_metrics(predictions: dict, references: dict,
                    metrics: tuple[str, ...] = ALL_SCORERS) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE of one caption per image.

    predictions: {image_id: caption}; references: {image_id: [caption, ...]}. Ids may be str or
    int (compared as strings); every prediction needs at least one reference, extra references are
    ignored. `metrics` picks scorers among ALL_SCORERS ("BLEU" gives BLEU-1..4). Returns
    {"BLEU-1": float, ..., "CIDEr-D": float, "SPICE": float | None, "skipped": {"SPICE": reason}}
    with raw (not x100) values, for the requested scorers.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    unknown = set(metrics) - set(ALL_SCORERS)
    if unknown:
        raise ValueError(f"unknown caption metrics {sorted(unknown)} (choose from {ALL_SCORERS})")
    preds = {str(k): v for k, v in predictions.items()}
    refs = {str(k): v for k, v in references.items()}
    if len(preds) != len(predictions) or len(refs) != len(references):
        raise PcmnetError("image ids collide once converted to strings (e.g. 1 and '1')")
    if not preds:
        raise PcmnetError("no predictions to evaluate")
    missing = [k for k in preds if not refs.get(k)]
    if missing:
        raise PcmnetError(f"{len(missing)} predictions have no reference captions (first: {missing[0]})")
    require_java()

    ids = sorted(preds, key=_sort_key)  # one canonical order: results never depend on input order
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs[k]] for k in ids})
    res = tokenizer.tokenize({k: [{"caption": preds[k]}] for k in ids})

    out: dict = {"skipped": {}}
    if "BLEU" in metrics:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for n, b in enumerate(bleu, 1):
            out[f"BLEU-{n}"] = float(b)
    if "METEOR" in metrics:
        out["METEOR"] = float(_meteor().compute_score(gts, res)[0])
    if "ROUGE-L" in metrics:
        out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr-D" in metrics:
        out["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    if "SPICE" in metrics:
        out["SPICE"] = None
        reason = spice_unavailable_reason()
        if reason is None:
            import subprocess

            from pycocoevalcap.spice.spice import Spice

            try:
                out["SPICE"] = float(Spice().compute_score(gts, res)[0])
            except (subprocess.CalledProcessError, OSError) as e:
                reason = f"SPICE failed ({type(e).__name__}: {e})"
        if reason is not None:
            out["skipped"]["SPICE"] = reason
    return out


def evaluate_captions(predictions: dict, references: dict, images: dict | None = None,
                      backbone=None, lm=None, *, image_embeds: dict | None = None,
                      metrics: tuple[str, ...] = ALL_SCORERS,
                      clip_prefix: str = "A photo depicts", ref_weight: float = 2.5,
                      max_length: int | None = None, batch_size: int = 32) -> dict:
    """Every evaluation number for one caption per image (METHODS.md sections 7 and 8).

    predictions: {image_id: caption}; references: {image_id: [captions]} (every prediction needs
    references; ids may be str or int). images: {image_id: path | PIL image} for the CLIP metrics,
    or image_embeds: {image_id: [D] tensor} when already computed. backbone: a loaded `Backbone`
    (None skips CLIP-S, RefCLIP-S and retrieval). lm: None (skip perplexity), "auto" (skipped with
    the reason when no LM is installed), a path / hub id, or a loaded `fluency.LanguageModel`.

    Returns {"num_images", "metrics": {name: raw value or None}, "skipped": {name: reason},
    "clip": {backbone spec + fingerprint, images scored / skipped, prefix, ...} (when scored),
    "lm": {...} (when perplexity was computed)}.
    """
    import torch

    from .clipscore import (backbone_info, caption_stats, clip_scores, embed_captions, embed_images,
                            retrieval_recall)
    from .fluency import fluency_stats, load_lm, perplexity

    preds = {str(k): v for k, v in predictions.items()}
    refs = {str(k): v for k, v in references.items()}
    ids = sorted(preds, key=_sort_key)
    captions = [preds[k] for k in ids]
    result: dict = {"num_images": len(ids), "metrics": {}, "skipped": {}}
    scores, skipped = result["metrics"], result["skipped"]

    cm = caption_metrics(preds, refs, metrics=metrics)
    skipped.update(cm.pop("skipped"))
    scores.update(cm)

    # CLIP-S, RefCLIP-S, retrieval: one pass over the images, shared by all three
    clip_names = ("CLIP-S", "RefCLIP-S", "R@1", "R@5", "R@10", "median_rank")
    if backbone is None or (images is None and image_embeds is None):
        reason = "no backbone given" if backbone is None else "no images given"
        scores.update(dict.fromkeys(clip_names))
        skipped.update(dict.fromkeys(clip_names, reason))
    else:
        if image_embeds is not None:
            emb = {str(k): v for k, v in image_embeds.items()}
            kept = [i for i, k in enumerate(ids) if emb.get(k) is not None]
            g = torch.stack([torch.as_tensor(emb[ids[i]]).float() for i in kept]) if kept else None
            errors = [f"image {k}: no embedding given" for k in ids if emb.get(k) is None]
        else:
            imgs = {str(k): v for k, v in images.items()}
            g, kept, errors = embed_images(backbone, [imgs.get(k) for k in ids], batch_size, names=ids)
        result["clip"] = {"backbone": backbone_info(backbone), "images_scored": len(kept),
                          "images_skipped": len(errors), "skipped_images": errors[:20],
                          "prefix": clip_prefix, "ref_weight": ref_weight}
        if not kept:
            scores.update(dict.fromkeys(clip_names))
            skipped.update(dict.fromkeys(clip_names, "no image could be read"))
        else:
            t = embed_captions(backbone, [captions[i] for i in kept], clip_prefix)
            clip = clip_scores([captions[i] for i in kept], backbone,
                               references=[refs[ids[i]] for i in kept], image_embeds=g,
                               caption_embeds=t, prefix=clip_prefix, ref_weight=ref_weight)
            scores["CLIP-S"], scores["RefCLIP-S"] = clip["CLIP-S"], clip["RefCLIP-S"]
            scores.update(retrieval_recall(g, t))

    scores.update(caption_stats(captions))
    scores.update(fluency_stats(captions, max_length=max_length))
    if max_length is None:
        skipped["truncated_share"] = "no max_length given"

    scores["perplexity"] = None
    if lm is None:
        skipped["perplexity"] = "no language model given"
    else:
        try:
            model = load_lm(lm) if isinstance(lm, str) else lm
        except MissingWeightsError as e:
            if lm != "auto":
                raise
            model, skipped["perplexity"] = None, str(e)
        if model is not None:
            ppl = perplexity(captions, model, batch_size=batch_size)
            scores["perplexity"] = ppl["perplexity"]
            result["lm"] = {"name": model.name, "num_tokens": ppl["num_tokens"],
                            "mean_nll": ppl["mean_nll"], "bos_prepended": ppl["bos_prepended"]}
            if ppl["perplexity"] is None:
                skipped["perplexity"] = "no caption has a token to score"
    return result
