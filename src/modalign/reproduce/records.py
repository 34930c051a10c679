"""Result records of the reproduce protocols, in the format of :mod:`modalign.evaluate.records`.

Each record is an evaluation record (dataset, split, model, task, protocol, bridges, inversion,
seed, package version, git hash, metrics) with four more fields: ``suite`` (the protocol:
``cross-the-gap``, ...), ``method`` (``native``, ``oti``, ``ovi``), ``counts`` (queries, gallery)
and ``model_spec`` (the encoder spec the model resolved to). A run writes:

- ``records/<file>.json``: one record per file (``modalign eval``'s record merging reads them);
- ``records.jsonl``: every record of the run, in order;
- ``done/<dataset>.json``: one dataset's records and the settings they were made with, so an
  interrupted run skips the datasets it finished and any change of settings runs them again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modalign.evaluate.records import make_record, write_record
from modalign.io import content_hash, read_json, write_json_atomic, write_jsonl_atomic
from modalign.reproduce.models import ResolvedModel


def protocol_record(*, suite: str, dataset: str, task: str, method: str, model: ResolvedModel,
                    split: str, protocol: Mapping[str, Any], metrics: Mapping[str, float],
                    counts: Mapping[str, int], inversion: Mapping[str, Any] | None = None,
                    seed: int = 0) -> dict[str, Any]:
    """One evaluation record of a reproduce suite.

    Examples:
        >>> m = ResolvedModel("clip", "hf-clip:/models/clip", "hf-clip")
        >>> r = protocol_record(suite="cross-the-gap", dataset="dtd", task="image-to-image",
        ...                     method="oti", model=m, split="test->train", protocol={},
        ...                     metrics={"map": 0.5}, counts={"queries": 2},
        ...                     inversion={"direction": "oti", "steps": 150})
        >>> r["metrics"], r["method"], [b["name"] for b in r["bridges"]]
        ({'map': 0.5}, 'oti', ['oti'])
    """
    bridges = [{"name": method, **dict(inversion or {})}] if method != "native" else []
    record = make_record(dataset=dataset, split=split, model=model.given, task=task,
                         protocol={"suite": suite, **dict(protocol)}, metrics=metrics,
                         bridges=bridges, inversion=inversion, seed=seed)
    return {**record, "suite": suite, "method": method, "counts": dict(counts),
            "model_spec": model.spec}


class RecordBook:
    """The record files of one run folder (see the module docstring)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)

    def _done_path(self, dataset: str) -> Path:
        return self.out_dir / "done" / f"{dataset}.json"

    def done(self, dataset: str, config: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        """The records of ``dataset`` from an earlier run with the same ``config``, if any."""
        p = self._done_path(dataset)
        if not p.exists():
            return None
        saved = read_json(p)
        return saved["records"] if saved.get("key") == content_hash(dict(config)) else None

    def save(self, dataset: str, config: Mapping[str, Any],
             records: Sequence[Mapping[str, Any]]) -> None:
        """Write a finished dataset's records (one file each) and its resume marker."""
        self.write(records)
        write_json_atomic(self._done_path(dataset), {"key": content_hash(dict(config)),
                                                     "records": list(records)})

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        """One file per record under ``records/``."""
        for r in records:
            write_record(r, self.out_dir / "records")

    def finish(self, records: Sequence[Mapping[str, Any]]) -> Path:
        """Write ``records.jsonl`` with every record of the run."""
        path = self.out_dir / "records.jsonl"
        write_jsonl_atomic(path, records)
        return path
