"""The tower interface: anything with a modality, an output dim, ``preprocess`` and ``encode``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from modalign.errors import ProtocolError


@runtime_checkable
class Encoder(Protocol):
    """A tower that maps raw inputs of one modality to vectors.

    Attributes:
        name: a spec string that ``modalign.encoders.load_encoder`` resolves back to this tower.
        modality: ``"image"``, ``"text"``, ``"audio"`` or any name the user chooses.
        dim: size of the vectors ``encode`` returns.

    ``preprocess`` turns a list of raw inputs (image paths or PIL images, strings, audio paths or
    ``(waveform, sample_rate)`` pairs) into a batch; ``encode`` maps that batch to a
    ``(batch, dim)`` float tensor, the tower's native output (normalised only where the tower
    itself normalises, as sentence-transformers models such as MiniLM do). ``identity()``
    describes the tower for manifests and cache keys (name, weights hash, preprocessing).

    Examples:
        >>> import torch
        >>> class Const:
        ...     name, modality, dim = "const", "text", 2
        ...     def preprocess(self, inputs): return len(inputs)
        ...     def encode(self, batch): return torch.ones(batch, 2)
        ...     def identity(self): return {"name": self.name}
        >>> isinstance(Const(), Encoder)
        True
    """

    name: str
    modality: str
    dim: int

    def preprocess(self, inputs: Sequence[Any]) -> Any: ...

    def encode(self, batch: Any) -> torch.Tensor: ...

    def identity(self) -> dict[str, Any]: ...


def tower_identity(tower: Any, *, architecture: str, weights_hash: str, preprocessing: str,
                   pooling: str) -> dict[str, Any]:
    """The ``identity()`` record of a tower: its name, modality and dim, then the given facts.

    Examples:
        >>> class T:
        ...     name, modality, dim = "t", "text", 2
        >>> tower_identity(T(), architecture="a", weights_hash="h", preprocessing="p",
        ...                pooling="mean")["dim"]
        2
    """
    return {"name": tower.name, "modality": tower.modality, "dim": tower.dim,
            "architecture": architecture, "weights_hash": weights_hash,
            "preprocessing": preprocessing, "pooling": pooling}


def check_encoder(obj: object) -> Encoder:
    """Return ``obj`` if it follows :class:`Encoder`, else raise
    :class:`~modalign.errors.ProtocolError` (a ``TypeError``) saying what it lacks.

    Examples:
        >>> try:
        ...     check_encoder(object())
        ... except TypeError as e:
        ...     print(str(e)[:36])
        encoder object lacks name, modality,
    """
    missing = [a for a in ("name", "modality", "dim", "preprocess", "encode", "identity")
               if not hasattr(obj, a)]
    missing += [a for a in ("preprocess", "encode", "identity")
                if a not in missing and not callable(getattr(obj, a))]
    if missing:
        raise ProtocolError(
            f"encoder {type(obj).__name__} lacks {', '.join(missing)}; an encoder needs "
            "name, modality, dim, preprocess(inputs), encode(batch) and identity()"
        )
    return obj  # type: ignore[return-value]
