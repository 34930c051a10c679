"""Markdown tables in the papers' layouts, with the published figures beside ours.

Values are percentages with one decimal. ``Avg`` is the mean over the columns shown; a published
row's ``Avg`` is recomputed over the same columns so both averages cover the same datasets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from modalign.reproduce.figures import CROSS_THE_GAP_I2I, HZ_SOURCE, I2I_COLUMNS

TEXT_COLUMNS = (("coco", "COCO"), ("flickr30k", "Flickr30k"), ("nocaps", "nocaps"),
                ("imdb", "IMDB"), ("20newsgroups", "20News"),
                ("nanobeir_climatefever", "ClimateFEVER"), ("nanobeir_dbpedia", "DBPedia"),
                ("nanobeir_fever", "FEVER"), ("nanobeir_nfcorpus", "NFCorpus"),
                ("nanobeir_nq", "NQ"), ("nanobeir_scidocs", "SCIDOCS"),
                ("nanobeir_scifact", "SciFact"))
REVISITED_LEVEL = "medium"

Record = Mapping[str, Any]


def _cell(v: float | None) -> str:
    return "–" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def _avg(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals and len(vals) == len(values) else None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table.

    Examples:
        >>> print(markdown_table(["a", "b"], [["1", "2"]]))
        | a | b |
        |---|---|
        | 1 | 2 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _metric(records: Sequence[Record], dataset: str, task: str, method: str,
            key: str) -> float | None:
    for r in records:
        if (r["dataset"], r["task"], r["method"]) == (dataset, task, method):
            m = r["metrics"]
            return m.get(key, m.get(f"{REVISITED_LEVEL}/{key}"))
    return None


def _section(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
             notes: Sequence[str]) -> str:
    return "\n".join([f"### {title}", "", markdown_table(header, rows), "", *notes, ""])


def _our_rows(records: Sequence[Record], model_label: str, cols: Sequence[tuple[str, str]],
              task: str, key: str, methods: Sequence[tuple[str, str]]) -> list[list[str]]:
    """One row of our ``key`` per (method, label) with a value in some column, plus its Avg."""
    rows = []
    for method, label in methods:
        vals = [_metric(records, k, task, method, key) for k, _ in cols]
        if any(v is not None for v in vals):
            rows.append([f"{model_label} (ours)", label, *map(_cell, vals), _cell(_avg(vals))])
    return rows


def cross_the_gap_tables(records: Sequence[Record], model_label: str,
                         paper_model: str | None) -> str:
    """The three Cross the Gap tables (image->image mAP, text->text mAP, zero-shot accuracy)."""
    present = {r["dataset"] for r in records}
    parts = []
    cols = [(k, name) for k, name in I2I_COLUMNS if k in present]
    if cols:
        rows = _our_rows(records, model_label, cols, "image-to-image", "map",
                         (("native", "Orig"), ("oti", "OTI")))
        if paper_model in CROSS_THE_GAP_I2I:
            for label in ("Orig", "OTI"):
                published = CROSS_THE_GAP_I2I[paper_model][label]
                vals = [published[k] / 100 if k in published else None for k, _ in cols]
                rows.append([f"{paper_model} (paper)", label, *map(_cell, vals),
                             _cell(_avg(vals))])
        notes = [f"mAP over the full ranking. ROx/RPar columns: the {REVISITED_LEVEL.capitalize()} "
                 "protocol; Easy, Medium and Hard are in the next table. The official code "
                 "reports all three; the published table does not say which one it shows."]
        notes.append(f"Paper rows (secondary source: the paper's own table could not be read): "
                     f"{HZ_SOURCE}." if paper_model in CROSS_THE_GAP_I2I else
                     "No published row matches this model (published: "
                     + ", ".join(CROSS_THE_GAP_I2I) + "); pass --paper-model to pick one.")
        parts.append(_section("Image-to-image retrieval (mAP): native vs OTI queries",
                              ["Model", "Method", *(n for _, n in cols), "Avg"], rows, notes))
        revisited = revisited_table(records, model_label)
        if revisited:
            parts.append(revisited)
    tcols = [(k, name) for k, name in TEXT_COLUMNS if k in present]
    if tcols:
        rows = _our_rows(records, model_label, tcols, "text-to-text", "map",
                         (("native", "Orig"), ("ovi", "OVI")))
        parts.append(_section(
            "Text-to-text retrieval (mAP): native vs OVI queries",
            ["Model", "Method", *(n for _, n in tcols), "Avg"], rows,
            ["Captions: the first caption of each image queries the other captions (relevant: "
             "same image). IMDB, 20News: label descriptions query the documents (relevant: "
             "same label); NanoBEIR: the set's queries, relevant by its qrels. Galleries of "
             "the textual sets are the official summaries when present (see the records' "
             "gallery_text).", "No published per-dataset figures were found for this table."]))
    zcols = [(k, name) for k, name in I2I_COLUMNS
             if any(r["dataset"] == k and r["task"] == "zero-shot" for r in records)]
    if zcols:
        rows = _our_rows(records, model_label, zcols, "zero-shot", "acc1",
                         (("native", "image vs text prompts (inter-modal)"),
                          ("oti", "OTI image vs text prompts (text-text)"),
                          ("ovi", "image vs OVI prompts (image-image)")))
        parts.append(_section(
            "Zero-shot classification (top-1 accuracy): inter- vs intra-modal",
            ["Model", "Classifier", *(n for _, n in zcols), "Avg"], rows,
            ["Class prompts: the CoOp template of each dataset; OVI inverts 'a photo of {class}'.",
             "No reliable published per-dataset figures were found for this table."]))
    return "\n".join(parts)


def revisited_table(records: Sequence[Record], model_label: str) -> str:
    """ROxford5k / RParis6k mAP under the Easy, Medium and Hard protocols, native and OTI."""
    levels = ("easy", "medium", "hard")
    names = {"roxford5k": "ROx", "rparis6k": "RPar"}
    rows = []
    for dataset, short in names.items():
        for method, label in (("native", "Orig"), ("oti", "OTI")):
            rec = next((r for r in records if (r["dataset"], r["task"], r["method"])
                        == (dataset, "image-to-image", method)), None)
            if rec is None:
                continue
            vals = [rec["metrics"].get(f"{level}/map") for level in levels]
            rows.append([f"{model_label} (ours)", short, label, *map(_cell, vals)])
    if not rows:
        return ""
    return _section("Revisited Oxford/Paris (mAP): Easy, Medium, Hard",
                    ["Model", "Dataset", "Method", "Easy", "Medium", "Hard"], rows,
                    [f"The main table shows {REVISITED_LEVEL.capitalize()}. Easy: easy images "
                     "relevant, hard ones ignored; Medium: easy and hard relevant; Hard: hard "
                     "relevant, easy ignored (junk ignored throughout)."])


def simple_table(title: str, records: Sequence[Record], keys: Sequence[str],
                 notes: Sequence[str] = (), percent: bool = True) -> str:
    """One row per record (dataset, task, method), one column per metric key."""
    rows = []
    for r in records:
        vals = [r["metrics"].get(k) for k in keys]
        cells = [_cell(v) if percent else ("–" if v is None else f"{v:.3f}") for v in vals]
        rows.append([r["dataset"], r["task"], r["method"], *cells])
    return _section(title, ["Dataset", "Task", "Method", *keys], rows, notes)
