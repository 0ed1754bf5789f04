"""Processes started by `accelerate launch` (one machine or many): the one place that sets them up.

Every long job (features, train, caption, synth) runs unchanged under
`accelerate launch [--multi_gpu] --num_processes N [--num_machines M ...] -m pcmnet <job> ...`.
On machines without CUDA, accelerate only joins the launched processes into one gloo group
(DistributedType.MULTI_CPU) when asked for `cpu=True`; without it every process would believe it is
alone and redo all the work. Barriers wait up to 48 h, because one rank may wait for another's
long stretch of work (feature extraction, image generation) before the next step.
"""
from __future__ import annotations

import os
from datetime import timedelta

BARRIER_TIMEOUT = timedelta(hours=48)


def needs_cpu_backend() -> bool:
    """Launched as several processes on a machine without CUDA."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state():
    """accelerate's `PartialState` for this process (rank, world size, device, barriers)."""
    from accelerate import PartialState

    return PartialState(cpu=needs_cpu_backend(), timeout=BARRIER_TIMEOUT)
