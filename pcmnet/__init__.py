"""pcmnet: image captioning with little or no paired data, built on CLIP.

Python API (each import is lazy, so `import pcmnet` is cheap):

    from pcmnet import load_backbone, Captioner, load_corpus, caption_images, evaluate_captions
"""
__version__ = "0.1.0"

_LAZY = {
    "BackboneConfig": "pcmnet.backbones.base",
    "load_backbone": "pcmnet.backbones.base",
    "CorpusConfig": "pcmnet.data.readers",
    "load_corpus": "pcmnet.data.readers",
    "Record": "pcmnet.data.records",
    "Captioner": "pcmnet.models.captioner",
    "caption_images": "pcmnet.caption",
    "evaluate_captions": "pcmnet.evaluate.metrics",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pcmnet' has no attribute {name!r}")


__all__ = list(_LAZY)
