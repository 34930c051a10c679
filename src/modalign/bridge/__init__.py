"""Bridging the modality gap: modality inversion and post-hoc transforms of embeddings.

``modalign.bridge.posthoc`` holds the fit/transform bridges (centering, mean shift, InvGC and
LocalAdj, CLOSE noise); ``modalign.bridge.inversion`` holds modality inversion.
"""
