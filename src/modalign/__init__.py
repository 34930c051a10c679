"""modalign: multimodal contrastive representation learning and the modality gap.

Train two-tower and N-tower models with the field's contrastive objectives, diagnose the geometry of
the joint space, bridge the gap at inference time, and evaluate retrieval and zero-shot
classification with reproducible records.
"""

__version__ = "0.1.0"
