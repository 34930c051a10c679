"""Where modalign keeps its caches: ``$MODALIGN_HOME`` or the user's cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    """Return the root folder for built datasets, embeddings and runs.

    ``MODALIGN_HOME`` overrides the default (the platform's user cache dir).

    Examples:
        >>> from modalign.paths import home
        >>> isinstance(home(), Path)
        True
    """
    env = os.environ.get("MODALIGN_HOME")
    root = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("modalign"))
    return root
