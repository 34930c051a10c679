"""Published figures the reproduce tables print beside ours, each with its source.

Image -> image retrieval mAP (x100), native image features ("Orig") against OTI queries, from
Herzog & Wang, "Reevaluating the Intra-Modal Misalignment Hypothesis in CLIP" (CVPR 2026, arXiv
2603.16100), Table 3, captioned "Image-to-image retrieval results (mAP) following [Cross the Gap]".
They do not say whether they copied these from Cross the Gap (Mistretta et al., ICLR 2025) or ran
its code again, nor which revisited protocol (Easy/Medium/Hard) the ROxford/RParis columns use.
CUB, SOP and OpenCLIP rows are not in that table. No per-dataset figures were found for text ->
text retrieval with OVI or for intra-modal zero-shot classification, so those tables show ours only.

Contrastive-gap metrics: means over 3 seeds of ``tests/gap_metrics.json`` in the official
repository of Fahim, Murphy & Fyshe, "It's Not a Modality Gap" (arXiv 2405.18570), CLIP trained
from scratch on MSCOCO with projection dims 32/64/128, evaluated on the 5k val images.

Examples:
    >>> CROSS_THE_GAP_I2I["CLIP B/32"]["OTI"]["roxford5k"]
    43.0
    >>> paper_model_for("openai/clip-vit-large-patch14")
    'CLIP L/14'
"""

from __future__ import annotations

import re
from collections.abc import Sequence

HZ_SOURCE = ("Herzog & Wang, CVPR 2026 (arXiv 2603.16100), Table 3: image-to-image mAP following "
             "Cross the Gap (Mistretta et al., ICLR 2025)")
CONTRASTIVE_GAP_SOURCE = ("abrar-fahim/contrastive-gap, tests/gap_metrics.json (Fahim et al., "
                          "arXiv 2405.18570): means over seeds, MSCOCO 5k val")

# Column order of the paper's table; CUB and SOP follow (not in the published table).
I2I_COLUMNS: tuple[tuple[str, str], ...] = (
    ("roxford5k", "ROx"), ("rparis6k", "RPar"), ("stanford_cars", "Cars"),
    ("oxford_pets", "Pets"), ("oxford_flowers", "Flowers"), ("fgvc_aircraft", "Aircraft"),
    ("dtd", "DTD"), ("eurosat", "EuroSAT"), ("food101", "Food"), ("sun397", "SUN"),
    ("caltech101", "Caltech"), ("ucf101", "UCF"), ("imagenet", "ImageNet"), ("cub2011", "CUB"),
    ("sop", "SOP"),
)

_ORDER = [k for k, _ in I2I_COLUMNS[:13]]
_GAP_METRICS = ("mean_positive_cosine", "linear_separability", "centroid_distance",
                "image_to_text_r@1", "text_to_image_r@1")


def _named(keys: Sequence[str], values: str) -> dict[str, float]:
    """The space-separated numbers of ``values`` keyed by ``keys``, in order."""
    nums = [float(v) for v in values.split()]
    return dict(zip(keys, nums, strict=True))


def _row(values: str) -> dict[str, float]:
    """One row of the published image-to-image table (the first 13 columns of I2I_COLUMNS)."""
    return _named(_ORDER, values)


def _gap_metrics(values: str) -> dict[str, float]:
    """One (projection dim, loss) entry of the contrastive-gap metrics (see _GAP_METRICS)."""
    return _named(_GAP_METRICS, values)


CROSS_THE_GAP_I2I: dict[str, dict[str, dict[str, float]]] = {
    "CLIP B/32": {
        "Orig": _row("42.4 74.0 24.9 31.2 62.5 14.5 28.3 49.3 33.6 34.6 77.7 46.2 21.6"),
        "OTI": _row("43.0 70.3 28.0 37.5 62.6 14.4 31.9 47.2 34.7 36.3 79.9 48.6 23.8"),
    },
    "CLIP L/14": {
        "Orig": _row("57.1 77.8 43.8 47.2 84.2 25.8 33.9 57.8 55.0 39.2 83.8 59.5 33.0"),
        "OTI": _row("62.4 77.1 50.5 56.0 86.0 27.1 37.7 56.3 55.9 43.5 87.3 62.8 38.2"),
    },
    "SigLIP B/16": {
        "Orig": _row("50.6 73.1 65.7 56.4 87.5 37.9 39.8 53.3 56.3 42.8 87.2 56.9 35.8"),
        "OTI": _row("55.2 79.1 71.8 64.2 89.7 37.6 43.3 52.9 59.0 43.6 88.9 54.9 38.8"),
    },
    "SLIP B/16": {
        "Orig": _row("36.5 79.2 4.9 17.8 65.7 9.1 29.7 53.7 19.5 26.1 65.4 40.2 15.4"),
        "OTI": _row("36.4 79.3 5.0 19.3 65.1 9.0 30.5 50.6 20.0 26.4 67.6 40.6 14.8"),
    },
}
# The averages the source prints (over its 13 columns), to check our transcription against.
CROSS_THE_GAP_I2I_AVG: dict[str, dict[str, float]] = {
    "CLIP B/32": {"Orig": 41.6, "OTI": 42.9}, "CLIP L/14": {"Orig": 53.7, "OTI": 57.0},
    "SigLIP B/16": {"Orig": 57.2, "OTI": 60.0}, "SLIP B/16": {"Orig": 35.6, "OTI": 35.7},
}

# (projection dim, loss) -> metric, from the contrastive-gap repository's gap_metrics.json;
# the numbers follow the order of _GAP_METRICS.
CONTRASTIVE_GAP: dict[tuple[int, str], dict[str, float]] = {
    (128, "CLIP"): _gap_metrics("0.567 1.000 0.661 0.276 0.268"),
    (128, "CUA"): _gap_metrics("0.728 0.726 0.082 0.258 0.254"),
    (128, "CUAXU"): _gap_metrics("0.637 0.817 0.127 0.267 0.269"),
    (64, "CLIP"): _gap_metrics("0.825 1.000 0.314 0.259 0.255"),
    (64, "CUA"): _gap_metrics("0.773 0.648 0.068 0.251 0.245"),
    (64, "CUAXU"): _gap_metrics("0.694 0.769 0.136 0.259 0.250"),
    (32, "CLIP"): _gap_metrics("0.909 0.782 0.104 0.238 0.241"),
    (32, "CUA"): _gap_metrics("0.813 0.586 0.068 0.235 0.229"),
    (32, "CUAXU"): _gap_metrics("0.758 0.682 0.122 0.238 0.240"),
}

_PAPER_MODELS: tuple[tuple[str, str], ...] = (
    (r"siglip.*(b-?16|base-patch16)|(b-?16|base-patch16).*siglip", "SigLIP B/16"),
    (r"slip.*b-?16", "SLIP B/16"),
    (r"(vit-?b-?32|base-patch32|vit-b/32)", "CLIP B/32"),
    (r"(vit-?l-?14|large-patch14|vit-l/14)(?!.*336)", "CLIP L/14"),
)


def paper_model_for(model: str) -> str | None:
    """The row of the published table that matches ``model`` by name, if any.

    OpenCLIP weights other than OpenAI's (``laion2b``, ``datacomp``) match no row: the table has
    OpenAI CLIP, SigLIP and SLIP only.

    Examples:
        >>> paper_model_for("open_clip:ViT-B-32/openai")
        'CLIP B/32'
        >>> paper_model_for("open_clip:ViT-B-32/laion2b_s34b_b79k") is None
        True
    """
    name = model.lower()
    if any(tag in name for tag in ("laion", "datacomp", "dfn", "metaclip", "commonpool")):
        return None
    for pattern, row in _PAPER_MODELS:
        if re.search(pattern, name):
            return row
    return None
