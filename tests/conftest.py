import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests use tiny models: one intra-op thread is as fast, and it keeps the subprocesses some tests
# start (accelerate launches, kill/resume runs) from oversubscribing a 2-core CI machine, where
# spinning OpenMP threads made small steps up to 50x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread in every test, as in the OMP_NUM_THREADS=1 subprocesses some tests
    start, so that results compared across processes match bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
