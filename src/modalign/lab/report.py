"""``lab.html``: the verdict, the figures and the per-setting table of a gap sweep."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modalign.report import Page

ANSWER_COLUMNS = (
    "name", "family", "seeds", "gap", "text_retrieval_recall@1", "train_text_retrieval_recall@1",
    "misalignment", "misalignment_ci", "better_through", "delta_map", "delta_map_ci",
    "bridge_delta_map", "bridge_delta_map_ci", "delta_map_converged", "oti_final_cosine",
    "ovi_final_cosine", "oti_converged_final_cosine", "ovi_converged_final_cosine",
    "oti_plateau_step", "ovi_plateau_step", "i2i_tower_before_map", "i2i_tower_after_map",
    "i2i_native_map", "t2t_tower_before_map", "t2t_tower_after_map", "t2t_native_map",
)
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
    from modalign.lab.answer import QUESTION

    lead = page.section("The question", intro=QUESTION)
    lead.paragraph(summary.get("answer") or "Not measured.")
    rows = [{k: _cell(r.get(k)) for k in ANSWER_COLUMNS} for r in summary["settings"]]
    lead.table(rows, ANSWER_COLUMNS, digits=3)
    lead.paragraph("misalignment: AP of intra-modal queries ranked through the other modality's "
                   "paired items minus their native AP (image->image and name->text averaged); "
                   "better_through: share of queries ranking their positives better that way; "
                   "delta_map: inverted (OTI/OVI) minus native AP at the fixed step budget, "
                   "bridge_delta_map: the same queries carried across by a learned bridge fitted "
                   "on the training split, minus native AP; "
                   "delta_map_converged: the same on a query subset run to the step cap; *_ci: "
                   "95% bootstrap intervals over the pooled queries of all seeds; tower_before, "
                   "tower_after: intra-modal mAP of the towers' features before and after "
                   "training (native_map: in the joint space); R@1: image->text on "
                   "the test split and on as many training concepts.", note=True)
    if "misalignment_vs_benefit" in figures:
        lead.figure(figures["misalignment_vs_benefit"], caption="Inversion benefit against the "
                    "measured misalignment; one point per setting, error bars one standard "
                    "deviation over seeds.")
    sec = page.section("Verdict")
    sec.paragraph(summary["verdict"])
    for fam, info in (summary.get("family_trends") or {}).items():
        sec.paragraph(f"Within the {fam} family: {info['verdict']}")
    mech = summary.get("mechanism") or {}
    if mech.get("verdict"):
        sec.paragraph("Misalignment vs benefit: " + mech["verdict"])
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


def _cell(v: Any) -> Any:
    """Intervals as ``[lo, hi]`` text; everything else as it is."""
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"[{v[0]:+.3f}, {v[1]:+.3f}]"
    return v
