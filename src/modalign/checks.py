"""Checks of settings values, with one message format: ``NAME must be ..., got VALUE``.

Settings classes (``ModelConfig``, the laboratory's ``GapSetting``, ...) check their fields in
``__post_init__`` with these helpers, so that a bad value reads the same wherever it is caught.
Each raises :class:`~modalign.errors.ModalignError` (a ``ValueError``).

Examples:
    >>> check_choice("head", "mlp", ("linear", "mlp"))
    >>> check_choice("head", "conv", ("linear", "mlp"))
    Traceback (most recent call last):
    ...
    modalign.errors.ModalignError: head must be one of ('linear', 'mlp'), got 'conv'
    >>> check_int("joint_dim", 0)
    Traceback (most recent call last):
    ...
    modalign.errors.ModalignError: joint_dim must be a positive int, got 0
    >>> check_int("unfreeze", -1, minimum=0)
    Traceback (most recent call last):
    ...
    modalign.errors.ModalignError: unfreeze must be an int >= 0, got -1
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from modalign.errors import ModalignError

__all__ = ["check_choice", "check_int"]


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
    """Raise unless ``value`` is one of ``choices`` (the message shows ``choices`` as given)."""
    if value not in choices:
        raise ModalignError(f"{name} must be one of {choices}, got {value!r}")


def check_int(name: str, value: Any, minimum: int = 1, *, context: str = "") -> None:
    """Raise unless ``value`` is an int of at least ``minimum``; ``context`` ends the first part
    of the message (e.g. ``" for an mlp head"``)."""
    if not isinstance(value, int) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ModalignError(f"{name} must be {what}{context}, got {value!r}")
