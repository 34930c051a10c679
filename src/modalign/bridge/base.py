"""What every bridge shares, after scikit-learn's estimator conventions.

* Parameters are the constructor's arguments (read with :func:`inspect.signature`), each kept as
  an attribute of the same name: :meth:`BaseBridge.get_params` / :meth:`BaseBridge.set_params`.
* What ``fit`` learns lives in attributes with a trailing underscore (``means_``, ``gap_``,
  ``banks_``, ``tensors_``), which do not exist before ``fit``; using an unfitted bridge raises
  :class:`NotFittedError`.
* ``fit_transform(bank)`` is ``fit(bank).transform(bank)``.
* A fitted bridge (or a chain of them) is saved as ``STEM.safetensors`` (the fitted tensors) plus
  ``STEM.json`` (class, parameters, a format version), written atomically, tensors first; nothing
  is pickled. :func:`load_bridge` reads it back: only classes derived from :class:`BaseBridge`
  that are already imported are built (a user's own subclass saves and loads the same way).

Examples:
    >>> import torch, tempfile, pathlib
    >>> from modalign.bridge.posthoc import Centering
    >>> bank = {"image": torch.nn.functional.normalize(torch.randn(20, 4) + 1, dim=1)}
    >>> b = Centering().fit(bank)
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = save_bridge(b, folder / "centering")
    >>> again = load_bridge(folder / "centering")
    >>> torch.equal(again.means_["image"], b.means_["image"]), again.get_params()
    (True, {'renormalize': True})
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from safetensors.torch import load_file, save_file
from torch import Tensor

from modalign.errors import ModalignError
from modalign.io import atomic_path, check_format_version, read_json, write_json_atomic

FORMAT = "modalign.bridge"
FORMAT_VERSION = 1
"""Version of the saved-bridge JSON; a reader refuses a newer one."""

B = TypeVar("B", bound="BaseBridge")

_CLASSES: dict[str, type[BaseBridge]] = {}


class NotFittedError(ModalignError):
    """A bridge was used (``transform``, ``save``) before ``fit`` (or loading) gave it its state.

    Examples:
        >>> from modalign.bridge.posthoc import MeanShift
        >>> MeanShift().transform({})  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        modalign.bridge.base.NotFittedError: meanshift: not fitted ...
    """


class BaseBridge:
    """Parameters from the constructor's signature, fitted state in ``*_`` attributes.

    Subclasses set ``name`` (the spec name), ``fitted_attributes`` (the ``*_`` attributes ``fit``
    sets: tensors, or mappings of str to tensor), and implement ``fit`` and ``transform``.
    """

    name: ClassVar[str] = "bridge"
    fitted_attributes: ClassVar[tuple[str, ...]] = ()
    saved_as: ClassVar[type[BaseBridge] | None] = None
    """The class a saved copy is loaded as (``None``: this class)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CLASSES[class_key(cls)] = cls

    # -- parameters ---------------------------------------------------------------------------

    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's argument names, in order (``*args``/``**kwargs`` are not allowed)."""
        names = []
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{cls.__name__}: bridges take named parameters only, not "
                                f"*{p.name}")
            names.append(p.name)
        return names

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Parameter name -> value, as the constructor would take them."""
        return {name: getattr(self, name) for name in self.param_names()}

    def set_params(self: B, **params: Any) -> B:
        """Change parameters (checked as the constructor checks them); forgets what fit learnt.

        Examples:
            >>> from modalign.bridge.posthoc import MeanShift
            >>> MeanShift().set_params(scale=0.5).get_params()["scale"]
            0.5
        """
        allowed = self.param_names()
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ModalignError(f"{self.name}: unknown parameter(s) {unknown}; expected some of "
                                f"{allowed}")
        merged = {**self.get_params(deep=False), **params}
        for attr in self.fitted_attributes:
            self.__dict__.pop(attr, None)
        self.__init__(**merged)  # type: ignore[misc]
        return self

    def __repr__(self) -> str:
        defaults = {name: p.default for name, p in
                    inspect.signature(type(self).__init__).parameters.items()}
        shown = [f"{k}={v!r}" for k, v in self.get_params(deep=False).items()
                 if defaults.get(k, inspect.Parameter.empty) != v]
        return f"{type(self).__name__}({', '.join(shown)})"

    # -- fitting ------------------------------------------------------------------------------

    def fit(self: B, bank: Mapping[str, Tensor]) -> B:
        raise NotImplementedError

    def transform(self, embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """Name and parameters, JSON-serialisable (for result records)."""
        return {"name": self.name, **_jsonable(self.get_params(deep=False))}

    def fit_transform(self, bank: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``fit(bank).transform(bank)``."""
        return self.fit(bank).transform(bank)

    def is_fitted(self) -> bool:
        """Whether every fitted attribute is there."""
        return all(attr in self.__dict__ for attr in self.fitted_attributes)

    def check_fitted(self) -> None:
        """Raise :class:`NotFittedError` unless :meth:`is_fitted`."""
        if not self.is_fitted():
            raise NotFittedError(f"{self.name}: not fitted; call fit(bank) first (or load a "
                                 "saved bridge)")

    # -- files --------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``(description, tensors)`` of the fitted bridge, as :func:`save_bridge` writes them."""
        self.check_fitted()
        tensors: dict[str, Tensor] = {}
        layout: dict[str, Any] = {}
        for attr in self.fitted_attributes:
            value = getattr(self, attr)
            if isinstance(value, Tensor):
                layout[attr] = attr
                tensors[attr] = value
            else:
                layout[attr] = {}
                for key, t in value.items():
                    layout[attr][key] = f"{attr}/{key}"
                    tensors[f"{attr}/{key}"] = t
        cls = self.saved_as or type(self)
        params = {name: getattr(self, name) for name in cls.param_names()}
        return {"class": class_key(cls), "params": _jsonable(params), "fitted": layout}, tensors

    @classmethod
    def from_state(cls: type[B], description: Mapping[str, Any],
                   tensors: Mapping[str, Tensor]) -> B:
        """Rebuild a bridge from :meth:`state`'s output."""
        bridge = cls(**description["params"])
        for attr, layout in description["fitted"].items():
            if attr not in cls.fitted_attributes:
                raise ModalignError(f"{cls.__name__}: unexpected fitted attribute {attr!r}")
            value = (tensors[layout] if isinstance(layout, str)
                     else {k: tensors[v] for k, v in layout.items()})
            setattr(bridge, attr, value)
        return bridge


def class_key(cls: type) -> str:
    """How a saved file names a bridge class: the class name for modalign's own, the module
    and qualified name for a user's subclass (which loads once its module is imported)."""
    if cls.__module__.split(".")[0] == "modalign":
        return cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


def save_bridge(bridge: BaseBridge, stem: str | os.PathLike[str],
                extra: Mapping[str, Any] | None = None) -> Path:
    """Write a fitted bridge as ``STEM.safetensors`` then ``STEM.json``; returns the JSON path.

    ``extra`` (JSON-serialisable) is stored beside the description, e.g. a fit report.
    """
    description, tensors = bridge.state()
    stem = stem_of(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(_beside(stem, ".safetensors")) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **description,
            "extra": dict(extra or {})}
    write_json_atomic(_beside(stem, ".json"), meta)
    if hasattr(bridge, "path"):  # a bridge that records where it lives (learned bridges)
        bridge.path = str(stem)
    return _beside(stem, ".json")


def read_bridge_files(stem: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The JSON description and the tensors of a saved bridge (``STEM``, ``STEM.json`` or
    ``STEM.safetensors``), with a clear error when either file is missing."""
    s = stem_of(stem)
    meta_path, weights = _beside(s, ".json"), _beside(s, ".safetensors")
    if not meta_path.is_file() or not weights.is_file():
        raise ModalignError(f"bridge {str(stem)!r}: expected {meta_path.name} and "
                            f"{weights.name} beside each other (written by save_bridge or "
                            "'modalign fit-bridge')")
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise ModalignError(f"{meta_path}: expected a JSON object describing a bridge")
    return meta, load_file(str(weights))


def load_bridge(stem: str | os.PathLike[str]) -> BaseBridge:
    """Load a bridge written by :func:`save_bridge` (or by ``modalign fit-bridge``)."""
    meta, tensors = read_bridge_files(stem)
    if meta.get("format") == "modalign.LearnedBridge":  # before format versions
        from modalign.bridge.learned import LearnedBridge

        return LearnedBridge.load(stem)
    if meta.get("format") != FORMAT:
        raise ModalignError(f"bridge {str(stem)!r}: not a saved bridge (format "
                            f"{meta.get('format')!r}, expected {FORMAT!r})")
    check_format_version(meta, FORMAT_VERSION, f"bridge {str(stem)!r}")
    bridge = bridge_from_state(meta, tensors)
    if hasattr(bridge, "path"):
        bridge.path = str(stem_of(stem))
    return bridge


def bridge_from_state(description: Mapping[str, Any],
                      tensors: Mapping[str, Tensor]) -> BaseBridge:
    """The bridge a :meth:`BaseBridge.state` description names (a known bridge class only)."""
    cls = _CLASSES.get(str(description.get("class")))
    if cls is None:
        raise ModalignError(f"saved bridge class {description.get('class')!r}: expected one of "
                            f"{sorted(_CLASSES)}")
    return cls.from_state(description, tensors)


def stem_of(path: str | os.PathLike[str]) -> Path:
    """``DIR/ID`` for ``DIR/ID``, ``DIR/ID.json`` or ``DIR/ID.safetensors``."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def _beside(stem: Path, suffix: str) -> Path:
    return stem.parent / (stem.name + suffix)


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
