"""The "Cross the Gap" claims measured on trained emoji models: native against inverted queries.

For each model (``NAME=MODEL_DIR``), on the test split of the emoji data:

1. image -> image across styles (``noto`` queries, ``openmoji`` gallery, and the reverse): the
   native image query against its OTI-inverted text-side feature; gallery native; same emoji =
   relevant. mAP over the full ranking and R@1.
2. text -> text: a concept's name as query against the other names (aliases) as gallery, native
   against the OVI-inverted image-side feature of the name.
3. zero-shot classification into Unicode subgroups: inter-modal (image against class-prompt
   prototypes) against intra-modal (OTI-inverted image against the same prototypes).

Inverted features are cached in the model's embedding store (keyed, resumable), so a rerun only
evaluates. Prints one JSON object per line (``ours`` = inverted query, ``baseline`` = native) and
writes one result JSON per model and task under ``--out``.

Usage:
    python benchmarks/inversion_claims.py --model clip=runs/clip/model --concepts 64
    python benchmarks/inversion_claims.py --model clip=runs/clip/model --quick
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from modalign.bridge.inversion import (
    InversionSettings,
    ProjectedForward,
    encoder_inversion,
)
from modalign.bridge.inversion.store import invert_into_store
from modalign.embed import Embeddings, EmbeddingStore
from modalign.evaluate.metrics import retrieval_metrics
from modalign.evaluate.zeroshot import class_name, encode_prototypes, zero_shot_classification
from modalign.io import file_hash, write_json_atomic

NAME = "inversion_claims"


def unit(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.array(x, dtype=np.float32))
    return torch.nn.functional.normalize(t, dim=1)


def pick_concepts(images: Embeddings, texts: Embeddings, limit: int | None) -> list[str]:
    """Test concepts with both image styles, a name and at least one alias (sorted, first N)."""
    views: dict[str, set[str]] = {}
    for it in [*images.items, *texts.items]:
        views.setdefault(it["group"], set()).add(it["view"])
    ok = sorted(g for g, v in views.items() if {"noto", "openmoji", "name", "alias"} <= v)
    return ok[:limit] if limit else ok


def rows_of(emb: Embeddings, groups: set[str], view: str) -> Embeddings:
    return emb.subset([i for i, it in enumerate(emb.items)
                       if it["group"] in groups and it["view"] == view])


def invert_rows(model: Any, store: EmbeddingStore, source: Embeddings, dst: str,
                settings: InversionSettings, model_dir: str, **hook: Any
                ) -> tuple[torch.Tensor, float]:
    tower = model.tower(dst)
    forward = ProjectedForward(encoder_inversion(tower, **hook),
                               lambda f: model.project(dst, f), head_name=f"model head {dst}")
    method = "oti" if dst == "text" else "ovi"
    context = {"direction": f"{source.items[0]['modality']}-to-{dst}", "split": "test",
               "model_weights": file_hash(Path(model_dir) / "model.safetensors"),
               "tower": tower.identity()}
    name = invert_into_store(store, torch.as_tensor(np.array(source.vectors)), source.items,
                             forward, settings, method=method, context=context)
    inverted = store.load(name)
    return unit(inverted.vectors), float(np.mean([it["final_cosine"] for it in inverted.items]))


def retrieval_pair(q_native: torch.Tensor, q_inverted: torch.Tensor, q_groups: np.ndarray,
                   gallery: torch.Tensor, g_groups: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for label, q in (("native", q_native), ("inverted", q_inverted)):
        r = retrieval_metrics(q, gallery, torch.as_tensor(q_groups), torch.as_tensor(g_groups))
        out[label] = {"map": r.metrics["map"], "recall@1": r.metrics["recall@1"],
                      "recall@5": r.metrics["recall@5"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="a trained model folder, repeatable")
    parser.add_argument("--data", default="emoji", help="dataset spec (default emoji)")
    parser.add_argument("--concepts", type=int, default=None,
                        help="first N eligible test concepts as queries (default all)")
    parser.add_argument("--oti-steps", type=int, default=150)
    parser.add_argument("--ovi-steps", type=int, default=1000)
    parser.add_argument("--ovi-tokens", type=int, default=16, help="CNN pseudo-patches P")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-ovi", action="store_true", help="only the OTI claims (1 and 3)")
    parser.add_argument("--out", default="docs/results/inversion", help="result JSON folder")
    parser.add_argument("--quick", action="store_true", help="8 concepts, 5 OTI / 5 OVI steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.concepts, args.oti_steps, args.ovi_steps = 8, 5, 5

    from modalign.data import load_dataset
    from modalign.embed.joint import load_joint
    from modalign.embed.paths import default_store_dir
    from modalign.model import MultiTowerModel

    dataset = load_dataset(args.data)
    out_dir = Path(args.out)
    for spec in args.model:
        label, _, model_dir = spec.partition("=")
        model = MultiTowerModel.from_pretrained(model_dir).eval()
        objectives = json.loads(
            (Path(model_dir) / "config.json").read_text())["extra"].get("objectives")
        joint = load_joint(model_dir=model_dir, data=args.data, split="test",
                           modalities=["image", "text"], progress=False)
        images, texts = joint["image"], joint["text"]
        store = EmbeddingStore(default_store_dir(dataset, model.config.towers))
        groups = set(pick_concepts(images, texts, args.concepts))
        common = {"model": label, "model_dir": model_dir, "objectives": objectives,
                  "data": args.data, "split": "test", "concepts": len(groups)}

        def emit(task: str, metric: str, case: dict[str, Any], ours: float, base: float,
                 label: str = label) -> None:
            print(json.dumps({"benchmark": NAME, "case": {"model": label, "task": task, **case},
                              "metric": metric, "ours": round(ours, 4), "baseline": round(base, 4),
                              "baseline_name": "native query"}), flush=True)

        # 1 + 3: OTI of every query image (both styles)
        oti_settings = InversionSettings(steps=args.oti_steps, batch_size=args.batch_size)
        query_imgs = images.subset([i for i, it in enumerate(images.items)
                                    if it["group"] in groups])
        t0 = time.perf_counter()
        oti, oti_cos = invert_rows(model, store, query_imgs, "text", oti_settings, model_dir)
        oti_seconds = time.perf_counter() - t0
        native_q = unit(query_imgs.vectors)
        qgroups = query_imgs.group_ids()
        result: dict[str, Any] = {**common, "task": "image-to-image across styles",
                                  "oti": {**oti_settings.as_dict(), "template": "a photo of {}",
                                          "mean_final_cosine": oti_cos,
                                          "seconds": round(oti_seconds, 1)}, "directions": []}
        for qv, gv in (("noto", "openmoji"), ("openmoji", "noto")):
            rows = [i for i, it in enumerate(query_imgs.items) if it["view"] == qv]
            gallery = images.filter(view=gv)
            res = retrieval_pair(native_q[rows], oti[rows], qgroups[rows],
                                 unit(gallery.vectors), gallery.group_ids())
            result["directions"].append({"query": f"image:{qv}", "gallery": f"image:{gv}",
                                         "queries": len(rows), "gallery_size": len(gallery),
                                         **res})
            for m in ("map", "recall@1"):
                emit("image-to-image", m, {"query": qv, "gallery": gv},
                     res["inverted"][m], res["native"][m])
        write_json_atomic(out_dir / f"{label}.image_to_image.json", result)

        classnames = sorted({it["labels"]["subgroup"] for it in images.items})
        prototypes = encode_prototypes(lambda p, m=model: m.encode("text", p),
                                       [class_name(c) for c in classnames])
        zs = {}
        for kind, override in (("inter-modal (image vs prompts)", None),
                               ("intra-modal (OTI vs prompts)", oti)):
            r = zero_shot_classification(query_imgs, prototypes, classnames, label="subgroup",
                                         query_override=override)
            zs[kind] = {k: float(v) for k, v in r.metrics.items()}
        emit("zero-shot-subgroup", "acc1", {"classes": len(classnames)},
             zs["intra-modal (OTI vs prompts)"]["acc1"],
             zs["inter-modal (image vs prompts)"]["acc1"])
        write_json_atomic(out_dir / f"{label}.zero_shot.json",
                          {**common, "task": "zero-shot subgroup", "classes": len(classnames),
                           "inputs": len(query_imgs), "templates": "modalign default", **zs})

        if args.skip_ovi:
            continue
        # 2: OVI of the names
        names = rows_of(texts, groups, "name")
        gallery = texts.subset([i for i, it in enumerate(texts.items) if it["view"] != "name"])
        ovi_settings = InversionSettings(steps=args.ovi_steps, batch_size=args.batch_size)
        t0 = time.perf_counter()
        ovi, ovi_cos = invert_rows(model, store, names, "image", ovi_settings, model_dir,
                                   num_tokens=args.ovi_tokens)
        res = retrieval_pair(unit(names.vectors), ovi, names.group_ids(), unit(gallery.vectors),
                             gallery.group_ids())
        for m in ("map", "recall@1"):
            emit("text-to-text", m, {"query": "name", "gallery": "alias"},
                 res["inverted"][m], res["native"][m])
        write_json_atomic(out_dir / f"{label}.text_to_text.json", {
            **common, "task": "text-to-text (name -> aliases)", "queries": len(names),
            "gallery_size": len(gallery),
            "ovi": {**ovi_settings.as_dict(), "num_tokens": args.ovi_tokens, "stage": 0,
                    "mean_final_cosine": ovi_cos, "seconds": round(time.perf_counter() - t0, 1)},
            **res})


if __name__ == "__main__":
    main()
