"""Default store folders, keyed by the dataset and the towers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from modalign.data.dataset import PairedDataset
from modalign.io import content_hash
from modalign.paths import home


def default_store_dir(dataset: PairedDataset, tower_specs: Mapping[str, str]) -> Path:
    """``$MODALIGN_HOME/embeddings/<dataset>-<hash of dataset identity and towers>``."""
    ident = dataset.info.get("options_key") or dataset.info.get("source") or str(dataset.root)
    key = content_hash(dataset.name, ident, dict(sorted(tower_specs.items())))
    return home() / "embeddings" / f"{dataset.name}-{key}"
