"""Training recipes beside plain CLIP with the same budget, on the emoji data (cached features).

Every case trains a built-in config (``clip``, or ``clip_intra`` for the three-key cases; frozen
towers, linear heads, batch 256, the same epochs, seed and learning rate) with one recipe on,
picks the epoch by validation image->text R@1 as ``modalign train`` does, and measures on the
test split:

- ``image-to-text_recall@1``, ``text-to-image_recall@1`` (the validation pair's keys, e.g.
  ``image:noto-to-text_recall@1`` for the three-key cases): cross-modal R@1 (positives: same
  concept);
- ``gap``: distance between the image and text centroids in the joint space;
- ``image_map``, ``text_map``: intra-modal mAP (each row retrieves the other rows of its
  modality, itself removed; positives: same concept);
- ``compositional``: accuracy of scoring a test image's concept name above three rule-based
  negatives of it (``eval --task compositional``);
- ``train_s``: training seconds (CPU, shared machine: compare within one run only).

    python benchmarks/recipes.py                    # every case, 30 epochs
    python benchmarks/recipes.py --epochs 10 --cases clip momentum --embeddings STORE
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

BENCHMARK = "recipes"
CASES: dict[str, list[str]] = {
    "clip": [],
    "momentum": ["momentum.decay=0.995", "momentum.queue_size=1024", "momentum.alpha=0.4"],
    "negatives": ["negatives.k=3", "negatives.weight=0.1"],
    # three keys (noto images, openmoji images, text): the built-in clip_intra config, plain and
    # with gradient harmonization of its three pairwise terms ("@name": the base config)
    "clip_intra": ["@clip_intra"],
    "harmonize": ["@clip_intra", "harmonize.enabled=true"],
    "harmonize_curriculum": ["@clip_intra", "harmonize.enabled=true", "harmonize.drop_below=0.0",
                             "harmonize.curriculum_steps=75"],
    # a 64-d linear student, alone and distilled from the 256-d plain CLIP model (the teacher)
    "clip_small": ["model.joint_dim=64"],
    "distill_small": ["model.joint_dim=64", "distill.teacher={teacher}"],
    # DeGLA's IGC + TGC + self-distillation (0.005 on a sum over 32 rows = 0.16 on our mean)
    "negatives_tgc": ["negatives.k=3", "negatives.weight=0.1", "negatives.tgc_weight=0.1",
                      "negatives.distill_weight=0.16", "negatives.ema_decay=0.99"],
    "clsr": ["objectives=[{{loss='clsr', modalities=['image', 'text']}}]"],  # {{}}: format()
    # two stages of 128-d heads (the concatenation is 256-d, as plain CLIP), twice the steps
    "mcl": ["mcl.stages=2", "mcl.clusters=10", "model.joint_dim=128"],
    "clip_128": ["model.joint_dim=128"],
    # FDT: codebook of 1024 256-d codes over the token arrays (needs --embeddings with tokens)
    "fdt": ["fdt.enabled=true", "fdt.codes=1024", "fdt.dim=256", "fdt.temperature=10.0"],
}


def run_case(name: str, epochs: int, threads: int, embeddings: str = "", teacher: str = "",
             keep: str = "") -> dict:
    """Train ``clip`` plus the case's overrides; the test-split figures of the chosen epoch;
    ``keep``: copy its model folder there."""
    from modalign.evaluate.metrics import retrieval_metrics, self_exclusion
    from modalign.model import MultiTowerModel, base_modality
    from modalign.train.config import load_config
    from modalign.train.data import KeyTable, load_key
    from modalign.train.loop import Trainer

    torch.set_num_threads(threads)
    base = next((o[1:] for o in CASES[name] if o.startswith("@")), "clip")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(base, [f"run.dir={tmp}", f"train.epochs={epochs}",
                                   "train.progress=false", "validate.patience=0",
                                   f"train.num_threads={threads}",
                                   *[o.format(teacher=teacher) for o in CASES[name]
                                     if not o.startswith("@")],
                                   *([f"data.embeddings={embeddings}"] if embeddings else [])])
        if cfg.fdt.enabled:
            return _fdt_case(name, cfg, epochs)
        out = {"benchmark": BENCHMARK, "case": name, "epochs": epochs}
        if cfg.mcl.enabled:  # the stages' concatenated embeddings
            from modalign.train.recipes.mcl import MultistageModel, train_mcl

            summary = train_mcl(cfg, run_dir=tmp)
            trainer = Trainer(cfg, run_dir=os.path.join(tmp, "eval"))
            model = MultistageModel.from_run(tmp)
            out["stages"] = len(summary["stages"])

            def embed(key, table):
                return torch.from_numpy(model.project_array(key, table.features))

            encode = model.encode
        else:
            trainer = Trainer(cfg)
            result = trainer.run()
            trainer.model.load_state_dict(MultiTowerModel.from_pretrained(
                result.model_dir).state_dict())
            if keep:
                shutil.copytree(result.model_dir, keep)
            out.update({"best_epoch": (result.summary.get("best") or {}).get("epoch"),
                        "train_s": round(trainer.train_seconds, 1)})
            embed, encode = trainer._embed_table, trainer.model.encode
        tables = trainer.split_tables("test")
        out.update(_measure(embed, tables))
        for key in dict.fromkeys(base_modality(k) for k in tables):  # every view of a modality
            table = KeyTable.from_embeddings(key, load_key(trainer.store, key, "test"))
            z = embed(key, table)
            g = torch.from_numpy(table.group_ids)
            ids = [it["id"] for it in table.items]
            m = retrieval_metrics(z, z, g, g, k_values=(1,), exclude=self_exclusion(ids, ids))
            out[f"{key}_map"] = round(float(m.metrics["map"]), 4)
        out["compositional"] = round(_compositional(embed, encode, tables), 4)
        if trainer.harmonize is not None:
            rates = trainer.harmonize.rates()
            out.update({f"harmonize_{k}": round(v, 4) for k, v in rates.items()})
        return out


def _measure(embed, tables) -> dict:
    """Cross-modal R@1 both ways and the centroid gap of the two test tables."""
    from modalign.train.validate import pair_metrics

    (ka, ta), (kb, tb) = tables.items()
    test = pair_metrics((ka, embed(ka, ta), torch.from_numpy(ta.group_ids)),
                        (kb, embed(kb, tb), torch.from_numpy(tb.group_ids)))
    return {k: round(v, 4) for k, v in test.items()
            if k == "gap" or (k.endswith("_recall@1") and k != "mean_recall@1")}


def _fdt_case(name: str, cfg, epochs: int) -> dict:
    """An [fdt] run from the store's token arrays: R@1, gap and intra-modal mAP on the test
    split (no compositional figure: the negatives would need the text tower's tokens)."""
    from modalign.evaluate.metrics import retrieval_metrics, self_exclusion
    from modalign.late.model import token_rows
    from modalign.train.recipes.fdt import FDTModel, evaluate_fdt, train_fdt

    settings = cfg.fdt_settings()
    summary = train_fdt(settings)
    model = FDTModel.from_pretrained(summary["model"])
    out = {"benchmark": BENCHMARK, "case": name, "epochs": epochs,
           "best_epoch": model.extra.get("epoch")}
    test = evaluate_fdt(model, settings.store, settings.keys, "test")
    out.update({k: round(v, 4) for k, v in test.items()
                if k == "gap" or (k.endswith("_recall@1") and k != "mean_recall@1")})
    rows = token_rows(settings.store, "test")
    for key in dict.fromkeys(k.partition(":")[0] for k in settings.keys[:2]):
        tf = rows(key)
        z = model.embed_rows(key, tf)
        g = torch.from_numpy(tf.group_ids())
        ids = [it["id"] for it in tf.items]
        m = retrieval_metrics(z, z, g, g, k_values=(1,), exclude=self_exclusion(ids, ids))
        out[f"{key}_map"] = round(float(m.metrics["map"]), 4)
    return out


def _compositional(embed, encode, tables) -> float:
    """Test images against their concept's name and its rule-based negatives (eval's task)."""
    from modalign.evaluate.compositional import evaluate_compositional

    (ki, images), (kt, texts) = tables.items()
    caption = {it["group"]: it["value"] for it in texts.items if it.get("view") == "name"}
    rows = [i for i, it in enumerate(images.items) if it["group"] in caption]
    z = embed(ki, images)[rows]
    result = evaluate_compositional(z, [caption[images.items[i]["group"]] for i in rows],
                                    lambda t: encode(kt, t))
    return result.metrics["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--embeddings", default="",
                    help="an embedding store of the emoji data (default: built for the towers)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher, cases = "", list(args.cases)
        if any("{teacher}" in o for name in cases for o in CASES[name]):
            teacher = os.path.join(tmp, "teacher")  # the plain CLIP run, kept
            row = run_case("clip", args.epochs, args.threads, args.embeddings, keep=teacher)
            print(json.dumps(row), flush=True)
            cases = [c for c in cases if c != "clip"]
        for name in cases:
            print(json.dumps(run_case(name, args.epochs, args.threads, args.embeddings, teacher)),
                  flush=True)


if __name__ == "__main__":
    main()
