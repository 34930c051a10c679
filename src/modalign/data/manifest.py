"""A user's own pairs: a CSV or JSONL manifest with one column per modality.

Columns:
- ``image``, ``audio``: file paths (relative paths resolve against the manifest's folder);
- ``text``: the text itself;
- ``MODALITY:VIEW`` (e.g. ``image:sketch``, ``text:caption``): a modality with a named view;
  any other modality name works too when written as ``NAME:VIEW`` (its values are paths if they
  look like existing files, else strings);
- ``group`` (optional): rows sharing a group are positives of each other; default: the row;
- ``label`` or ``label:NAME`` (optional): class labels;
- ``split`` (optional): train/val/test; default: a deterministic hash of the group;
- ``id`` (optional): a row id.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modalign.data.dataset import SPLITS, Item, PairedDataset, split_of

FILE_MODALITIES = ("image", "audio")
KNOWN_MODALITIES = ("image", "text", "audio")
RESERVED = ("group", "label", "split", "id")


@dataclass
class ManifestReport:
    """What was read and what was skipped, with reasons."""

    rows: int = 0
    items: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        reasons = Counter(s["reason"].split(":")[0] for s in self.skipped)
        extra = "; ".join(f"{n} x {r}" for r, n in reasons.most_common())
        return (f"{self.rows} rows -> {self.items} items; skipped {len(self.skipped)} bad entries"
                + (f" ({extra})" if extra else ""))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ValueError(f"manifest {path}: empty file; expected a header row with "
                                 "columns such as image,text[,group,label,split]")
            return [dict(r) for r in reader]
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"manifest {path}, line {n}: not valid JSON ({e})") from e
                if not isinstance(obj, dict):
                    raise ValueError(f"manifest {path}, line {n}: expected a JSON object per line")
                rows.append(obj)
        return rows
    raise ValueError(f"manifest={str(path)!r}: expected a .csv or .jsonl file")


def _modality_columns(columns: list[str]) -> dict[str, tuple[str, str]]:
    out = {}
    for c in columns:
        if c in RESERVED or c.startswith("label:"):
            continue
        if ":" in c:
            mod, view = c.split(":", 1)
            out[c] = (mod, view)
        elif c in KNOWN_MODALITIES:
            out[c] = (c, "default")
    return out


def _check_image(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        return f"unreadable image: {path} ({type(e).__name__})"
    return None


def load_manifest(path: str | Path, name: str | None = None, verify_images: bool = True,
                  split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  ) -> tuple[PairedDataset, ManifestReport]:
    """Read a user manifest into a :class:`PairedDataset`, skipping and counting bad rows.

    A manifest that is wrong as a whole (unknown format, no modality column, no rows) raises
    ``ValueError`` at once.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "pairs.csv"
        >>> _ = p.write_text("text:caption,text:title,group\\na cat,Cat,1\\na dog,Dog,2\\n")
        >>> ds, report = load_manifest(p)
        >>> ds.views("text"), report.items
        (['caption', 'title'], 4)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} not found")
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"manifest {path}: no rows; expected one row per pair or tuple")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    mod_cols = _modality_columns(columns)
    if not mod_cols:
        raise ValueError(
            f"manifest {path}: no modality column among {columns}; expected at least one of "
            "image, text, audio or MODALITY:VIEW (e.g. image:photo, text:caption)")
    label_cols = [c for c in columns if c == "label" or c.startswith("label:")]
    root = path.parent.resolve()
    report = ManifestReport(rows=len(rows))
    items: list[Item] = []
    seen: dict[tuple[str, str, str, str], str] = {}
    verified: dict[Path, str | None] = {}
    for n, row in enumerate(rows):
        row_id = str(row.get("id") or n)
        group = str(row.get("group") if row.get("group") not in (None, "") else f"row{n}")
        split = str(row.get("split") or "").strip().lower() or split_of(group, split_fractions)
        if split not in SPLITS:
            report.skipped.append({"row": n, "reason": f"bad split: {split!r} not in {SPLITS}"})
            continue
        labels = {("label" if c == "label" else c.split(":", 1)[1]): str(row[c])
                  for c in label_cols if row.get(c) not in (None, "")}
        for col, (mod, view) in mod_cols.items():
            value = row.get(col)
            if value is None or (isinstance(value, str) and not value.strip()):
                if col in row:
                    report.skipped.append({"row": n, "column": col, "reason": "empty value"})
                continue
            value = str(value).strip()
            if mod in FILE_MODALITIES or (mod not in KNOWN_MODALITIES and (root / value).is_file()):
                file = Path(value) if Path(value).is_absolute() else root / value
                if not file.is_file():
                    report.skipped.append({"row": n, "column": col,
                                           "reason": f"missing file: {file}"})
                    continue
                if mod == "image" and verify_images:
                    if file not in verified:
                        verified[file] = _check_image(file)
                    if verified[file]:
                        report.skipped.append({"row": n, "column": col, "reason": verified[file]})
                        continue
                value = str(file)
            key = (mod, view, value, group)
            if key in seen:  # the same image listed on several caption rows of one group
                continue
            item_id = f"{row_id}/{mod}/{view}"
            seen[key] = item_id
            items.append(Item(item_id, mod, view, value, group, split, labels))
    report.items = len(items)
    if not items:
        raise ValueError(f"manifest {path}: every row was skipped ({report.summary()})")
    ds = PairedDataset(name or path.stem, items, root=root,
                       info={"kind": "manifest", "source": str(path),
                             "skipped": report.skipped})
    return ds, report
