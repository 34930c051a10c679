"""``train`` with the CMA objective on class prompts versus plain CLIP, on the emoji OoD protocol.

Protocol (that of ``benchmarks/after_training.py``): the Unicode group ``--holdout`` is removed
from the embedding store; the rest is ID. Three models with the same budget (the built-in
``clip`` config: frozen towers, linear heads, ``--epochs`` epochs, batch 256, lr 5e-3, no early
stopping, the best-validation epoch kept) are trained from scratch:

* ``clip``: InfoNCE on each concept's own texts (names, aliases);
* ``clip on class prompts``: the same loss (CMA with lambda 0) on class prompts: every image's
  text is a prompt of its subgroup (the four default templates), built with
  :func:`modalign.embed.class_prompts.class_prompt_store`;
* ``cma``: the CMA objective (lambda 0.001) on the same class prompts.

Each is measured on the ID test split (gap, cross-modal retrieval against the concept texts,
zero-shot over the ID subgroups) and on OoD detection (MCM and kNN, 95% bootstrap intervals,
paired intervals of the change against ``clip``).

    python benchmarks/cma_train.py --out docs/results/cma-train.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from modalign.data import EmojiOptions, build_emoji
from modalign.demo.ood import holdout_store, measure_ood
from modalign.embed import embed_dataset
from modalign.embed.class_prompts import class_prompt_store
from modalign.embed.paths import default_store_dir
from modalign.encoders import load_encoder
from modalign.evaluate.ood import bootstrap_difference
from modalign.evaluate.zeroshot import DEFAULT_TEMPLATES
from modalign.model import MultiTowerModel
from modalign.refine.core import class_prompt_features
from modalign.train.config import load_config
from modalign.train.loop import train

TOWERS = {"image": "effnet-lite0", "text": "minilm"}


def train_model(store_dir: Path, run_dir: Path, objective: dict[str, Any], epochs: int,
                seed: int) -> tuple[Path, float]:
    """Train the ``clip`` config on ``store_dir`` with ``objective``; (model folder, CPU s)."""
    model_dir = run_dir / "model"
    if (model_dir / "config.json").exists():
        return model_dir, float("nan")
    cfg = load_config("clip", [f"data.embeddings={store_dir}", f"train.seed={seed}",
                               f"train.epochs={epochs}", "validate.patience=0"])
    cfg.objectives = [objective]
    cfg.train.progress = False
    cpu = time.process_time()
    train(cfg, run_dir=run_dir)
    return model_dir, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="cma-train.json")
    p.add_argument("--work", default="runs/cma-train")
    p.add_argument("--holdout", default="Food & Drink")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    work = Path(args.work)
    ds = build_emoji(EmojiOptions(speech=False), progress=False)
    full = embed_dataset(ds, {m: load_encoder(s, modality=m) for m, s in TOWERS.items()},
                         default_store_dir(ds, TOWERS), progress=False)
    store = holdout_store(full, args.holdout, work / "store-id")
    prompts_store = class_prompt_store(store, load_encoder("minilm", modality="text"),
                                       "subgroup", work / "store-id-prompts",
                                       templates=DEFAULT_TEMPLATES)
    classnames = sorted({v for v in store.load("image").labels("subgroup") if v})
    runs = {
        "clip": (store, {"loss": "clip", "modalities": ["image", "text"]}),
        "clip on class prompts": (prompts_store, {"loss": "cma", "modalities": ["image", "text"],
                                                  "lam": 0.0}),
        "cma (lambda 0.001)": (prompts_store, {"loss": "cma", "modalities": ["image", "text"],
                                               "lam": 0.001}),
    }
    models: dict[str, Any] = {}
    base_scores = None
    for i, (name, (train_store, objective)) in enumerate(runs.items()):
        model_dir, train_cpu = train_model(train_store.path, work / f"run-{i}", objective,
                                           args.epochs, args.seed)
        model = MultiTowerModel.from_pretrained(model_dir)
        prompts = class_prompt_features(model, classnames, DEFAULT_TEMPLATES)
        row, scores = measure_ood(model, full, store, args.holdout, classnames, prompts,
                                  seed=args.seed)
        row = {**row, "objective": objective, "train_cpu_s": train_cpu}
        if base_scores is None:
            base_scores = scores
        else:
            for score, (s_id, s_ood) in scores.items():
                d = bootstrap_difference(*base_scores[score], s_id, s_ood, n_boot=1000,
                                         seed=args.seed)
                for key in ("auroc", "fpr@95tpr"):
                    row[f"delta_{score}/{key}"] = list(d[key])
        models[name] = row
        print(name, json.dumps(row), flush=True)
    result = {"holdout": args.holdout, "epochs": args.epochs, "seed": args.seed,
              "threads": args.threads, "num_id_classes": len(classnames), "models": models,
              "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
