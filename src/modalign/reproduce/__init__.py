"""Paper protocols on the field's standard datasets: ``modalign reproduce``.

``cross-the-gap`` (image->image retrieval native vs OTI, text->text native vs OVI, zero-shot
classification inter- vs intra-modal), ``contrastive-gap`` (gap metrics on COCO) and
``clip-benchmark`` (zero-shot classification and image-text retrieval) each read datasets from
:mod:`modalign.data.benchmarks`, embed them with a model resolved by :func:`resolve_model`, and
write result records plus one table in the paper's layout with the published figures beside ours.
"""

from modalign.reproduce.models import ResolvedModel, load_towers, resolve_model

__all__ = ["ResolvedModel", "load_towers", "resolve_model"]
