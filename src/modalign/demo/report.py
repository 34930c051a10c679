"""The demo's report: conclusions drawn from the numbers, the comparison table, the diagnosis
plots, a query gallery and the gap laboratory, in one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modalign import __version__
from modalign.report.html import Page

COLUMNS = [
    ("gap", "gap", "centroid distance between image and text embeddings (test split)"),
    ("i2t R@1", "text_retrieval_recall@1", "image -> text recall@1"),
    ("t2i R@1", "image_retrieval_recall@1", "text -> image recall@1"),
    ("i2i mAP", "i2i_native_map", "Noto image -> OpenMoji images, native queries"),
    ("i2i mAP OTI", "i2i_oti_map", "the same with OTI-inverted queries"),
    ("t2t mAP", "t2t_native_map", "name -> other texts of the concept, native queries"),
    ("t2t mAP OVI", "t2t_ovi_map", "the same with OVI-inverted queries"),
    ("zs inter", "zeroshot_subset_inter_acc1", "zero-shot subgroup acc@1, image vs prompts"),
    ("zs intra", "zeroshot_subset_intra_acc1", "the same with OTI-inverted images"),
    ("i2t R@1 centering", "centering_text_retrieval_recall@1", "after removing modality means"),
    ("i2t R@1 InvGC", "invgc_text_retrieval_recall@1", "after InvGC (LocalAdj) on the gallery"),
]


def _m(info: Mapping[str, Any], key: str) -> float:
    v = info.get("evaluation", {}).get("metrics", {}).get(key)
    return float("nan") if v is None else float(v)


def _fmt(v: float, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _ci(info: Mapping[str, Any], key: str, signed: bool = False) -> str:
    """`` [low, high]`` of a 95% interval in the evaluation, or nothing when there is none."""
    iv = (info.get("evaluation", {}).get("intervals") or {}).get(key)
    if not iv or iv[0] is None or iv[1] is None:
        return ""
    return f" [{_fmt(iv[0], signed)}, {_fmt(iv[1], signed)}]"


def terminal_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    """A compact fixed-width summary: per model, the gap, R@1 both ways, intra-modal mAP native
    vs inverted, zero-shot inter vs intra; brackets hold 95% bootstrap intervals over queries
    (for the nat/inverted pairs: of the paired difference inverted - native)."""
    head = ["model", "gap", "i2t R@1 [95% CI]", "t2i R@1 [95% CI]",
            "i2i mAP nat/OTI [diff CI]", "t2t mAP nat/OVI [diff CI]",
            "zero-shot inter/intra [diff CI]"]
    rows = [head]
    for name, info in models.items():
        rows.append([
            name, _fmt(_m(info, "gap")),
            _fmt(_m(info, "text_retrieval_recall@1")) + _ci(info, "text_retrieval_recall@1"),
            _fmt(_m(info, "image_retrieval_recall@1")) + _ci(info, "image_retrieval_recall@1"),
            f"{_fmt(_m(info, 'i2i_native_map'))} / {_fmt(_m(info, 'i2i_oti_map'))}"
            + _ci(info, "i2i_delta_map", signed=True),
            f"{_fmt(_m(info, 't2t_native_map'))} / {_fmt(_m(info, 't2t_ovi_map'))}"
            + _ci(info, "t2t_delta_map", signed=True),
            f"{_fmt(_m(info, 'zeroshot_subset_inter_acc1'))} / "
            f"{_fmt(_m(info, 'zeroshot_subset_intra_acc1'))}"
            + _ci(info, "zeroshot_subset_delta_acc1", signed=True),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


INVERSIONS = (("OTI", "image->image retrieval across styles", "i2i_native_map", "i2i_oti_map"),
              ("OVI", "name->text retrieval", "t2t_native_map", "t2t_ovi_map"))
BRIDGES = ("centering", "invgc")


def _mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / len(values)


def findings(models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The numbers the conclusions state, from the models' measured metrics; a finding whose
    metrics no model has is left out.

    Keys: ``gap`` (smallest and largest ``(model, gap)``, ``scale``: ``"small"`` when every gap
    is under 0.5, ``"some-clip-like"``, ``"clip-like"``), ``best_retrieval`` (the model with the
    best image->text R@1 and its R@1 both ways), ``inversion:OTI`` / ``inversion:OVI`` (mean and
    per-model change of mAP, inverted - native), ``zeroshot`` (inter- and intra-modal acc@1
    averaged over the models), ``bridge:centering`` / ``bridge:invgc`` (mean and per-model change
    of image->text R@1).

    Examples:
        >>> m = {"a": {"evaluation": {"metrics": {"gap": 0.2, "text_retrieval_recall@1": 0.5}}},
        ...      "b": {"evaluation": {"metrics": {"gap": 0.9, "text_retrieval_recall@1": 0.1}}}}
        >>> f = findings(m)
        >>> f["gap"], f["best_retrieval"]["model"]
        ({'smallest': ('a', 0.2), 'largest': ('b', 0.9), 'scale': 'some-clip-like'}, 'a')
    """
    out: dict[str, Any] = {}
    gaps = {n: _m(i, "gap") for n, i in models.items()}
    gaps = {n: g for n, g in gaps.items() if not math.isnan(g)}
    if gaps:
        lo, hi = min(gaps, key=lambda n: gaps[n]), max(gaps, key=lambda n: gaps[n])
        scale = ("small" if gaps[hi] < 0.5 else "some-clip-like" if gaps[lo] < 0.5
                 else "clip-like")
        out["gap"] = {"smallest": (lo, gaps[lo]), "largest": (hi, gaps[hi]), "scale": scale}
        best = max(models, key=lambda n: _m(models[n], "text_retrieval_recall@1"))
        out["best_retrieval"] = {"model": best,
                                 "i2t_r1": _m(models[best], "text_retrieval_recall@1"),
                                 "t2i_r1": _m(models[best], "image_retrieval_recall@1")}
    for method, _task, nat, inv in INVERSIONS:
        deltas = {n: _m(i, inv) - _m(i, nat) for n, i in models.items()}
        deltas = {n: d for n, d in deltas.items() if not math.isnan(d)}
        if deltas:
            out[f"inversion:{method}"] = {"mean": _mean(deltas), "per_model": deltas}
    zs = {n: (_m(i, "zeroshot_subset_inter_acc1"), _m(i, "zeroshot_subset_intra_acc1"))
          for n, i in models.items()}
    zs = {n: v for n, v in zs.items() if not any(math.isnan(x) for x in v)}
    if zs:
        out["zeroshot"] = {"inter": sum(v[0] for v in zs.values()) / len(zs),
                           "intra": sum(v[1] for v in zs.values()) / len(zs)}
    for bridge in BRIDGES:
        d = {n: _m(i, f"{bridge}_text_retrieval_recall@1") - _m(i, "text_retrieval_recall@1")
             for n, i in models.items()}
        d = {n: v for n, v in d.items() if not math.isnan(v)}
        if d:
            out[f"bridge:{bridge}"] = {"mean": _mean(d), "per_model": d}
    return out


def conclusions(models: Mapping[str, Mapping[str, Any]], lab_verdict: str) -> list[str]:
    """Plain sentences, one per finding of :func:`findings` (nothing here is written in
    advance), then the gap laboratory's verdict."""
    f = findings(models)
    out: list[str] = []
    if "gap" in f:
        (lo, g_lo), (hi, g_hi) = f["gap"]["smallest"], f["gap"]["largest"]
        scale = {"small": "every model here has a small gap",
                 "some-clip-like": "some model here reaches a CLIP-like gap",
                 "clip-like": "every model here has a CLIP-like gap"}[f["gap"]["scale"]]
        out.append(f"The smallest modality gap is {lo}'s ({g_lo:.3f}) and the largest "
                   f"{hi}'s ({g_hi:.3f}); CLIP-scale models sit near 0.8, so {scale}.")
        best = f["best_retrieval"]
        out.append(f"{best['model']} retrieves best across modalities: image->text R@1 "
                   f"{best['i2t_r1']:.3f}, text->image R@1 {best['t2i_r1']:.3f}.")
    for method, task, _nat, _inv in INVERSIONS:
        if f"inversion:{method}" not in f:
            continue
        mean, deltas = f[f"inversion:{method}"]["mean"], f[f"inversion:{method}"]["per_model"]
        helped = [n for n, d in deltas.items() if d > 0]
        verb = "helps" if mean > 0 else "does not help"
        where = (f"it helps {', '.join(helped)}" if helped and len(helped) < len(deltas)
                 else ("it helps every model" if helped else "it helps no model"))
        out.append(f"Inversion ({method}) {verb} {task} here: mAP changes by {mean:+.3f} on "
                   f"average over the models ({where}; per model "
                   + ", ".join(f"{n} {d:+.3f}" for n, d in deltas.items()) + ").")
    if "zeroshot" in f:
        inter, intra = f["zeroshot"]["inter"], f["zeroshot"]["intra"]
        better = ("inter-modal wins" if inter > intra else
                  "intra-modal wins" if intra > inter else "they tie")
        out.append(f"Zero-shot subgroup classification of the inverted query images: inter-modal "
                   f"acc@1 {inter:.3f} (image features against class prompts) vs intra-modal "
                   f"{intra:.3f} (their OTI text features against the same prompts), averaged "
                   f"over the models: {better}.")
    for bridge in BRIDGES:
        if f"bridge:{bridge}" in f:
            mean, d = f[f"bridge:{bridge}"]["mean"], f[f"bridge:{bridge}"]["per_model"]
            out.append(f"The {bridge} bridge changes image->text R@1 by {mean:+.3f} on average "
                       "(" + ", ".join(f"{n} {v:+.3f}" for n, v in d.items()) + ").")
    if lab_verdict:
        out.append("Gap laboratory: " + lab_verdict)
    return out


def _img(path: str, size: int = 56) -> str:
    p = Path(path)
    if not path or not p.is_file():
        return "<span>?</span>"
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" width="{size}" height="{size}" '
            f'alt="{html.escape(p.stem)}">')


def _gallery_html(gallery: Mapping[str, Any], names: Mapping[str, str]) -> str:
    rows = []
    for q in gallery.get("queries", []):
        def cells(results: list[dict[str, Any]], group: str = q["group"]) -> str:
            return "".join(
                f'<td style="{"outline:3px solid #2a9d8f;" if r["group"] == group else ""}">'
                f'{_img(r["path"], 44)}<br><small>{html.escape(names.get(r["group"], ""))}'
                f'<br>{r["score"]:.2f}</small></td>' for r in results)
        rows.append(
            f"<tr><td>{_img(q['query'])}<br><small>{html.escape(names.get(q['group'], ''))}"
            f"</small></td><th>native</th>{cells(q['native'])}</tr>"
            f"<tr><td><small>OTI cosine {q['oti_cosine']:.2f}</small></td><th>OTI</th>"
            f"{cells(q['inverted'])}</tr>")
    return ("<table><thead><tr><th>query</th><th></th><th colspan=5>top 5 in the "
            f"{html.escape(gallery.get('gallery_view', ''))} gallery (framed: the right concept)"
            "</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def write_demo_report(out: Path, models: Mapping[str, Mapping[str, Any]], lab: Any,
                      gallery: Mapping[str, Any], times: Mapping[str, float],
                      cached: Mapping[str, bool], *, dataset: Any, store: Any,
                      quick: bool, ood: Mapping[str, Any] | None = None) -> Path:
    """Write ``<out>/report.html`` and return its path."""
    from modalign.geometry.report import diagnosis_page

    names = {it.group: it.value for it in dataset.select(modality="text", view="name")}
    page = Page("modalign demo: the modality gap on real towers and real data",
                subtitle=f"emoji data ({len(dataset.groups())} concepts"
                         f"{', quick run' if quick else ''}), frozen EfficientNet-Lite0 and "
                         f"MiniLM towers, modalign {__version__}")
    sec = page.section("Conclusions")
    for sentence in conclusions(models, getattr(lab, "verdict", "")):
        sec.paragraph(sentence)

    sec = page.section("Comparison", intro="Test split. OTI/OVI: the query is replaced by its "
                       "inversion into the other modality; the gallery keeps native features.")
    rows = []
    for name, info in models.items():
        row: dict[str, Any] = {"model": name, "objectives": " + ".join(
            f"{o.get('weight', 1)}x{o['loss']}" for o in info.get("objectives", []))}
        for label, key, _ in COLUMNS:
            row[label] = _m(info, key)
        if "audio_to_text_recall@1" in info.get("evaluation", {}).get("metrics", {}):
            row["audio->text R@1"] = _m(info, "audio_to_text_recall@1")
            row["text->audio R@1"] = _m(info, "text_to_audio_recall@1")
        rows.append(row)
    sec.table(rows, digits=3)
    sec.paragraph("; ".join(f"{label}: {text}" for label, _, text in COLUMNS), note=True)

    page.include(diagnosis_page([(n, i["diagnosis"]) for n, i in models.items()]),
                 prefix="Geometry: ")

    sec = page.section("Query gallery", intro=f"Model {gallery.get('model', '')}: a few "
                       f"{gallery.get('query_view', '')} queries and their top 5 "
                       f"{gallery.get('gallery_view', '')} results, with the native image "
                       "feature as the query and with its OTI inversion.")
    sec.raw_html(_gallery_html(gallery, names))
    if (out / "explore.html").is_file():
        sec.raw_html('<p><a href="explore.html">Explore this joint space</a>: the map, the '
                     "neighbours of any item natively and after a bridge, the gap slider.</p>")

    from modalign.lab.answer import QUESTION

    summary = getattr(lab, "summary", {}) or {}
    sec = page.section("Gap laboratory (quick sweep)", intro=QUESTION)
    if summary.get("answer"):
        sec.paragraph(summary["answer"])
    sec.paragraph(getattr(lab, "verdict", ""))
    figs = getattr(lab, "figures", {}) or {}
    if figs:
        sec.figures_side_by_side([(f, k.replace("_", " ")) for k, f in figs.items()])
    per = summary.get("settings") or []
    if isinstance(per, list) and per:
        sec.table([{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in per],
                  digits=3)

    if ood:
        from modalign.demo.ood import ood_section

        ood_section(page, ood)

    sec = page.section("Run", intro="Stage times of this run on this machine (0: taken from the "
                                    "cache of an earlier run).")
    sec.table([{"stage": k, "seconds": round(v, 2), "cached": bool(cached.get(k, False))}
               for k, v in times.items()])
    sec.paragraph(f"Records: {out / 'records'}; embedding store: {store.path}; lab: "
                  f"{out / 'lab'}.", note=True)
    return page.write(out / "report.html")
