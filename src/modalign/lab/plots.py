"""Figures of the gap lab, each readable on its own.

- ``benefit_vs_gap``: inversion benefit (delta mAP, inverted minus native) against the gap, one
  point per setting, error bars one standard deviation over seeds, a dashed line at no benefit;
  the same queries carried across by the learned bridge beside them;
- ``gap_shift``: retrieval mAP and zero-shot accuracy as one modality moves along the gap vector,
  for the smallest- and largest-gap settings;
- ``extremes``: both modalities on their first two principal axes, smallest vs largest gap;
- ``trajectories``: the validation gap after each epoch of training, per setting;
- ``misalignment_vs_benefit``: the inversion benefit against the measured intra-modal
  misalignment, one point per setting, coloured by family (the paper's mechanism).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

DIRECTIONS = (("i2i_delta_map", "image->image, OTI queries", "o"),
              ("t2t_delta_map", "name->text, OVI queries", "s"),
              ("delta_map", "mean of both", "D"),
              ("bridge_delta_map", "learned bridge instead, mean of both", "x"))


def benefit_vs_gap(summary: dict[str, Any]) -> Any:
    """Delta mAP against the gap, one point per setting (mean +- std over seeds).

    Examples:
        >>> row = {"name": "a", "gap": 0.1, "gap_std": 0.0, "delta_map": -0.1,
        ...        "delta_map_std": 0.0, "i2i_delta_map": -0.1, "t2t_delta_map": -0.1}
        >>> fig = benefit_vs_gap({"settings": [row], "verdict": "x"})
        >>> len(fig.axes)
        1
    """
    rows = summary["settings"]
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for key, label, marker in DIRECTIONS:
        x = [r["gap"] for r in rows if key in r]
        y = [r[key] for r in rows if key in r]
        if not x:
            continue
        ax.errorbar(x, y, xerr=[r.get("gap_std", 0.0) for r in rows if key in r],
                    yerr=[r.get(f"{key}_std", 0.0) for r in rows if key in r], fmt=marker,
                    capsize=3, label=label, alpha=0.9 if key == "delta_map" else 0.55,
                    markersize=7 if key == "delta_map" else 5)
    for r in rows:
        if "delta_map" in r:
            ax.annotate(r["name"], (r["gap"], r["delta_map"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("modality gap (centroid distance, test split)")
    ax.set_ylabel("benefit: delta mAP (inverted or bridged - native)")
    trend = summary.get("trend")
    title = "Does inversion pay more as the gap grows?"
    if trend:
        title += f"\nSpearman rho {trend['rho']:+.2f}, permutation p = {trend['p_value']:.3g}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _panels(records: Sequence[dict[str, Any]], names: Sequence[str], *, width: float,
            height: float) -> tuple[list[dict[str, Any]], Any, Any]:
    """The first-seed record of each setting in ``names`` and a figure with one panel each."""
    chosen = [next(r for r in records if r["name"] == n) for n in names]
    fig = Figure(figsize=(width * len(chosen), height))
    return chosen, fig, fig.subplots(1, len(chosen), squeeze=False)


def gap_shift(records: Sequence[dict[str, Any]], names: Sequence[str]) -> Any:
    """Metrics against the shift amount for the settings ``names`` (first seed of each)."""
    chosen, fig, axes = _panels(records, names, width=5.2, height=4.0)
    series = (("text_retrieval_map", "image->text mAP"), ("image_retrieval_map", "text->image mAP"),
              ("zeroshot_acc1", "zero-shot acc@1"))
    for ax, rec in zip(axes[0], chosen, strict=True):
        rows = rec["gap_shift"]
        x = [row["amount"] for row in rows]
        for key, label in series:
            if key in rows[0]:
                ax.plot(x, [row[key] for row in rows], marker="o", label=label)
        ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("shift of the text embeddings along the gap vector (x gap)")
        ax.set_title(f"{rec['name']} (gap {rec['metrics']['gap']:.2f})", fontsize=10)
        ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.set_ylabel("metric on the test split")
    fig.tight_layout()
    return fig


def extremes(records: Sequence[dict[str, Any]], names: Sequence[str]) -> Any:
    """PCA of both modalities (first seed) for each setting in ``names``, side by side."""
    chosen, fig, axes = _panels(records, names, width=4.6, height=4.4)
    for ax, rec in zip(axes[0], chosen, strict=True):
        pca = rec["pca"]
        for m, color in (("image", "tab:blue"), ("text", "tab:orange")):
            pts = np.asarray(pca[m])
            ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.5, color=color, label=m)
        ev = pca["explained"]
        ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}%)")
        ax.set_title(f"{rec['name']}: gap {rec['metrics']['gap']:.2f}", fontsize=10)
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    return fig


def trajectories(records: Sequence[dict[str, Any]]) -> Any:
    """Validation gap after each epoch, one line per setting (first seed)."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    seen = set()
    for rec in records:
        if rec["name"] in seen or not rec.get("trajectory"):
            continue
        seen.add(rec["name"])
        rows = [r for r in rec["trajectory"] if "gap" in r]
        if rows:
            ax.plot([r["epoch"] for r in rows], [r["gap"] for r in rows], marker=".",
                    label=rec["name"])
    ax.set_xscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("gap on the validation split")
    ax.set_title("How the gap forms during training", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


FAMILY_COLORS = {"heads": "tab:blue", "finetune": "tab:green", "scratch": "tab:red"}


def misalignment_vs_benefit(summary: dict[str, Any]) -> Any:
    """Delta mAP against the misalignment, one point per setting (mean +- std over seeds).

    Examples:
        >>> row = {"name": "a", "family": "scratch", "misalignment": 0.1, "delta_map": 0.05}
        >>> len(misalignment_vs_benefit({"settings": [row]}).axes)
        1
    """
    rows = [r for r in summary["settings"] if "misalignment" in r and "delta_map" in r]
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for fam, color in FAMILY_COLORS.items():
        part = [r for r in rows if r.get("family", "heads") == fam]
        if part:
            ax.errorbar([r["misalignment"] for r in part], [r["delta_map"] for r in part],
                        xerr=[r.get("misalignment_std", 0.0) for r in part],
                        yerr=[r.get("delta_map_std", 0.0) for r in part], fmt="o", capsize=3,
                        color=color, label=fam)
    for r in rows:
        ax.annotate(r["name"], (r["misalignment"], r["delta_map"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("intra-modal misalignment: mAP through the other modality - native mAP")
    ax.set_ylabel("benefit: delta mAP (inverted or bridged - native)")
    mech = (summary.get("mechanism") or {}).get("trend")
    title = "Does inversion pay where the other modality ranks better?"
    if mech:
        title += f"\nSpearman rho {mech['rho']:+.2f}, permutation p = {mech['p_value']:.3g}"
    ax.set_title(title, fontsize=10)
    if rows:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def lab_figures(records: Sequence[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """Every figure of the lab, by name (empty when there are no records)."""
    if not records or not summary["settings"]:
        return {}
    ends = [summary["smallest_gap"], summary["largest_gap"]]
    ends = list(dict.fromkeys(ends))
    return {"benefit_vs_gap": benefit_vs_gap(summary), "gap_shift": gap_shift(records, ends),
            "extremes": extremes(records, ends), "trajectories": trajectories(records),
            "misalignment_vs_benefit": misalignment_vs_benefit(summary)}
