"""Tower identities remembered across runs, so a cached store is found without building towers.

A store array is keyed by its inputs and its tower's ``identity()``
(:func:`modalign.embed.encode.array_key`). Building a tower only to read its identity costs
seconds (MiniLM imports transformers and loads its weights), so :func:`remember_identity` keeps
the identity of a tower built from a spec together with the stamp (size, modification and
status-change times, inode, device; :func:`modalign.io.file_stamp`) of everything it was derived
from:

- the files its ``identity()`` hashed through :func:`modalign.io.cached_file_hash` (the weights),
  every file beside them and in their sub-folders one level down (configuration, tokenizer,
  pooling settings), and those folders themselves (a file added or removed);
- the source files of the tower's classes, of its registered factory and of
  ``modalign.encoders`` and ``modalign.io``, and the entry files of the libraries towers are built
  with (an upgrade replaces them).

An entry is keyed by the spec, the modality, the factory's source file, the Python installation
(``sys.prefix``: each virtual environment has its own entries), the working directory (a spec may
hold a relative path) and the variables that say where hub models live
(:data:`LOCATION_VARIABLES`).

:func:`remembered_identity` returns the identity only while every stamp is unchanged; anything
else (a replaced weight file, an edited config, an upgrade, an edited tower) gives None and the
caller builds the tower. A tower is never remembered when its identity hashes no file (a hub
name, a tower of one's own that hashes nothing), when its factory has no source file, or when a
folder beside its weights holds more than :data:`MAX_FILES` files: such a tower is built every
time.

Examples:
    >>> from modalign.encoders import load_encoder
    >>> tower = load_encoder("effnet-lite0:image_size=64", modality="image")
    >>> identity = remember_identity("effnet-lite0:image_size=64", "image", tower)
    >>> remembered_identity("effnet-lite0:image_size=64", "image") == identity
    True
    >>> remembered_identity("effnet-lite0:image_size=64", "sketch") is None  # another entry
    True
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

from modalign.io import (
    content_hash,
    file_stamp,
    read_json,
    recording_hashed_files,
    write_json_atomic,
)

CACHE = "tower-identities.json"
"""File under :func:`modalign.paths.home` holding the remembered identities."""

ENTRIES = 256
"""Most identities remembered (the least recently remembered are dropped first)."""

MAX_FILES = 256
"""Most files stamped beside a tower's weights; a tower with more is not remembered."""

LOCATION_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
                      "XDG_CACHE_HOME", "TORCH_HOME")
"""Environment variables that change which files a spec resolves to (part of each entry's key)."""

LIBRARIES = ("torch", "transformers", "open_clip", "timm", "PIL", "numpy")
"""Libraries whose entry file is stamped: an upgrade of one forgets every identity."""


def remember_identity(spec: str, modality: str | None, tower: Any) -> dict[str, Any]:
    """``tower.identity()``, remembered for ``(spec, modality)`` when it can be checked later.

    Call it on a tower freshly built by ``load_encoder(spec, modality=modality)`` (before its
    identity was first asked for: a tower that keeps its weight hash would hash no file now, and
    is then not remembered). Returns the identity in every case.
    """
    with recording_hashed_files() as hashed:
        identity = tower.identity()
    key = _key(spec, modality)
    if key is None or not hashed or not isinstance(identity, dict):
        return identity
    stamps = _stamps(_inputs(hashed), _code(tower, spec))
    if stamps is None:
        return identity
    entries = _read()
    entries.pop(key, None)
    entries[key] = {"spec": spec, "modality": modality, "identity": identity, "stamps": stamps}
    for old in list(entries)[: max(0, len(entries) - ENTRIES)]:
        del entries[old]
    from modalign.paths import home

    with suppress(OSError, TypeError, ValueError):  # a read-only home: towers are built instead
        write_json_atomic(home() / CACHE, entries, indent=0)
    return identity


def remembered_identity(spec: str, modality: str | None) -> dict[str, Any] | None:
    """The identity remembered for ``(spec, modality)`` while nothing it depends on has changed,
    else None (build the tower). Costs one small JSON read and a few dozen ``stat`` calls."""
    key = _key(spec, modality)
    entry = _read().get(key) if key is not None else None
    if not isinstance(entry, dict) or not isinstance(entry.get("stamps"), dict):
        return None
    stamps: dict[str, Any] = entry["stamps"]
    if not stamps or any(file_stamp(path) != stamp for path, stamp in stamps.items()):
        return None
    identity = entry.get("identity")
    return identity if isinstance(identity, dict) else None


def _key(spec: str, modality: str | None) -> str | None:
    """The entry of ``(spec, modality)`` in this environment: the source file of the factory
    registered for the spec's name now (a factory defined elsewhere is another tower), the
    Python installation (another virtual environment resolves a spec to its own files), the
    working directory (a relative path in a spec) and the settings that say where hub models are
    found. None when the factory's file is not known (a factory defined interactively, an
    unknown name): nothing is remembered then."""
    source = _factory_file(spec)
    if source is None:
        return None
    where = {var: os.environ[var] for var in LOCATION_VARIABLES if var in os.environ}
    return content_hash("tower identity", spec, modality, source, sys.prefix, os.getcwd(), where)


def _factory_file(spec: str) -> str | None:
    """The source file of the factory registered now for ``spec``'s name, if there is one."""
    from modalign import encoders

    entry = encoders._REGISTRY.get(spec.split(":", 1)[0])
    try:
        source = inspect.getsourcefile(entry.factory) if entry is not None else None
    except (TypeError, OSError):
        source = None
    return os.path.abspath(source) if source and os.path.isfile(source) else None


def _read() -> dict[str, Any]:
    from modalign.paths import home

    path = home() / CACHE
    try:
        entries = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        entries = {}
    return entries if isinstance(entries, dict) else {}


def _inputs(hashed: Iterable[str]) -> list[str] | None:
    """The hashed files, their folders, and every file beside them (sub-folders one level
    down); None when a folder holds more than :data:`MAX_FILES` files."""
    out: list[str] = []
    for name in dict.fromkeys(hashed):
        folder = Path(name).parent
        out += [str(folder), name]
        try:
            level = sorted(folder.iterdir())
            for sub in [p for p in level if p.is_dir()]:
                if len(level) > MAX_FILES:
                    return None
                out.append(str(sub))
                level += sorted(sub.iterdir())
        except OSError:
            return None
        files = [str(p) for p in level if p.is_file()]
        if len(files) > MAX_FILES:
            return None
        out += files
    return out


def _code(tower: Any, spec: str) -> list[str]:
    """Source files that shape the identity: the tower's classes, its factory, the encoders
    package (with the built-in factories), the hash helpers, and the libraries' entry files (for
    their versions)."""
    files = [getattr(sys.modules.get(cls.__module__), "__file__", None)
             for cls in type(tower).__mro__]
    files.append(_factory_file(spec))
    from modalign import encoders, io

    package = Path(encoders.__file__).parent
    files += [str(package), *(str(p) for p in sorted(package.glob("*.py"))), io.__file__]
    for lib in LIBRARIES:
        with suppress(ImportError, ValueError):
            found = importlib.util.find_spec(lib)
            files.append(found.origin if found is not None else None)
    return [os.path.abspath(f) for f in files if f]


def _stamps(*groups: list[str] | None) -> dict[str, list[int]] | None:
    stamps: dict[str, list[int]] = {}
    for group in groups:
        if group is None:
            return None
        for path in group:
            stamp = file_stamp(path)
            if stamp is None:
                return None
            stamps[path] = stamp
    return stamps
