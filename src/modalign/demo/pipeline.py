"""The main job: data -> embeddings -> training -> diagnosis -> evaluation -> gap lab -> report.

Every stage is cached (its own cache, or :class:`~modalign.demo.stages.Stages`), so a second run
only re-renders the report. ``quick`` keeps 300 concepts, short training and short inversions.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modalign import __version__
from modalign.data import EmojiOptions, build_emoji
from modalign.demo.stages import Stages
from modalign.embed import EmbeddingStore
from modalign.embed.paths import default_store_dir
from modalign.embed.resolve import update_store
from modalign.io import content_hash, file_hash, write_json_atomic

TOWERS = {"image": "effnet-lite0", "text": "minilm", "audio": "logmel"}
CONFIGS = ("clip", "clip_unif_align", "clip_intra", "three_modal")
QUICK_CONCEPTS = 300


@dataclass
class DemoOptions:
    """What the demo runs.

    Attributes:
        out: the run folder (report, records, models, caches).
        quick: 300 concepts, short training and inversion (about a minute).
        speech: build the speech modality and train the three-modality model; ``None`` means
            "when espeak-ng is installed and not quick".
        seed: seed of training, inversion and sampling.
        progress: progress bars and stage lines on stderr.
        configs: built-in training configs to run (``three_modal`` only with speech).
        limit: keep only the first N concepts (default: all, or 300 when quick).
    """

    out: Path = Path("runs/demo")
    quick: bool = False
    speech: bool | None = None
    seed: int = 0
    progress: bool = True
    configs: tuple[str, ...] = CONFIGS
    limit: int | None = None


@dataclass
class DemoResult:
    out: Path
    report: Path
    models: dict[str, dict[str, Any]]
    lab: dict[str, Any]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    summary_table: str = ""


def _eval_config(quick: bool, seed: int):
    """How each demo model is measured: the lab's measurement (see ``modalign.lab.measure``)
    with the official OTI step count; OVI enters the CNN late (see docs/lab.md)."""
    from modalign.lab.settings import GapSetting, LabConfig

    return LabConfig(settings=(GapSetting(),), seeds=(seed,),
                     inverted_queries=16 if quick else 64, oti_steps=30 if quick else 150,
                     ovi_steps=30 if quick else 100, shifts=(-0.5, 0.0, 0.5, 1.0),
                     permutations=100, bootstrap=100, converge_queries=0)


def _lab_config(quick: bool):
    """The lab's quick sweep; in a quick demo (a few hundred concepts), three frozen-tower
    settings and towers trained from scratch for 20 epochs, with short inversions."""
    from modalign.lab.settings import GapSetting, LabConfig, quick_config

    if not quick:
        return quick_config()
    return LabConfig(settings=(GapSetting(), GapSetting(temperature=0.01),
                               GapSetting("cone", 3, epochs=2),
                               GapSetting(family="scratch", epochs=20)),
                     seeds=(0,), inverted_queries=12, oti_steps=20, ovi_steps=20,
                     shifts=(-0.5, 0.0, 0.5, 1.0), permutations=2000, bootstrap=500,
                     converge_queries=4, converge_steps=60, converge_families=("scratch",),
                     scratch_warmup_steps=10)


def _train_overrides(quick: bool, train_groups: int) -> list[str]:
    batch = min(128 if quick else 256, train_groups)
    quick_runs = ["train.epochs=6", "validate.patience=3"] if quick else []
    return [f"train.batch_size={batch}", *quick_runs]


def run_demo(options: DemoOptions | None = None) -> DemoResult:
    """Run (or continue) the demo and write ``<out>/report.html``; see the module docstring."""
    from modalign.demo.report import terminal_table, write_demo_report

    opts = options or DemoOptions()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    st = Stages(out, verbose=opts.progress)
    torch.manual_seed(opts.seed)

    speech = opts.speech
    if speech is None:
        speech = bool(shutil.which("espeak-ng")) and not opts.quick
    limit = opts.limit if opts.limit is not None else (QUICK_CONCEPTS if opts.quick else None)
    emoji_opts = EmojiOptions(limit=limit, speech=speech)
    with st.timed("data", "Building the emoji dataset: every concept drawn by two artists "
                          "(Noto, OpenMoji), with its names" + (" and speech" if speech else "")):
        ds = build_emoji(emoji_opts, progress=opts.progress)
    specs = {m: TOWERS[m] for m in ds.modalities}
    store_dir = default_store_dir(ds, specs)
    with st.timed("embed", "Encoding every item with the frozen pretrained towers "
                           f"({', '.join(f'{m}: {s}' for m, s in specs.items())})"):
        # towers are built only for arrays that are missing or stale
        store = update_store(ds, specs, store_dir, progress=opts.progress)
    fingerprint = {n: store.info(n).get("hash") for n in store.arrays}

    configs = [c for c in opts.configs if c != "three_modal" or "audio" in ds.modalities]
    models: dict[str, dict[str, Any]] = {}
    with st.timed("train", f"Training {len(configs)} frozen-tower models on cached features "
                           f"({', '.join(configs)})"):
        for name in configs:
            models[name] = _train(name, store, out, fingerprint, opts,
                                  len(ds.groups("train")))

    from modalign.lab.measure import LabTowers, SpaceData

    eval_cfg = _eval_config(opts.quick, opts.seed)
    towers = LabTowers.from_specs({m: specs[m] for m in ("image", "text")},
                                  ovi_stage=eval_cfg.ovi_stage, ovi_tokens=eval_cfg.ovi_tokens)
    for name, info in models.items():
        key = {"weights": info["weights_hash"], "version": __version__}
        info["diagnosis"] = st.run(
            f"diagnose-{name}", f"Diagnosing the geometry of {name} (test split)", key,
            functools.partial(_diagnose, info, store, opts.seed))

    data = None
    for name, info in models.items():
        key = {"weights": info["weights_hash"], "eval": eval_cfg.measuring_dict(),
               "store": fingerprint, "version": __version__, "intervals": 1}

        def measure(info: dict[str, Any] = info, name: str = name) -> dict[str, Any]:
            nonlocal data
            if data is None:
                data = SpaceData.load(store, eval_cfg, towers.encode_text)
            return _evaluate(name, info, store, data, eval_cfg, towers, out, opts.seed)

        info["evaluation"] = st.run(
            f"evaluate-{name}", f"Evaluating {name}: retrieval both ways, image->image across "
            "styles and name->text natively and with inverted queries (OTI/OVI), zero-shot "
            "subgroups inter vs intra, and the post-hoc bridges", key, measure)

    lab_cfg = _lab_config(opts.quick)
    with st.timed("lab", "Running the gap laboratory's quick sweep: settings that produce "
                         "small and large gaps, and whether inversion pays more as the gap grows"):
        from modalign.lab import run_gap_lab

        lab = run_gap_lab(lab_cfg, store, out / "lab", towers=towers, progress=opts.progress)

    first = next(iter(models.values()))
    from modalign.model import MultiTowerModel

    gallery = st.run(
        "gallery", "Picking a few queries to show their top results native vs inverted",
        {"weights": first["weights_hash"], "eval": eval_cfg.measuring_dict(), "seed": opts.seed,
         "version": __version__},
        lambda: {**_gallery(MultiTowerModel.from_pretrained(first["model_dir"]), store, towers,
                            eval_cfg, ds.root, n_queries=4, seed=opts.seed),
                 "model": first["name"]})
    with st.timed("explore", f"Writing the explore page of {first['name']}"):
        _explore(first, store, ds, out, opts.seed)
    ood = st.run("ood", "Holding one Unicode group out of training: MCM out-of-distribution "
                        "detection before and after CLIP-Refine and CMA",
                 {"store": fingerprint, "seed": opts.seed, "quick": opts.quick,
                  "version": __version__},
                 lambda: _ood(store, out, opts))
    with st.timed("report", "Writing the report"):
        st.times.setdefault("report", 0.0)
        report = write_demo_report(out, models, lab, gallery, st.times, st.cached,
                                   dataset=ds, store=store, quick=opts.quick, ood=ood)
    table = terminal_table(models)
    write_json_atomic(out / "demo.json", {
        "version": __version__, "options": {k: str(v) for k, v in asdict(opts).items()},
        "stage_seconds": st.times, "cached": st.cached, "report": str(report),
        "models": {n: {k: v for k, v in m.items() if k != "diagnosis"} for n, m in models.items()},
        "lab_verdict": lab.verdict})
    return DemoResult(out, report, models, {"verdict": lab.verdict, "summary": lab.summary},
                      dict(st.times), table)


def _ood(store: EmbeddingStore, out: Path, opts: DemoOptions) -> dict[str, Any]:
    from modalign.demo.ood import demo_variants, run_ood_protocol

    return run_ood_protocol(store, out / "ood", seed=opts.seed, variants=demo_variants(opts.seed),
                            train_overrides=lambda n: _train_overrides(opts.quick, n),
                            n_boot=500)


def _train(name: str, store: EmbeddingStore, out: Path, fingerprint: dict[str, Any],
           opts: DemoOptions, train_groups: int) -> dict[str, Any]:
    from modalign.train.config import load_config
    from modalign.train.loop import SUMMARY_NAME, train

    overrides = [f"data.embeddings={store.path}", f"train.seed={opts.seed}",
                 *_train_overrides(opts.quick, train_groups)]
    cfg = load_config(name, overrides)
    cfg.run.name = name
    key = content_hash(cfg.to_dict(), fingerprint, __version__)
    cfg.train.progress = opts.progress
    run_dir = out / "models" / f"{name}-{key}"
    if (run_dir / SUMMARY_NAME).exists():
        from modalign.inventory import read_run_summary

        summary = read_run_summary(run_dir)  # an older run's keys read as today's
    else:
        resume = (run_dir / "checkpoints").exists()
        summary = train(cfg, run_dir=run_dir, resume=resume).summary
    model_dir = run_dir / "model"
    return {"name": name, "run_dir": str(run_dir), "model_dir": str(model_dir),
            "weights_hash": file_hash(model_dir / "model.safetensors"),
            "objectives": cfg.objectives, "summary": summary}


def _explore(info: dict[str, Any], store: EmbeddingStore, ds: Any, out: Path, seed: int) -> Path:
    """``out/explore.html``: the interactive page of one model's joint space (test split)."""
    from modalign.explore import ExploreOptions, build_explore, write_page
    from modalign.explore.sources import load_sources

    src = load_sources(model_dir=info["model_dir"], data=ds, embeddings_dir=store.path,
                       split="test", progress=False)
    opts = ExploreOptions(seed=seed, title=f"modalign demo: the joint space of {info['name']}")
    return write_page(build_explore(src.shown, bank=src.bank, inverted=src.inverted,
                                    values=src.values, options=opts, source=src.source),
                      out / "explore.html")


def _joint_test(info: dict[str, Any], store: EmbeddingStore, modalities=("image", "text")):
    from modalign.embed.joint import load_joint

    return load_joint(model_dir=info["model_dir"], embeddings_dir=store.path, split="test",
                      modalities=[m for m in modalities], progress=False)


def _diagnose(info: dict[str, Any], store: EmbeddingStore, seed: int) -> dict[str, Any]:
    from modalign.geometry.diagnose import DiagnoseOptions, diagnose
    from modalign.model import MultiTowerModel

    joint = _joint_test(info, store)
    model = MultiTowerModel.from_pretrained(info["model_dir"])
    shared = len(set(joint["image"].group_ids().tolist()) & set(joint["text"].group_ids().tolist()))
    return diagnose({m: np.asarray(e.vectors) for m, e in joint.items()},
                    groups={m: e.group_ids() for m, e in joint.items()},
                    logit_scale=float(model.logit_scale.detach()),
                    options=DiagnoseOptions(seed=seed, k=max(1, min(10, shared - 2))))


def _evaluate(name: str, info: dict[str, Any], store: EmbeddingStore, data: Any, cfg: Any,
              towers: Any, out: Path, seed: int) -> dict[str, Any]:
    from modalign.evaluate.records import make_record, write_record
    from modalign.evaluate.retrieval import cross_modal_retrieval
    from modalign.lab.measure import measure_space
    from modalign.model import MultiTowerModel

    model = MultiTowerModel.from_pretrained(info["model_dir"])
    result = measure_space(model, data, cfg, towers, seed=seed)
    metrics = dict(result["metrics"])
    metrics.update({k: v for k, v in result["inversion"].items()})
    if "audio" in model.modalities:
        joint = _joint_test(info, store, ("audio", "text"))
        r = cross_modal_retrieval(joint, ("audio", "text"), k_values=(1, 5))
        metrics["audio_to_text_recall@1"] = r.metrics["text_retrieval_recall@1"]
        metrics["text_to_audio_recall@1"] = r.metrics["audio_retrieval_recall@1"]
    record = make_record(dataset="emoji", split="test", model=name, task="demo-suite",
                         protocol={"inverted_queries": cfg.inverted_queries,
                                   "oti_steps": cfg.oti_steps, "ovi_steps": cfg.ovi_steps,
                                   "image_views": list(cfg.image_views),
                                   "text_views": list(cfg.text_views), "label": cfg.label,
                                   "bridges": list(cfg.bridges)},
                         metrics={k: v for k, v in metrics.items()
                                  if isinstance(v, (int, float))},
                         seed=seed, intervals=result.get("intervals", {}),
                         bootstrap={"samples": 1000, "seed": seed, "level": 0.95,
                                    "unit": "query", "method": "percentile"})
    write_record(record, out / "records")
    return {"metrics": metrics, "intervals": result.get("intervals", {}),
            "pca": result.get("pca"), "seconds": result.get("seconds")}


def _gallery(model: Any, store: EmbeddingStore, towers: Any, cfg: Any, root: Path | None,
             n_queries: int, seed: int) -> dict[str, Any]:
    """Top-5 OpenMoji results of a few Noto queries: native image query vs its OTI feature."""
    from modalign.lab.measure import invert_queries

    img = store.load("image", split="test")
    qv, gv = cfg.image_views
    q_rows = [i for i, it in enumerate(img.items) if it["view"] == qv]
    g_rows = np.array([i for i, it in enumerate(img.items) if it["view"] == gv])
    rng = np.random.default_rng(seed)
    q_rows = sorted(rng.choice(q_rows, size=min(n_queries, len(q_rows)), replace=False).tolist())
    joint = torch.from_numpy(model.project_array("image", img.vectors))
    ids = [img.items[i]["id"] for i in q_rows]
    inverted, cosines = invert_queries(model, towers, "text", joint[q_rows], ids, cfg.oti_steps,
                                       cfg.oti_lr, seed)
    gallery = F.normalize(joint[g_rows], dim=-1)

    def top(q: torch.Tensor) -> list[dict[str, Any]]:
        scores = gallery @ F.normalize(q, dim=-1)
        best = torch.topk(scores, k=min(5, len(g_rows))).indices.tolist()
        return [{"path": str(Path(root) / img.items[g_rows[b]]["value"]) if root else "",
                 "group": img.items[g_rows[b]]["group"],
                 "name": img.items[g_rows[b]]["labels"].get("emoji", ""),
                 "score": float(scores[b])} for b in best]

    rows = []
    for j, i in enumerate(q_rows):
        it = img.items[i]
        rows.append({"query": str(Path(root) / it["value"]) if root else "", "group": it["group"],
                     "native": top(joint[i]), "inverted": top(inverted[j]),
                     "oti_cosine": float(cosines[j])})
    return {"queries": rows, "query_view": qv, "gallery_view": gv}
