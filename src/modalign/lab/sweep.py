"""The gap sweep: train every (setting, seed) from cached features, measure it, summarise.

Each (setting, seed) is keyed by content hashes: its training run, of the setting, the seed, the
training knobs, the store's arrays and the tower specs, lives in ``<out>/runs/<train key>/``
(checkpointed every epoch, resumed when interrupted); its record, whose key adds the measuring
knobs and the inversion towers, in ``<out>/settings/<name>-s<seed>-<key>.json`` (written
atomically), so changing only how spaces are measured re-measures without retraining. A sweep
started again skips every finished record and resumes an unfinished run, so a killed sweep
continues with the settings not done. ``lab.json`` holds the per-setting means and standard
deviations over seeds, the trend test and its verdict; ``lab.html`` the plots and tables.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from modalign import __version__
from modalign.embed.store import EmbeddingStore
from modalign.errors import SmallDataWarning
from modalign.io import content_hash, file_hash, read_json, read_jsonl, write_json_atomic
from modalign.lab.measure import LabTowers, SpaceData, measure_space
from modalign.lab.settings import FAMILY_GROUPS, GapSetting, LabConfig
from modalign.lab.trend import TrendTest, trend_test, verdict
from modalign.train.config import TrainConfig
from modalign.train.loop import LOG_NAME, Trainer
from modalign.vocabulary import upgrade_training_row

SCHEMA = 1
SUMMARY_METRICS = (
    "gap", "separability", "cone_image", "cone_text", "uniformity_image", "uniformity_text",
    "logit_scale", "text_retrieval_recall@1", "image_retrieval_recall@1", "text_retrieval_map",
    "image_retrieval_map", "centering_text_retrieval_map", "invgc_text_retrieval_map",
    "i2i_native_map", "i2i_oti_map", "i2i_delta_map", "t2t_native_map", "t2t_ovi_map",
    "t2t_delta_map", "delta_map", "zeroshot_inter_acc1", "centering_zeroshot_inter_acc1",
    "invgc_zeroshot_inter_acc1", "zeroshot_subset_inter_acc1", "zeroshot_subset_intra_acc1",
    "oti_final_cosine", "ovi_final_cosine",
    "i2i_through_text_map", "t2t_through_image_map", "i2i_misalignment", "t2t_misalignment",
    "misalignment", "i2i_better_through", "t2t_better_through", "better_through",
    "i2i_tower_before_map", "i2i_tower_after_map", "t2t_tower_before_map", "t2t_tower_after_map",
    "train_text_retrieval_recall@1", "train_text_retrieval_map", "train_image_retrieval_recall@1",
    "delta_map_budget_subset", "delta_map_converged", "oti_converged_final_cosine",
    "ovi_converged_final_cosine", "oti_plateau_step", "ovi_plateau_step",
    "i2i_bridge_map", "t2t_bridge_map", "i2i_bridge_delta_map", "t2t_bridge_delta_map",
    "bridge_delta_map",
)


@dataclass
class LabResult:
    """What :func:`run_gap_lab` returns.

    Attributes:
        records: one dict per (setting, seed) (what ``settings/*.json`` hold).
        summary: what ``lab.json`` holds (per-setting means/stds, the trend test, the verdict).
        verdict: the sentence on "the benefit of inversion grows with the gap".
        figures: name -> matplotlib figure (benefit vs gap, gap shift, extremes, trajectories).
        out_dir: where everything was written.
    """

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    verdict: str
    figures: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None


def store_fingerprint(store: EmbeddingStore) -> dict[str, Any]:
    """The hashes of the store's image and text arrays (part of every cache key)."""
    out = {}
    for m in ("image", "text"):
        info = store.info(m)
        digest = info.get("hash") or file_hash(store.path / info["file"])
        out[m] = {"hash": digest, "count": info.get("count"), "dim": info.get("dim")}
    return out


def _training_knobs(setting: GapSetting, config: LabConfig) -> dict[str, Any]:
    knobs = config.training_dict()
    if setting.end_to_end:
        knobs["end_to_end"] = config.end_to_end_dict(setting.family)
    return knobs


def train_key(setting: GapSetting, seed: int, config: LabConfig, fingerprint: dict[str, Any],
              specs: dict[str, str]) -> str:
    """Content hash naming one training run (what changes the trained weights)."""
    return content_hash(SCHEMA, setting.to_dict(), seed, _training_knobs(setting, config),
                        fingerprint, specs)


def run_key(setting: GapSetting, seed: int, config: LabConfig, fingerprint: dict[str, Any],
            towers: dict[str, Any]) -> str:
    """Content hash naming one record: the training run plus how it is measured."""
    return content_hash(SCHEMA, setting.to_dict(), seed, _training_knobs(setting, config),
                        config.measuring_dict(), fingerprint, towers)


def training_config(setting: GapSetting, seed: int, config: LabConfig, store: EmbeddingStore,
                    towers: dict[str, str], *, progress: bool = False,
                    end_to_end: dict[str, Any] | None = None) -> TrainConfig:
    """The :class:`~modalign.train.config.TrainConfig` that trains ``setting`` with ``seed``.

    The batch is ``config.batch_size``, or every training group when the split has fewer.
    ``end_to_end`` (from :func:`modalign.lab.endtoend.trainer_sections`) adds the raw dataset,
    the unfrozen tower stages, their learning rate, the image augmentation, and may set the
    batch and other optimiser knobs.
    """
    sections = setting.train_sections()
    train_groups = len(set(store.load("image", split=config.bank_split).group_ids().tolist()))
    batch = (end_to_end.get("batch_size", config.e2e_batch_size) if end_to_end
             else config.batch_size)
    batch_size = max(2, min(batch, train_groups))
    model = {"towers": dict(towers), "joint_dim": config.joint_dim, **sections["model"]}
    e2e = end_to_end or {}
    model.update(e2e.get("model", {}))
    optim: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay,
                             "warmup_steps": config.warmup_steps}
    train: dict[str, Any] = {**sections["train"], "batch_size": batch_size, "seed": seed,
                             "device": "cpu", "keep_checkpoints": 1, "progress": progress}
    data: dict[str, Any] = {"embeddings": str(store.path), "keys": setting.keys(),
                            "train_split": config.bank_split,
                            "val_split": "val" if _has_split(store, "val") else ""}
    extra: dict[str, Any] = {}
    if e2e:
        data["dataset"] = e2e["dataset"]
        train["unfreeze"] = e2e["unfreeze"]
        optim["tower_lr"] = e2e["tower_lr"]
        optim.update(e2e.get("optim", {}))
        extra["augment"] = e2e["augment"]
        if e2e.get("lora"):
            extra["lora"] = e2e["lora"]
    return TrainConfig.from_dict({
        "data": data, "model": model, "objectives": sections["objectives"], "optim": optim,
        "train": train, "validate": {"metric": "image-to-text_recall@1", "patience": 0},
        **extra,
    })


def _has_split(store: EmbeddingStore, split: str) -> bool:
    return len(store.load("image", split=split)) > 0 and len(store.load("text", split=split)) > 0


def train_setting(setting: GapSetting, seed: int, config: LabConfig, store: EmbeddingStore,
                  towers: dict[str, str], run_dir: Path, *,
                  modules: Mapping[str, Any] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """Train (or resume, or reload) one run; returns the final model and the per-epoch log.

    The model is the *last* epoch's (not the best validation epoch's): training length is one
    of the factors of the sweep. ``modules``: tower objects to train (scratch towers).
    """
    from modalign.lab.endtoend import trainer_sections

    cfg = training_config(setting, seed, config, store, towers,
                          end_to_end=trainer_sections(setting, config, store, modules))
    resume = (run_dir / "checkpoints" / "latest.json").is_file()
    with warnings.catch_warnings():
        # the trainer's note on a batch large for the data is about the laboratory's own batch
        # size (a setting of its grid, recorded with each run), not something to act on
        warnings.filterwarnings("ignore", message="batch .* holds more than a tenth",
                                category=SmallDataWarning)
        trainer = Trainer(cfg, run_dir=run_dir, resume=resume, towers=modules)
    with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch lines go to log.jsonl
        trainer.run()
    # trainer.model holds the last epoch's weights and temperature (the run saved its best's)
    log = read_jsonl(run_dir / LOG_NAME) if (run_dir / LOG_NAME).is_file() else []
    return trainer.model, log


def run_setting(setting: GapSetting, seed: int, config: LabConfig, store: EmbeddingStore,
                data: SpaceData, towers: LabTowers, out_dir: Path, *,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train and measure one (setting, seed), or read its finished record; returns the record."""
    fingerprint = store_fingerprint(store)
    key = run_key(setting, seed, config, fingerprint, towers.identity)
    run_dir = out_dir / "runs" / train_key(setting, seed, config, fingerprint, towers.specs)
    path = out_dir / "settings" / f"{setting.name}-s{seed}-{key}.json"
    if path.is_file():
        return read_json(path)
    torch.manual_seed(seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    run_towers = towers
    if setting.end_to_end:
        from modalign.lab.endtoend import dataset_spec, scratch_store, scratch_towers, trained_space

        train_store, modules = store, None
        specs = dict(towers.specs)
        if setting.family == "scratch":
            train_store = scratch_store(store, config, out_dir)
            modules = scratch_towers(config, seed)
            specs = store_tower_specs(train_store)
        model, log = train_setting(setting, seed, config, train_store, specs, run_dir,
                                   modules=modules)
        train_seconds = time.perf_counter() - t0
        if progress is not None:
            progress("encoding with the trained towers")
        data, run_towers = trained_space(model, train_store, config, towers,
                                         dataset=dataset_spec(store, config))
    else:
        model, log = train_setting(setting, seed, config, store, towers.specs, run_dir)
        train_seconds = time.perf_counter() - t0
    measured = measure_space(model, data, config, run_towers, seed=seed, progress=progress,
                             converge=setting.family in config.converge_families)
    record = {
        "schema": SCHEMA, "key": key, "run": str(run_dir.relative_to(out_dir)),
        "name": setting.name, "setting": setting.to_dict(),
        "seed": seed, "modalign_version": __version__, "store": str(store.path),
        "towers": towers.identity, "bridge": config.learned_bridge,
        "trajectory": [{k: v for k, v in upgrade_training_row(row).items()
                        if k in ("epoch", "gap", "image-to-text_recall@1",
                                 "text-to-image_recall@1", "train_loss")} for row in log],
        **measured,
    }
    record["seconds"]["train"] = train_seconds
    record["seconds"]["cpu"] = time.process_time() - cpu0  # every thread of the process
    write_json_atomic(path, record)
    return record


def summarize(records: Sequence[dict[str, Any]], config: LabConfig) -> dict[str, Any]:
    """Per-setting means and standard deviations over seeds, the trend tests and the verdicts.

    The trend of the benefit with the gap is tested over every setting without a control term
    (the main verdict), and within each family of spaces with at least 3 such settings; the
    relation of the measured misalignment with the benefit over every setting (fine-tuned and
    LoRA settings form one group, :data:`~modalign.lab.settings.FAMILY_GROUPS`); the answer to
    the laboratory's question is written from the scratch family's pooled queries
    (:func:`modalign.lab.answer.answer`).
    """
    from modalign.lab.answer import answer, pooled_interval

    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_name.setdefault(r["name"], []).append(r)
    rows = []
    for s in config.settings:
        runs = by_name.get(s.name, [])
        if not runs:
            continue
        row: dict[str, Any] = {"name": s.name, "setting": s.to_dict(), "seeds": len(runs),
                               "family": s.family, "control": s.control}
        for k in SUMMARY_METRICS:
            vals = [v for r in runs
                    if (v := {**r["metrics"], **r["inversion"]}.get(k)) is not None]
            if vals:
                row[k] = float(np.mean(vals))
                row[f"{k}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        for key, parts in (("delta_map", ("i2i_delta", "t2t_delta")),
                           ("misalignment", ("i2i_misalignment", "t2t_misalignment")),
                           ("bridge_delta_map", ("i2i_bridge_delta", "t2t_bridge_delta"))):
            pooled = [v for r in runs for p in parts for v in r.get("per_query", {}).get(p, [])]
            if pooled:
                row[f"{key}_ci"] = pooled_interval(pooled, seed=0)
        rows.append(row)
    main = [r for r in rows if not r["control"]]
    test = _trend(main, "gap", "delta_map", config)
    families = {}
    for fam in dict.fromkeys(FAMILY_GROUPS[r["family"]] for r in main):
        part = [r for r in main if FAMILY_GROUPS[r["family"]] == fam]
        t = _trend(part, "gap", "delta_map", config)
        families[fam] = {"settings": [r["name"] for r in part],
                         "trend": t.to_dict() if t else None, "verdict": verdict(t, len(part))}
    with_mis = [r for r in rows if "misalignment" in r]
    mech = _trend(with_mis, "misalignment", "delta_map", config)
    clip_like = [r["name"] for r in rows if r["gap"] >= 0.5]
    note = None
    if main and all("oti_final_cosine" in r and "ovi_final_cosine" in r for r in main):
        lo, hi = min(main, key=lambda r: r["gap"]), max(main, key=lambda r: r["gap"])
        note = (f"Inversion quality: mean final cosine to the targets {lo['oti_final_cosine']:.2f} "
                f"(OTI) / {lo['ovi_final_cosine']:.2f} (OVI) at the smallest gap ({lo['name']}), "
                f"{hi['oti_final_cosine']:.2f} / {hi['ovi_final_cosine']:.2f} at the largest "
                f"({hi['name']}).")
    return {
        "schema": SCHEMA, "modalign_version": __version__, "settings": rows,
        "answer": answer(rows, records),
        "trend": test.to_dict() if test else None, "claim_held": test.held if test else None,
        "verdict": verdict(test, len(main)), "inversion_note": note,
        "family_trends": families,
        "mechanism": {"trend": mech.to_dict() if mech else None,
                      "verdict": mechanism_verdict(mech, len(with_mis))},
        "clip_like_gap_settings": clip_like,
        "largest_gap": max(rows, key=lambda r: r["gap"])["name"] if rows else None,
        "smallest_gap": min(rows, key=lambda r: r["gap"])["name"] if rows else None,
        "config": {"seeds": list(config.seeds), **config.training_dict(),
                   **config.measuring_dict()},
    }


def _trend(rows: Sequence[dict[str, Any]], x: str, y: str, config: LabConfig
           ) -> TrendTest | None:
    rows = [r for r in rows if x in r and y in r]
    if len(rows) < 3 or len({r[x] for r in rows}) < 2:
        return None
    return trend_test([r[x] for r in rows], [r[y] for r in rows],
                      permutations=config.permutations, bootstrap=config.bootstrap)


def mechanism_verdict(test: TrendTest | None, n: int) -> str:
    """The sentence on "the benefit of inversion grows with the measured misalignment"."""
    if test is None:
        return f"Not tested: {n} setting(s) with a misalignment measurement; at least 3 needed."
    held = "held" if test.held else "did not hold"
    return (f"The mechanism {held} here: Spearman rho between misalignment and the benefit of "
            f"inversion = {test.rho:+.2f} over {test.n} settings (95% bootstrap interval "
            f"[{test.ci_low:+.2f}, {test.ci_high:+.2f}], one-sided permutation p = "
            f"{test.p_value:.3g}); least-squares slope {test.slope:+.3f} mAP of benefit per unit "
            "of misalignment.")


def run_gap_lab(config: LabConfig, store: EmbeddingStore | str | Path,
                out_dir: str | Path, *, towers: LabTowers | None = None,
                progress: bool = True, report: bool = True) -> LabResult:
    """Run (or continue) the sweep of ``config`` on a store of tower features.

    Args:
        config: settings, seeds and measuring knobs (``quick_config()``, ``full_config()``).
        store: the embedding store of image and text tower features (train/val/test splits).
        out_dir: where runs, records, ``lab.json`` and ``lab.html`` go.
        towers: the frozen towers (default: loaded from the store's recorded encoders).
        progress: show a progress bar over the runs.
        report: write ``lab.html`` (the figures are returned either way).

    Examples:
        (Not run as a doctest: the sweep trains a model per setting (minutes).)

        >>> from modalign.lab import quick_config, run_gap_lab
        >>> res = run_gap_lab(quick_config(), "STORE", "lab-out")  # doctest: +SKIP
        >>> print(res.verdict)  # doctest: +SKIP
        The claim ...
    """
    from modalign.lab.plots import lab_figures
    from modalign.lab.report import write_report

    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    for m in ("image", "text"):
        if m not in store.arrays:
            raise ValueError(f"store {store.path}: no {m!r} array; the lab needs image and text "
                             "tower features (build them with 'modalign embed')")
    if towers is None:
        towers = LabTowers.from_specs(store_tower_specs(store), ovi_stage=config.ovi_stage,
                                      ovi_tokens=config.ovi_tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = SpaceData.load(store, config, towers.encode_text)
    # seed-major: an interrupted sweep has every setting at its first seed before any second
    jobs = [(s, seed) for seed in config.seeds for s in config.settings]
    records = []
    t0 = time.perf_counter()
    bar = tqdm(jobs, unit="run", desc="gap lab", disable=(not progress) or None, file=sys.stderr)
    for setting, seed in bar:
        bar.set_postfix_str(f"{setting.name} seed {seed}")

        def note(stage: str, _s: GapSetting = setting, _seed: int = seed) -> None:
            bar.set_postfix_str(f"{_s.name} seed {_seed}: {stage}")

        records.append(run_setting(setting, seed, config, store, data, towers, out,
                                   progress=note))
    bar.close()
    summary = summarize(records, config)
    summary["seconds"] = time.perf_counter() - t0
    summary["records"] = sorted(str(Path("settings") / f"{r['name']}-s{r['seed']}-{r['key']}.json")
                                for r in records)
    write_json_atomic(out / "lab.json", summary)
    figures = lab_figures(records, summary)
    if report:
        write_report(out / "lab.html", records, summary, figures)
    return LabResult(records, summary, summary["verdict"], figures, out)


def store_tower_specs(store: EmbeddingStore) -> dict[str, str]:
    """The encoder spec the store recorded for its image and text arrays."""
    specs = {}
    for m in ("image", "text"):
        enc = store.info(m).get("encoder") or {}
        name = enc.get("name") if isinstance(enc, dict) else None
        if not name:
            raise ValueError(f"store {store.path}: the {m!r} array records no encoder; pass "
                             "towers=LabTowers.from_specs({...}) explicitly")
        specs[m] = str(name)
    return specs


def data_store(data: str = "emoji") -> EmbeddingStore:
    """The store of the default image and text towers for ``data`` (encoded once, then cached).

    Examples:
        (Not run as a doctest: it encodes the whole dataset with two pretrained towers (minutes).)

        >>> store = data_store("emoji")  # doctest: +SKIP
        >>> sorted(store.modalities)  # doctest: +SKIP
        ['image', 'text']
    """
    from modalign.train.loop import resolve_store

    return resolve_store(TrainConfig.from_dict({"data": {"dataset": data,
                                                         "keys": ["image", "text"]}}))


def run_quick_lab(out_dir: str | Path, data: str = "emoji", *,
                  progress: bool = True) -> LabResult:
    """The quick sweep (:func:`~modalign.lab.settings.quick_config`) on ``data``'s tower features.

    What ``modalign demo`` calls for its report: ``result.figures["benefit_vs_gap"]`` and
    ``result.verdict``. Finished runs in ``out_dir`` are reused.

    Examples:
        (Not run as a doctest: it encodes the emoji data and trains the sweep (minutes).)

        >>> res = run_quick_lab("lab-quick")  # doctest: +SKIP
        >>> res.verdict  # doctest: +SKIP
        'The claim ...'
    """
    from modalign.lab.settings import quick_config

    return run_gap_lab(quick_config(), data_store(data), out_dir, progress=progress)
