"""Result records: one JSON per evaluation run, merged into one CSV table.

A record says what was measured and how, so two numbers can be compared honestly::

    {"schema": 1, "created": "...", "dataset": "emoji", "split": "test", "model": "runs/m",
     "task": "retrieval", "protocol": {...}, "bridges": [...], "inversion": null, "seed": 0,
     "modalign_version": "0.1.0", "git_hash": "1a2b3c4" | null, "metrics": {...}}

Metric keys follow CLIP_benchmark where it has one (``image_retrieval_recall@5`` is text -> image,
``text_retrieval_recall@5`` is image -> text, ``acc1``, ``acc5``, ``mean_per_class_recall``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import modalign
from modalign.io import (
    check_format_version,
    content_hash,
    csv_cell,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)
from modalign.naming import dataset_name, model_name

RECORD_SCHEMA = 1
REQUIRED_FIELDS: tuple[str, ...] = (
    "dataset", "split", "model", "task", "protocol", "bridges", "inversion", "seed",
    "modalign_version", "git_hash", "metrics",
)
CSV_FIELDS: tuple[str, ...] = (
    "record", "name", "dataset", "split", "model", "task", "modalities", "directions",
    "query_view", "gallery_view", "relevance", "label", "templates", "bridges", "inversion",
    "inverted_arrays", "num_queries", "seed", "modalign_version", "git_hash",
)
def git_hash() -> str | None:
    """The commit of the installed source tree (short hash), or ``None`` when not in git.

    Examples:
        >>> import re
        >>> h = git_hash()  # None outside a git checkout
        >>> h is None or re.fullmatch("[0-9a-f]{12,40}", h) is not None
        True
    """
    here = Path(modalign.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip()
    return value if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{7,40}", value) else None


def make_record(
    *,
    dataset: str,
    split: str,
    model: str,
    task: str,
    protocol: Mapping[str, Any],
    metrics: Mapping[str, float],
    bridges: Sequence[Mapping[str, Any]] = (),
    inversion: Mapping[str, Any] | None = None,
    seed: int | None = None,
    name: str | None = None,
    intervals: Mapping[str, Sequence[float]] | None = None,
    bootstrap: Mapping[str, Any] | None = None,
    comparisons: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Assemble a record (adds schema, time, package version and git hash).

    ``intervals`` (metric -> ``[low, high]``, see :mod:`modalign.evaluate.bootstrap`) and
    ``bootstrap`` (samples, seed, level) describe the uncertainty of the metrics;
    ``comparisons`` hold paired differences against a baseline (native queries, no bridge).

    Examples:
        >>> r = make_record(dataset="emoji", split="test", model="m", task="zeroshot",
        ...                 protocol={"label": "group"}, metrics={"acc1": 0.5})
        >>> r["metrics"]["acc1"], r["modalign_version"] == modalign.__version__
        (0.5, True)
    """
    if not task:
        raise ValueError("task: expected a non-empty task name")
    clean = {}
    for key, value in metrics.items():
        value = float(value)
        clean[str(key)] = None if math.isnan(value) else value
    return {
        "schema": RECORD_SCHEMA,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dataset": str(dataset),
        "split": str(split),
        "model": str(model),
        "task": task,
        "protocol": dict(protocol),
        "bridges": [dict(b) for b in bridges],
        "inversion": dict(inversion) if inversion else None,
        "seed": seed,
        "name": str(name) if name else None,
        "modalign_version": modalign.__version__,
        "git_hash": git_hash(),
        "metrics": clean,
        "intervals": {str(k): [_finite(v[0]), _finite(v[1])]
                      for k, v in (intervals or {}).items()},
        "bootstrap": dict(bootstrap) if bootstrap else None,
        "comparisons": [dict(c) for c in comparisons],
    }


def record_filename(record: Mapping[str, Any]) -> str:
    """``{dataset}_{model}_{task}_{hash}.json``, file-name safe; the hash covers the settings.

    Examples:
        >>> record_filename({"dataset": "emoji", "model": "runs/clip", "task": "retrieval",
        ...                  "split": "test", "protocol": {}, "bridges": [], "inversion": None,
        ...                  "seed": 0})[:21]
        'emoji_clip_retrieval_'
    """
    settings = {k: record.get(k) for k in ("dataset", "split", "model", "task", "protocol",
                                           "bridges", "inversion", "seed")}
    if record.get("name"):
        settings["name"] = record["name"]
    model = record.get("name") or model_name(str(record.get("model", "")))
    parts = [_slug(dataset_name(str(record.get("dataset", "")))), _slug(str(model)),
             _slug(str(record.get("task", "")))]
    return "_".join([*parts, content_hash(settings)[:10]]) + ".json"


def write_record(record: Mapping[str, Any], out: str | os.PathLike[str]) -> Path:
    """Write ``record`` atomically; ``out`` is a ``.json`` file or a folder (name from settings).

    Examples:
        >>> import tempfile
        >>> r = make_record(dataset="d", split="test", model="m", task="t", protocol={},
        ...                 metrics={"map": 1.0})
        >>> write_record(r, tempfile.mkdtemp()).suffix
        '.json'
    """
    _check_record(record, "record")
    out = Path(out)
    path = out if out.suffix == ".json" else out / record_filename(record)
    write_json_atomic(path, dict(record))
    return path


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check one record file."""
    record = read_json(path)
    _check_record(record, str(path))
    return record


def merge_records(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """One flat row per record: the settings columns, then every metric (union over records).

    Folders are searched for ``*.json`` records.

    Examples:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> for m in ("a", "b"):
        ...     _ = write_record(make_record(dataset="d", split="test", model=m, task="t",
        ...                      protocol={}, metrics={"map": 0.5}), d)
        >>> [row["model"] for row in merge_records([d])]
        ['a', 'b']
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"records: {p} is neither a record file nor a folder")
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not files:
        raise ValueError("records: expected at least one record file or folder with records")
    rows = []
    for f in files:
        r = read_record(f)
        row: dict[str, Any] = {
            "record": f.name, "name": r.get("name") or model_name(str(r["model"])),
            **{k: r[k] for k in ("dataset", "split", "model", "task", "seed",
                                 "modalign_version", "git_hash")},
            **flatten_protocol(r),
        }
        row.update(r["metrics"])
        for key, (lo, hi) in (r.get("intervals") or {}).items():
            row[f"{key}_ci_low"], row[f"{key}_ci_high"] = lo, hi
        for comp in r.get("comparisons") or []:
            for key, diff in comp.get("differences", {}).items():
                prefix = f"{key}_minus_{comp.get('baseline', 'baseline')}"
                row[prefix] = diff["difference"]
                row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"] = diff["interval"]
        rows.append(row)
    rows.sort(key=lambda x: (x["dataset"], x["task"], x["model"], x["bridges"], x["record"]))
    return rows


def flatten_protocol(record: Mapping[str, Any]) -> dict[str, Any]:
    """The protocol of a record as flat table columns, so different settings never look alike.

    Columns: ``modalities``, ``directions`` (``image-to-text;text-to-image``), ``query_view``,
    ``gallery_view``, ``relevance``, ``label``, ``templates`` (joined by `` | ``), ``bridges``
    (each with its parameters), ``inversion``, ``inverted_arrays``, ``num_queries``.

    Examples:
        >>> r = {"task": "zeroshot", "protocol": {"inputs": "image", "label": "group",
        ...      "templates": ["a photo of {}", "{}"], "num_inputs": 9}, "bridges": [],
        ...      "inversion": None}
        >>> flatten_protocol(r)["templates"], flatten_protocol(r)["num_queries"]
        ('a photo of {} | {}', 9)
    """
    from modalign.vocabulary import direction_name

    proto = record.get("protocol") or {}
    dirs = proto.get("directions") or []
    out: dict[str, Any] = {}
    if dirs:
        out["directions"] = ";".join(direction_name(d["query"], d["gallery"]) for d in dirs)
        out["modalities"] = ",".join(dict.fromkeys(
            str(k).split(":", 1)[0] for d in dirs for k in (d["query"], d["gallery"])))
        views = [(str(d["query"]).partition(":")[2], str(d["gallery"]).partition(":")[2])
                 for d in dirs]
        out["query_view"] = views[0][0]
        out["gallery_view"] = views[0][1]
        out["num_queries"] = ";".join(str(d.get("num_queries", "")) for d in dirs)
    else:
        out["modalities"] = proto.get("inputs", "")
        out["directions"] = f"{proto.get('inputs', '?')}-to-class" if "inputs" in proto else ""
        out["num_queries"] = proto.get("num_inputs", "")
    out["relevance"] = proto.get("relevance", "")
    out["label"] = proto.get("label", "")
    out["templates"] = " | ".join(proto.get("templates") or [])
    out["bridges"] = "+".join(_bridge_text(b) for b in record.get("bridges") or []) or "none"
    inv = record.get("inversion")
    out["inversion"] = (inv or {}).get("name", "yes") if inv else "none"
    out["inverted_arrays"] = ";".join(
        f"{k}={v.get('array', '?')}" for k, v in ((inv or {}).get("queries") or {}).items())
    return out


def _bridge_text(bridge: Mapping[str, Any]) -> str:
    params = {k: v for k, v in bridge.items() if k != "name" and isinstance(v, (int, float, str))}
    inner = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{bridge.get('name', '?')}" + (f"({inner})" if inner else "")


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write merged rows as CSV atomically; metric columns are sorted after the settings."""
    metric_cols = sorted({k for r in rows for k in r} - set(CSV_FIELDS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*CSV_FIELDS, *metric_cols], restval="",
                            lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else csv_cell(v) for k, v in r.items()})
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))
    return Path(path)


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object (an evaluation record)")
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise ValueError(f"{where}: not an evaluation record; missing fields {missing}")
    if not isinstance(record["metrics"], Mapping):
        raise ValueError(f"{where}: expected 'metrics' to be an object of name -> number")
    check_format_version(dict(record), RECORD_SCHEMA, f"record {where}", key="schema")


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")[:40] or "x"
