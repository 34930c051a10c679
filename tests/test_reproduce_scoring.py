"""Protocol scoring (retrieval with self-removal, zero-shot accuracy) against obvious loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modalign.data.benchmarks import RetrievalProtocol, Side
from modalign.embed import Embeddings
from modalign.reproduce.scoring import class_prototypes_for, score_retrieval, zero_shot_scores


def naive_map(q: np.ndarray, g: np.ndarray, qgroups, ggroups, qids, gids, exclude_self):
    aps = []
    for i in range(len(q)):
        cand = [j for j in range(len(g)) if not (exclude_self and gids[j] == qids[i])]
        s = [(float(q[i] @ g[j]), j) for j in cand]
        order = [j for _, j in sorted(s, key=lambda t: -t[0])]
        rel = [ggroups[j] == qgroups[i] for j in order]
        if not any(rel):
            continue
        hits, ap = 0, 0.0
        for pos, r in enumerate(rel, start=1):
            if r:
                hits += 1
                ap += hits / pos
        aps.append(ap / sum(rel))
    return float(np.mean(aps))


def _emb(vectors: np.ndarray, groups, prefix: str = "i") -> Embeddings:
    rows = [{"id": f"{prefix}{k}", "group": str(g), "labels": {}} for k, g in enumerate(groups)]
    return Embeddings(vectors.astype(np.float32), rows, {})


@pytest.mark.parametrize("exclude_self", [True, False])
def test_retrieval_map_matches_loop(exclude_self: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    groups = rng.integers(0, 5, 30)
    emb = _emb(x, groups)
    proto = RetrievalProtocol("image-to-image", Side("image"), Side("image"),
                              exclude_self=exclude_self)
    got = score_retrieval(proto, emb, emb)["map"]
    ids = [it["id"] for it in emb.items]
    xf = x.astype(np.float32).astype(np.float64)
    assert got == pytest.approx(naive_map(xf, xf, groups, groups, ids, ids, exclude_self),
                                abs=1e-6)
    if not exclude_self:
        assert got > naive_map(xf, xf, groups, groups, ids, ids, True)  # self-match helps


def test_inverted_queries_keep_item_relevance() -> None:
    rng = np.random.default_rng(1)
    g = rng.standard_normal((12, 4))
    groups = np.arange(12) % 3
    gallery = _emb(g, groups)
    queries = Embeddings(np.asarray(rng.standard_normal((12, 4)), np.float32), gallery.items, {})
    proto = RetrievalProtocol("image-to-image", Side("image"), Side("image"), exclude_self=True)
    ids = [it["id"] for it in gallery.items]
    qn = queries.vectors / np.linalg.norm(queries.vectors, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    assert score_retrieval(proto, queries, gallery)["map"] == pytest.approx(
        naive_map(qn, gn, groups, groups, ids, ids, True), abs=1e-6)


def test_zero_shot_matches_loop() -> None:
    rng = np.random.default_rng(2)
    names = [f"class {c}" for c in range(7)]
    feats = rng.standard_normal((50, 8))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    protos = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    labels = rng.integers(0, 7, 50)
    rows = [{"id": f"i{k}", "group": names[y], "labels": {"class": names[y]}}
            for k, y in enumerate(labels)]
    images = Embeddings(feats.astype(np.float32), rows, {})
    override = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    for vectors, kwargs in ((feats, {}), (override.numpy(), {"override": override})):
        got = zero_shot_scores(images, protos, names, **kwargs)
        top1, top5, per_class = 0, 0, {}
        for f, y in zip(vectors.astype(np.float32), labels):
            s = [(float(torch.from_numpy(f) @ w), c) for c, w in enumerate(protos)]
            ranked = [c for _, c in sorted(s, key=lambda t: -t[0])]
            top1 += ranked[0] == y
            top5 += y in ranked[:5]
            per_class.setdefault(y, []).append(ranked[0] == y)
        assert got["acc1"] == pytest.approx(top1 / 50)
        assert got["acc5"] == pytest.approx(top5 / 50)
        assert got["mean_per_class_recall"] == pytest.approx(
            np.mean([np.mean(v) for v in per_class.values()]))


class _BagOfChars:
    """A text tower whose feature is the letter histogram of the text."""

    name, modality, dim = "chars", "text", 26

    def preprocess(self, texts):
        return texts

    def encode(self, batch):
        out = torch.zeros(len(batch), 26)
        for i, t in enumerate(batch):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out

    def identity(self):
        return {"name": self.name}


def test_prototypes_average_normalised_prompts() -> None:
    tower = _BagOfChars()
    # "a_a" -> "a a": underscores become spaces; each prompt is normalised before averaging
    w = class_prototypes_for(tower, ["a_a", "c"], ["{}", "b{}"], batch_size=1)
    a2 = torch.zeros(26)
    a2[0] = 1.0  # "a a" normalised
    ab = torch.zeros(26)
    ab[:2] = torch.tensor([2.0, 1.0]) / 5 ** 0.5  # "ba a" normalised
    assert torch.allclose(w[0], torch.nn.functional.normalize(a2 + ab, dim=0), atol=1e-6)
    assert w[1, 2] > 0 and w[1, 1] > 0 and w[1, 0] == 0
