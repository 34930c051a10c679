"""Tiny on-disk fixtures for the benchmark and reproduce tests: images, split files, a CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def byte_chars() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE uses for bytes 0..255."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_png(path: Path, seed: int, size: int = 8) -> None:
    """A tiny random RGB PNG (deterministic in ``seed``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random-weight transformers CLIP (2 layers, width 32) with a byte-level CLIP tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["Â£</w>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nÂ £</w>\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=16),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                       ).save_pretrained(folder)
    return folder


CAPTION_WORDS = ("red", "blue", "cat", "dog", "car", "tree", "sky", "sea", "house", "bird")


def _caption(image: int, k: int) -> str:
    w = CAPTION_WORDS
    return f"a {w[image % 10]} {w[(image + k + 1) % 10]} number {image} caption {k}"


def write_karpathy(root: Path, name: str = "coco", n_images: int = 6, captions: int = 3) -> Path:
    """A Karpathy split file plus tiny images; splits cycle through train/restval/val/test."""
    folder = root / name
    splits = ("train", "restval", "val", "test", "test", "val")
    images = []
    for i in range(n_images):
        entry = {"filename": f"img{i}.jpg" if name == "coco" else f"{1000 + i}.jpg",
                 "split": splits[i % len(splits)], "imgid": i,
                 "sentences": [{"raw": _caption(i, k), "tokens": []} for k in range(captions)]}
        if name == "coco":
            entry["filepath"] = "val2014"
            entry["cocoid"] = 500 + i
        sub = "val2014" if name == "coco" else "flickr30k-images"
        write_png(folder / sub / entry["filename"], i)
        images.append(entry)
    (folder / f"dataset_{name}.json").write_text(json.dumps({"images": images, "dataset": name}))
    return folder


def write_nocaps(root: Path, n_images: int = 4, captions: int = 3) -> Path:
    folder = root / "nocaps"
    images = [{"id": i, "file_name": f"{i:04d}.jpg", "domain": "in-domain"}
              for i in range(n_images)]
    anns = [{"id": 100 * i + k, "image_id": i, "caption": _caption(i, k)}
            for i in range(n_images) for k in range(captions)]
    for im in images:
        write_png(folder / "val" / im["file_name"], im["id"])
    (folder / "nocaps_val_4500_captions.json").write_text(
        json.dumps({"images": images, "annotations": anns}))
    return folder


def write_cub(root: Path, n_classes: int = 3, per_class: int = 3) -> Path:
    folder = root / "CUB_200_2011"
    classes, images, labels, split = [], [], [], []
    k = 0
    for c in range(1, n_classes + 1):
        cname = f"{c:03d}.Bird_{c}_Species"
        classes.append(f"{c} {cname}")
        for j in range(per_class):
            k += 1
            rel = f"{cname}/Bird_{c}_{j}.jpg"
            write_png(folder / "images" / rel, k)
            images.append(f"{k} {rel}")
            labels.append(f"{k} {c}")
            split.append(f"{k} {j % 2}")
    for fname, lines in (("classes.txt", classes), ("images.txt", images),
                         ("image_class_labels.txt", labels), ("train_test_split.txt", split)):
        (folder / fname).write_text("\n".join(lines) + "\n")
    return folder


def write_sop(root: Path, n_products: int = 3, per_product: int = 2) -> Path:
    folder = root / "Stanford_Online_Products"
    k = 0
    for split_name, offset in (("train", 0), ("test", 100)):
        lines = ["image_id class_id super_class_id path"]
        for p in range(n_products):
            for j in range(per_product):
                k += 1
                rel = f"bicycle_final/{offset + p}_{j}.JPG"
                write_png(folder / rel, k)
                lines.append(f"{k} {offset + p + 1} 1 {rel}")
        (folder / f"Ebay_{split_name}.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_revisited(root: Path, name: str = "roxford5k", n_db: int = 8, n_queries: int = 2,
                    distractors: int = 2) -> Path:
    """A revisited dataset whose ``gnd`` holds numpy arrays and lists, pickled like the original."""
    import pickle

    folder = root / name
    imlist = [f"{name}_db_{i}" for i in range(n_db)]
    qimlist = [f"{name}_q_{i}" for i in range(n_queries)]
    gnd = []
    for q in range(n_queries):
        gnd.append({"bbx": [1.0, 2.0, 30.0, 40.0],
                    "easy": np.array([q, q + 2], dtype=np.int64),
                    "hard": [q + 4],
                    "junk": np.array([q + 6], dtype=np.int64)})
    for i, im in enumerate(imlist + qimlist):
        write_png(folder / "jpg" / f"{im}.jpg", i)
    with open(folder / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    if distractors:
        r1m = root / "revisitop1m"
        names = [f"0/{j}.jpg" for j in range(distractors + 1)]
        for j, rel in enumerate(names[:distractors]):  # the last one is listed but not on disk
            write_png(r1m / "jpg" / rel, 1000 + j)
        (r1m / "revisitop1m.txt").write_text("\n".join(names) + "\n")
    return folder


COOP_SPLIT_FILES = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
COOP_CLASSES = ("sea_lion", "apple pie", "Boeing 707")


def write_coop(root: Path, name: str, per_split: dict[str, int] | None = None) -> Path:
    """One CoOp dataset in its layout, ``per_split`` images per class and split."""
    per_split = per_split or {"train": 2, "val": 1, "test": 1}
    k = 0
    if name == "fgvc_aircraft":
        folder = root / "fgvc_aircraft"
        (folder).mkdir(parents=True, exist_ok=True)
        (folder / "variants.txt").write_text("\n".join(COOP_CLASSES) + "\n")
        for split, n in per_split.items():
            lines = []
            for cname in COOP_CLASSES:
                for _ in range(n):
                    k += 1
                    write_png(folder / "images" / f"{1000 + k}.jpg", k)
                    lines.append(f"{1000 + k} {cname}")
            (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        return folder
    if name == "imagenet":
        folder = root / "imagenet"
        wnids = [f"n0000000{c}" for c in range(len(COOP_CLASSES))]
        (folder).mkdir(parents=True, exist_ok=True)
        (folder / "classnames.txt").write_text(
            "\n".join(f"{w} {c}" for w, c in zip(wnids, COOP_CLASSES)) + "\n")
        for sub, n in (("train", per_split["train"]), ("val", per_split["test"])):
            for w in wnids:
                for _ in range(n):
                    k += 1
                    write_png(folder / "images" / sub / w / f"{w}_{k}.JPEG", k)
        return folder
    dirname, image_dir, split_file = COOP_SPLIT_FILES[name]
    folder = root / dirname
    data: dict[str, list[list[object]]] = {}
    for split, n in per_split.items():
        data[split] = []
        for c, cname in enumerate(COOP_CLASSES):
            for _ in range(n):
                k += 1
                rel = f"{cname.replace(' ', '_')}/image_{k:04d}.jpg"
                write_png(folder / image_dir / rel, k)
                data[split].append([rel, c, cname])
    (folder / split_file).write_text(json.dumps(data))
    return folder


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (tiny models only lose to thread hand-offs)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
