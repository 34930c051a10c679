"""Small synthetic embedding stores and towers shared by the training tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modalign.embed.store import EmbeddingStore
from modalign.encoders.tower import Tower
from modalign.train.checkpoint import Checkpoint, load_checkpoint
from modalign.train.config import TrainConfig, load_config


def synthetic_store(path: Path, n_groups: int = 48, image_dim: int = 12, text_dim: int = 8,
                    audio_dim: int = 0, seed: int = 0) -> EmbeddingStore:
    """A store with learnable structure: features are noisy linear maps of a group latent.

    Images come in two views (``noto``, ``openmoji``), texts in two (``name``, ``alias``); the
    groups are split 2/3 train, 1/6 val, 1/6 test.
    """
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n_groups, 6))
    splits = ["train"] * (n_groups * 2 // 3) + ["val"] * (n_groups // 6)
    splits += ["test"] * (n_groups - len(splits))
    store = EmbeddingStore(path)
    specs = [("image", image_dim, ("noto", "openmoji")), ("text", text_dim, ("name", "alias"))]
    if audio_dim:
        specs.append(("audio", audio_dim, ("en",)))
    for modality, dim, views in specs:
        proj = rng.normal(size=(6, dim))
        rows, vecs = [], []
        for g in range(n_groups):
            for v in views:
                rows.append({"id": f"{modality}/{v}/{g}", "modality": modality, "view": v,
                             "group": f"g{g:03d}", "split": splits[g], "labels": {}})
                vecs.append(latent[g] @ proj + 0.3 * rng.normal(size=dim) + 0.5)
        store.add_array(modality, np.asarray(vecs, np.float32), rows,
                        info={"encoder": {"name": f"fake-{modality}"}})
    return store


def small_config(store: Path, run_dir: Path, **sections: dict[str, Any]) -> TrainConfig:
    """A fast config on a synthetic store; ``sections`` update the defaults per section."""
    base: dict[str, Any] = {
        "data": {"embeddings": str(store), "dataset": ""},
        "model": {"towers": {"image": "fake-image", "text": "fake-text", "audio": "fake-audio"},
                  "joint_dim": 8},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"epochs": 3, "batch_size": 8, "seed": 0, "progress": False,
                  "device": "cpu"},
        "run": {"dir": str(run_dir)},
    }
    for name, values in sections.items():
        if name == "objectives":
            base["objectives"] = values
        else:
            base.setdefault(name, {}).update(values)
    return TrainConfig.from_dict(base)


class TinyImageTower(Tower):
    """A two-stage random conv tower for 16x16 images (tests of partial unfreezing)."""

    name = "tiny-image"
    modality = "image"
    dim = 12

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.top = nn.Linear(4, self.dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def blocks(self) -> list[nn.Module]:
        return [self.stem, self.top]

    def preprocess(self, inputs: Any) -> torch.Tensor:
        from modalign.encoders.images import images_to_tensor

        return images_to_tensor(list(inputs), 16)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(batch)).mean(dim=(2, 3))
        return self.top(h)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name}


class HashTextEncoder:
    """A deterministic text 'tower': a seeded random vector per string."""

    name = "hash-text"
    modality = "text"
    dim = 8

    def preprocess(self, inputs: Any) -> list[str]:
        return list(inputs)

    def encode(self, batch: list[str]) -> torch.Tensor:
        out = []
        for s in batch:
            g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(s)))
            out.append(torch.randn(self.dim, generator=g))
        return torch.stack(out)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name}


def tiny_image_dataset(root: Path) -> tuple[Path, Path]:
    """24 concepts, a 16x16 image and two texts each, embedded with the tiny towers; returns the
    dataset folder and its store (groups 0-15 train, 16-19 val, 20-23 test)."""
    from PIL import Image

    from modalign.data.dataset import Item, PairedDataset
    from modalign.embed.encode import embed_dataset

    rng = np.random.default_rng(0)
    items = []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for g in range(24):
        split = "train" if g < 16 else ("val" if g < 20 else "test")
        colour = tuple(int(c) for c in rng.integers(0, 255, size=3))
        Image.new("RGB", (16, 16), colour).save(root / "img" / f"{g}.png")
        items.append(Item(f"i{g}", "image", "flat", f"img/{g}.png", f"g{g}", split))
        for v in ("name", "alias"):
            items.append(Item(f"t{g}{v}", "text", v, f"{v} of colour {colour}", f"g{g}", split))
    PairedDataset("tiny", items, root=root).save(root)
    store = root / "store"
    embed_dataset(PairedDataset.load(root), {"image": TinyImageTower(), "text": HashTextEncoder()},
                  store, progress=False)
    return root, store


class GroupTokenTower:
    """A token tower for tests: each input ``"<kind> g<N>"`` gives ``2 + N % 3`` tokens, noisy
    linear maps (one per kind) of group ``N``'s latent, so matching kinds must be learnt."""

    def __init__(self, modality: str, dim: int, seed: int, n_groups: int = 64) -> None:
        self.name, self.modality, self.dim = f"toy-tokens-{modality}", modality, dim
        rng = np.random.default_rng(seed)
        self.latent = np.random.default_rng(0).normal(size=(n_groups, 5))
        self.proj = rng.normal(size=(5, dim))
        self.seed = seed

    def preprocess(self, inputs: Any) -> list[str]:
        return [str(s) for s in inputs]

    def token_counts(self, inputs: Any) -> list[int]:
        return [2 + int(str(s).rsplit("g", 1)[1]) % 3 for s in inputs]

    def encode_tokens(self, batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        counts = self.token_counts(batch)
        out = torch.zeros(len(batch), max(counts), self.dim)
        mask = torch.zeros(len(batch), max(counts), dtype=torch.bool)
        for i, s in enumerate(batch):
            g = int(s.rsplit("g", 1)[1])
            rng = np.random.default_rng([self.seed, g, len(s)])
            for j in range(counts[i]):
                out[i, j] = torch.from_numpy(self.latent[g] @ self.proj
                                             + 0.8 * rng.normal(size=self.dim)).float()
                mask[i, j] = True
        return out, mask

    def identity(self) -> dict[str, Any]:
        return {"name": self.name}


def token_store(path: Path, n_groups: int = 48) -> Path:
    """A store of token arrays (image ``flat``; text ``name``, ``alias``), split 2/3 train,
    1/6 val, 1/6 test (``modalign embed --tokens`` written by :class:`GroupTokenTower`)."""
    from modalign.data import Item, PairedDataset
    from modalign.embed.tokens import embed_tokens

    items = []
    for g in range(n_groups):
        split = ("train" if g < n_groups * 2 // 3 else "val" if g < n_groups * 5 // 6
                 else "test")
        items += [Item(f"i{g}", "image", "flat", f"img/g{g}", f"g{g:03d}", split),
                  Item(f"n{g}", "text", "name", f"name g{g}", f"g{g:03d}", split),
                  Item(f"a{g}", "text", "alias", f"alias g{g}", f"g{g:03d}", split)]
    embed_tokens(PairedDataset("toy", items),
                 {"image": GroupTokenTower("image", 10, 1, n_groups),
                  "text": GroupTokenTower("text", 7, 2, n_groups)}, path, progress=False)
    return path


def assert_resumes_bitwise(make_config: Any, root: Path, stop_at: int,
                           towers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``make_config(run_dir)`` to the end with a checkpoint every step, then the same
    run stopped at its step-``stop_at`` checkpoint (later ones removed) and resumed: every saved
    module (model, objective, recipes) must end bit for bit equal. Returns the full run's last
    checkpoint weights."""
    import shutil

    from modalign.io import write_json_atomic
    from modalign.train.checkpoint import load_checkpoint
    from modalign.train.loop import train

    full = root / "full"
    train(make_config(full), towers=towers)
    ckpt = load_checkpoint(full / "checkpoints")
    part = root / "part"
    shutil.copytree(full, part)
    folder = part / "checkpoints"
    for later in folder.glob("ckpt-*"):
        if int(later.name.split("-")[1]) > stop_at:
            shutil.rmtree(later)
    name = f"ckpt-{stop_at:09d}"
    assert (folder / name).is_dir(), f"no checkpoint at step {stop_at}"
    write_json_atomic(folder / "latest.json", {"checkpoint": name, "step": stop_at})
    train(make_config(part), towers=towers, resume=True)
    other = load_checkpoint(folder)
    assert other.step == ckpt.step
    assert set(other.weights) == set(ckpt.weights)
    for module, weights in ckpt.weights.items():
        for k, v in weights.items():
            assert torch.equal(other.weights[module][k], v), f"{module}.{k}"
    return ckpt.weights


class WordTower(Tower):
    """A text tower with word-order-aware features (test stand-in for MiniLM)."""

    name = "word-text"
    modality = "text"
    dim = 10

    def preprocess(self, inputs):
        return list(inputs)

    def encode(self, batch):
        out = np.zeros((len(batch), self.dim))
        for r, t in enumerate(batch):
            for pos, w in enumerate(t.split()):
                seed = sum(map(ord, w)) * 31 + min(pos, 2)
                out[r] += np.random.default_rng(seed).normal(size=self.dim)
        return torch.tensor(out, dtype=torch.float32)

    def identity(self):
        return {"name": self.name}


def caption_store(path: Path) -> list[str]:
    """A store of colour-shape captions (text tower: :class:`WordTower`) and images derived
    from them; 28 training groups, 8 validation groups."""
    colours, shapes = ["red", "blue", "green", "yellow"], ["circle", "square", "heart"]
    caps = [f"{c} {s}" for c in colours for s in shapes] * 3
    rng = np.random.default_rng(0)
    store = EmbeddingStore(path)
    tower = WordTower()
    text = tower.encode(caps).numpy().astype(np.float32)
    img = text @ rng.normal(size=(10, 12)) + 0.1 * rng.normal(size=(len(caps), 12))
    split = lambda g: "train" if g < 28 else "val"  # noqa: E731
    store.add_array("image", img.astype(np.float32), [
        {"id": f"i{g}", "modality": "image", "view": "a", "group": f"g{g:02d}", "split": split(g),
         "labels": {}} for g in range(len(caps))], info={"encoder": {"name": "fake-image"}})
    store.add_array("text", text, [
        {"id": f"t{g}", "modality": "text", "view": "name", "group": f"g{g:02d}",
         "split": split(g), "value": c, "labels": {}} for g, c in enumerate(caps)],
        info={"encoder": {"name": "word-text"}})
    return caps


def train_in_one_and_two_processes(config: Path, root: Path) -> tuple[Checkpoint, Checkpoint]:
    """Train ``config`` in this process (``root/one``) and in 2 gloo processes under torchrun
    (``root/two``); return the two runs' last checkpoints."""
    from modalign.train.loop import train

    train(load_config(config, [f"run.dir={root / 'one'}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "modalign", "train", "--config",
                          str(config), "--run.dir", str(root / "two")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    return (load_checkpoint(root / "one" / "checkpoints"),
            load_checkpoint(root / "two" / "checkpoints"))
