"""Setting checks shared by the recipes' ``check`` methods; each raises ``ModalignError``."""

from __future__ import annotations

import math

from modalign.errors import ModalignError


def check_weight(key: str, value: object) -> None:
    """Refuse anything but a finite number >= 0 (a loss weight, a scale).

    Examples:
        >>> check_weight("momentum.weight", 0.5)
        >>> check_weight("momentum.weight", float("nan"))
        Traceback (most recent call last):
        ...
        modalign.errors.ModalignError: momentum.weight must be a finite number >= 0, got nan
    """
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ModalignError(f"{key} must be a finite number >= 0, got {value!r}")


def check_temperature(key: str, value: float, min_scale: float, max_scale: float) -> None:
    """Refuse a temperature outside ``[1 / max_scale, 1 / min_scale]`` (the logit scale's clamp).

    Examples:
        >>> check_temperature("negatives.temperature", 2.0, 1.0, 100.0)
        Traceback (most recent call last):
        ...
        modalign.errors.ModalignError: negatives.temperature must be in [0.01, 1.0], got 2.0
    """
    if not 1 / max_scale <= value <= 1 / min_scale:
        raise ModalignError(f"{key} must be in [{1 / max_scale}, {1 / min_scale}], "
                            f"got {value!r}")
