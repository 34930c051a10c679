"""One way to write a direction and a metric, everywhere.

A *direction* is ``QUERY-to-GALLERY`` with modality keys (``image-to-text``,
``image:noto-to-image:openmoji``): what queries, what is ranked. Files, records, tables and logs
use that form; the terminal writes it in words (``image → text``). Older spellings (``i2t``,
``image->text``, ``image|text``, ``image,text``) are read by :func:`parse_direction`.

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

from modalign.errors import ModalignError

_LETTERS = {"i": "image", "t": "text", "a": "audio", "v": "video"}
_RETRIEVAL_KEY = re.compile(r"^(?P<gallery>.+?)_retrieval_(?P<measure>.+)$")


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


def describe_metric(key: str, queries: tuple[str, str] | dict[str, str] | None = None) -> str:
    """A metric key in words, with its direction when the key names one.

    ``queries`` says which query set ranked each gallery: the two modalities of a cross-modal
    retrieval, or a mapping gallery -> query (from a record's protocol directions).

    Examples:
        >>> describe_metric("text_retrieval_recall@1", ("image", "text"))
        'image → text recall@1'
        >>> describe_metric("image:openmoji_retrieval_map", {"image:openmoji": "image:noto"})
        'image:noto → image:openmoji map'
        >>> describe_metric("acc1")
        'acc1'
    """
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
