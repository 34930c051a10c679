"""The one parser for spec strings ``NAME[:ARG][:key=value,...]`` (towers, datasets, bridges).

``effnet-lite0``, ``effnet-lite0:image_size=48``, ``minilm:models/my-bert``,
``hf-clip:openai/clip-vit-base-patch32:max_length=32``, ``emoji:limit=200,speech=1``: the name
comes before the first ``:``; a last part made only of ``key=value`` pairs holds the options
(numbers and ``true``/``false`` are parsed); anything between is the argument (a path or a model
name, which may itself contain ``:``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from modalign.errors import ModalignError

__all__ = ["Spec", "parse_spec", "parse_value"]

_OPTION = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=")


@dataclass(frozen=True)
class Spec:
    """A parsed spec: ``name``, positional ``arg`` ("" if none) and ``options``."""

    name: str
    arg: str = ""
    options: dict[str, Any] = field(default_factory=dict)


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"1e-3"`` -> 0.001, ``"true"`` -> True; anything else stays a string.

    Examples:
        >>> parse_value("48"), parse_value("5e-3"), parse_value("False"), parse_value("noto")
        (48, 0.005, False, 'noto')
    """
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(text: str, what: str = "spec") -> Spec:
    """Split ``NAME[:ARG][:key=value,...]``; ``what`` names the argument in errors.

    Examples:
        >>> parse_spec("effnet-lite0:image_size=48")
        Spec(name='effnet-lite0', arg='', options={'image_size': 48})
        >>> parse_spec("open_clip:local-dir:/m/clip:precision=fp32").arg
        'local-dir:/m/clip'
    """
    if not isinstance(text, str) or not text.strip():
        raise ModalignError(f"{what}: expected a non-empty NAME[:key=value,...], got {text!r}")
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if not name:
        raise ModalignError(f"{what} {text!r}: the name before ':' is empty")
    arg, options = rest, {}
    head, sep, last = rest.rpartition(":")
    candidate = last if sep else rest
    parts = [p for p in candidate.split(",") if p.strip()]
    if parts and all(_OPTION.match(p) for p in parts):
        arg = head if sep else ""
        for p in parts:
            key, _, value = p.partition("=")
            key = key.strip()
            if key in options:
                raise ModalignError(f"{what} {text!r}: option {key!r} is given twice")
            options[key] = parse_value(value)
    elif any(_OPTION.match(p) for p in parts) and "," in candidate:
        bad = [p for p in parts if not _OPTION.match(p)]
        raise ModalignError(f"{what} {text!r}: options must all look like key=value, got "
                            f"{bad}")
    return Spec(name, arg.strip(), options)
