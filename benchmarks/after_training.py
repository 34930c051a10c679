"""After-training methods on the emoji data: OoD protocol, CLIP-Refine / CMA, learned bridges.

Protocol: one Unicode group (``--holdout``, default "Food & Drink") is out-of-distribution: its
rows are removed from the embedding store before training, so none of its concepts is seen. A
CLIP-loss model (the built-in ``clip`` config, frozen towers) is trained on the rest. Then:

* OoD: ID = test images of the other groups, OOD = every image of the held-out group; MCM,
  energy, max-logit and kNN scores against the ID subgroups' prompt prototypes; AUROC, FPR@95TPR,
  AUPR with 95% bootstrap intervals (1,000 replicates).
* Refinement of the trained model (heads only), see ``modalign.demo.ood.default_variants``:
  CLIP-Refine as published (raw features, T = 1, lr 1e-6, one epoch), longer raw and normalised
  (T = 0.01) variants (lr 1e-4, 10 epochs, batch 128), and the CMA objective on subgroup prompts
  (alone and with HyCD); gap, retrieval, zero-shot and OoD before/after, with paired bootstrap
  intervals of the change in MCM and kNN AUROC / FPR95.
* Bridges image -> text fitted on the ID training split: Procrustes, least squares, MLP,
  Diffusion-Link (3 seeds), and OTI on the same 64 test queries, with seconds per 1,000 queries.

    python benchmarks/after_training.py --out docs/results/after-training.json
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

import numpy as np
import torch
import torch.nn.functional as F

from modalign.bridge.learned import LearnedBridge, group_pairs
from modalign.data import EmojiOptions, build_emoji
from modalign.demo.ood import run_ood_protocol
from modalign.embed import EmbeddingStore, embed_dataset
from modalign.embed.paths import default_store_dir
from modalign.embed.store import Embeddings
from modalign.encoders import load_encoder
from modalign.evaluate.metrics import retrieval_metrics, self_exclusion
from modalign.geometry.gap import modality_gap
from modalign.model import MultiTowerModel

TOWERS = {"image": "effnet-lite0", "text": "minilm"}


def paired_mean_change(a: np.ndarray, b: np.ndarray, seed: int, n_boot: int = 2000
                       ) -> list[float]:
    """``[mean(b - a), lo, hi]``: percentile bootstrap over the queries (95%)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
    return [float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def bridges(model: MultiTowerModel, store: EmbeddingStore, n_queries: int, oti_steps: int,
            dl_steps: int, dl_hidden: int, seed: int) -> dict[str, Any]:
    """Image -> text bridges and OTI on the same test queries (noto images)."""
    from modalign.lab.measure import LabTowers, invert_queries
    from modalign.lab.settings import LabConfig

    joint = {}
    for m in ("image", "text"):
        e = store.load(m)
        joint[m] = Embeddings(model.project_array(m, e.vectors), e.items, e.group_index)
    train = {m: e.filter(split="train") for m, e in joint.items()}
    test = {m: e.filter(split="test") for m, e in joint.items()}
    rng = np.random.default_rng(seed)
    noto = [i for i, it in enumerate(test["image"].items) if it["view"] == "noto"]
    rows = np.sort(rng.choice(noto, size=min(n_queries, len(noto)), replace=False))
    q = F.normalize(torch.from_numpy(np.asarray(test["image"].vectors)), dim=1)
    t = F.normalize(torch.from_numpy(np.asarray(test["text"].vectors)), dim=1)
    qg = torch.from_numpy(test["image"].group_ids())
    tg = torch.from_numpy(test["text"].group_ids())
    ids = [it["id"] for it in test["image"].items]
    exclude = self_exclusion([ids[i] for i in rows], ids)
    sel = torch.from_numpy(rows)

    per_query: dict[str, dict[str, np.ndarray]] = {}

    def metrics(queries: torch.Tensor, name: str) -> dict[str, float]:
        cross = retrieval_metrics(queries, t, qg[sel], tg, k_values=(1, 5))
        intra = retrieval_metrics(queries, q, qg[sel], qg, k_values=(1, 5), exclude=exclude)
        per_query[name] = {"i2t_recall@1": cross.per_query["recall@1"].numpy(),
                           "i2i_map": intra.per_query["map"].numpy()}
        out = {"i2t_recall@1": cross.metrics["recall@1"], "i2t_recall@5": cross.metrics[
            "recall@5"], "i2t_map": cross.metrics["map"],
            "i2i_recall@1": intra.metrics["recall@1"], "i2i_map": intra.metrics["map"],
            "query_gap": modality_gap(queries.numpy(), t.numpy()).centroid_distance}
        if name != "native":  # paired bootstrap over the queries: change against native
            for key, values in per_query[name].items():
                out[f"delta_{key}"] = paired_mean_change(per_query["native"][key], values, seed)
        return out

    out: dict[str, Any] = {"native": {**metrics(q[sel], "native"), "seconds_per_1000": 0.0,
                                      "split_gap": modality_gap(q.numpy(),
                                                                t.numpy()).centroid_distance}}
    x, y = group_pairs(train["image"], train["text"])
    kinds = [("procrustes", 0), ("lstsq", 0), ("mlp", 0)] + [("diffusion-link", s)
                                                             for s in range(3)]
    for kind, s in kinds:
        extra = ({"steps": dl_steps, "hidden": dl_hidden, "batch_size": 128}
                 if kind == "diffusion-link" else {})
        start = time.process_time()
        b = LearnedBridge(kind, "image", "text", seed=s, **extra).fit_pairs(x, y)
        fit_cpu = time.process_time() - start
        start = time.perf_counter()
        mapped_all = b.map(q)
        per_1000 = (time.perf_counter() - start) / len(q) * 1000
        name = kind + (f"/seed{s}" if kind == "diffusion-link" else "")
        row = {**metrics(mapped_all[sel], name), "seconds_per_1000": per_1000,
               "fit_cpu_s": fit_cpu,
               "split_gap": modality_gap(mapped_all.numpy(), t.numpy()).centroid_distance}
        out[name] = row
        print(kind, s, json.dumps(row), flush=True)
    towers = LabTowers.from_specs(TOWERS)
    start = time.perf_counter()
    oti_lr = LabConfig.__dataclass_fields__["oti_lr"].default  # the official 0.02
    inverted, _ = invert_queries(model, towers, "text", q[sel], [ids[i] for i in rows],
                                 oti_steps, oti_lr, seed)
    oti_s = time.perf_counter() - start
    out["oti"] = {**metrics(inverted, "oti"), "seconds_per_1000": oti_s / len(rows) * 1000,
                  "steps": oti_steps}
    out["num_queries"] = len(rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="after-training.json")
    p.add_argument("--work", default="runs/after-training")
    p.add_argument("--holdout", default="Food & Drink")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--oti-steps", type=int, default=150)
    p.add_argument("--dl-steps", type=int, default=600)
    p.add_argument("--dl-hidden", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", default="", help="comma list: refine,bridges")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    work = Path(args.work)
    ds = build_emoji(EmojiOptions(speech=False), progress=False)
    full = embed_dataset(ds, {m: load_encoder(s, modality=m) for m, s in TOWERS.items()},
                         default_store_dir(ds, TOWERS), progress=False)
    skip = set(args.skip.split(","))
    variants = None if "refine" not in skip else {}
    summary = run_ood_protocol(full, work, holdout=args.holdout, seed=args.seed,
                               variants=variants)
    # paths relative to --work: the results file must not carry this machine's paths
    public = {k: (str(Path(v).relative_to(work)) if k in ("model_dir", "store_dir") else v)
              for k, v in summary.items()}
    result: dict[str, Any] = {"ood": public, "seed": args.seed, "threads": args.threads}
    print("ood", json.dumps(summary), flush=True)
    store = EmbeddingStore(summary["store_dir"])
    model = MultiTowerModel.from_pretrained(summary["model_dir"])
    if "bridges" not in skip:
        result["bridges"] = bridges(model, store, args.queries, args.oti_steps, args.dl_steps,
                                    args.dl_hidden, args.seed)
        print("bridges", json.dumps(result["bridges"]), flush=True)
    result["wall_s"] = time.perf_counter() - wall
    result["cpu_s"] = time.process_time() - cpu
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
