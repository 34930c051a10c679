"""Result records: fields, atomic writes, merge into CSV."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

import modalign
from modalign.evaluate.records import (
    make_record,
    merge_records,
    read_record,
    record_filename,
    write_csv,
    write_record,
)


def record(model="m", task="retrieval", metrics=None, bridges=(), seed=0):
    return make_record(dataset="emoji", split="test", model=model, task=task,
                       protocol={"k_values": [1, 5]}, metrics=metrics or {"acc1": 0.25},
                       bridges=bridges, seed=seed)


def _head_of_source_tree() -> str | None:
    """The commit of the tree modalign is imported from, by its first 12 hex digits (None
    outside a git checkout), read here with git itself."""
    out = subprocess.run(["git", "log", "-1", "--format=%H"],
                         cwd=Path(modalign.__file__).resolve().parent, capture_output=True,
                         text=True, check=False)
    return out.stdout.strip()[:12] if out.returncode == 0 and out.stdout.strip() else None


def test_record_fields():
    r = record(metrics={"image_retrieval_recall@5": 0.5, "nan_metric": float("nan")})
    assert r["modalign_version"] == modalign.__version__
    assert r["git_hash"] == _head_of_source_tree()
    assert r["metrics"] == {"image_retrieval_recall@5": 0.5, "nan_metric": None}
    assert r["protocol"] == {"k_values": [1, 5]} and r["inversion"] is None
    json.dumps(r)  # serialisable as is


def test_write_read_and_filename_depends_on_settings(tmp_path):
    a, b = record(seed=0), record(seed=1)
    assert record_filename(a) != record_filename(b)
    assert record_filename(a) == record_filename(record(seed=0))
    path = write_record(a, tmp_path)
    assert path.parent == tmp_path and read_record(path)["metrics"] == a["metrics"]
    assert write_record(a, tmp_path / "x.json").name == "x.json"
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind
    (tmp_path / "bad.json").write_text('{"dataset": "d"}')
    with pytest.raises(ValueError, match="missing fields"):
        read_record(tmp_path / "bad.json")


def test_merge_to_csv(tmp_path):
    write_record(record(model="a", metrics={"acc1": 0.1}), tmp_path / "r")
    write_record(record(model="b", metrics={"map": 0.2},
                        bridges=[{"name": "centering"}, {"name": "invgc"}]), tmp_path / "r")
    rows = merge_records([tmp_path / "r"])
    assert [r["model"] for r in rows] == ["a", "b"]
    assert rows[1]["bridges"] == "centering+invgc" and rows[0]["bridges"] == "none"
    out = write_csv(rows, tmp_path / "table.csv")
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert table[0]["acc1"] == "0.1" and table[0]["map"] == ""
    assert table[1]["map"] == "0.2" and table[1]["dataset"] == "emoji"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="at least one"):
        merge_records([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="neither"):
        merge_records([tmp_path / "missing"])
