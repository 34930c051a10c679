"""``modalign runs`` and ``modalign stores``: what exists, in one table each.

A *run* is a folder written by ``modalign train`` (``log.jsonl``, ``model/config.json``); a
*store* is an embedding store under ``$MODALIGN_HOME/embeddings`` (or any folder with a
``manifest.json`` of arrays). Each is listed with its data, towers, size and date.

Examples:
    >>> list_runs(["no/such/folder"])
    []
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from modalign.cli_support import add_command


def register(sub: argparse._SubParsersAction) -> None:
    r = add_command(sub, "runs", run=_run_runs,
                    help="list training runs (name, data, towers, size, date)",
                    description="List the training runs under the given folders (default "
                                "./runs): name, data, towers, best validation metric, size "
                                "on disk and date.")
    r.add_argument("folders", nargs="*", default=["runs"], help="where to look (default runs)")
    r.add_argument("--json", action="store_true", help="print JSON rows")
    s = add_command(sub, "stores", run=_run_stores,
                    help="list embedding stores (name, data, towers, size, date)",
                    description="List the embedding stores under $MODALIGN_HOME/embeddings "
                                "(or the given folders): name, data, arrays with their "
                                "towers and rows, size on disk and date.")
    s.add_argument("folders", nargs="*", default=None, help="where to look")
    s.add_argument("--json", action="store_true", help="print JSON rows")


def list_runs(folders: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """One row per run folder found in (or at) ``folders``, newest first."""
    rows = []
    for run in _find(folders, lambda p: (p / "log.jsonl").is_file()
                     or (p / "model" / "config.json").is_file()):
        config = _json(run / "config.resolved.json").get("config", {})
        model = _json(run / "model" / "config.json").get("model", {})
        summary = read_run_summary(run)
        best = summary.get("best") or {}
        metric = summary.get("metric")
        rows.append({
            "name": run.name, "path": str(run),
            "data": (config.get("data") or {}).get("dataset", ""),
            "towers": ",".join(f"{m}={s}" for m, s in (model.get("towers") or {}).items()),
            "best": f"{metric} {best[metric]:.3f}" if metric in best else "",
            "size": _size(run), "date": _date(run)})
    return sorted(rows, key=lambda r: r["date"], reverse=True)


def run_validation_pair(run: str | os.PathLike[str]) -> list[str] | None:
    """The two keys a run validated on (``validate.pair``, else its first two ``data.keys``),
    from ``RUN/config.resolved.json``; None when not recorded."""
    config = _json(Path(run) / "config.resolved.json").get("config") or {}
    pair = (config.get("validate") or {}).get("pair") or (config.get("data") or {}).get(
        "keys", [])[:2]
    return list(pair) if len(pair) == 2 else None


def read_run_summary(run: str | os.PathLike[str]) -> dict[str, Any]:
    """``RUN/summary.json`` with today's metric keys (older runs wrote ``i2t_r1``, ...)."""
    from modalign.vocabulary import upgrade_training_metric, upgrade_training_row

    summary = _json(Path(run) / "summary.json")
    pair = run_validation_pair(run) or ["image", "text"]
    if isinstance(summary.get("best"), dict):
        summary["best"] = upgrade_training_row(summary["best"], pair)
    metric = str(summary.get("metric") or "").lstrip("-")
    if metric:
        summary["metric"] = upgrade_training_metric(metric, pair) or metric
    return summary


def list_stores(folders: Iterable[str | os.PathLike[str]] | None = None
                ) -> list[dict[str, Any]]:
    """One row per embedding store found in ``folders`` (default the embeddings home); its
    ``data`` is the name given with ``modalign embed --name``, else the dataset's name."""
    if folders is None:
        from modalign.paths import home

        folders = [home() / "embeddings"]
    rows = []
    for store in _find(folders, lambda p: (p / "manifest.json").is_file()):
        arrays = _json(store / "manifest.json").get("arrays") or {}
        parts = []
        for name, info in sorted(arrays.items()):
            tower = (info.get("encoder") or {}).get("name") or (
                "inverted" if "inversion" in info else "")
            parts.append(f"{name}:{info.get('count', '?')}" + (f"({tower})" if tower else ""))
        dataset = _json(store / "dataset.json")
        data = (dataset.get("display_name") or dataset.get("name")
                or store.name.rsplit("-", 1)[0])
        rows.append({"name": store.name, "path": str(store),
                     "data": str(data), "arrays": " ".join(parts),
                     "size": _size(store), "date": _date(store)})
    return sorted(rows, key=lambda r: r["date"], reverse=True)


def format_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width table of ``columns``."""
    table = [list(columns)] + [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _run_runs(args: argparse.Namespace) -> int:
    rows = list_runs(args.folders)
    _print(rows, ("name", "data", "towers", "best", "size", "date", "path"), args.json,
           f"no runs under {', '.join(map(str, args.folders))}")
    return 0


def _run_stores(args: argparse.Namespace) -> int:
    rows = list_stores(args.folders or None)
    _print(rows, ("name", "data", "arrays", "size", "date"), args.json, "no embedding stores")
    return 0


def _print(rows: list[dict[str, Any]], columns: Sequence[str], as_json: bool,
           empty: str) -> None:
    if as_json:
        print(json.dumps(rows))
    elif rows:
        print(format_rows(rows, columns))
    else:
        print(empty)


def _find(folders: Iterable[str | os.PathLike[str]], is_match: Any) -> list[Path]:
    found = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        if is_match(folder):
            found.append(folder)
            continue
        found += [p for p in sorted(folder.iterdir()) if p.is_dir() and is_match(p)]
    return found


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _size(folder: Path) -> str:
    total = float(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if total < 1024 or unit == "GiB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024
    return ""


def _date(folder: Path) -> str:
    newest = max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()),
                 default=folder.stat().st_mtime)
    return datetime.fromtimestamp(newest).strftime("%Y-%m-%d %H:%M")
