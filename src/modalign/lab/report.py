"""``lab.html``: the verdict, the figures and the per-setting table of a gap sweep."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modalign.report import Page

TABLE_COLUMNS = (
    "name", "seeds", "gap", "separability", "cone_image", "cone_text", "uniformity_image",
    "logit_scale", "text_retrieval_recall@1", "text_retrieval_map",
    "centering_text_retrieval_map", "invgc_text_retrieval_map", "i2i_native_map", "i2i_oti_map",
    "t2t_native_map", "t2t_ovi_map", "oti_final_cosine", "ovi_final_cosine", "delta_map",
    "zeroshot_inter_acc1", "zeroshot_subset_inter_acc1", "zeroshot_subset_intra_acc1",
)


def write_report(path: str | Path, records: Sequence[dict[str, Any]], summary: dict[str, Any],
                 figures: Mapping[str, Any]) -> Path:
    """Write the sweep's self-contained HTML page; returns its path."""
    page = Page("Gap laboratory", f"{len(summary['settings'])} settings, "
                f"{len(records)} trained spaces, seeds {summary['config']['seeds']}")
    sec = page.section("Verdict")
    sec.paragraph(summary["verdict"])
    if summary.get("inversion_note"):
        sec.paragraph(summary["inversion_note"])
    clip_like = summary["clip_like_gap_settings"]
    sec.paragraph("Settings reaching a CLIP-like gap (centroid distance >= 0.5): "
                  + (", ".join(clip_like) if clip_like else "none") + ".")
    if "benefit_vs_gap" in figures:
        sec.figure(figures["benefit_vs_gap"], caption="Inversion benefit against the gap; one "
                   "point per setting, error bars one standard deviation over seeds.")
    if "gap_shift" in figures:
        page.section("Moving along the gap", intro="Text embeddings (and the zero-shot "
                     "prototypes) translated by a multiple of the gap vector measured on the "
                     "training split, then renormalised; 0 is the trained space, 1 closes the "
                     "gap before renormalisation.").figure(figures["gap_shift"])
    if "extremes" in figures:
        page.section("The extreme settings", intro="Test embeddings of both modalities on the "
                     "first two principal axes of their union.").figure(figures["extremes"])
    if "trajectories" in figures:
        page.section("How the gap forms").figure(figures["trajectories"])
    rows = [{k: r.get(k) for k in TABLE_COLUMNS} for r in summary["settings"]]
    page.section("Every setting", intro="Means over seeds (test split). Retrieval mAP over the "
                 "full ranking; i2i: Noto image queries against OpenMoji images; t2t: a "
                 "concept's name against every other text; *_final_cosine: how close the inverted "
                 "features got to their targets; delta_map: inverted minus native, averaged over "
                 "both.").table(rows, TABLE_COLUMNS, digits=3)
    return page.write(path)
