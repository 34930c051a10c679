"""Model folders: resolve a local folder or a hub name without waiting on an absent network,
and hash the weights a folder holds."""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modalign.io import cached_file_hash, content_hash

HUB_HOST = "huggingface.co"
PROBE_TIMEOUT_S = 1.5


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Load a transformers model without its progress bars ("Loading weights: 100%|...").

    The bars are off inside the block only: transformers' setting (``is_progress_bar_enabled``)
    is what it was afterwards, also when loading fails.

    Examples:
        >>> from transformers.utils import logging
        >>> before = logging.is_progress_bar_enabled()
        >>> with quiet_loading():
        ...     logging.is_progress_bar_enabled()
        False
        >>> logging.is_progress_bar_enabled() == before
        True
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network access."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(host: str = HUB_HOST, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:443`` opens within ``timeout`` seconds (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_hub_name(name: str) -> bool:
    """Whether ``name`` has the form of a hub repository id (``model`` or ``org/model``).

    Examples:
        >>> is_hub_name("openai/clip-vit-base-patch32"), is_hub_name("./models/clip")
        (True, False)
    """
    return bool(HUB_NAME.match(name)) and ".." not in name


def _cached_snapshot(name: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        return None


def resolve_model_dir(path_or_name: str, *, argument: str, kind: str) -> str:
    """Return a local folder for ``path_or_name``: the folder itself, or a hub name's cached copy.

    A hub name that is neither cached nor reachable (``HF_HUB_OFFLINE=1``, or no connection to the
    hub within ~1.5 s) raises ``ValueError`` at once, naming the local-folder alternative. With a
    network, an uncached hub name is returned as is for ``from_pretrained`` to download.

    Args:
        path_or_name: a folder saved by ``save_pretrained`` or a hub name such as ``org/model``.
        argument: the argument as the caller spells it, for messages (``"hf-clip:PATH_OR_NAME"``).
        kind: what the folder holds, for error messages (``"a CLIPModel"``).
    """
    if not isinstance(path_or_name, str) or not path_or_name.strip():
        raise ValueError(f"{argument} must be a local folder or a hub name, got {path_or_name!r}")
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"{argument} must be a folder holding {kind}, but {str(path)!r} is a file")
    if not is_hub_name(path_or_name):
        raise ValueError(f"{argument}: no such folder {str(path)!r} "
                         f"(expected a folder holding {kind})")
    cached = _cached_snapshot(path_or_name)
    if cached is not None:
        return cached
    if hub_offline() or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if hub_offline() else f"{HUB_HOST} cannot be reached"
        raise ValueError(
            f"{argument}: {path_or_name!r} is not a local folder and not in the hub cache, "
            f"and {why}. Download it where there is a network (e.g. "
            f"`from_pretrained({path_or_name!r})` then `save_pretrained('DIR')`, or "
            f"`huggingface-cli download {path_or_name} --local-dir DIR`) and pass the local "
            f"folder instead: {argument.split(':')[0]}:DIR"
        )
    return path_or_name


def folder_weights_hash(folder: str | os.PathLike[str]) -> str:
    """A hash of the weight files (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``) in ``folder``.

    A name that is not a folder (a hub name resolved later by ``from_pretrained``) hashes the name.
    """
    path = Path(folder)
    patterns = ("*.safetensors", "*.bin", "*.pt", "*.pth")
    files = sorted(f for p in patterns for f in path.glob(p)) if path.is_dir() else []
    hashes = [cached_file_hash(f) for f in files]
    return content_hash(hashes) if files else content_hash(str(folder))
