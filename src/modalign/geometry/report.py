"""The diagnosis report: a self-contained HTML page for one or several ``diagnose`` records.

One page shows the metrics table (a column per run, a one-line explanation per row), then per
modality pair: a 2-D PCA projection of a sample of pairs coloured by modality with lines joining
some positive pairs, histograms of positive and negative cosine similarities (cross-modal and
intra-modal), and the covariance spectra. With several runs, each figure appears side by side.

Examples:
    >>> import numpy as np
    >>> from modalign.geometry.diagnose import DiagnoseOptions, diagnose
    >>> x = np.random.default_rng(0).normal(size=(60, 8))
    >>> rec = diagnose({"image": x, "text": x + 1}, options=DiagnoseOptions(compute_mir=False))
    >>> "<table" in diagnosis_page([("run", rec)]).render()
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.collections import LineCollection

from modalign.report.html import Page

__all__ = ["diagnosis_page", "metric_rows"]

Getter = Callable[[dict[str, Any]], Any]
COLOURS = ("#2f6fdf", "#e0702b", "#2e9e5b", "#b63fa6", "#8a6d3b")


def _get(*path: str) -> Getter:
    def getter(record: dict[str, Any]) -> Any:
        node: Any = record
        for p in path:
            if not isinstance(node, dict) or p not in node:
                return None
            node = node[p]
        return node
    return getter


def _metric_specs(record: dict[str, Any]) -> list[tuple[str, Getter, str]]:
    specs: list[tuple[str, Getter, str]] = []
    for m in record["modalities"]:
        specs += [
            (f"{m}: rows", _get("modalities", m, "n"), "Embeddings of this modality."),
            (f"{m}: cone (mean cosine)", _get("modalities", m, "cone"),
             "Mean cosine of distinct pairs: 1 = all in one direction, 0 = spread out."),
            (f"{m}: uniformity", _get("modalities", m, "uniformity"),
             "log mean exp(-2 d²) over distinct pairs: 0 = collapsed, lower = more uniform."),
            (f"{m}: effective rank", _get("modalities", m, "spectrum", "effective_rank"),
             "exp(entropy) of the singular values: how many directions are really used."),
            (f"{m}: variance in top 10 PCs",
             _get("modalities", m, "spectrum", "explained_variance", "10"),
             "Share of the variance in the 10 main directions (near 1 = low-dimensional)."),
        ]
    k = record.get("options", {}).get("k", 10)
    for key in record["pairs"]:
        a, b = key.split("|", 1)
        p = ("pairs", key)
        specs += [
            (f"{key}: pairs", _get(*p, "n_pairs"), "Positive pairs used by the paired metrics."),
            (f"{key}: centroid distance", _get(*p, "gap", "centroid_distance"),
             "The modality gap ‖mean(a) − mean(b)‖ (centroids not renormalised; max 2)."),
            (f"{key}: renormalised centroid distance", _get(*p, "gap", "renormalized_distance"),
             "Distance between the centroid directions only."),
            (f"{key}: linear separability", _get(*p, "separability", "accuracy"),
             "Held-out accuracy of a logistic regression telling a from b (0.5 = chance)."),
            (f"{key}: alignment", _get(*p, "alignment"),
             "Mean squared distance of positive pairs (0 = identical, 4 = antipodal)."),
            (f"{key}: cross-uniformity", _get(*p, "cross_uniformity"),
             "log mean exp(-2 d²) over non-positive cross pairs."),
            (f"{key}: mean positive cosine", _get(*p, "temperature", "mean_positive"),
             "Mean cosine of positive pairs."),
            (f"{key}: mean negative cosine", _get(*p, "temperature", "mean_negative"),
             "Mean cosine of non-positive cross pairs."),
            (f"{key}: hardest-negative margin", _get(*p, "temperature", "hardest_margin"),
             "Mean of cos(positive) − max cos(negative) per anchor (> 0 = positive wins)."),
            (f"{key}: share of anchors won", _get(*p, "temperature", "positive_margin_share"),
             f"Share of {a} anchors whose positive beats every negative (R@1 on the sample)."),
        ]
        for q, g in ((a, b), (b, a)):
            specs += [
                (f"{key}: hubness skew {q}→{g}", _get(*p, "hubness", f"{q}->{g}", "skewness"),
                 f"Skewness of {k}-occurrence of {g} items for {q} queries (large = hubs)."),
                (f"{key}: anti-hubs {q}→{g}", _get(*p, "hubness", f"{q}->{g}", "antihub_share"),
                 f"Share of {g} items never in any {q} query's {k}-NN."),
            ]
        specs += [
            (f"{key}: agreement of {m} neighbours", _get(*p, "agreement", f"agreement_{side}"),
             f"Overlap of {m}-{m} k-NN with the k-NN found through the paired {other} (1 = same).")
            for m, other, side in ((a, b, "x"), (b, a, "y"))
        ]
        specs += [
            (f"{key}: agreement at chance", _get(*p, "agreement", "chance"),
             "k / (n − 1): the overlap of random neighbour lists."),
            (f"{key}: MIR", _get(*p, "mir", "mir"),
             "log10 Fréchet distance after text-centric scaling (lower = better integrated)."),
            (f"{key}: logit scale", _get(*p, "temperature", "logit_scale"),
             "1 / temperature of the trained model (when known)."),
            (f"{key}: clamped share", _get(*p, "temperature", "clamped_share"),
             "Share of logged training steps with the logit scale at its clamp."),
        ]
    specs.append(("joint: effective rank", _get("joint", "spectrum", "effective_rank"),
                  "Effective rank of all modalities pooled."))
    return specs


def metric_rows(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Table rows ``{"metric", <run name>..., "meaning"}``, metrics in the first run's order."""
    seen: dict[str, tuple[Getter, str]] = {}
    for _, rec in runs:
        for label, getter, text in _metric_specs(rec):
            seen.setdefault(label, (getter, text))
    rows = []
    for label, (getter, text) in seen.items():
        row: dict[str, Any] = {"metric": label}
        for name, rec in runs:
            row[name] = getter(rec)
        row["meaning"] = text
        rows.append(row)
    return rows


def _projection_figure(fig_data: dict[str, Any], title: str) -> Any:
    proj = fig_data["projection"]
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    names = list(proj["points"])
    pts = {m: proj["points"][m] for m in names}
    a, b = names[0], names[-1]
    n_lines = min(proj["lines"], len(pts[a]), len(pts[b]))
    segments = [[pts[a][i], pts[b][i]] for i in range(n_lines)]
    ax.add_collection(LineCollection(segments, colors="#9aa3b2", linewidths=0.6, alpha=0.7,
                                     zorder=1))
    for c, m in zip(COLOURS, names):
        xs = [p[0] for p in pts[m]]
        ys = [p[1] for p in pts[m]]
        ax.scatter(xs, ys, s=9, color=c, alpha=0.75, label=m, zorder=2)
    ev = proj.get("explained", [0, 0])
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.1f} %)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.1f} %)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    return fig


def _histogram_figure(fig_data: dict[str, Any], title: str) -> Any:
    hist = fig_data["histograms"]
    edges = hist["edges"]
    series = hist["series"]
    # the pair's two names come from the data, never from parsing labels: a name may hold
    # spaces or hyphens ("my scan", "x-ray")
    a, b = list(fig_data["projection"]["points"])[:2]
    cross = [k for k in series if k.startswith((f"{a}-{b} ", f"{b}-{a} "))]
    intra = [k for k in series if k not in cross]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.2), sharex=True)
    for ax, keys, sub in ((axes[0], cross, "cross-modal"), (axes[1], intra, "intra-modal")):
        for c, k in zip(COLOURS, keys):
            ax.stairs(series[k], edges, fill=True, color=c, alpha=0.35, label=k)
            ax.stairs(series[k], edges, color=c, lw=1)
        ax.set_title(f"{title}: {sub}", fontsize=10)
        ax.set_xlabel("cosine similarity")
        ax.set_ylabel("density")
        if keys:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _spectrum_figure(record: dict[str, Any], title: str) -> Any:
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    entries = [(m, v["spectrum"]) for m, v in record["modalities"].items()]
    if record.get("joint", {}).get("spectrum"):
        entries.append(("joint", record["joint"]["spectrum"]))
    for c, (name, spec) in zip((*COLOURS[: len(entries) - 1], "#333333"), entries):
        total = spec["total_variance"] or 1.0
        ratios = [v / total for v in spec["eigenvalues"]]
        ax.semilogy(range(1, len(ratios) + 1), [max(r, 1e-12) for r in ratios], color=c,
                    marker=".", ms=3, lw=1, label=f"{name} (erank {spec['effective_rank']:.1f})")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig


def diagnosis_page(runs: Sequence[tuple[str, dict[str, Any]]], *,
                   title: str = "Embedding geometry diagnosis") -> Page:
    """A :class:`~modalign.report.html.Page` for ``(run name, diagnose record)`` pairs."""
    if not runs:
        raise ValueError("runs: expected at least one (name, record) pair")
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"runs: run names must be unique, got {names}")
    page = Page(title, subtitle="Runs: " + ", ".join(names))
    sec = page.section("Metrics", intro="One column per run. Sampled metrics use the seed and "
                       "sample sizes listed under Sampling.")
    sec.table(metric_rows(runs), ["metric", *names, "meaning"], explain_column="meaning")
    pair_keys = list(dict.fromkeys(k for _, rec in runs for k in rec.get("figures", {})))
    for key in pair_keys:
        present = [(n, r) for n, r in runs if key in r.get("figures", {})]
        s = page.section(f"{key}: projection",
                         intro="PCA of a sample of pairs (both modalities together); grey lines "
                               "join positive pairs.")
        s.figures_side_by_side([(_projection_figure(r["figures"][key], n), n)
                                for n, r in present])
        s = page.section(f"{key}: similarity histograms",
                         intro="Cosine similarity of positive and negative pairs, across and "
                               "within modalities.")
        s.figures_side_by_side([(_histogram_figure(r["figures"][key], n), n)
                                for n, r in present])
    s = page.section("Spectrum", intro="Covariance eigenvalues as a share of the total variance.")
    s.figures_side_by_side([(_spectrum_figure(r, n), n) for n, r in runs])
    s = page.section("Sampling")
    s.table([{"run": n, **{k: str(v) for k, v in r.get("sampling", {}).items()}}
             for n, r in runs])
    return page
