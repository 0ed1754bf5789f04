"""Loading weights from the Hugging Face hub or local files, shared by the CLIP backbones:
fail fast offline (instead of minutes of download retries) and fingerprint local weight files."""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".npz")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub endpoint answers a TCP connect within `timeout` seconds.

    Offline mode (HF_HUB_OFFLINE=1) counts as unreachable. Behind an HTTP(S) proxy a direct connect
    says nothing, so then the hub is assumed reachable and the normal download path runs.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline_unless_reachable():
    """Run the body in huggingface_hub offline mode (cache only) when the hub cannot be reached.

    Without this, a download attempt on a machine without internet retries for about a minute per
    file before failing; in offline mode a missing file fails at once and a cached one still loads.
    """
    from huggingface_hub import constants

    offline = not hub_reachable()
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield offline
    finally:
        constants.HF_HUB_OFFLINE = saved


def caused_by_missing_file(err: BaseException) -> bool:
    """Whether an exception (or one in its cause/context chain) is a missing file or no network."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        # FileNotFoundError, hub LocalEntryNotFoundError / HTTP errors, URLError, ConnectionError
        if isinstance(err, OSError):
            return True
        err = err.__cause__ or err.__context__
    return False


def sha256_files(paths: list[Path]) -> str:
    """Short (16 hex) sha256 over the full contents of files, in the given order (names do not count)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder (sorted), the part of the folder a fingerprint hashes."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def one_line(err: BaseException, limit: int = 200) -> str:
    """"Type: first line of the message", cut to `limit` characters."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
