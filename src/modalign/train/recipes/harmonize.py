"""Cross-modality gradient harmonization ("Scaling Multimodal Pre-Training via Cross-Modality
Gradient Harmonization", Wu et al. 2022), on the gradients of the pairwise objective terms with
respect to a shared key's embeddings.

With three or more keys, pairwise terms share an anchor (e.g. video in video-audio and
video-text). For a sample ``i`` and two terms ``p, q`` sharing the anchor ``a``, let ``g_p, g_q``
be the rows ``i`` of ``dL_p/dz_a`` and ``dL_q/dz_a``. The paper's abstract states the two
remedies; their form here is ours (PCGrad-style, following the design notes):

* realignment: if ``cos(g_p, g_q) < 0``, ``g_p <- g_p - (g_p.g_q / |g_q|^2) g_q`` and
  symmetrically (both from the originals), so the two no longer conflict;
* curriculum: a sample whose ``cos`` falls below ``delta_t`` has its rows of the pairwise
  terms' gradients dropped (every key), ``delta_t`` relaxing linearly from ``drop_below`` to
  -1 (nothing dropped) over ``curriculum_steps``.

The trainer then back-propagates the harmonized embedding gradients (plus those of every other
term and recipe) through the heads. ``fired`` counts the sample/term pairs that were projected,
``dropped`` the samples removed; both are logged per epoch.

Examples:
    >>> import torch
    >>> g = {"p": {"v": torch.tensor([[1.0, 0.0]])}, "q": {"v": torch.tensor([[-1.0, 1.0]])}}
    >>> out, stats = harmonize_gradients(g, {"v": [("p", "q")]})
    >>> out["p"]["v"].tolist(), stats["fired"]
    ([[0.5, 0.5]], 1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from modalign.errors import ModalignError


@dataclass
class HarmonizeConfig:
    """The ``[harmonize]`` section (``enabled = false``: off)."""

    enabled: bool = False
    project: bool = True
    drop_below: float = -1.0
    curriculum_steps: int = 0

    def check(self, accumulate: int) -> None:
        """Raise :class:`ModalignError` naming the first bad key."""
        if not self.enabled:
            return
        if not -1.0 <= self.drop_below <= 1.0:
            raise ModalignError(f"harmonize.drop_below must be in [-1, 1], "
                                f"got {self.drop_below!r}")
        if self.curriculum_steps < 0:
            raise ModalignError(f"harmonize.curriculum_steps must be >= 0, "
                                f"got {self.curriculum_steps!r}")
        if accumulate > 1:
            raise ModalignError("harmonize.enabled needs train.accumulate = 1")


HELP: dict[str, str] = {
    "harmonize.enabled": "cross-modality gradient harmonization of the pairwise objective terms "
                         "that share a key (three or more keys)",
    "harmonize.project": "project away the conflicting component of two terms' per-sample "
                         "gradients (realignment)",
    "harmonize.drop_below": "curriculum: drop samples whose two terms' gradient cosine is below "
                            "this (-1: never)",
    "harmonize.curriculum_steps": "steps over which the drop threshold relaxes to -1 (0: fixed)",
}


def threshold_at(cfg: HarmonizeConfig, step: int) -> float:
    """``drop_below`` relaxed linearly to -1 over ``curriculum_steps`` (0: fixed)."""
    if cfg.curriculum_steps <= 0:
        return cfg.drop_below
    t = min(1.0, step / cfg.curriculum_steps)
    return cfg.drop_below + t * (-1.0 - cfg.drop_below)


def harmonize_gradients(grads: Mapping[str, Mapping[str, torch.Tensor]],
                        anchors: Mapping[str, Sequence[tuple[str, str]]], *,
                        project: bool = True, drop_below: float = -1.0
                        ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """Harmonize per-term embedding gradients.

    Args:
        grads: term -> key -> (n, d) gradient of that term's loss w.r.t. the key's embeddings.
        anchors: key -> pairs of terms that share it.
        project: apply the realignment.
        drop_below: zero every key's rows of a sample (in the terms of the pair) whose cosine is
            below this.

    Returns:
        the adjusted gradients and ``{"fired", "pairs", "dropped", "samples"}`` counts.
    """
    out = {t: {k: g.clone() for k, g in d.items()} for t, d in grads.items()}
    fired = pairs = 0
    drop: dict[tuple[str, str], torch.Tensor] = {}
    n = 0
    for key, term_pairs in anchors.items():
        for p, q in term_pairs:
            gp, gq = grads[p][key], grads[q][key]
            n = gp.shape[0]
            dot = (gp * gq).sum(1)
            cos = dot / (gp.norm(dim=1) * gq.norm(dim=1)).clamp_min(1e-30)
            conflict = dot < 0
            fired += int(conflict.sum())
            pairs += n
            if project:
                c = conflict.unsqueeze(1).to(gp.dtype)
                out[p][key] = out[p][key] - c * (dot / (gq * gq).sum(1).clamp_min(1e-30)
                                                 ).unsqueeze(1) * gq
                out[q][key] = out[q][key] - c * (dot / (gp * gp).sum(1).clamp_min(1e-30)
                                                 ).unsqueeze(1) * gp
            if drop_below > -1.0:
                low = cos < drop_below
                for t in (p, q):
                    drop[(t, key)] = drop.get((t, key), torch.zeros_like(low)) | low
    dropped = torch.zeros(n, dtype=torch.bool)
    for mask in drop.values():
        dropped |= mask.cpu()
    if bool(dropped.any()):
        terms = {t for t, _ in drop}
        for t in terms:
            for k in out[t]:
                out[t][k] = out[t][k].masked_fill(dropped.to(out[t][k].device).unsqueeze(1), 0.0)
    return out, {"fired": fired, "pairs": pairs, "dropped": int(dropped.sum()), "samples": n}


class GradientHarmonization(nn.Module):
    """Which objective terms are pairwise and share keys, and the running counts.

    Args:
        objectives: the run's objective specs (``loss``, ``modalities``, ``label``...).
        labels: the objective's term labels, in the same order.
        config: the ``[harmonize]`` section.
    """

    fired: torch.Tensor  # buffers: counts accumulated over the run
    pairs: torch.Tensor
    dropped: torch.Tensor
    samples: torch.Tensor

    def __init__(self, objectives: Sequence[Mapping], labels: Sequence[str],
                 config: HarmonizeConfig) -> None:
        super().__init__()
        self.config = config
        self.pairwise = {lab: tuple(spec["modalities"]) for spec, lab in zip(objectives, labels)
                         if len(spec.get("modalities", ())) == 2}
        by_key: dict[str, list[str]] = {}
        for lab, mods in self.pairwise.items():
            for k in mods:
                by_key.setdefault(k, []).append(lab)
        self.anchors = {k: [(a, b) for i, a in enumerate(ts) for b in ts[i + 1:]]
                        for k, ts in by_key.items() if len(ts) >= 2}
        if not self.anchors:
            raise ModalignError("harmonize.enabled needs two or more pairwise objective terms "
                                "that share a key (e.g. CLIP(image, text) and CLIP(image, audio));"
                                f" the objectives' pairwise terms are {self.pairwise}")
        for name in ("fired", "pairs", "dropped", "samples"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long))

    def trainable(self) -> list[nn.Parameter]:
        """No parameters of its own."""
        return []

    def clamp_(self) -> None:
        """Nothing to clamp."""

    def adjust(self, grads: Mapping[str, Mapping[str, torch.Tensor]], step: int
              ) -> dict[str, dict[str, torch.Tensor]]:
        """:func:`harmonize_gradients` with this step's threshold; counts accumulate."""
        out, stats = harmonize_gradients(grads, self.anchors, project=self.config.project,
                                         drop_below=threshold_at(self.config, step))
        counts = torch.tensor([int(v) for v in stats.values()], dtype=torch.long)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = next(iter(next(iter(grads.values())).values())).device
            counts = counts.to(device)
            dist.all_reduce(counts)  # every rank counts the whole global batch
        for name, v in zip(stats, counts.tolist(), strict=True):
            getattr(self, name).add_(v)
        return out

    def rates(self) -> dict[str, float]:
        """How often the realignment fired and the curriculum dropped, so far."""
        return {"fired": float(self.fired) / max(1, int(self.pairs)),
                "dropped": float(self.dropped) / max(1, int(self.samples))}
