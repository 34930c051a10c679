"""The gap-shift experiment: move one modality along the gap vector and watch the metrics.

With ``mu_a``, ``mu_b`` the centroids of modalities ``a`` and ``b`` (on a bank, the training
split) and the gap vector ``g = mu_a - mu_b``, every embedding ``y`` of ``b`` becomes

    y(lambda) = normalize(y + lambda g)

``lambda = 0`` is the trained space, ``lambda = 1`` moves ``b``'s centroid (before renormalising)
onto ``a``'s, negative values widen the gap. Cross-modal retrieval both ways and zero-shot
classification (inputs of ``a`` against class prototypes of ``b``, shifted the same way) are
measured at every amount, as in Liang et al. (NeurIPS 2022, "Mind the Gap", Sec. 4.2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from modalign.embed.store import Embeddings
from modalign.evaluate.retrieval import as_unit_tensor, cross_modal_retrieval
from modalign.evaluate.zeroshot import zero_shot_classification
from modalign.geometry.gap import modality_gap

DEFAULT_SHIFTS: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
"""Shift amounts ``lambda`` (multiples of the gap vector) of the default curve."""


def shift_along_gap(vectors: Tensor, gap_vector: Tensor, amount: float) -> Tensor:
    """``normalize(vectors + amount * gap_vector)`` row by row.

    Args:
        vectors: ``(n, d)`` embeddings of the modality being moved.
        gap_vector: ``(d,)`` the gap vector (e.g. ``mean(image) - mean(text)``).
        amount: multiples of the gap vector to add (``0`` leaves the rows unchanged up to
            normalisation).

    Examples:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0]])
        >>> shift_along_gap(x, torch.tensor([0.0, 1.0]), 1.0)
        tensor([[0.7071, 0.7071]])
    """
    if vectors.ndim != 2:
        raise ValueError(f"vectors: expected an (n, d) tensor, got shape {tuple(vectors.shape)}")
    if gap_vector.ndim != 1 or gap_vector.shape[0] != vectors.shape[1]:
        raise ValueError(f"gap_vector: expected shape ({vectors.shape[1]},), got "
                         f"{tuple(gap_vector.shape)}")
    if not np.isfinite(amount):
        raise ValueError(f"amount: expected a finite number, got {amount}")
    return F.normalize(vectors + amount * gap_vector.to(vectors.dtype), dim=-1)


def gap_vector(bank: Mapping[str, Embeddings], modalities: tuple[str, str]) -> Tensor:
    """``mean(a) - mean(b)`` of the L2-normalised bank rows of ``modalities = (a, b)``."""
    a, b = modalities
    for m in modalities:
        if m not in bank:
            raise ValueError(f"bank: no {m!r} embeddings (has {sorted(bank)})")
    return as_unit_tensor(bank[a]).mean(0) - as_unit_tensor(bank[b]).mean(0)


def gap_shift_curve(
    embeddings: Mapping[str, Embeddings],
    bank: Mapping[str, Embeddings],
    *,
    modalities: tuple[str, str] = ("image", "text"),
    amounts: Sequence[float] = DEFAULT_SHIFTS,
    prototypes: Tensor | None = None,
    classnames: Sequence[str] = (),
    label: str = "subgroup",
) -> list[dict[str, Any]]:
    """Metrics of the space with modality ``b`` shifted by each amount along the gap vector.

    Args:
        embeddings: modality -> evaluation embeddings (both of ``modalities``).
        bank: modality -> embeddings the gap vector is measured on (the training split).
        modalities: ``(a, b)``; ``b`` (and the prototypes) move towards ``a``.
        amounts: the shift amounts ``lambda``.
        prototypes: ``(C, d)`` class prototypes in ``b``'s modality, or ``None`` to skip
            zero-shot classification.
        classnames: the label value of each prototype row.
        label: the item label zero-shot classification predicts.

    Returns:
        One row per amount: ``amount``, ``gap`` (centroid distance after the shift),
        ``{b}_retrieval_map`` / ``_recall@1`` (``a`` queries), ``{a}_retrieval_map`` /
        ``_recall@1`` (``b`` queries) and, with prototypes, ``zeroshot_acc1``.

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> emb = toy_embeddings()
        >>> rows = gap_shift_curve(emb, emb, amounts=(0.0, 1.0))
        >>> rows[1]["gap"] < rows[0]["gap"]
        True
    """
    if not amounts:
        raise ValueError("amounts: expected at least one shift amount")
    a, b = modalities
    g = gap_vector(bank, modalities)
    native_b = as_unit_tensor(embeddings[b])
    rows = []
    for amount in amounts:
        moved = shift_along_gap(native_b, g, float(amount))
        shifted = {a: embeddings[a], b: _with_vectors(embeddings[b], moved)}
        ret = cross_modal_retrieval(shifted, (a, b), k_values=(1,)).metrics
        row: dict[str, Any] = {
            "amount": float(amount),
            "gap": modality_gap(as_unit_tensor(embeddings[a]).numpy(), moved.numpy(),
                                normalize=False).centroid_distance,
        }
        for key in (f"{b}_retrieval_map", f"{b}_retrieval_recall@1",
                    f"{a}_retrieval_map", f"{a}_retrieval_recall@1"):
            row[key] = ret[key]
        if prototypes is not None:
            protos = shift_along_gap(F.normalize(prototypes.float(), dim=-1), g, float(amount))
            zs = zero_shot_classification(embeddings[a], protos, classnames, label=label,
                                          input_key=a, prototype_key=b)
            row["zeroshot_acc1"] = zs.metrics["acc1"]
        rows.append(row)
    return rows


def _with_vectors(embeddings: Embeddings, vectors: Tensor) -> Embeddings:
    return Embeddings(vectors.numpy().astype(np.float32), embeddings.items,
                      embeddings.group_index)


__all__ = ["DEFAULT_SHIFTS", "gap_shift_curve", "gap_vector", "shift_along_gap"]

