"""Result records of the reproduce protocols: one JSON object per (dataset, task, method).

Each record says what was measured and how: dataset, split, model (as given and as resolved),
task, protocol, bridges, seed, package version, git revision, metrics (fractions in [0, 1]) and
counts. ``records.jsonl`` holds every record of a run; ``records/<dataset>.json`` holds one
dataset's records and lets an interrupted run skip the datasets it finished.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from modalign import __version__
from modalign.io import content_hash, read_json, write_json_atomic, write_jsonl_atomic
from modalign.reproduce.models import ResolvedModel


@cache
def git_revision() -> str | None:
    """The git commit of the installed source tree, or None outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def make_record(*, suite: str, dataset: str, task: str, method: str, model: ResolvedModel,
                split: str, protocol: Mapping[str, Any], metrics: Mapping[str, float],
                counts: Mapping[str, int], bridges: Sequence[str] = (), seed: int = 0,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One result record.

    Examples:
        >>> m = ResolvedModel("clip", "hf-clip:/models/clip", "hf-clip")
        >>> r = make_record(suite="cross-the-gap", dataset="dtd", task="image-to-image",
        ...                 method="native", model=m, split="test->train", protocol={},
        ...                 metrics={"map": 0.5}, counts={"queries": 2})
        >>> r["metrics"], r["model"]["spec"]
        ({'map': 0.5}, 'hf-clip:/models/clip')
    """
    return {"suite": suite, "dataset": dataset, "task": task, "method": method,
            "split": split, "model": {"given": model.given, "spec": model.spec,
                                      "family": model.family},
            "protocol": dict(protocol), "bridges": list(bridges), "seed": seed,
            "metrics": {k: float(v) for k, v in metrics.items()}, "counts": dict(counts),
            "version": __version__, "git": git_revision(), **dict(extra or {})}


class RecordBook:
    """Per-dataset record files under ``<out>/records/`` plus the combined ``records.jsonl``.

    A dataset whose file was written under the same configuration is done and is skipped on
    resume; any change of configuration runs it again.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)

    def _path(self, dataset: str) -> Path:
        return self.out_dir / "records" / f"{dataset}.json"

    def done(self, dataset: str, config: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        """The records of ``dataset`` from an earlier run with the same ``config``."""
        p = self._path(dataset)
        if not p.exists():
            return None
        saved = read_json(p)
        return saved["records"] if saved.get("key") == content_hash(dict(config)) else None

    def save(self, dataset: str, config: Mapping[str, Any],
             records: Sequence[Mapping[str, Any]]) -> None:
        write_json_atomic(self._path(dataset), {"key": content_hash(dict(config)),
                                                "records": list(records)})

    def finish(self, records: Sequence[Mapping[str, Any]]) -> Path:
        path = self.out_dir / "records.jsonl"
        write_jsonl_atomic(path, records)
        return path
