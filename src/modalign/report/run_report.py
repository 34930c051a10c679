"""A report for any run: training curves, eval records with intervals, diagnosis, search gallery.

:func:`run_report` reads what exists and skips what does not:

* a *run folder* (``modalign train --run.dir RUN``): curves from ``RUN/log.jsonl`` (loss terms,
  retrieval at 1, gap, the objectives' temperatures tau per epoch, also from older logs that
  record logit scales); with ``data``, a top-k gallery for a sample of queries (thumbnails for
  images, text for text) and, with ``label``, a zero-shot confusion matrix of ``RUN/model`` on
  that data;
* *records* (``modalign eval`` files or folders of them): one table row per record with the
  headline metrics and their 95% intervals;
* a *diagnosis* (``modalign diagnose --out DIR``: ``DIR/diagnosis.json``): its figures.

Examples:
    (Not run as a doctest: it needs run folders and evaluation records on disk.)

    >>> page = run_report(["runs/shop", "eval-records"], data="shop/manifest.csv",
    ...                   label="label")  # doctest: +SKIP
    >>> page.write("report.html")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modalign.errors import ModalignError
from modalign.report.html import Page

TEMPERATURE_TITLE = "temperature τ (1 / logit scale)"
_HEADLINE = re.compile(r"(_retrieval_recall@1|_retrieval_map|^acc1|^mean_per_class_recall)$")


def classify_inputs(paths: Sequence[str | Path]) -> dict[str, list[Path]]:
    """Sort report inputs into ``runs``, ``records`` and ``diagnoses``.

    Examples:
        >>> classify_inputs(["no/such/thing"])
        Traceback (most recent call last):
        ...
        modalign.errors.ModalignError: no/such/thing: no such file or folder
    """
    out: dict[str, list[Path]] = {"runs": [], "records": [], "diagnoses": []}
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise ModalignError(f"{p}: no such file or folder")
        if p.is_dir() and (p / "log.jsonl").is_file():
            out["runs"].append(p)
            if (p / "diagnosis" / "diagnosis.json").is_file():
                out["diagnoses"].append(p / "diagnosis" / "diagnosis.json")
        elif p.is_dir() and (p / "diagnosis.json").is_file():
            out["diagnoses"].append(p / "diagnosis.json")
        elif p.name == "diagnosis.json":
            out["diagnoses"].append(p)
        elif (p.is_dir() and any(p.glob("*.json"))) or (p.is_file() and p.suffix == ".json"):
            out["records"].append(p)
        else:
            raise ModalignError(f"{p}: expected a run folder (with log.jsonl), eval records "
                                "(.json files or a folder of them) or a diagnosis folder")
    return out


def run_report(paths: Sequence[str | Path], *, data: str | None = None, label: str | None = None,
               queries: int = 6, k: int = 5, seed: int = 0, title: str | None = None) -> Page:
    """Build the report page for run folders, record files/folders and diagnosis folders.

    Args:
        paths: what to report on (see the module docstring).
        data: a dataset to draw gallery queries from (and classify with ``label``).
        label: a label name of ``data`` for the zero-shot confusion matrix.
        queries: gallery queries per direction.
        k: hits shown per query.
        seed: seed of the query sample.
        title: page title (default from the inputs).
    """
    found = classify_inputs(paths)
    names = [p.name for p in found["runs"]] or [Path(p).name for p in paths]
    page = Page(title or f"modalign report: {', '.join(names)}",
                subtitle=f"{len(found['runs'])} run(s), {len(found['records'])} record "
                         f"source(s), {len(found['diagnoses'])} diagnosis(es)")
    for run in found["runs"]:
        _training_section(page, run)
    if found["records"]:
        _records_section(page, found["records"])
    for diag in found["diagnoses"]:
        from modalign.geometry.report import diagnosis_page
        from modalign.io import read_json

        name = diag.parent.name
        if name == "diagnosis" and diag.parent.parent.name:
            name = diag.parent.parent.name  # RUN/diagnosis: name it after the run
        page.include(diagnosis_page([(name, read_json(diag))]), prefix=f"{name} diagnosis: ")
    if data is not None:
        for run in found["runs"]:
            if (run / "model" / "config.json").is_file():
                _gallery_section(page, run, data, queries, k, seed)
                if label:
                    _confusion_section(page, run, data, label)
    if not page.sections:
        raise ModalignError("nothing to report: the inputs hold no training log, record or "
                            "diagnosis")
    return page


def read_log(path: Path) -> list[dict[str, Any]]:
    """The epoch rows of a ``log.jsonl`` (rows without an epoch are skipped), with today's
    metric keys (an older log's ``i2t_r1`` reads as ``image-to-text_recall@1``)."""
    from modalign.inventory import run_validation_pair
    from modalign.vocabulary import upgrade_training_row

    pair = run_validation_pair(path.parent)
    rows = []
    for line in path.read_text("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if isinstance(row, dict) and "epoch" in row:
                rows.append(upgrade_training_row(row, pair))
    return rows


def _training_section(page: Page, run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(run / "log.jsonl")
    sec = page.section(f"{run.name}: training", intro=f"{len(rows)} epochs from log.jsonl.")
    if not rows:
        sec.paragraph("The log has no epoch rows yet.", note=True)
        return
    epochs = [r["epoch"] for r in rows]
    panels = {
        "loss": [k for k in rows[-1] if "loss" in k and _numeric(rows, k)],
        "retrieval": [k for k in rows[-1] if re.search(r"(_r\d+|recall@\d+)$", k)
                      and _numeric(rows, k)],
        "gap": [k for k in rows[-1] if k.startswith("gap") and _numeric(rows, k)],
    }
    temperatures = temperature_curves(rows)
    figures = []
    for title, keys in panels.items():
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(4, 2.8))
        for key in keys:
            ax.plot(epochs, [_or_nan(r.get(key)) for r in rows], marker="o", ms=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=7)
        figures.append((fig, title))
    if temperatures:
        fig, ax = plt.subplots(figsize=(4, 2.8))
        for key, curve in temperatures.items():
            ax.plot(epochs, curve, marker="o", ms=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(TEMPERATURE_TITLE)
        ax.legend(fontsize=7)
        figures.append((fig, TEMPERATURE_TITLE))
    sec.figures_side_by_side(figures)
    last = {k: v for k, v in rows[-1].items() if isinstance(v, (int, float))}
    sec.table([last], caption="last epoch")


def row_temperatures(row: Mapping[str, Any]) -> dict[str, float]:
    """The temperatures tau of one epoch row, by objective term: its ``temperatures``, or
    ``1 / scale`` for each entry of the ``logit_scales`` that training logs record.

    Examples:
        >>> row_temperatures({"epoch": 1, "logit_scales": {"clip": 20.0, "intra": 100.0}})
        {'clip': 0.05, 'intra': 0.01}
        >>> row_temperatures({"epoch": 1, "temperatures": {"clip": 0.07}})
        {'clip': 0.07}
    """
    if isinstance(row.get("temperatures"), Mapping):
        return {k: float(v) for k, v in row["temperatures"].items()}
    scales = row.get("logit_scales")
    if not isinstance(scales, Mapping):
        return {}
    return {k: 1.0 / float(v) if v else float("nan") for k, v in scales.items()}


def temperature_curves(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Per objective term, its temperature tau at each epoch row (NaN where a row has none).

    Examples:
        >>> temperature_curves([{"logit_scales": {"clip": 10.0}}, {"logit_scales": {}}])
        {'clip': [0.1, nan]}
    """
    per_row = [row_temperatures(r) for r in rows]
    keys = sorted({k for taus in per_row for k in taus})
    return {k: [_or_nan(taus.get(k)) for taus in per_row] for k in keys}


def _or_nan(value: Any) -> float:
    """A logged number, or NaN (a gap in the curve) where the epoch has none."""
    return float("nan") if value is None else float(value)


def _numeric(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    return any(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
               for r in rows)


def _records_section(page: Page, sources: Sequence[Path]) -> None:
    from modalign.evaluate.records import merge_records

    rows = merge_records(sources)
    sec = page.section("Evaluation records",
                       intro="One row per record; [low, high] is the 95% bootstrap interval "
                             "over queries when the record has one.")
    table = []
    for r in rows:
        out: dict[str, Any] = {k: r.get(k, "") for k in ("name", "dataset", "split", "task",
                                                         "directions", "bridges", "inversion")}
        for key in sorted(k for k in r if _HEADLINE.search(k)):
            value = r[key]
            lo, hi = r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high")
            out[key] = (f"{value:.4f} [{lo:.4f}, {hi:.4f}]"
                        if isinstance(value, float) and lo is not None and lo != ""
                        else value)
        table.append(out)
    sec.table(table)


def _gallery_section(page: Page, run: Path, data: str, queries: int, k: int, seed: int) -> None:
    import numpy as np
    import torch

    from modalign.evaluate.semantic import JointSpace, semantic_search

    space = JointSpace(run / "model")
    names = space.modalities or []
    sec = page.section(f"{run.name}: search gallery",
                       intro=f"Top {k} items of {data} for {queries} sampled queries per "
                             "direction; a green border marks an item of the query's group.")
    rng = np.random.default_rng(seed)
    for query_m, gallery_m in (("text", "image"), ("image", "text")):
        if query_m not in names or gallery_m not in names:
            continue
        qs = space.gallery(data, query_m)
        if any(it.get("split") == "test" for it in qs.items):
            qs = qs.filter(split="test")
        gallery = space.gallery(data, gallery_m)
        pick = sorted(rng.choice(len(qs), size=min(queries, len(qs)), replace=False).tolist())
        hits = semantic_search(torch.from_numpy(np.asarray(qs.vectors[pick])), gallery, k)
        rows = []
        for i, hs in zip(pick, hits):
            item = qs.items[i]
            cells = "".join(_cell(h.value, gallery_m, h.group == item["group"], h.score)
                            for h in hs)
            rows.append(f"<tr><td>{_cell(item['value'], query_m, False, None)}</td>"
                        f"<td>{cells}</td></tr>")
        sec.raw_html(f'<table class="data"><caption>{query_m} → {gallery_m}</caption>'
                     f"<thead><tr><th>query</th><th>top {k}</th></tr></thead><tbody>"
                     + "".join(rows) + "</tbody></table>")


def _cell(value: str, modality: str, relevant: bool, score: float | None) -> str:
    border = "3px solid #2a2" if relevant else "1px solid #ccc"
    caption = "" if score is None else f"<br><small>{score:+.3f}</small>"
    if modality == "image":
        return (f'<span style="display:inline-block;margin:2px;padding:2px;border:{border};'
                f'text-align:center">{_thumbnail(value)}{caption}</span>')
    return (f'<span style="display:inline-block;margin:2px;padding:4px;border:{border};'
            f'max-width:12em;vertical-align:top">{html.escape(value)}{caption}</span>')


def _thumbnail(path: str, size: int = 64) -> str:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except OSError:
        return f"<small>{html.escape(Path(path).name)}</small>"
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img alt="{html.escape(Path(path).name)}" width="{size}" '
            f'src="data:image/png;base64,{data}">')


def _confusion_section(page: Page, run: Path, data: str, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from modalign.evaluate.semantic import JointSpace
    from modalign.evaluate.zeroshot import class_name, default_templates, encode_prototypes

    space = JointSpace(run / "model")
    if "text" not in (space.modalities or []) or "image" not in (space.modalities or []):
        return
    images = space.gallery(data, "image")
    truth = images.labels(label)
    if not any(truth):
        raise ModalignError(f"--label {label!r}: the image items of {data} carry no such label")
    keep = [i for i, t in enumerate(truth) if t]
    classes = sorted({truth[i] for i in keep})
    protos = encode_prototypes(lambda p: space.encode("text", p),
                               [class_name(c) for c in classes], default_templates(data))
    x = torch.from_numpy(np.asarray(images.vectors[keep], dtype=np.float32))
    pred = (x @ protos.T).argmax(1).numpy()
    true = np.array([classes.index(truth[i]) for i in keep])
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(matrix, (true, pred), 1)
    size = min(12.0, 2.0 + 0.35 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    if len(classes) <= 30:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    sec = page.section(f"{run.name}: zero-shot confusion",
                       intro=f"Images of {data} classified by '{label}' against text "
                             f"prototypes; accuracy {float((pred == true).mean()):.3f} on "
                             f"{len(keep)} images, {len(classes)} classes (all splits).")
    sec.figure(fig, caption=f"{label}: rows true, columns predicted")
