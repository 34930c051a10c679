"""The emoji OoD protocol: one Unicode group held out of training, MCM before/after refinement.

A ``clip`` model (frozen towers) is trained on an embedding store from which every row of the
held-out group was removed, so none of its concepts is seen. ID = the other groups' test images,
OOD = every image of the held-out group; classes = the ID subgroups, prototypes from the default
prompt templates. The model is then refined with CLIP-Refine and with the CMA objective, and each
version is measured: gap, retrieval, zero-shot, and OoD scores (MCM, kNN) with bootstrap intervals
and paired intervals of the change. Used by the demo (its "Out-of-distribution" section) and by
``benchmarks/after_training.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modalign.embed.store import Embeddings, EmbeddingStore
from modalign.errors import ModalignError
from modalign.evaluate.ood import bootstrap_difference, knn_scores, mcm_scores, ood_detection
from modalign.evaluate.zeroshot import DEFAULT_TEMPLATES
from modalign.io import content_hash
from modalign.model import MultiTowerModel
from modalign.refine.core import (
    RefineConfig,
    class_prompt_features,
    evaluate_model,
    prototypes,
    refine_model,
)

DEFAULT_HOLDOUT = "Food & Drink"
"""The Unicode group held out by default (133 concepts, none resembling faces or symbols)."""

SCORES = ("mcm", "knn")
"""The scores of the report table and of the paired comparisons (all four are measured)."""


def pick_holdout(store: EmbeddingStore, preferred: str = DEFAULT_HOLDOUT) -> str | None:
    """``preferred`` if the store has it and another group; else the smallest other group with
    test rows; ``None`` when the data has a single group (no protocol possible).

    Examples:
        >>> import tempfile
        >>> store = EmbeddingStore(tempfile.mkdtemp())
        >>> rows = [{"id": f"i{i}", "modality": "image", "view": "v", "group": f"g{i}",
        ...          "split": "test", "labels": {"group": "A" if i < 3 else "B"}}
        ...         for i in range(5)]
        >>> store.add_array("image", np.ones((5, 2), np.float32), rows)
        >>> pick_holdout(store)
        'B'
    """
    groups = store.load("image").labels("group")
    counts: dict[str, int] = {}
    for g in groups:
        if g:
            counts[g] = counts.get(g, 0) + 1
    if len(counts) < 2:
        return None
    if preferred in counts:
        return preferred
    return min(counts, key=lambda g: (counts[g], g))


def holdout_store(store: EmbeddingStore, holdout: str, folder: str | Path) -> EmbeddingStore:
    """A copy of ``store``'s image and text arrays without the rows of group ``holdout``."""
    new = EmbeddingStore(folder)
    for m in ("image", "text"):
        if m in new.arrays:
            continue
        emb = store.load(m)
        keep = np.array([v != holdout for v in emb.labels("group")])
        rows = [emb.items[i] for i in np.flatnonzero(keep)]
        info = {k: v for k, v in store.info(m).items() if k not in ("file", "count", "hash")}
        new.add_array(m, np.asarray(emb.vectors)[keep], rows, info=info)
    return new


def train_id_model(store: EmbeddingStore, run_dir: str | Path, *, seed: int = 0,
                   overrides: Sequence[str] = (), progress: bool = False) -> Path:
    """Train the built-in ``clip`` config on ``store`` (resumes; reuses a finished run).

    The run folder is keyed by the caller; a changed store or config needs a new ``run_dir``.
    """
    from modalign.train.config import load_config
    from modalign.train.loop import train

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if (model_dir / "model.safetensors").exists() and (model_dir / "config.json").exists():
        return model_dir
    cfg = load_config("clip", [f"data.embeddings={store.path}", f"train.seed={seed}",
                               *overrides])
    cfg.train.progress = progress
    train(cfg, run_dir=run_dir, resume=(run_dir / "checkpoints").exists())
    return model_dir


def _project(model: MultiTowerModel, emb: Embeddings) -> Embeddings:
    return Embeddings(model.project_array("image", emb.vectors), emb.items, emb.group_index)


def measure_ood(model: MultiTowerModel, full: EmbeddingStore, store: EmbeddingStore,
                holdout: str, classnames: list[str], prompt_features: torch.Tensor, *,
                seed: int = 0, n_boot: int = 1000
                ) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Gap, retrieval, zero-shot (on ``store``'s test split) and OoD metrics; plus the raw
    per-input MCM and kNN scores (for paired comparisons)."""
    metrics = evaluate_model(model, store, split="test", label="subgroup",
                             prompt_features=prompt_features, classnames=classnames)
    img = _project(model, full.load("image"))
    groups = np.array(img.labels("group"))
    split = np.array([it["split"] for it in img.items])
    ind, out = img.subset((groups != holdout) & (split == "test")), img.subset(groups == holdout)
    bank = _project(model, store.load("image", split="train"))
    protos = prototypes(model, prompt_features)
    r = ood_detection(ind, out, protos, classnames, label="subgroup", bank=bank,
                      n_boot=n_boot, seed=seed, templates=DEFAULT_TEMPLATES)
    metrics.update({k: v for k, v in r.metrics.items()
                    if not k.startswith("id_") and "aupr_out" not in k})
    x_id = F.normalize(torch.from_numpy(np.asarray(ind.vectors)).double(), dim=1)
    x_ood = F.normalize(torch.from_numpy(np.asarray(out.vectors)).double(), dim=1)
    p = F.normalize(protos.double(), dim=1)
    b = torch.from_numpy(np.asarray(bank.vectors))
    scores = {"mcm": (mcm_scores(x_id @ p.T).numpy(), mcm_scores(x_ood @ p.T).numpy()),
              "knn": (knn_scores(x_id, b).numpy(), knn_scores(x_ood, b).numpy())}
    metrics.update({"num_id": float(len(ind)), "num_ood": float(len(out))})
    return metrics, scores


def default_variants(seed: int = 0) -> dict[str, RefineConfig]:
    """The refinements compared: CLIP-Refine as published and longer, normalised, and CMA."""
    longer: dict[str, Any] = {"lr": 1e-4, "epochs": 10, "batch_size": 128, "seed": seed}
    cma: dict[str, Any] = {"method": "cma", "label": "subgroup", "templates": DEFAULT_TEMPLATES}
    return {
        "clip-refine official (raw, T=1, lr 1e-6, 1 epoch, batch 512)": RefineConfig(seed=seed),
        "clip-refine raw, T=1": RefineConfig(**longer),
        "clip-refine normalised, T=0.01": RefineConfig(normalize=True, temperature=0.01,
                                                       **longer),
        "cma (lambda 0.001)": RefineConfig(lambda_kd=0.0, **cma, **longer),
        "cma (lambda 0.001) + HyCD": RefineConfig(**cma, **longer),
    }


def demo_variants(seed: int = 0) -> dict[str, RefineConfig]:
    """The demo's smaller set: CLIP-Refine as published and longer, and CMA."""
    every = default_variants(seed)
    keep = ("clip-refine official (raw, T=1, lr 1e-6, 1 epoch, batch 512)",
            "clip-refine raw, T=1", "cma (lambda 0.001)")
    return {k: every[k] for k in keep}


def run_ood_protocol(full: EmbeddingStore, work: str | Path, *, holdout: str | None = None,
                     seed: int = 0, variants: Mapping[str, RefineConfig] | None = None,
                     train_overrides: Sequence[str] | Callable[[int], Sequence[str]] = (),
                     n_boot: int = 1000,
                     progress: bool = False) -> dict[str, Any]:
    """Hold out a group, train, refine, measure; a JSON-ready summary.

    Returns ``{"holdout", "num_id_classes", "models": {name: metrics}}`` where each refined
    model's metrics also hold ``delta_{score}/{metric}`` = ``[change, lo, hi]`` against the base
    model (paired bootstrap over the same inputs), or ``{"skipped": reason}``.
    """
    from modalign.train.data import PairedFeatures

    work = Path(work)
    holdout = holdout or pick_holdout(full)
    if holdout is None:
        return {"skipped": "the data has a single Unicode group: no group to hold out"}
    slug = "".join(ch if ch.isalnum() else "-" for ch in holdout.lower())
    # folders keyed by the full store's content, so a changed store never reuses stale work
    tag = content_hash({m: full.info(m).get("hash") for m in ("image", "text")}, holdout)[:12]
    store = holdout_store(full, holdout, work / f"store-id-{slug}-{tag}")
    if len(store.load("image", split="test")) == 0:
        raise ModalignError(f"holdout={holdout!r}: no ID test rows remain")
    if callable(train_overrides):
        n_train = len({it["group"] for it in store.load("image", split="train").items})
        train_overrides = train_overrides(n_train)
    run_tag = content_hash(tag, list(train_overrides), seed)[:12]
    model_dir = train_id_model(store, work / f"clip-id-{slug}-{run_tag}", seed=seed,
                               overrides=train_overrides, progress=progress)
    model = MultiTowerModel.from_pretrained(model_dir)
    classnames = sorted({v for v in store.load("image").labels("subgroup") if v})
    prompts = class_prompt_features(model, classnames, DEFAULT_TEMPLATES)
    base, base_scores = measure_ood(model, full, store, holdout, classnames, prompts, seed=seed,
                                    n_boot=n_boot)
    models: dict[str, dict[str, Any]] = {"base (clip)": base}
    data = PairedFeatures(store, ["image", "text"], "train")
    for name, cfg in (variants if variants is not None else default_variants(seed)).items():
        refined = refine_model(model, data, cfg, prompt_features=prompts, classnames=classnames)
        row, scores = measure_ood(refined.model, full, store, holdout, classnames, prompts,
                                  seed=seed, n_boot=n_boot)
        row_out: dict[str, Any] = {**row, "steps": refined.steps,
                                   "refine_seconds": refined.seconds}
        for score, (s_id, s_ood) in scores.items():
            d = bootstrap_difference(*base_scores[score], s_id, s_ood, n_boot=n_boot, seed=seed)
            for key in ("auroc", "fpr@95tpr"):
                row_out[f"delta_{score}/{key}"] = list(d[key])
        models[name] = row_out
    return {"holdout": holdout, "num_id_classes": len(classnames), "model_dir": str(model_dir),
            "store_dir": str(store.path), "models": models}


def ood_table(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows for a report table: gap, zero-shot, MCM and kNN AUROC / FPR95 with intervals."""
    rows = []
    for name, m in summary.get("models", {}).items():
        row: dict[str, Any] = {"model": name, "gap": m["gap"], "zero-shot acc1": m[
            "zeroshot_acc1"], "i2t R@1": m["text_retrieval_recall@1"]}
        for score in SCORES:
            for key, label in (("auroc", "AUROC"), ("fpr@95tpr", "FPR95")):
                v, lo, hi = m[f"{score}/{key}"], m[f"{score}/{key}_lo"], m[f"{score}/{key}_hi"]
                row[f"{score.upper()} {label}"] = f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
        delta = m.get("delta_mcm/auroc")
        row["ΔMCM AUROC"] = f"{delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]" if delta else ""
        rows.append(row)
    return rows


def ood_section(page: Any, summary: Mapping[str, Any]) -> None:
    """Add the demo report's "Out-of-distribution" section to ``page``."""
    if "skipped" in summary:
        sec = page.section("Out-of-distribution detection")
        sec.paragraph(f"Skipped: {summary['skipped']}.", note=True)
        return
    sec = page.section(
        "Out-of-distribution detection",
        intro=f"The Unicode group {summary['holdout']!r} is held out of training (a separate "
              f"clip model on the other groups; the four models above are unchanged). ID = the "
              f"other groups' test images, OOD = every image of {summary['holdout']!r}; "
              f"{summary['num_id_classes']} ID subgroups as classes. MCM = max softmax of "
              "cosines to the class prompts (T = 1); kNN = cosine to the nearest ID training "
              "image. 95% bootstrap intervals; the change in MCM AUROC is a paired interval "
              "against the base model.")
    sec.table(ood_table(summary), digits=3)
    sec.paragraph("Refinements train the heads only, from the base model: CLIP-Refine (RaFA + "
                  "HyCD) as published and longer; CMA on subgroup prompts. See "
                  "docs/after-training.md.", note=True)
