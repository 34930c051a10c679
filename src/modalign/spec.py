"""The one parser for spec strings ``NAME[:ARG][:key=value,...]`` (towers, datasets, bridges).

``effnet-lite0``, ``effnet-lite0:image_size=48``, ``minilm:models/my-bert``,
``hf-clip:openai/clip-vit-base-patch32:max_length=32``, ``emoji:limit=200,speech=1``: the name
comes before the first ``:``; a last part made only of ``key=value`` pairs holds the options
(numbers and ``true``/``false`` are parsed); anything between is the argument (a path or a model
name, which may itself contain ``:``).
"""

from __future__ import annotations

import datetime
import re
import sys
from dataclasses import dataclass, field
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from modalign.errors import ModalignError

__all__ = ["Spec", "parse_spec", "parse_value", "split_key_value"]

_OPTION = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=")


@dataclass(frozen=True)
class Spec:
    """A parsed spec: ``name``, positional ``arg`` ("" if none) and ``options``."""

    name: str
    arg: str = ""
    options: dict[str, Any] = field(default_factory=dict)


def parse_value(text: str) -> Any:
    """The one parser of a value given as text (spec options, ``--set`` overrides, bridge
    parameters): a TOML literal (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``"a,b"``), ``True`` or
    ``False`` in any case; anything else (a name, a path, a date) stays the string itself.

    Examples:
        >>> parse_value("48"), parse_value("5e-3"), parse_value("False"), parse_value("noto")
        (48, 0.005, False, 'noto')
        >>> parse_value("[1, 2]"), parse_value("x/y.npy"), parse_value("2024-01-02")
        ([1, 2], 'x/y.npy', '2024-01-02')
    """
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if isinstance(value, (datetime.date, datetime.time)) or (
            isinstance(value, dict) and not text.startswith("{")):
        return text
    return value


def split_key_value(text: str, what: str, example: str = "key=value") -> tuple[str, str]:
    """The one splitter of ``key=value`` text: the stripped key and the unparsed value.

    ``what`` names the argument in errors, ``example`` shows the expected form.

    Examples:
        >>> split_key_value(" optim.lr = 1e-3", "--set")
        ('optim.lr', '1e-3')
        >>> split_key_value("sketch=effnet-lite0:image_size=48", "--tower")
        ('sketch', 'effnet-lite0:image_size=48')
    """
    key, eq, value = text.partition("=") if isinstance(text, str) else ("", "", "")
    if not eq or not key.strip():
        raise ModalignError(f"{what} {text!r}: expected {example}")
    return key.strip(), value.strip()


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
            key, value = split_key_value(p, f"{what} {text!r}: option")
            if key in options:
                raise ModalignError(f"{what} {text!r}: option {key!r} is given twice")
            options[key] = parse_value(value)
    elif any(_OPTION.match(p) for p in parts) and "," in candidate:
        bad = [p for p in parts if not _OPTION.match(p)]
        raise ModalignError(f"{what} {text!r}: options must all look like key=value, got "
                            f"{bad}")
    return Spec(name, arg.strip(), options)
