"""Nearest-neighbour search: chunked exact torch == full sort; faiss exact == torch exact."""

from __future__ import annotations

import pytest
import torch

from modalign.errors import ModalignError
from modalign.evaluate.search import (
    ExactIndex,
    build_index,
    faiss_available,
    recall_against_exact,
)


def data(seed, Q=13, G=57, d=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(Q, d, generator=gen), dim=1)
    g = torch.nn.functional.normalize(torch.randn(G, d, generator=gen), dim=1)
    return q, g


def naive_topk(q, g, k, exclude=None):
    out = []
    for i in range(len(q)):
        scored = [(float(q[i] @ g[j]), j) for j in range(len(g))
                  if exclude is None or j != int(exclude[i])]
        scored.sort(key=lambda e: -e[0])
        out.append([j for _, j in scored[:k]])
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 57, 200, 10**6])
def test_exact_chunked_equals_full_sort(chunk_size):
    q, g = data(0)
    index = ExactIndex(chunk_size=chunk_size)
    index.add(g[:20])
    index.add(g[20:])  # several add() calls concatenate
    assert index.size == 57
    result = index.search(q, 5)
    assert result.indices.tolist() == naive_topk(q, g, 5)
    assert torch.allclose(result.scores, (q @ g.T).topk(5, dim=1).values, atol=1e-6)
    assert bool((result.scores[:, :-1] >= result.scores[:, 1:]).all())


@pytest.mark.parametrize("chunk_size", [3, 10**6])
def test_exclusion_removes_self(chunk_size):
    _, g = data(1)
    exclude = torch.arange(len(g))
    result = build_index("exact", chunk_size=chunk_size)
    result.add(g)
    found = result.search(g, 4, exclude=exclude)
    assert found.indices.tolist() == naive_topk(g, g, 4, exclude)
    assert not bool((found.indices == exclude[:, None]).any())


def test_k_larger_than_gallery_pads_with_minus_one():
    q, g = data(2, G=3)
    index = ExactIndex()
    index.add(g)
    result = index.search(q, 5, exclude=torch.zeros(len(q), dtype=torch.long))
    assert (result.indices[:, 2:] == -1).all() and torch.isneginf(result.scores[:, 2:]).all()
    assert result.indices[:, :2].tolist() == naive_topk(q, g, 2, torch.zeros(len(q)))


def test_recall_against_exact():
    exact = torch.tensor([[0, 1, 2], [3, 4, -1]])
    assert recall_against_exact(exact, exact) == 1.0
    assert recall_against_exact(torch.tensor([[2, 9, 8], [4, 7, 6]]), exact) == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="same"):
        recall_against_exact(exact[:, :2], exact)


def test_bad_input():
    index = ExactIndex()
    with pytest.raises(ValueError, match="empty"):
        index.search(torch.zeros(1, 2), 1)
    index.add(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="dimension"):
        index.add(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="k="):
        index.search(torch.zeros(1, 2), 0)
    with pytest.raises(ValueError, match="kind"):
        build_index("annoy")
    with pytest.raises(ValueError, match="chunk_size"):
        ExactIndex(chunk_size=0)


@pytest.mark.skipif(faiss_available(), reason="faiss is installed")
def test_missing_faiss_gives_a_clear_error():
    with pytest.raises(ModalignError, match="faiss-cpu"):
        build_index("flat")


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_faiss_flat_equals_torch_exact():
    q, g = data(3, Q=40, G=500, d=16)
    exact, flat = build_index("exact"), build_index("flat")
    exact.add(g)
    flat.add(g)
    a, b = exact.search(q, 10), flat.search(q, 10)
    assert torch.equal(a.indices, b.indices)
    assert torch.allclose(a.scores, b.scores, atol=1e-5)
    ex = torch.arange(40)
    assert torch.equal(exact.search(g[:40], 5, exclude=ex).indices,
                       flat.search(g[:40], 5, exclude=ex).indices)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_faiss_approximate_recall_is_reported(kind):
    q, g = data(4, Q=50, G=2000, d=16)
    exact, approx = build_index("exact"), build_index(kind)
    exact.add(g)
    approx.add(g)
    recall = recall_against_exact(approx.search(q, 10).indices, exact.search(q, 10).indices)
    assert 0.8 <= recall <= 1.0
