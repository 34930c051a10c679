"""A tiny synthetic store and towers for the gap-lab tests (seconds, no real encoders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalign.embed.store import EmbeddingStore
from modalign.lab.measure import LabTowers

IMAGE_DIM, TEXT_DIM, TOKEN_DIM = 12, 10, 6


def fake_store(path: Path, groups: int = 40, seed: int = 0) -> EmbeddingStore:
    """Two image views and a name (+ an alias for every other concept) per group, 3 splits."""
    rng = np.random.default_rng(seed)
    concept = rng.normal(size=(groups, 8))
    w_img, w_txt = rng.normal(size=(8, IMAGE_DIM)), rng.normal(size=(8, TEXT_DIM))
    splits = ["train"] * (groups // 2) + ["val"] * (groups // 4)
    splits += ["test"] * (groups - len(splits))
    img_rows, img_vecs, txt_rows, txt_vecs = [], [], [], []
    for g in range(groups):
        labels = {"subgroup": f"sub{g % 4}", "group": f"grp{g % 2}"}
        base = {"group": f"c{g}", "split": splits[g], "labels": labels}
        for view in ("noto", "openmoji"):
            img_rows.append({"id": f"c{g}/image/{view}", "modality": "image", "view": view,
                             **base})
            img_vecs.append(concept[g] @ w_img + 0.3 * rng.normal(size=IMAGE_DIM))
        views = ("name", "alias") if g % 2 == 0 else ("name",)
        for view in views:
            txt_rows.append({"id": f"c{g}/text/{view}", "modality": "text", "view": view,
                             **base})
            txt_vecs.append(concept[g] @ w_txt + 0.3 * rng.normal(size=TEXT_DIM))
    store = EmbeddingStore(path)
    store.add_array("image", np.asarray(img_vecs), img_rows, {"encoder": {"name": "fake-image"}})
    store.add_array("text", np.asarray(txt_vecs), txt_rows, {"encoder": {"name": "fake-text"}})
    return store


class LinearTokens:
    """An :class:`~modalign.bridge.inversion.InversionForward`: a fixed map of 2 pseudo-tokens."""

    num_tokens = 2
    token_dim = TOKEN_DIM

    def __init__(self, modality: str, out_dim: int, seed: int) -> None:
        self.modality = modality
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(self.num_tokens * TOKEN_DIM, out_dim, generator=gen)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(tokens.flatten(1) @ self.weight.to(tokens.dtype))

    def identity(self) -> dict[str, Any]:
        return {"kind": "linear-tokens", "modality": self.modality}


def fake_towers() -> LabTowers:
    """Text features of a prompt from a hash of its words; linear pseudo-token towers."""
    def encode_text(texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), TEXT_DIM)
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", "").split():
                gen = torch.Generator().manual_seed(sum(map(ord, w)) * 31 + len(w))
                out[i] += torch.randn(TEXT_DIM, generator=gen)
        return out

    forwards = {"text": LinearTokens("text", TEXT_DIM, 1),
                "image": LinearTokens("image", IMAGE_DIM, 2)}
    return LabTowers({"image": "fake-image", "text": "fake-text"}, encode_text,
                     forwards.__getitem__, {"fake": 1})


def attach_fake_dataset(store: EmbeddingStore, folder: Path) -> Path:
    """A raw dataset behind ``store``'s items (small PNGs, short texts), recorded in its
    ``dataset.json``: what the lab's end-to-end settings read."""
    from PIL import Image

    from modalign.data.dataset import Item, PairedDataset
    from modalign.embed.store import DATASET_INFO
    from modalign.io import write_json_atomic

    rng = np.random.default_rng(0)
    items = []
    for m in ("image", "text"):
        for row in store.load(m).items:
            g = int(row["group"][1:])
            if m == "image":
                rel = f"images/{row['id'].replace('/', '_')}.png"
                (folder / "images").mkdir(parents=True, exist_ok=True)
                pixels = np.full((24, 24, 3), (g * 37) % 256, np.uint8)
                pixels[: 6 + g % 12] = rng.integers(0, 255, 3, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / rel)
                value = rel
            else:
                value = f"thing {g} {'alias' if row['view'] == 'alias' else 'name'}"
            items.append(Item(row["id"], m, row["view"], value, row["group"], row["split"],
                              row.get("labels") or {}))
    PairedDataset("fake", items, root=folder).save(folder)
    write_json_atomic(store.path / DATASET_INFO, {"name": "fake", "root": str(folder)})
    return folder
