"""Name -> loss-module registry, so configs can declare objectives as data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

_LOSSES: dict[str, type[nn.Module]] = {}

T = TypeVar("T", bound=type[nn.Module])


def register_loss(name: str) -> Callable[[T], T]:
    """Class decorator: make a loss module buildable by ``name`` from a config.

    Examples:
        >>> from torch import nn
        >>> @register_loss("doc-example")
        ... class Dummy(nn.Module):
        ...     pass
        >>> "doc-example" in available_losses()
        True
    """

    def deco(cls: T) -> T:
        if name in _LOSSES and _LOSSES[name] is not cls:
            owner = _LOSSES[name].__name__
            raise ValueError(f"loss name {name!r} is already registered by {owner}")
        _LOSSES[name] = cls
        return cls

    return deco


def available_losses() -> list[str]:
    """Names accepted by :func:`build_loss` (built-in ones are imported on first call)."""
    _import_builtins()
    return sorted(_LOSSES)


def loss_class(name: str) -> type[nn.Module]:
    """The class registered as ``name``: read its declarations (``needs_dataset_size``, ...)
    before building it.

    Examples:
        >>> loss_class("isogclr").needs_dataset_size, loss_class("clip").supports_groups
        (True, True)
    """
    _import_builtins()
    if name not in _LOSSES:
        raise ValueError(f"loss={name!r} is unknown; expected one of {sorted(_LOSSES)}")
    return _LOSSES[name]


def build_loss(name: str, **params: Any) -> nn.Module:
    """Instantiate the loss registered as ``name`` with ``params``."""
    return loss_class(name)(**params)


def _import_builtins() -> None:
    import modalign.losses  # noqa: F401  (its __init__ imports every built-in loss module)
