"""The laboratory's question, answered from the numbers.

"Where towers are trained by the contrastive loss alone, is there intra-modal misalignment, and
does crossing the gap (OTI/OVI) repair it?" The scratch family's records (no control term) are
pooled query by query over settings and seeds (image->image and name->text queries together):

* misalignment: mean of ``AP through the other modality - native AP`` with a 95% percentile
  bootstrap interval over the pooled queries; "there is misalignment" when the interval lies
  above 0, "the other modality ranks worse" when it lies below 0, else "no clear sign";
* repair: the same for ``AP with inverted queries - native AP`` at the fixed step budget, and the
  converged run's mean on its query subset beside it; and for the same queries carried across
  by a learned bridge fitted on the training split (``AP bridged - native AP``), with the paired
  interval of ``bridged - inverted``;
* retrieval beside it: test and training-subset image->text R@1 of those settings, with a
  warning when the space barely retrieves (test R@1 below 0.05);
* the same for the fine-tuned and LoRA settings (pretrained towers trained further by the CLIP
  loss), with their towers' own intra-modal mAP before and after training.

Examples:
    >>> answer([], [])
    'Not measured: no setting trains its towers by the contrastive loss alone (family scratch).'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

QUESTION = ("Where towers are trained by the contrastive loss alone, is there intra-modal "
            "misalignment, and does crossing the gap (OTI/OVI, or a learned bridge) repair it?")
POOR_RETRIEVAL = 0.05


def pooled_interval(values: Sequence[float], *, seed: int = 0, samples: int = 2000,
                    level: float = 0.95) -> list[float]:
    """95% percentile bootstrap interval of the mean of ``values`` (resampled with replacement).

    Examples:
        >>> pooled_interval([1.0, 1.0, 1.0])
        [1.0, 1.0]
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("values: expected at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (samples, x.size))].mean(1)
    a = (1.0 - level) / 2.0
    return [float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))]


def _sign(ci: Sequence[float]) -> int:
    return 1 if ci[0] > 0 else (-1 if ci[1] < 0 else 0)


def _pooled(recs: Sequence[dict[str, Any]], parts: Sequence[str]) -> list[float]:
    return [v for r in recs for k in parts for v in r.get("per_query", {}).get(k, [])]


def _repair(recs: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """The OTI/OVI and learned-bridge verdicts and the sentence with their numbers."""
    delta = _pooled(recs, ("i2i_delta", "t2t_delta"))
    delta_ci = pooled_interval(delta)
    verdict = {1: "crossing the gap with OTI/OVI repaired part of it",
               -1: "crossing the gap with OTI/OVI made intra-modal retrieval worse",
               0: "crossing the gap with OTI/OVI changed intra-modal retrieval by no "
                  "measurable amount"}[_sign(delta_ci)]
    conv = [r["inversion"]["delta_map_converged"] for r in recs
            if "delta_map_converged" in r.get("inversion", {})]
    conv_text = (f"; run to convergence (step cap {recs[0]['inversion']['converge_steps']}) on a "
                 f"query subset the change was {np.mean(conv):+.3f}" if conv else "")
    text = (f"inverted queries changed it by {np.mean(delta):+.3f} ([{delta_ci[0]:+.3f}, "
            f"{delta_ci[1]:+.3f}]) at the fixed step budget{conv_text}")
    bridge = _pooled(recs, ("i2i_bridge_delta", "t2t_bridge_delta"))
    if len(bridge) == len(delta) and bridge:
        b_ci = pooled_interval(bridge)
        diff = np.asarray(bridge) - np.asarray(delta)  # same queries: bridge AP - inverted AP
        d_ci = pooled_interval(diff)
        kind = next((r.get("bridge") for r in recs if r.get("bridge")), "learned")
        verdict += {1: ", a learned bridge repaired part of it",
                    -1: ", a learned bridge made it worse",
                    0: ", a learned bridge changed it by no measurable amount"}[_sign(b_ci)]
        text += (f"; the same queries carried across by a learned bridge ({kind}, fitted on the "
                 f"training split's joint embeddings) changed it by {np.mean(bridge):+.3f} "
                 f"([{b_ci[0]:+.3f}, {b_ci[1]:+.3f}]), {np.mean(diff):+.3f} "
                 f"([{d_ci[0]:+.3f}, {d_ci[1]:+.3f}], paired) against the inverted queries")
    return verdict, text


def _spaces(names: Sequence[str], recs: Sequence[dict[str, Any]],
            by: dict[str, dict[str, Any]]) -> str:
    return (f"{len(names)} setting(s), {len(recs)} trained space(s); " + "; ".join(
        f"{n}: gap {by[n]['gap']:.2f}, image->text R@1 {by[n]['text_retrieval_recall@1']:.3f} "
        f"test / {by[n].get('train_text_retrieval_recall@1', float('nan')):.3f} train"
        for n in names if n in by))


def answer(rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> str:
    """The answer to :data:`QUESTION` from the summary rows and the records (see module doc)."""
    names = [r["name"] for r in rows if r.get("family") == "scratch" and not r.get("control")]
    recs = [r for r in records if r["name"] in names and "per_query" in r]
    by = {r["name"]: r for r in rows}
    tuned = _tuned(rows, records, by)
    if not names or not recs:
        return ("Not measured: no setting trains its towers by the contrastive loss alone "
                "(family scratch)." + (f" {tuned}" if tuned else ""))
    mis = _pooled(recs, ("i2i_misalignment", "t2t_misalignment"))
    mis_ci = pooled_interval(mis)
    better = float(np.mean([r["metrics"]["better_through"] for r in recs]))
    poor = [n for n in names if n in by and by[n]["text_retrieval_recall@1"] < POOR_RETRIEVAL]
    verdict_mis = {1: "yes, there is intra-modal misalignment",
                   -1: "no: ranking through the other modality is worse than ranking natively",
                   0: "no clear sign of intra-modal misalignment"}[_sign(mis_ci)]
    verdict_fix, fix_text = _repair(recs)
    text = (f"{verdict_mis.capitalize()}, and {verdict_fix}. Towers trained by the CLIP loss "
            f"alone ({_spaces(names, recs, by)}): ranking "
            f"images and texts through their paired items of the other modality changed "
            f"intra-modal mAP by {np.mean(mis):+.3f} (95% interval [{mis_ci[0]:+.3f}, "
            f"{mis_ci[1]:+.3f}] over {len(mis)} queries; {better:.0%} of queries ranked their "
            f"positives better that way); {fix_text}.")
    controls = [r for r in rows if r.get("family") == "scratch" and r.get("control")
                and "misalignment" in r]
    if controls:
        text += " Controls: " + "; ".join(
            f"{r['name']}: gap {r['gap']:.2f}, misalignment {r['misalignment']:+.3f}, "
            f"inversion {r['delta_map']:+.3f}" for r in controls) + "."
    if poor:
        text += (f" Caution: {', '.join(poor)} retrieve(s) poorly (test R@1 below "
                 f"{POOR_RETRIEVAL}), so these numbers describe a barely trained space.")
    return text + (f" {tuned}" if tuned else "")


def _tuned(rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
           by: dict[str, dict[str, Any]]) -> str:
    """The same measurements for pretrained towers trained further by the contrastive loss
    (fine-tuned or LoRA, no control), with the change of the towers' own intra-modal mAP."""
    names = [r["name"] for r in rows if r.get("family") in ("finetune", "lora")
             and not r.get("control")]
    recs = [r for r in records if r["name"] in names and "per_query" in r]
    if not recs:
        return ""
    mis = _pooled(recs, ("i2i_misalignment", "t2t_misalignment"))
    mis_ci = pooled_interval(mis)
    _, fix_text = _repair(recs)
    erosion = "; ".join(
        f"{n}: " + ", ".join(f"{label} {by[n][f'{d}_tower_before_map']:.3f} -> "
                             f"{by[n][f'{d}_tower_after_map']:.3f} (joint "
                             f"{by[n][f'{d}_native_map']:.3f})"
                             for d, label in (("i2i", "image->image"), ("t2t", "name->text")))
        for n in names if n in by and "i2i_tower_after_map" in by[n])
    return (f"Pretrained towers trained further by the CLIP loss (fine-tuned or LoRA; "
            f"{_spaces(names, recs, by)}): misalignment {np.mean(mis):+.3f} "
            f"([{mis_ci[0]:+.3f}, {mis_ci[1]:+.3f}] over {len(mis)} queries); {fix_text}"
            + (f"; the towers' own intra-modal mAP before -> after training (and in the "
               f"joint space): {erosion}" if erosion else "") + ".")
