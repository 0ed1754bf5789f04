"""Feature cache: backbone features extracted once into sharded safetensors files (see cache.py).

The names are imported lazily so that `pcmnet --help` (which imports `pcmnet.features.cli`) does not
pay for torch.
"""

__all__ = ["FeatureStore", "FeatureView", "cache_dir_for", "extract_image_features",
           "extract_text_features"]


def __getattr__(name: str):
    if name in __all__:
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'pcmnet.features' has no attribute '{name}'")
