"""Evaluation: exact retrieval metrics at scale, retrieval and zero-shot tasks, result records.

Examples:
    >>> from modalign.evaluate import cross_modal_retrieval
    >>> from modalign.evaluate.retrieval import toy_embeddings
    >>> result = cross_modal_retrieval(toy_embeddings(), k_values=(1,))
    >>> 0.0 <= result.metrics["image_retrieval_map"] <= 1.0
    True
"""

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
from modalign.evaluate.search import SearchIndex, build_index, recall_against_exact
from modalign.evaluate.zeroshot import (
    class_prototypes,
    encode_prototypes,
    zero_shot_classification,
)

__all__ = [
    "RetrievalResult",
    "SearchIndex",
    "TaskResult",
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
    "self_exclusion",
    "write_record",
    "zero_shot_classification",
]
