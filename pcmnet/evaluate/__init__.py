"""Evaluation of generated captions (METHODS.md sections 7 and 8); see docs/evaluation.md.

    from pcmnet.evaluate import evaluate_captions, caption_metrics, clip_scores, distinctiveness,
                                fluency_stats, perplexity, load_lm, read_predictions

Imports are lazy so that `pcmnet --help` does not load torch.
"""
_LAZY = {
    "evaluate_captions": "pcmnet.evaluate.metrics",
    "caption_metrics": "pcmnet.evaluate.metrics",
    "clip_scores": "pcmnet.evaluate.clipscore",
    "clip_s": "pcmnet.evaluate.clipscore",
    "distinctiveness": "pcmnet.evaluate.clipscore",
    "retrieval_recall": "pcmnet.evaluate.clipscore",
    "caption_stats": "pcmnet.evaluate.clipscore",
    "fluency_stats": "pcmnet.evaluate.fluency",
    "perplexity": "pcmnet.evaluate.fluency",
    "load_lm": "pcmnet.evaluate.fluency",
    "read_predictions": "pcmnet.evaluate.predictions",
    "match_predictions": "pcmnet.evaluate.predictions",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pcmnet.evaluate' has no attribute {name!r}")


__all__ = list(_LAZY)
