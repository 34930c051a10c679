"""Settings whose towers train: fine-tuned pretrained towers and small towers from scratch.

Both train with the ordinary :class:`~modalign.train.loop.Trainer`: ``train.unfreeze`` names the
tower stages that train (for scratch towers: all of them, the towers passed as
``Trainer(towers=...)``), the raw images and texts come from the dataset the store was encoded
from, images get a random resized crop and colour jitter (``augment``), scratch texts token
masking (:class:`~modalign.lab.towers.ScratchTextTower`). The trainer reads feature dimensions
(and, for the heads' centring, feature means) from a store: a fine-tuned run uses the store of
the pretrained towers, a scratch run a store of its initial towers' features, written once per
tower design by :func:`scratch_store` (its features are also the "tower before training"
baseline of the intra-modal measurements).

After training, :func:`trained_space` encodes the evaluated and bank splits with the trained
towers and returns them with towers (prompt encoding, inversion forwards) that run the trained
weights, so :func:`~modalign.lab.measure.measure_space` measures these spaces as any other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modalign.embed.store import Embeddings, EmbeddingStore
from modalign.encoders.tower import Tower
from modalign.errors import ModalignError
from modalign.io import content_hash
from modalign.lab.measure import MODALITIES, LabTowers, SpaceData
from modalign.lab.settings import GapSetting, LabConfig
from modalign.lab.towers import ScratchImageTower, ScratchTextTower, scratch_inversion


def dataset_spec(store: EmbeddingStore, config: LabConfig) -> str:
    """The raw dataset of end-to-end settings: ``config.dataset``, else the store's source."""
    spec = config.dataset or str(store.dataset_info.get("root") or "")
    if not spec:
        raise ModalignError(f"store {store.path} records no dataset folder; set the lab's "
                            "dataset (LabConfig.dataset) so that towers can be trained on the raw "
                            "images and texts")
    return spec


def scratch_towers(config: LabConfig, seed: int) -> dict[str, Tower]:
    """Fresh scratch towers of ``config``'s design, initialised from ``seed``."""
    return {"image": ScratchImageTower(config.scratch_image_size, config.scratch_width,
                                       config.scratch_dim, seed=seed,
                                       crop_scale=config.scratch_crop_scale,
                                       color_jitter=config.scratch_color_jitter),
            "text": ScratchTextTower(width=config.scratch_text_width, dim=config.scratch_dim,
                                     layers=config.scratch_layers,
                                     token_mask=config.token_mask, seed=seed)}


def _raw_loader(spec: str) -> Callable[[list[dict[str, Any]]], list[Any]]:
    from modalign.data import load_dataset

    ds = load_dataset(spec)
    by_id = {it.id: it for it in ds.items}

    def inputs(items: list[dict[str, Any]]) -> list[Any]:
        out = []
        for row in items:
            it = by_id.get(row["id"])
            if it is None:
                raise ModalignError(f"item {row['id']!r} of the store is not in the dataset "
                                    f"{spec!r}")
            out.append(str(ds.resolve(it)) if it.modality != "text" else it.value)
        return out

    return inputs


@torch.no_grad()
def encode_items(tower: Any, inputs: list[Any], batch_size: int = 128) -> np.ndarray:
    """Tower features of raw inputs, in batches, in eval mode."""
    if isinstance(tower, nn.Module):
        tower.eval()
    out = [tower.encode(tower.preprocess(inputs[i:i + batch_size])).float().cpu().numpy()
           for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def scratch_store(store: EmbeddingStore, config: LabConfig, root: Path) -> EmbeddingStore:
    """The store of the scratch towers' initial features (seed 0) over ``store``'s items.

    Written once per tower design and source store under ``root``; reused afterwards.
    """
    towers = scratch_towers(config, seed=0)
    key = content_hash({m: t.identity() for m, t in towers.items()},
                       {m: store.info(m).get("hash") for m in MODALITIES}, dataset_spec(
                           store, config))
    out = EmbeddingStore(root / f"scratch-store-{key}")
    if all(m in out.arrays for m in MODALITIES):
        return out
    raw = _raw_loader(dataset_spec(store, config))
    for m in MODALITIES:
        items = store.load(m).items
        vectors = encode_items(towers[m], raw(items))
        out.add_array(m, vectors, items,
                      {"encoder": {"name": towers[m].name, **towers[m].identity()}})
    info = dict(store.dataset_info)
    if info:
        from modalign.embed.store import DATASET_INFO
        from modalign.io import write_json_atomic

        write_json_atomic(out.path / DATASET_INFO, info)
    return out


def trainer_sections(setting: GapSetting, config: LabConfig, store: EmbeddingStore,
                     towers: Mapping[str, nn.Module] | None) -> dict[str, Any]:
    """What an end-to-end setting adds to the lab's training config."""
    if not setting.end_to_end:
        return {}
    lora: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    batch = config.e2e_batch_size
    if setting.family == "scratch":
        assert towers is not None
        unfreeze = {m: len(towers[m].blocks()) for m in MODALITIES}  # type: ignore[operator]
        lr = config.scratch_lr
        optim = {"lr": lr, "warmup_steps": config.scratch_warmup_steps}
        batch = config.scratch_batch_size
    elif setting.family == "lora":
        unfreeze, lr = {}, config.lora_lr
        lora = {"towers": list(MODALITIES), "rank": config.lora_rank,
                "alpha": 2.0 * config.lora_rank}
    else:
        unfreeze = {m: setting.unfreeze for m in MODALITIES}
        lr = config.tower_lr
    model: dict[str, Any] = {}
    crop, jitter = config.crop_scale, config.color_jitter
    if setting.family == "scratch":  # (the scratch CNN applies them itself: see its tower)
        crop, jitter = config.scratch_crop_scale, config.scratch_color_jitter
        model["center_features"] = False  # the initial towers' mean means nothing after training
    return {"dataset": dataset_spec(store, config), "unfreeze": unfreeze, "tower_lr": lr,
            "optim": optim, "batch_size": batch, "model": model, "lora": lora,
            "augment": {"crop_scale": list(crop), "color_jitter": jitter}}


def trained_space(model: Any, store: EmbeddingStore, config: LabConfig,
                  base: LabTowers, *, dataset: str) -> tuple[SpaceData, LabTowers]:
    """The evaluated and bank splits encoded by the model's trained towers, and towers that run
    them (prompts, inversion); ``store`` holds the same items' features before training."""
    from modalign.bridge.inversion import encoder_inversion
    from modalign.encoders.lora import has_lora, merge_lora

    trained = {m: model.towers[m] for m in MODALITIES}
    for tower in trained.values():
        if has_lora(tower):  # the adapters folded into the weights: a plain tower again
            merge_lora(tower)
    raw = _raw_loader(dataset)

    def encode(part: Mapping[str, Embeddings]) -> dict[str, Embeddings]:
        return {m: Embeddings(encode_items(trained[m], raw(e.items)), e.items, e.group_index)
                for m, e in part.items()}

    before = {m: store.load(m, split=config.split) for m in MODALITIES}
    bank = {m: store.load(m, split=config.bank_split) for m in MODALITIES}

    def encode_text(texts: list[str]) -> Tensor:
        return torch.from_numpy(encode_items(trained["text"], texts))

    forwards: dict[str, Any] = {}

    def inversion(m: str) -> Any:
        if m not in forwards:
            tower = trained[m]
            tower.eval()
            if isinstance(tower, (ScratchImageTower, ScratchTextTower)):
                forwards[m] = scratch_inversion(tower, num_tokens=config.ovi_tokens)
            else:
                tokens = config.ovi_tokens if m == "image" else None
                forwards[m] = encoder_inversion(tower, stage=config.ovi_stage, num_tokens=tokens)
        return forwards[m]

    towers = LabTowers(base.specs, encode_text, inversion, base.identity)
    data = SpaceData.from_parts(encode(before), encode(bank), config, encode_text, before=before)
    return data, towers
