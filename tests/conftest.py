import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"


@pytest.fixture
def coco_mini():
    """The shared coco-mini benchmark; tests that need it skip (saying so) where it is absent."""
    if not (SHARED / "captions.json").exists():
        pytest.skip(f"needs the shared coco-mini data at {SHARED} (CI has it; users do not)")
    return SHARED


@pytest.fixture
def toy_backbone():
    from toys import ToyBackbone

    return ToyBackbone().freeze()
