"""Errors that mean bad input or a missing file, shown to users as one line (see pcmnet.cli)."""


class PcmnetError(RuntimeError):
    """Base class for one-line user-facing errors (wrong checkpoint, missing weights, ...)."""


class MissingWeightsError(PcmnetError):
    """Model weights that are not on this machine (and will not be downloaded here)."""


class CheckpointError(PcmnetError):
    """A checkpoint that cannot be used: missing files, or made for another backbone."""
