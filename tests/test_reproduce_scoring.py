"""Protocol scoring (retrieval with self-removal, zero-shot accuracy) against obvious loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modalign.data.benchmarks import RetrievalProtocol, Side
from modalign.embed import Embeddings
from modalign.reproduce.scoring import class_weights, score_retrieval, zero_shot_scores


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
    feats = torch.nn.functional.normalize(torch.randn(50, 8, dtype=torch.float64), dim=-1)
    weights = torch.nn.functional.normalize(torch.randn(7, 8, dtype=torch.float64), dim=-1)
    labels = torch.from_numpy(rng.integers(0, 7, 50))
    got = zero_shot_scores(feats, weights, labels, chunk=9)
    top1, top5, per_class = 0, 0, {}
    for f, y in zip(feats, labels.tolist()):
        s = [(float(f @ w), c) for c, w in enumerate(weights)]
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


def test_class_weights_average_normalised_prompts() -> None:
    tower = _BagOfChars()
    w = class_weights(tower, [["aa", "b"], ["c"]], batch_size=1)
    expected0 = torch.nn.functional.normalize(torch.tensor([0.5, 0.5] + [0.0] * 24), dim=0)
    assert torch.allclose(w[0], expected0) and w[1, 2] == pytest.approx(1.0)


def test_zero_shot_bad_shapes() -> None:
    with pytest.raises(ValueError, match="features"):
        zero_shot_scores(torch.zeros(3, 4), torch.zeros(2, 5), torch.zeros(3))
