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
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modalign.data.dataset import SPLITS, Item, PairedDataset, split_of
from modalign.errors import ModalignError
from modalign.io import read_user_text

FILE_MODALITIES = ("image", "audio")
KNOWN_MODALITIES = ("image", "text", "audio")
RESERVED = ("group", "label", "split", "id")


@dataclass
class ManifestReport:
    """What was read and what was skipped, with reasons.

    ``rows`` counts every data row; each one is in ``loaded_lines`` (its items are in the
    dataset), in ``skipped`` (with its ``line`` and ``reason``), or both (some cells loaded,
    others skipped). ``outside`` lists file paths that lead outside the manifest's folder.
    """

    rows: int = 0
    items: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    outside: set[str] = field(default_factory=set)
    loaded_lines: set[int] = field(default_factory=set)

    def summary(self) -> str:
        reasons = Counter(s["reason"].split(":")[0] for s in self.skipped)
        extra = "; ".join(f"{n} x {r}" for r, n in reasons.most_common())
        out = (f"{self.rows} rows -> {self.items} items; skipped {len(self.skipped)} bad entries"
               + (f" ({extra})" if extra else ""))
        if self.outside:
            out += (f"; {len(self.outside)} file paths lead outside the manifest's folder "
                    "(absolute or ../ paths: read as given)")
        return out


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of a manifest (with their ``_line``) and the rows refused as malformed."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise ModalignError(f"manifest={str(path)!r}: expected a .csv or .jsonl file")
    text = read_user_text(path, "manifest")
    rows: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    if suffix == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise ModalignError(f"manifest {path}: empty file; expected a header row with "
                                "columns such as image,text[,group,label,split]")
        header = [h.strip() for h in header]
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise ModalignError(
                f"manifest {path}: column names {dup} appear more than once in the header "
                f"{header}; give each column its own name (e.g. text:caption,text:title for two "
                "views of one modality)")
        for fields in reader:
            line = reader.line_num
            if not fields:  # a blank line
                continue
            if len(fields) > len(header):
                extra = fields[len(header):]
                bad.append({"row": len(rows) + len(bad), "line": line,
                            "reason": f"too many fields: {len(fields)} for {len(header)} columns "
                                      f"(extra {extra}); quote a value that holds a comma"})
                continue
            row: dict[str, Any] = dict(zip(header, fields + [""] * (len(header) - len(fields))))
            row["_line"] = line
            rows.append(row)
        return rows, bad
    for line, raw in enumerate(text.split("\n"), 1):  # not splitlines(): U+0085 is text
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            bad.append({"row": len(rows) + len(bad), "line": line,
                        "reason": f"not valid JSON: {e}"})
            continue
        if not isinstance(obj, dict):
            bad.append({"row": len(rows) + len(bad), "line": line,
                        "reason": f"expected a JSON object, got {type(obj).__name__}"})
            continue
        obj = {str(k): v for k, v in obj.items()}
        obj["_line"] = line
        rows.append(obj)
    return rows, bad


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
    """None if ``path`` decodes fully as an image, else why not (a decompression bomb, a
    truncated or corrupt file). Large images are decoded at reduced size where the format allows
    (JPEG draft mode), so a check never needs the full-resolution pixels in memory."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.draft("RGB", (512, 512))
                im.load()
    except Image.DecompressionBombError as e:
        return f"unreadable image: {path} (decompression bomb: {e})"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return f"unreadable image: {path} ({type(e).__name__}: {e})"
    return None


def load_manifest(path: str | Path, name: str | None = None, verify_images: bool = True,
                  split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  ) -> tuple[PairedDataset, ManifestReport]:
    """Read a user manifest into a :class:`PairedDataset`, skipping and counting bad rows.

    The file is read as UTF-8 (a byte-order mark is allowed). A manifest that is wrong as a whole
    (unknown format, not UTF-8, repeated column names, no modality column, no rows) raises
    :class:`~modalign.errors.ModalignError` at once; a bad row (too many fields, invalid JSON,
    a duplicate id, a bad split, an empty cell, a missing or undecodable file) is skipped and
    counted in the report with its line number and reason.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "pairs.csv"
        >>> _ = p.write_text("text:caption,text:title,group\\na cat,Cat,1\\na dog,Dog,2\\n")
        >>> ds, report = load_manifest(p)
        >>> ds.views("text"), report.items
        (['caption', 'title'], 4)
    """
    path = Path(path)
    if not path.is_file():
        raise ModalignError(f"manifest {path} not found (expected a .csv or .jsonl file)")
    rows, malformed = _read_rows(path)
    if not rows and not malformed:
        raise ModalignError(f"manifest {path}: no rows; expected one row per pair or tuple")
    if not rows:
        first = malformed[0]
        raise ModalignError(f"manifest {path}: every row is malformed ({len(malformed)} rows; "
                            f"line {first['line']}: {first['reason']})")
    columns = list(dict.fromkeys(k for r in rows for k in r if k != "_line"))
    mod_cols = _modality_columns(columns)
    if not mod_cols:
        raise ModalignError(
            f"manifest {path}: no modality column among {columns}; expected at least one of "
            "image, text, audio or MODALITY:VIEW (e.g. image:photo, text:caption)")
    label_cols = [c for c in columns if c == "label" or c.startswith("label:")]
    root = path.parent.resolve()
    report = ManifestReport(rows=len(rows) + len(malformed), skipped=list(malformed))
    items: list[Item] = []
    seen: dict[tuple[str, str, str, str], str] = {}
    verified: dict[Path, str | None] = {}
    row_ids: dict[str, int] = {}
    for n, row in enumerate(rows):
        line = row.pop("_line")
        row_id = str(row.get("id") if row.get("id") not in (None, "") else n)
        if row_id in row_ids:
            report.skipped.append({"row": n, "line": line,
                                   "reason": f"duplicate id: {row_id!r} (first on line "
                                             f"{row_ids[row_id]})"})
            continue
        row_ids[row_id] = line
        group = str(row.get("group") if row.get("group") not in (None, "") else f"row{n}")
        split = str(row.get("split") or "").strip().lower() or split_of(group, split_fractions)
        if split not in SPLITS:
            report.skipped.append({"row": n, "line": line,
                                   "reason": f"bad split: {split!r} not in {SPLITS}"})
            continue
        labels = {("label" if c == "label" else c.split(":", 1)[1]): str(row[c])
                  for c in label_cols if row.get(c) not in (None, "")}
        skipped_before = len(report.skipped)
        for col, (mod, view) in mod_cols.items():
            value = row.get(col)
            if value is None or (isinstance(value, str) and not value.strip()):
                if col in row:
                    report.skipped.append({"row": n, "line": line, "column": col,
                                           "reason": "empty value"})
                continue
            value = str(value).strip()
            if mod in FILE_MODALITIES or (mod not in KNOWN_MODALITIES and (root / value).is_file()):
                file = Path(value) if Path(value).is_absolute() else root / value
                if not file.is_file():
                    report.skipped.append({"row": n, "line": line, "column": col,
                                           "reason": f"missing file: {file}"})
                    continue
                if mod == "image" and verify_images:
                    if file not in verified:
                        verified[file] = _check_image(file)
                    if verified[file]:
                        report.skipped.append({"row": n, "line": line, "column": col,
                                               "reason": verified[file]})
                        continue
                if not file.resolve().is_relative_to(root):
                    report.outside.add(str(file))
                value = str(file)
            key = (mod, view, value, group)
            report.loaded_lines.add(line)
            if key in seen:  # the same image listed on several caption rows of one group
                continue
            item_id = f"{row_id}/{mod}/{view}"
            seen[key] = item_id
            items.append(Item(item_id, mod, view, value, group, split, labels))
        if line not in report.loaded_lines and len(report.skipped) == skipped_before:
            report.skipped.append({"row": n, "line": line,
                                   "reason": f"no value in any modality column {list(mod_cols)}"})
    report.items = len(items)
    if not items:
        raise ModalignError(f"manifest {path}: every row was skipped ({report.summary()})")
    ds = PairedDataset(name or path.stem, items, root=root,
                       info={"kind": "manifest", "source": str(path),
                             "skipped": report.skipped})
    return ds, report
