"""One way to write a direction and a metric, everywhere.

A *direction* is ``QUERY-to-GALLERY`` with modality keys (``image-to-text``,
``image:noto-to-image:openmoji``): what queries, what is ranked. Files, records, tables and logs
use that form; the terminal writes it in words (``image → text``). Older spellings (``i2t``,
``image->text``, ``image|text``, ``image,text``) are read by :func:`parse_direction`.

A metric of one direction is ``DIRECTION_MEASURE`` (:func:`metric_key`): training logs write
``image-to-text_recall@1``, ``text-to-image_recall@5``; older training logs and configs wrote
``i2t_r1``, ``t2i_r5``, ``mean_r1``, read by :func:`upgrade_training_metric`.

Metric keys in records stay CLIP_benchmark's, which name the *gallery*:
``text_retrieval_recall@1`` is image -> text, ``image_retrieval_recall@1`` is text -> image;
zero-shot keys are ``acc1``, ``acc5``, ``mean_per_class_recall``. :func:`describe_metric` reads
such a key back into its direction and measure.

Examples:
    >>> direction_name("image", "text"), direction_words("image", "text")
    ('image-to-text', 'image → text')
    >>> parse_direction("t2i"), parse_direction("image->text")
    (('text', 'image'), ('image', 'text'))
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from modalign.errors import ModalignError

_LETTERS = {"i": "image", "t": "text", "a": "audio", "v": "video"}
_RETRIEVAL_KEY = re.compile(r"^(?P<gallery>.+?)_retrieval_(?P<measure>.+)$")
_DIRECTION_KEY = re.compile(r"^(?P<query>.+?)-to-(?P<gallery>.+)_(?P<measure>recall@\d+|map|mrr)$")
_LEGACY_TRAINING = re.compile(r"^(?P<dir>i2t|t2i)_r(?P<k>\d+)$")


def direction_name(query: str, gallery: str) -> str:
    """``QUERY-to-GALLERY``: the one written form of a direction."""
    return f"{query}-to-{gallery}"


def direction_words(query: str, gallery: str) -> str:
    """The direction for people: ``image → text``."""
    return f"{query} → {gallery}"


def parse_direction(text: str) -> tuple[str, str]:
    """``(query, gallery)`` from any spelling in use: ``image-to-text``, ``i2t``, ``image->text``,
    ``image|text``, ``image,text``."""
    s = text.strip()
    m = re.fullmatch(r"([a-z])2([a-z])", s)
    if m and m.group(1) in _LETTERS and m.group(2) in _LETTERS:
        return _LETTERS[m.group(1)], _LETTERS[m.group(2)]
    for sep in ("-to-", "->", "→", "|", ","):
        query, found, gallery = s.partition(sep)
        if found and query.strip() and gallery.strip():
            return query.strip(), gallery.strip()
    raise ModalignError(f"direction {text!r}: expected QUERY-to-GALLERY, e.g. image-to-text")


def metric_key(query: str, gallery: str, measure: str) -> str:
    """``QUERY-to-GALLERY_MEASURE``: a metric of one direction, e.g. ``image-to-text_recall@1``."""
    return f"{direction_name(query, gallery)}_{measure}"


def parse_metric_key(key: str) -> tuple[str, str, str] | None:
    """``(query, gallery, measure)`` of a :func:`metric_key`; None for any other key.

    Examples:
        >>> parse_metric_key("image:noto-to-text_recall@5"), parse_metric_key("gap")
        (('image:noto', 'text', 'recall@5'), None)
    """
    m = _DIRECTION_KEY.match(key)
    return (m.group("query"), m.group("gallery"), m.group("measure")) if m else None


def upgrade_training_metric(name: str, pair: tuple[str, str] | list[str]) -> str | None:
    """The key of today's training logs for an older one (``i2t_r1``, ``t2i_r5``, ``mean_r1``),
    given the validation ``pair`` (``i2t`` was the first key retrieving the second); None when
    ``name`` is not an older key.

    Examples:
        >>> upgrade_training_metric("t2i_r1", ("image", "text"))
        'text-to-image_recall@1'
        >>> upgrade_training_metric("mean_r1", ("image", "text"))
        'mean_recall@1'
    """
    if name == "mean_r1":
        return "mean_recall@1"
    m = _LEGACY_TRAINING.match(name)
    if not m:
        return None
    first, second = pair
    query, gallery = (first, second) if m.group("dir") == "i2t" else (second, first)
    return metric_key(query, gallery, f"recall@{m.group('k')}")


def upgrade_training_row(row: Mapping[str, Any], pair: tuple[str, str] | list[str] | None = None
                         ) -> dict[str, Any]:
    """A row of an older ``log.jsonl`` (or a ``summary.json`` ``best``) with today's keys;
    ``pair`` is the run's validation pair (default ``("image", "text")``). Other keys are kept.

    Examples:
        >>> upgrade_training_row({"epoch": 1, "i2t_r1": 0.5, "gap": 0.2})
        {'epoch': 1, 'image-to-text_recall@1': 0.5, 'gap': 0.2}
    """
    keys = (pair[0], pair[1]) if pair and len(pair) == 2 else ("image", "text")
    return {upgrade_training_metric(k, keys) or k: v for k, v in row.items()}


def describe_metric(key: str, queries: tuple[str, str] | dict[str, str] | None = None) -> str:
    """A metric key in words, with its direction when the key names one.

    ``queries`` says which query set ranked each gallery: the two modalities of a cross-modal
    retrieval, or a mapping gallery -> query (from a record's protocol directions).

    Examples:
        >>> describe_metric("text_retrieval_recall@1", ("image", "text"))
        'image → text recall@1'
        >>> describe_metric("image:openmoji_retrieval_map", {"image:openmoji": "image:noto"})
        'image:noto → image:openmoji map'
        >>> describe_metric("image-to-text_recall@1"), describe_metric("acc1")
        ('image → text recall@1', 'acc1')
    """
    parsed = parse_metric_key(key)
    if parsed:
        return f"{direction_words(parsed[0], parsed[1])} {parsed[2]}"
    m = _RETRIEVAL_KEY.match(key)
    if not m:
        return key
    gallery, measure = m.group("gallery"), m.group("measure")
    if isinstance(queries, tuple) and gallery in queries:
        query = queries[1] if gallery == queries[0] else queries[0]
        return f"{direction_words(query, gallery)} {measure}"
    if isinstance(queries, dict) and gallery in queries:
        return f"{direction_words(queries[gallery], gallery)} {measure}"
    return f"→ {gallery} {measure}"
