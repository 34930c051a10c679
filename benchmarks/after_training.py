"""After-training methods on the emoji data: OoD protocol, CLIP-Refine / CMA, learned bridges.

Protocol: one Unicode group (``--holdout``, default "Food & Drink") is out-of-distribution: its
rows are removed from the embedding store before training, so none of its concepts is seen. A
CLIP-loss model (the built-in ``clip`` config, frozen towers) is trained on the rest. Then:

* OoD: ID = test images of the other groups, OOD = every image of the held-out group; MCM,
  energy, max-logit and kNN scores against the ID subgroups' prompt prototypes; AUROC, FPR@95TPR,
  AUPR with 95% bootstrap intervals (1,000 replicates).
* Refinement of the trained model (heads only): CLIP-Refine as published (raw features, T = 1,
  lr 1e-6, one epoch), a stronger raw variant (lr 1e-4, 5 epochs), the normalised variant (T = 0.01)
  and the CMA objective on subgroup prompts; gap, retrieval, zero-shot and OoD before/after.
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
from modalign.embed import EmbeddingStore, embed_dataset
from modalign.embed.paths import default_store_dir
from modalign.embed.store import Embeddings
from modalign.encoders import load_encoder
from modalign.evaluate.metrics import retrieval_metrics, self_exclusion
from modalign.evaluate.ood import bootstrap_difference, knn_scores, mcm_scores, ood_detection
from modalign.evaluate.zeroshot import DEFAULT_TEMPLATES
from modalign.geometry.gap import modality_gap
from modalign.model import MultiTowerModel
from modalign.refine.core import (
    RefineConfig,
    class_prompt_features,
    evaluate_model,
    prototypes,
    refine_model,
)
from modalign.train.data import PairedFeatures

TOWERS = {"image": "effnet-lite0", "text": "minilm"}


def id_store(store: EmbeddingStore, holdout: str, out: Path) -> EmbeddingStore:
    """A copy of ``store`` without the rows of group ``holdout`` (all splits)."""
    new = EmbeddingStore(out)
    for m in ("image", "text"):
        if m in new.arrays:
            continue
        emb = store.load(m)
        keep = np.array([v != holdout for v in emb.labels("group")])
        rows = [emb.items[i] for i in np.flatnonzero(keep)]
        new.add_array(m, np.asarray(emb.vectors)[keep], rows,
                      info={k: v for k, v in store.info(m).items()
                            if k not in ("file", "count", "hash")})
    return new


def train_model(store: EmbeddingStore, out: Path, seed: int) -> Path:
    from modalign.train.config import load_config
    from modalign.train.loop import train

    model_dir = out / "model"
    if (model_dir / "model.safetensors").exists():
        return model_dir
    cfg = load_config("clip", [f"data.embeddings={store.path}", f"train.seed={seed}"])
    cfg.train.progress = False
    train(cfg, run_dir=out, resume=(out / "checkpoints").exists())
    return model_dir


def ood(model: MultiTowerModel, full: EmbeddingStore, train_store: EmbeddingStore, holdout: str,
        classnames: list[str], prompt_feats: torch.Tensor, seed: int
        ) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]]]:
    img = full.load("image")
    proj = Embeddings(model.project_array("image", img.vectors), img.items, img.group_index)
    groups = np.array(proj.labels("group"))
    split = np.array([it["split"] for it in proj.items])
    ind = proj.subset((groups != holdout) & (split == "test"))
    out = proj.subset(groups == holdout)
    bank_raw = train_store.load("image", split="train")
    bank = Embeddings(model.project_array("image", bank_raw.vectors), bank_raw.items,
                      bank_raw.group_index)
    protos = prototypes(model, prompt_feats)
    r = ood_detection(ind, out, protos, classnames, label="subgroup",
                      bank=bank, n_boot=1000, seed=seed, templates=DEFAULT_TEMPLATES)
    metrics = {k: v for k, v in r.metrics.items()
               if k.split("/")[-1].startswith(("auroc", "fpr", "aupr_in")) or k.startswith("id_")}
    x_id = F.normalize(torch.from_numpy(np.asarray(ind.vectors)).double(), dim=1)
    x_ood = F.normalize(torch.from_numpy(np.asarray(out.vectors)).double(), dim=1)
    p = F.normalize(protos.double(), dim=1)
    b = torch.from_numpy(np.asarray(bank.vectors))
    scores = {"mcm": (mcm_scores(x_id @ p.T).numpy(), mcm_scores(x_ood @ p.T).numpy()),
              "knn": (knn_scores(x_id, b).numpy(), knn_scores(x_ood, b).numpy())}
    return metrics, scores


def measure(model: MultiTowerModel, full: EmbeddingStore, store: EmbeddingStore, holdout: str,
            classnames: list[str], prompt_feats: torch.Tensor, seed: int
            ) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]]]:
    m = evaluate_model(model, store, split="test", label="subgroup", prompt_features=prompt_feats,
                       classnames=classnames)
    metrics, scores = ood(model, full, store, holdout, classnames, prompt_feats, seed)
    m.update(metrics)
    return m, scores


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

    def metrics(queries: torch.Tensor) -> dict[str, float]:
        cross = retrieval_metrics(queries, t, qg[sel], tg, k_values=(1, 5)).metrics
        intra = retrieval_metrics(queries, q, qg[sel], qg, k_values=(1, 5),
                                  exclude=exclude).metrics
        return {"i2t_recall@1": cross["recall@1"], "i2t_recall@5": cross["recall@5"],
                "i2t_map": cross["map"], "i2i_recall@1": intra["recall@1"],
                "i2i_map": intra["map"],
                "query_gap": modality_gap(queries.numpy(), t.numpy()).centroid_distance}

    out: dict[str, Any] = {"native": {**metrics(q[sel]), "seconds_per_1000": 0.0,
                                      "split_gap": modality_gap(q.numpy(),
                                                                t.numpy()).centroid_distance}}
    x, y = group_pairs(train["image"], train["text"])
    kinds = [("procrustes", 0), ("lstsq", 0), ("mlp", 0)] + [("diffusion-link", s)
                                                             for s in range(3)]
    for kind, s in kinds:
        extra = {"steps": dl_steps, "hidden": dl_hidden} if kind == "diffusion-link" else {}
        start = time.process_time()
        b = LearnedBridge(kind, "image", "text", seed=s, **extra).fit_pairs(x, y)
        fit_cpu = time.process_time() - start
        start = time.perf_counter()
        mapped_all = b.map(q)
        per_1000 = (time.perf_counter() - start) / len(q) * 1000
        row = {**metrics(mapped_all[sel]), "seconds_per_1000": per_1000, "fit_cpu_s": fit_cpu,
               "split_gap": modality_gap(mapped_all.numpy(), t.numpy()).centroid_distance}
        out[f"{kind}" + (f"/seed{s}" if kind == "diffusion-link" else "")] = row
    towers = LabTowers.from_specs(TOWERS)
    start = time.perf_counter()
    inverted, _ = invert_queries(model, towers, "text", q[sel], [ids[i] for i in rows],
                                 oti_steps, LabConfig().oti_lr, seed)
    oti_s = time.perf_counter() - start
    out["oti"] = {**metrics(inverted), "seconds_per_1000": oti_s / len(rows) * 1000,
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
    p.add_argument("--dl-steps", type=int, default=800)
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
    slug = "".join(ch if ch.isalnum() else "-" for ch in args.holdout.lower())
    store = id_store(full, args.holdout, work / f"store-id-{slug}")
    model_dir = train_model(store, work / f"clip-id-{slug}", args.seed)
    model = MultiTowerModel.from_pretrained(model_dir)
    classnames = sorted({v for v in store.load("image").labels("subgroup") if v})
    prompt_feats = class_prompt_features(model, classnames, DEFAULT_TEMPLATES)
    result: dict[str, Any] = {"holdout": args.holdout, "seed": args.seed,
                              "num_id_classes": len(classnames), "threads": args.threads}
    result["base"], base_scores = measure(model, full, store, args.holdout, classnames,
                                          prompt_feats, args.seed)
    print("base", json.dumps(result["base"]), flush=True)
    skip = set(args.skip.split(","))
    if "refine" not in skip:
        data = PairedFeatures(store, ["image", "text"], "train")
        longer = {"lr": 1e-4, "epochs": 10, "batch_size": 128, "seed": args.seed}
        cma = {"method": "cma", "label": "subgroup", "templates": DEFAULT_TEMPLATES}
        variants = {
            "clip-refine official (raw, T=1, lr 1e-6, 1 epoch, batch 512)":
                RefineConfig(seed=args.seed),
            "clip-refine raw, T=1": RefineConfig(**longer),
            "clip-refine normalised, T=0.01": RefineConfig(normalize=True, temperature=0.01,
                                                           **longer),
            "cma (lambda 0.001)": RefineConfig(lambda_kd=0.0, **cma, **longer),
            "cma (lambda 0.001) + HyCD": RefineConfig(**cma, **longer),
        }
        result["refine"] = {}
        for name, cfg in variants.items():
            start = time.process_time()
            r = refine_model(model, data, cfg, prompt_features=prompt_feats,
                             classnames=classnames)
            row, scores = measure(r.model, full, store, args.holdout, classnames, prompt_feats,
                                  args.seed)
            row.update({"steps": r.steps, "refine_cpu_s": time.process_time() - start})
            for score, (s_id, s_ood) in scores.items():
                d = bootstrap_difference(*base_scores[score], s_id, s_ood, n_boot=1000,
                                         seed=args.seed)
                for key in ("auroc", "fpr@95tpr"):
                    row[f"delta_{score}/{key}"] = list(d[key])
            result["refine"][name] = row
            print(name, json.dumps(row), flush=True)
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
