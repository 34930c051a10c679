"""Validation during training: the two validation keys' rows, their retrieval and gap, the row.

After every epoch the trainer embeds all rows of the validation split for the two keys of
``validate.pair`` (cached features through the heads; raw inputs through attached towers) and
measures R@1/R@5 both ways (positives: the same group) and the centroid gap.

Examples:
    >>> row = {"epoch": 1, "step": 3, "train_loss": 2.5, "image-to-text_recall@1": 0.5,
    ...        "samples_per_s": 120.0, "best": True}
    >>> format_row(row)
    'epoch 1 | step 3 | loss 2.5000 | image → text recall@1 0.500 | 120 samples/s | *best*'
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from modalign.embed.store import EmbeddingStore
from modalign.errors import ModalignError
from modalign.model import MultiTowerModel
from modalign.train.config import DataConfig, TrainConfig
from modalign.train.data import KeyTable, RawInputs, load_key
from modalign.vocabulary import describe_metric, metric_key, parse_metric_key


def validation_tables(config: TrainConfig, store: EmbeddingStore) -> dict[str, KeyTable] | None:
    """The validation keys' rows of ``data.val_split``; None when validation is off, or when the
    default split is missing from the data (then a warning says the run trains without it)."""
    pair = config.validation_pair()
    if pair is None:
        return None
    split = config.data.val_split
    if split == DataConfig.val_split and not has_split(store, pair, split):
        # The default split is missing (a user's manifest with only train/test): train
        # without validation and say so; a split the user named must exist.
        warnings.warn(f"the data has no {split!r} split, so this run trains without "
                      "validation; set data.val_split to validate on another split "
                      "(e.g. --set data.val_split=test)", stacklevel=2)
        return None
    return {k: KeyTable.from_embeddings(k, load_key(store, k, split)) for k in pair}


def split_tables(config: TrainConfig, store: EmbeddingStore, split: str) -> dict[str, KeyTable]:
    """The two validation keys' rows of ``split`` (to evaluate another split the same way)."""
    pair = config.validation_pair() or list(config.data.keys[:2])
    if len(pair) != 2:
        raise ModalignError(f"evaluation needs two keys, got {pair}")
    return {k: KeyTable.from_embeddings(k, load_key(store, k, split)) for k in pair}


def has_split(store: EmbeddingStore, keys: Sequence[str], split: str) -> bool:
    """Whether every modality of ``keys`` has rows in ``split`` of ``store``."""
    for key in keys:
        modality, _, view = key.partition(":")
        if modality in store.arrays and len(store.load(modality, view=view or None,
                                                       split=split)) == 0:
            return False
    return True


def embed_table(model: MultiTowerModel, key: str, table: KeyTable,
                raw: RawInputs | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Joint embeddings of a table's rows: cached features through the head, or (``raw`` given:
    a key encoded on the fly) the rows' raw inputs through the attached tower."""
    model.eval()
    try:
        if raw is None:
            return torch.from_numpy(model.project_array(key, table.features, batch_size))
        return model.encode(key, raw.inputs(table.items), batch_size=64).float().cpu()
    finally:
        model.train()


@torch.no_grad()
def evaluate(model: MultiTowerModel, tables: Mapping[str, KeyTable],
             raw: Mapping[str, RawInputs] | None = None) -> dict[str, float]:
    """R@1/R@5 both ways (positives: same group) and the centroid gap of two keys' rows.

    Keys follow :mod:`modalign.vocabulary`: ``image-to-text_recall@1`` is the first
    key retrieving the second, ``text-to-image_recall@1`` the reverse; also
    ``mean_recall@1`` and ``gap``. ``raw`` maps the keys encoded on the fly to their inputs.
    """
    raw = raw or {}
    (ka, ta), (kb, tb) = tables.items()
    za, zb = embed_table(model, ka, ta, raw.get(ka)), embed_table(model, kb, tb, raw.get(kb))
    return pair_metrics((ka, za, torch.from_numpy(ta.group_ids)),
                        (kb, zb, torch.from_numpy(tb.group_ids)))


def pair_metrics(a: tuple[str, torch.Tensor, torch.Tensor],
                 b: tuple[str, torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """:func:`evaluate`'s figures from two keys' ``(key, embeddings, group ids)``: R@1/R@5 both
    ways, ``mean_recall@1`` and the centroid ``gap`` (any model's embeddings)."""
    from modalign.evaluate.metrics import retrieval_metrics
    from modalign.geometry.gap import modality_gap

    (ka, za, ga), (kb, zb, gb) = a, b
    a2b = retrieval_metrics(za, zb, ga, gb, k_values=(1, 5)).metrics
    b2a = retrieval_metrics(zb, za, gb, ga, k_values=(1, 5)).metrics
    gap = modality_gap(za.numpy(), zb.numpy(), normalize=False).centroid_distance
    out = {metric_key(q, g, f"recall@{k}"): m[f"recall@{k}"]
           for q, g, m in ((ka, kb, a2b), (kb, ka, b2a)) for k in (1, 5)}
    return {**out, "mean_recall@1": 0.5 * (a2b["recall@1"] + b2a["recall@1"]),
            "gap": float(gap)}


def format_row(row: Mapping[str, Any]) -> str:
    """One line for an epoch's log row: loss, retrieval metrics, gap, throughput."""
    parts = [f"epoch {row['epoch']:g}", f"step {row['step']}", f"loss {row['train_loss']:.4f}"]
    for k, v in row.items():
        if parse_metric_key(k):
            parts.append(f"{describe_metric(k)} {v:.3f}")
    if "gap" in row:
        parts.append(f"gap {row['gap']:.3f}")
    parts.append(f"{row['samples_per_s']:.0f} samples/s")
    if row.get("best"):
        parts.append("*best*")
    return " | ".join(parts)
