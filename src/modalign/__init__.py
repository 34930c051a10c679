"""modalign: multimodal contrastive representation learning and the modality gap.

Train two-tower and N-tower models with the field's contrastive objectives, diagnose the geometry of
the joint space, bridge the gap at inference time, and evaluate retrieval and zero-shot
classification with reproducible records.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: ``import modalign`` stays light for the command line
    if name == "search":
        from modalign.evaluate.semantic import search

        return search
    raise AttributeError(f"module 'modalign' has no attribute {name!r}")
