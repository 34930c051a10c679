"""Evaluation: exact retrieval metrics at scale, retrieval and zero-shot tasks, result records.

:func:`run` is ``modalign eval`` as a Python call (same settings, same record, same table).

Examples:
    >>> from modalign.evaluate import cross_modal_retrieval
    >>> from modalign.evaluate.retrieval import toy_embeddings
    >>> result = cross_modal_retrieval(toy_embeddings(), k_values=(1,))
    >>> 0.0 <= result.metrics["image_retrieval_map"] <= 1.0
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> defining module; imported on first use so that ``modalign eval --help`` and
# argument errors do not wait for torch.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("RetrievalResult", "metrics_from_positions", "recall_from_topk",
                     "relevant_positions", "retrieval_metrics", "self_exclusion"),
                    "modalign.evaluate.metrics"),
    **dict.fromkeys(("make_record", "merge_records", "read_record", "write_record"),
                    "modalign.evaluate.records"),
    **dict.fromkeys(("TaskResult", "cross_modal_retrieval", "intra_modal_retrieval"),
                    "modalign.evaluate.retrieval"),
    **dict.fromkeys(("SearchIndex", "build_index", "recall_against_exact"),
                    "modalign.evaluate.search"),
    **dict.fromkeys(("class_prototypes", "encode_prototypes", "zero_shot_classification",
                     "zero_shot_task"), "modalign.evaluate.zeroshot"),
    **dict.fromkeys(("EvalOutcome", "EvalSettings", "run"), "modalign.evaluate.runner"),
    "align_inverted": "modalign.evaluate.inverted",
}

if TYPE_CHECKING:
    from modalign.evaluate.inverted import align_inverted
    from modalign.evaluate.metrics import (
        RetrievalResult,
        metrics_from_positions,
        recall_from_topk,
        relevant_positions,
        retrieval_metrics,
        self_exclusion,
    )
    from modalign.evaluate.records import make_record, merge_records, read_record, write_record
    from modalign.evaluate.retrieval import TaskResult, cross_modal_retrieval, intra_modal_retrieval
    from modalign.evaluate.runner import EvalOutcome, EvalSettings, run
    from modalign.evaluate.search import SearchIndex, build_index, recall_against_exact
    from modalign.evaluate.zeroshot import (
        class_prototypes,
        encode_prototypes,
        zero_shot_classification,
        zero_shot_task,
    )

__all__ = [
    "EvalOutcome",
    "EvalSettings",
    "RetrievalResult",
    "SearchIndex",
    "TaskResult",
    "align_inverted",
    "build_index",
    "class_prototypes",
    "cross_modal_retrieval",
    "encode_prototypes",
    "intra_modal_retrieval",
    "make_record",
    "merge_records",
    "metrics_from_positions",
    "read_record",
    "recall_against_exact",
    "recall_from_topk",
    "relevant_positions",
    "retrieval_metrics",
    "run",
    "self_exclusion",
    "write_record",
    "zero_shot_classification",
    "zero_shot_task",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modalign.evaluate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
