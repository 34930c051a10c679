"""Everything measured on one trained space: geometry, retrieval, inversion, zero-shot, bridges.

The model's heads project the store's tower features of the evaluation split (and the bank split
for the bridges and the gap vector). Then:

- geometry: centroid gap, linear separability of the modalities, cone (mean pairwise cosine
  within a modality) and uniformity of each modality;
- cross-modal retrieval both ways, natively and after each post-hoc bridge;
- cross-style image -> image retrieval (Noto queries, OpenMoji gallery) and name -> text retrieval
  (a concept's name querying every other text) natively and with inverted queries: OTI turns each
  query image into a text feature, OVI each query name into an image feature, through the frozen
  tower and the trained head; ``delta_map`` is inverted minus native mAP;
- zero-shot classification into the label: inter-modal (images against prompt prototypes), with
  each bridge, and intra-modal (the OTI features of the query images against the same prototypes);
- the gap-shift curve (:mod:`modalign.geometry.gapshift`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.bridge.inversion import (
    InversionForward,
    InversionResult,
    InversionSettings,
    ProjectedForward,
    invert,
)
from modalign.embed.store import Embeddings, EmbeddingStore, evenly_spaced
from modalign.evaluate.bootstrap import QueryValues, bootstrap_intervals, paired_bootstrap
from modalign.evaluate.metrics import retrieval_metrics, self_exclusion
from modalign.evaluate.retrieval import as_unit_tensor, cross_modal_retrieval
from modalign.evaluate.zeroshot import (
    build_prompts,
    class_name,
    class_prototypes,
    zero_shot_classification,
)
from modalign.geometry.cone import mean_pairwise_cosine
from modalign.geometry.gap import modality_gap
from modalign.geometry.gapshift import gap_shift_curve
from modalign.geometry.separability import linear_separability
from modalign.geometry.uniformity import uniformity
from modalign.lab.misalign import (
    bridged_queries,
    intra_map,
    measure_misalignment,
    plateau_step,
)
from modalign.lab.settings import LabConfig
from modalign.model import MultiTowerModel

MODALITIES = ("image", "text")


@dataclass
class LabTowers:
    """What the sweep needs from the frozen towers besides the cached features.

    Attributes:
        specs: encoder spec per modality (recorded in each trained model).
        encode_text: text tower features of a list of strings (for zero-shot prompts).
        inversion: modality -> the tower run from pseudo-tokens (its features, before a head).
        identity: a JSON description of the towers (part of every cache key).
    """

    specs: dict[str, str]
    encode_text: Callable[[list[str]], Tensor]
    inversion: Callable[[str], InversionForward]
    identity: dict[str, Any]

    @classmethod
    def from_specs(cls, specs: Mapping[str, str], *, ovi_stage: int = 0,
                   ovi_tokens: int | None = None) -> LabTowers:
        """Towers loaded by spec (``modalign.encoders.load_encoder``), each on first use.

        Examples:
            >>> towers = LabTowers.from_specs({"image": "effnet-lite0", "text": "minilm"})
            >>> towers.specs["text"]
            'minilm'
        """
        from modalign.bridge.inversion import encoder_inversion
        from modalign.encoders import load_encoder

        missing = [m for m in MODALITIES if m not in specs]
        if missing:
            raise ValueError(f"specs: no tower spec for {missing}; expected image and text")
        loaded: dict[str, Any] = {}
        forwards: dict[str, InversionForward] = {}

        def tower(m: str) -> Any:
            if m not in loaded:
                loaded[m] = load_encoder(specs[m], modality=m)
                if isinstance(loaded[m], torch.nn.Module):
                    loaded[m].eval()
            return loaded[m]

        def encode_text(texts: list[str]) -> Tensor:
            enc = tower("text")
            with torch.no_grad():
                return enc.encode(enc.preprocess(texts)).float()

        def inversion(m: str) -> InversionForward:
            if m not in forwards:
                tokens = ovi_tokens if m == "image" else None
                forwards[m] = encoder_inversion(tower(m), stage=ovi_stage, num_tokens=tokens)
            return forwards[m]

        return cls(dict(specs), encode_text, inversion,
                   {"specs": dict(specs), "ovi_stage": ovi_stage, "ovi_tokens": ovi_tokens})


@dataclass
class SpaceData:
    """The evaluation and bank splits of one store, tower features (not yet projected).

    ``before`` holds the evaluated split's features from the towers before training (the
    store's) where the towers themselves trained; ``None`` when ``test`` already is that.
    """

    test: dict[str, Embeddings]
    bank: dict[str, Embeddings]
    classnames: list[str]
    prompt_features: Tensor  # (C * T, d_text) tower features of the prompts, class-major
    image_queries: np.ndarray  # row indices into test["image"]
    text_queries: np.ndarray  # row indices into test["text"]
    before: dict[str, Embeddings] | None = None

    @classmethod
    def load(cls, store: EmbeddingStore, config: LabConfig,
             encode_text: Callable[[list[str]], Tensor]) -> SpaceData:
        """Read both splits, pick the inverted queries, encode the class prompts."""
        test = {m: store.load(m, split=config.split) for m in MODALITIES}
        bank = {m: store.load(m, split=config.bank_split) for m in MODALITIES}
        return cls.from_parts(test, bank, config, encode_text)

    @classmethod
    def from_parts(cls, test: dict[str, Embeddings], bank: dict[str, Embeddings],
                   config: LabConfig, encode_text: Callable[[list[str]], Tensor], *,
                   before: dict[str, Embeddings] | None = None) -> SpaceData:
        """The same from features already at hand (e.g. encoded by towers that trained)."""
        for part, name in ((test, config.split), (bank, config.bank_split)):
            for m, e in part.items():
                if len(e) < 5:
                    raise ValueError(f"split {name!r}: {len(e)} {m} rows in the store; the lab "
                                     "needs at least 5 per modality")
        qv, gv = config.image_views
        img_items = test["image"].items
        img_q = [i for i, it in enumerate(img_items) if it["view"] == qv]
        gallery_groups = {it["group"] for it in img_items if it["view"] == gv}
        img_q = [i for i in img_q if img_items[i]["group"] in gallery_groups]
        name_view, alias_view = config.text_views
        txt_items = test["text"].items
        with_alias = {it["group"] for it in txt_items if it["view"] == alias_view}
        txt_q = [i for i, it in enumerate(txt_items)
                 if it["view"] == name_view and it["group"] in with_alias]
        if not img_q or not txt_q:
            raise ValueError(f"split {config.split!r} has no {qv!r} images with a {gv!r} "
                             f"counterpart or no {name_view!r} texts with an {alias_view!r} one; "
                             "check image_views / text_views")
        labels = sorted({v for e in (*test.values(), *bank.values())
                         for v in e.labels(config.label) if v})
        if not labels:
            raise ValueError(f"label={config.label!r}: no item of the store carries it")
        prompts = build_prompts([class_name(c) for c in labels], config.templates)
        feats = encode_text([p for per in prompts for p in per])
        return cls(test, bank, labels, torch.as_tensor(feats).float(),
                   np.asarray(img_q)[evenly_spaced(len(img_q), config.inverted_queries)],
                   np.asarray(txt_q)[evenly_spaced(len(txt_q), config.inverted_queries)], before)


def project(model: MultiTowerModel, part: Mapping[str, Embeddings]) -> dict[str, Embeddings]:
    """Joint-space embeddings of each modality's tower features."""
    return {m: Embeddings(model.project_array(m, e.vectors), e.items, e.group_index)
            for m, e in part.items()}


def measure_space(model: MultiTowerModel, data: SpaceData, config: LabConfig,
                  towers: LabTowers, *, seed: int = 0,
                  progress: Callable[[str], None] | None = None,
                  converge: bool = True) -> dict[str, Any]:
    """All metrics of one trained model (see the module docstring); returns a JSON-ready dict.

    ``converge``: run the converged inversions (``config.converge_queries``) on this space; the
    sweep turns them off for families outside ``config.converge_families``."""
    note = progress or (lambda _msg: None)
    model.eval()
    test, bank = project(model, data.test), project(model, data.bank)
    img, txt = as_unit_tensor(test["image"]), as_unit_tensor(test["text"])
    t0 = time.perf_counter()
    m: dict[str, float] = {}
    iv: dict[str, list[float | None]] = {}  # 95% bootstrap intervals (differences: paired)
    gap = modality_gap(img.numpy(), txt.numpy(), normalize=False)
    m["gap"] = gap.centroid_distance
    m["separability"] = linear_separability(img.numpy(), txt.numpy(), seed=seed)["accuracy"]
    m["cone_image"] = mean_pairwise_cosine(img.numpy())
    m["cone_text"] = mean_pairwise_cosine(txt.numpy())
    m["uniformity_image"] = uniformity(img.numpy())
    m["uniformity_text"] = uniformity(txt.numpy())
    m["logit_scale"] = float(model.logit_scale.detach())

    def retrieval(prefix: str, bridges: Sequence[str] = ()) -> None:
        res = cross_modal_retrieval(test, MODALITIES, k_values=(1, 5), bridges=bridges,
                                    bank=bank if bridges else None)
        keys = ("text_retrieval_map", "text_retrieval_recall@1", "image_retrieval_map",
                "image_retrieval_recall@1")
        for k in keys:
            m[f"{prefix}{k}"] = res.metrics[k]
        for k, (lo, hi) in bootstrap_intervals({k: res.per_query[k] for k in keys},
                                               seed=seed).items():
            iv[f"{prefix}{k}"] = [lo, hi]

    note("retrieval")
    retrieval("")
    protos = class_prototypes(model.project("text", data.prompt_features).detach().reshape(
        len(data.classnames), len(config.templates), -1))
    zs = zero_shot_classification(test["image"], protos, data.classnames, label=config.label)
    m["zeroshot_inter_acc1"] = zs.metrics["acc1"]
    for b in config.bridges:
        name = b.split(":", 1)[0]
        retrieval(f"{name}_", [b])
        zb = zero_shot_classification(test["image"], protos, data.classnames, label=config.label,
                                      bridges=[b], bank=bank)
        m[f"{name}_zeroshot_inter_acc1"] = zb.metrics["acc1"]
    eval_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    note("OTI image -> text")
    inv: dict[str, Any] = {}
    q_img = data.image_queries
    oti = invert_queries(model, towers, "text", img[q_img],
                         [test["image"].items[i]["id"] for i in q_img],
                         config.oti_steps, config.oti_lr, seed)
    inv["oti_final_cosine"] = float(oti[1].mean())
    note("OVI text -> image")
    q_txt = data.text_queries
    ovi = invert_queries(model, towers, "image", txt[q_txt],
                         [test["text"].items[i]["id"] for i in q_txt],
                         config.ovi_steps, config.ovi_lr, seed)
    inv["ovi_final_cosine"] = float(ovi[1].mean())
    inversion_seconds = time.perf_counter() - t1

    # cross-style image -> image: query view vs gallery view, native vs OTI queries
    gv = config.image_views[1]
    g_rows = np.array([i for i, it in enumerate(test["image"].items) if it["view"] == gv])
    g_groups = torch.from_numpy(test["image"].group_ids()[g_rows])
    q_groups = torch.from_numpy(test["image"].group_ids()[q_img])
    native_r = retrieval_metrics(img[q_img], img[g_rows], q_groups, g_groups, k_values=(1,))
    inverted_r = retrieval_metrics(oti[0], img[g_rows], q_groups, g_groups, k_values=(1,))
    native, inverted = native_r.metrics, inverted_r.metrics
    iv["i2i_delta_map"] = _paired(QueryValues(inverted_r.per_query["map"].numpy()),
                                  QueryValues(native_r.per_query["map"].numpy()), seed)
    inv_ap = {"i2i": inverted_r.per_query["map"].numpy().astype(np.float64)}
    m["i2i_native_map"], m["i2i_oti_map"] = native["map"], inverted["map"]
    m["i2i_native_recall@1"], m["i2i_oti_recall@1"] = native["recall@1"], inverted["recall@1"]
    # name -> every other text of the split, native vs OVI queries
    t_ids = [it["id"] for it in test["text"].items]
    q_ids = [t_ids[i] for i in q_txt]
    t_groups = torch.from_numpy(test["text"].group_ids())
    excl = self_exclusion(q_ids, t_ids)
    native_r = retrieval_metrics(txt[q_txt], txt, t_groups[q_txt], t_groups, k_values=(1,),
                                 exclude=excl)
    inverted_r = retrieval_metrics(ovi[0], txt, t_groups[q_txt], t_groups, k_values=(1,),
                                   exclude=excl)
    native, inverted = native_r.metrics, inverted_r.metrics
    iv["t2t_delta_map"] = _paired(QueryValues(inverted_r.per_query["map"].numpy()),
                                  QueryValues(native_r.per_query["map"].numpy()), seed)
    inv_ap["t2t"] = inverted_r.per_query["map"].numpy().astype(np.float64)
    m["t2t_native_map"], m["t2t_ovi_map"] = native["map"], inverted["map"]
    m["t2t_native_recall@1"], m["t2t_ovi_recall@1"] = native["recall@1"], inverted["recall@1"]
    m["i2i_delta_map"] = m["i2i_oti_map"] - m["i2i_native_map"]
    m["t2t_delta_map"] = m["t2t_ovi_map"] - m["t2t_native_map"]
    m["delta_map"] = 0.5 * (m["i2i_delta_map"] + m["t2t_delta_map"])
    # intra-modal misalignment: the same queries ranked through the other modality's items
    all_img_groups = torch.from_numpy(test["image"].group_ids())
    mis = {"i2i": measure_misalignment(img[q_img], q_groups, img[g_rows], g_groups, txt,
                                       t_groups),
           "t2t": measure_misalignment(txt[q_txt], t_groups[q_txt], txt, t_groups, img,
                                       all_img_groups, exclude=excl)}
    per_query: dict[str, list[float]] = {
        "i2i_misalignment": (mis["i2i"].through_ap - mis["i2i"].native_ap).tolist(),
        "t2t_misalignment": (mis["t2t"].through_ap - mis["t2t"].native_ap).tolist(),
        "i2i_delta": (np.asarray(inv_ap["i2i"]) - mis["i2i"].native_ap).tolist(),
        "t2t_delta": (np.asarray(inv_ap["t2t"]) - mis["t2t"].native_ap).tolist()}
    for d, other in (("i2i", "text"), ("t2t", "image")):
        r = mis[d]
        m[f"{d}_through_{other}_map"] = r.through_map
        m[f"{d}_misalignment"] = r.misalignment
        m[f"{d}_better_through"] = r.better_through
        iv[f"{d}_misalignment"] = _paired(QueryValues(r.through_ap), QueryValues(r.native_ap),
                                          seed)
    m["misalignment"] = 0.5 * (m["i2i_misalignment"] + m["t2t_misalignment"])
    if config.learned_bridge:
        note("learned bridge")
        t3 = time.perf_counter()
        m.update(_bridge_benefit(config, seed, img, txt, bank, q_img, q_txt, g_rows, g_groups,
                                 q_groups, t_groups, excl, mis, inv_ap, per_query, iv))
        eval_seconds += time.perf_counter() - t3
    m["better_through"] = 0.5 * (m["i2i_better_through"] + m["t2t_better_through"])
    # intra-modal structure of the towers before training vs after, and of the joint space
    before = data.before if data.before is not None else data.test
    for tag, part in (("tower_before", before), ("tower_after", data.test)):
        m[f"i2i_{tag}_map"] = intra_map(torch.as_tensor(np.asarray(part["image"].vectors)),
                                        q_img, g_rows, all_img_groups)
        m[f"t2t_{tag}_map"] = intra_map(torch.as_tensor(np.asarray(part["text"].vectors)),
                                        q_txt, np.arange(len(t_ids)), t_groups, exclude=excl)
    m["train_subset_groups"], train_ret = train_retrieval(
        bank, config, len(np.unique(test["image"].group_ids())))
    m.update({f"train_{k}": v for k, v in train_ret.items()})
    t2 = time.perf_counter()
    if converge and config.converge_queries > 0 and config.converge_steps > 0:
        note("inversion to convergence")
        inv.update(converged_inversion(model, towers, config, seed, img, txt, test, q_img, q_txt,
                                       g_rows, g_groups, q_groups, t_groups, excl, inv_ap,
                                       oti[1], ovi[1]))
    inversion_seconds += time.perf_counter() - t2
    # zero-shot on the OTI queries: inter (native images) vs intra (their OTI text features)
    subset = test["image"].subset(q_img)
    inter = zero_shot_classification(subset, protos, data.classnames, label=config.label)
    intra = zero_shot_classification(subset, protos, data.classnames, label=config.label,
                                     query_override=oti[0])
    m["zeroshot_subset_inter_acc1"] = inter.metrics["acc1"]
    m["zeroshot_subset_intra_acc1"] = intra.metrics["acc1"]
    iv["zeroshot_subset_delta_acc1"] = _paired(intra.per_query["acc1"],
                                               inter.per_query["acc1"], seed)

    note("gap shift")
    shift = gap_shift_curve(test, bank, amounts=config.shifts, prototypes=protos,
                            classnames=data.classnames, label=config.label)
    return {"metrics": m, "intervals": iv, "inversion": inv, "gap_shift": shift,
            "per_query": per_query, "pca": pca_2d(img, txt),
            "seconds": {"evaluate": eval_seconds, "invert": inversion_seconds}}


def _bridge_benefit(config: LabConfig, seed: int, img: Tensor, txt: Tensor,
                    bank: Mapping[str, Embeddings], q_img: np.ndarray, q_txt: np.ndarray,
                    g_rows: np.ndarray, g_groups: Tensor, q_groups: Tensor, t_groups: Tensor,
                    excl: Tensor, mis: Mapping[str, Any], inv_ap: Mapping[str, np.ndarray],
                    per_query: dict[str, list[float]], iv: dict[str, list[float | None]]
                    ) -> dict[str, float]:
    """The OTI/OVI queries carried across by a learned bridge fitted on the bank (image -> text
    for the image queries, text -> image for the names), ranking the same galleries: mAP, the
    benefit over native (per query, paired interval) and the paired difference to inversion."""
    kind = config.learned_bridge
    bridged = {
        "i2i": bridged_queries(img[q_img], bank["image"], bank["text"], kind=kind, seed=seed),
        "t2t": bridged_queries(txt[q_txt], bank["text"], bank["image"], kind=kind, seed=seed)}
    ap = {"i2i": retrieval_metrics(bridged["i2i"], img[g_rows], q_groups, g_groups,
                                   k_values=(1,)).per_query["map"].numpy().astype(np.float64),
          "t2t": retrieval_metrics(bridged["t2t"], txt, t_groups[q_txt], t_groups, k_values=(1,),
                                   exclude=excl).per_query["map"].numpy().astype(np.float64)}
    out: dict[str, float] = {}
    for d in ("i2i", "t2t"):
        native = mis[d].native_ap
        out[f"{d}_bridge_map"] = float(ap[d].mean())
        out[f"{d}_bridge_delta_map"] = float((ap[d] - native).mean())
        per_query[f"{d}_bridge_delta"] = (ap[d] - native).tolist()
        iv[f"{d}_bridge_delta_map"] = _paired(QueryValues(ap[d]), QueryValues(native), seed)
        iv[f"{d}_bridge_vs_inversion"] = _paired(QueryValues(ap[d]),
                                                 QueryValues(np.asarray(inv_ap[d])), seed)
    out["bridge_delta_map"] = 0.5 * (out["i2i_bridge_delta_map"] + out["t2t_bridge_delta_map"])
    return out


def train_retrieval(bank: Mapping[str, Embeddings], config: LabConfig, test_groups: int
                    ) -> tuple[int, dict[str, float]]:
    """Cross-modal retrieval on a fixed subset of training groups, as many as the evaluated
    split has (or ``config.train_subset``), so train and test galleries are of one size."""
    groups = np.unique(bank["image"].group_ids())
    groups = np.intersect1d(groups, np.unique(bank["text"].group_ids()))
    n = config.train_subset or test_groups
    n = min(max(n, 2), len(groups))
    keep = np.sort(np.random.default_rng(0).choice(groups, size=n, replace=False))
    part = {m: e.subset(np.isin(e.group_ids(), keep)) for m, e in bank.items()}
    res = cross_modal_retrieval(part, MODALITIES, k_values=(1,))
    return n, {k: res.metrics[k] for k in ("text_retrieval_recall@1", "text_retrieval_map",
                                           "image_retrieval_recall@1", "image_retrieval_map")}


def converged_inversion(model: MultiTowerModel, towers: LabTowers, config: LabConfig, seed: int,
                        img: Tensor, txt: Tensor, test: Mapping[str, Embeddings],
                        q_img: np.ndarray, q_txt: np.ndarray, g_rows: np.ndarray,
                        g_groups: Tensor, q_groups: Tensor, t_groups: Tensor, excl: Tensor,
                        budget_ap: Mapping[str, np.ndarray], oti_cos: Tensor, ovi_cos: Tensor
                        ) -> dict[str, Any]:
    """Both inversions run again on the first ``converge_queries`` queries of each subset with
    ``converge_steps`` steps: final cosine, steps to the plateau, and the benefit there beside
    the fixed-budget benefit of the same queries."""
    n_i, n_t = min(config.converge_queries, len(q_img)), min(config.converge_queries, len(q_txt))
    out: dict[str, Any] = {"converge_steps": config.converge_steps}
    oti = invert_result(model, towers, "text", img[q_img[:n_i]],
                        [test["image"].items[i]["id"] for i in q_img[:n_i]],
                        config.converge_steps, config.oti_lr, seed)
    ovi = invert_result(model, towers, "image", txt[q_txt[:n_t]],
                        [test["text"].items[i]["id"] for i in q_txt[:n_t]],
                        config.converge_steps, config.ovi_lr, seed)
    native_i = retrieval_metrics(img[q_img[:n_i]], img[g_rows], q_groups[:n_i], g_groups,
                                 k_values=(1,)).per_query["map"].numpy()
    conv_i = retrieval_metrics(oti.features, img[g_rows], q_groups[:n_i], g_groups,
                               k_values=(1,)).per_query["map"].numpy()
    native_t = retrieval_metrics(txt[q_txt[:n_t]], txt, t_groups[q_txt[:n_t]], t_groups,
                                 k_values=(1,), exclude=excl[:n_t]).per_query["map"].numpy()
    conv_t = retrieval_metrics(ovi.features, txt, t_groups[q_txt[:n_t]], t_groups,
                               k_values=(1,), exclude=excl[:n_t]).per_query["map"].numpy()
    for name, res, budget_cos in (("oti", oti, oti_cos[:n_i]), ("ovi", ovi, ovi_cos[:n_t])):
        out[f"{name}_converged_final_cosine"] = float(res.final_cosine.mean())
        out[f"{name}_budget_final_cosine_subset"] = float(budget_cos.mean())
        step = plateau_step(res.loss_curve)
        out[f"{name}_plateau_step"] = step
        out[f"{name}_plateaued"] = bool(step is not None
                                        and step <= 0.8 * config.converge_steps)
    out["i2i_delta_map_budget_subset"] = float(np.mean(budget_ap["i2i"][:n_i] - native_i))
    out["i2i_delta_map_converged"] = float(np.mean(conv_i - native_i))
    out["t2t_delta_map_budget_subset"] = float(np.mean(budget_ap["t2t"][:n_t] - native_t))
    out["t2t_delta_map_converged"] = float(np.mean(conv_t - native_t))
    out["delta_map_budget_subset"] = 0.5 * (out["i2i_delta_map_budget_subset"]
                                            + out["t2t_delta_map_budget_subset"])
    out["delta_map_converged"] = 0.5 * (out["i2i_delta_map_converged"]
                                        + out["t2t_delta_map_converged"])
    return out


def _paired(treated: QueryValues, baseline: QueryValues, seed: int) -> list[float | None]:
    """Paired 95% bootstrap interval of ``treated - baseline`` over the same queries."""
    out = paired_bootstrap({"m": treated}, {"m": baseline}, seed=seed)
    return list(out["m"]["interval"]) if "m" in out else [None, None]


def invert_queries(model: MultiTowerModel, towers: LabTowers, modality: str, targets: Tensor,
                   keys: list[str], steps: int, lr: float, seed: int) -> tuple[Tensor, Tensor]:
    """Joint-space features of ``modality`` matching ``targets`` (unit joint embeddings of the
    other modality) through the frozen tower and the model's head, and their final cosines."""
    res = invert_result(model, towers, modality, targets, keys, steps, lr, seed)
    return res.features, res.final_cosine


def invert_result(model: MultiTowerModel, towers: LabTowers, modality: str, targets: Tensor,
                  keys: list[str], steps: int, lr: float, seed: int) -> InversionResult:
    """:func:`invert_queries` with the whole :class:`InversionResult` (its loss curve too)."""
    def to_joint(features: Tensor) -> Tensor:
        return model.project(modality, features)

    forward = ProjectedForward(towers.inversion(modality), to_joint, head_name=f"head {modality}")
    settings = InversionSettings(steps=steps, lr=lr, seed=seed,
                                 batch_size=max(1, len(keys)))
    for p in model.parameters():
        p.requires_grad_(False)
    res = invert(targets, forward, settings, keys=keys)
    res.features = F.normalize(res.features, dim=-1)
    return res


def pca_2d(image: Tensor, text: Tensor) -> dict[str, Any]:
    """Both modalities on the first two principal axes of their union (for side-by-side plots).

    Examples:
        >>> out = pca_2d(torch.randn(5, 4), torch.randn(6, 4))
        >>> len(out["image"]), len(out["text"]), len(out["explained"])
        (5, 6, 2)
    """
    both = torch.cat([image, text]).double()
    centred = both - both.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ vh[:2].T
    var = s.pow(2)
    explained = (var[:2] / var.sum()).tolist()
    n = len(image)
    return {"image": np.round(coords[:n].numpy(), 4).tolist(),
            "text": np.round(coords[n:].numpy(), 4).tolist(), "explained": explained}
