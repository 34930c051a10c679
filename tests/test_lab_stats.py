"""The gap shift and the trend test of the gap lab, against obvious references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from modalign.evaluate.retrieval import cross_modal_retrieval, toy_embeddings
from modalign.geometry.gapshift import gap_shift_curve, gap_vector, shift_along_gap
from modalign.lab.trend import rank, spearman, trend_test, verdict


def naive_shift(x: torch.Tensor, g: torch.Tensor, amount: float) -> torch.Tensor:
    rows = []
    for i in range(x.shape[0]):
        v = [float(x[i, j]) + amount * float(g[j]) for j in range(x.shape[1])]
        norm = math.sqrt(sum(c * c for c in v))
        rows.append([c / norm for c in v])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("amount", [-0.5, 0.0, 0.7, 1.5])
def test_shift_matches_loop_values_and_gradients(amount: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(shift_along_gap(x, g, amount), naive_shift(x, g, amount))
    xr = x.clone().requires_grad_()
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    (shift_along_gap(xr, g, amount) * w).sum().backward()
    # reference gradient of sum(w * (y / |y|)) with y = x + a g: (w - (w.u) u) / |y|
    y = x + amount * g
    n = y.norm(dim=1, keepdim=True)
    u = y / n
    ref = (w - (w * u).sum(1, keepdim=True) * u) / n
    torch.testing.assert_close(xr.grad, ref)


def test_shift_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="gap_vector"):
        shift_along_gap(torch.ones(3, 4), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="vectors"):
        shift_along_gap(torch.ones(4), torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="amount"):
        shift_along_gap(torch.ones(2, 4), torch.ones(4), float("nan"))


def test_gap_shift_curve_zero_is_the_trained_space_and_one_closes_the_gap() -> None:
    emb = toy_embeddings(groups=16, dim=8)
    rows = gap_shift_curve(emb, emb, amounts=(0.0, 0.5, 1.0), prototypes=None)
    native = cross_modal_retrieval(emb, ("image", "text"), k_values=(1,)).metrics
    assert rows[0]["text_retrieval_map"] == pytest.approx(native["text_retrieval_map"])
    assert rows[0]["image_retrieval_map"] == pytest.approx(native["image_retrieval_map"])
    gaps = [r["gap"] for r in rows]
    assert gaps[0] > gaps[1] > gaps[2]
    # the gap vector is the difference of the normalised centroids
    img = torch.nn.functional.normalize(torch.from_numpy(emb["image"].vectors), dim=1)
    txt = torch.nn.functional.normalize(torch.from_numpy(emb["text"].vectors), dim=1)
    torch.testing.assert_close(gap_vector(emb, ("image", "text")), img.mean(0) - txt.mean(0))


def test_gap_shift_curve_zero_shot_moves_prototypes_too() -> None:
    emb = toy_embeddings(groups=16, dim=8)
    names = sorted(set(emb["image"].labels("subgroup")))
    text = torch.from_numpy(emb["text"].vectors)
    subs = emb["text"].labels("subgroup")
    protos = torch.stack([text[[i for i, s in enumerate(subs) if s == c]].mean(0) for c in names])
    rows = gap_shift_curve(emb, emb, amounts=(0.0, 1.0), prototypes=protos, classnames=names)
    # recomputed: prototypes moved by lambda times the gap vector, images classified by cosine
    img = torch.nn.functional.normalize(torch.from_numpy(emb["image"].vectors).double(), dim=1)
    txt = torch.nn.functional.normalize(text.double(), dim=1)
    gap = img.mean(0) - txt.mean(0)
    truth = torch.tensor([names.index(s) for s in emb["image"].labels("subgroup")])
    for r, amount in zip(rows, (0.0, 1.0), strict=True):
        moved = torch.nn.functional.normalize(
            torch.nn.functional.normalize(protos.double(), dim=1) + amount * gap, dim=1)
        expected = float(((img @ moved.T).argmax(1) == truth).double().mean())
        assert r["zeroshot_acc1"] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="amounts"):
        gap_shift_curve(emb, emb, amounts=())


def naive_rank(values: list[float]) -> list[float]:
    out = []
    for v in values:
        below = sum(1 for w in values if w < v)
        equal = sum(1 for w in values if w == v)
        out.append(below + (equal + 1) / 2)
    return out


def test_rank_and_spearman_match_definitions() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=9).astype(float)  # with ties
    assert rank(x).tolist() == naive_rank(x.tolist())
    a, b = rng.normal(size=8), rng.normal(size=8)  # no ties: 1 - 6 sum d^2 / (n (n^2 - 1))
    d = np.array(naive_rank(a.tolist())) - np.array(naive_rank(b.tolist()))
    assert spearman(a, b) == pytest.approx(1 - 6 * (d ** 2).sum() / (8 * (64 - 1)))


def test_permutation_p_value_matches_exact_enumeration() -> None:
    gaps = [0.1, 0.2, 0.4, 0.8, 1.0]
    benefits = [-0.3, -0.1, -0.2, 0.1, 0.0]
    rho = spearman(np.array(gaps), np.array(benefits))
    perms = [spearman(np.array(gaps), np.array(p))
             for p in itertools.permutations(benefits)]
    exact = np.mean([r >= rho - 1e-12 for r in perms])
    test = trend_test(gaps, benefits, permutations=20000, bootstrap=300)
    assert test.rho == pytest.approx(rho)
    assert test.p_value == pytest.approx(exact, abs=0.01)
    assert test.ci_low <= test.rho <= test.ci_high
    assert test.gap_range == (0.1, 1.0) and test.benefit_at_ends == (-0.3, 0.0)
    assert test.slope == pytest.approx(np.polyfit(gaps, benefits, 1)[0])


def test_verdict_is_written_from_the_numbers() -> None:
    up = trend_test([0.1, 0.2, 0.3, 0.5, 0.7, 0.9], [-0.3, -0.2, -0.1, 0.0, 0.1, 0.2],
                    permutations=2000, bootstrap=200)
    down = trend_test([0.1, 0.2, 0.3, 0.5, 0.7, 0.9], [0.2, 0.1, 0.0, -0.1, -0.2, -0.3],
                      permutations=2000, bootstrap=200)
    assert up.held and not down.held
    assert verdict(up, 6).startswith("The claim held here")
    assert verdict(down, 6).startswith("The claim did not hold here")
    assert f"{up.rho:+.2f}" in verdict(up, 6) and f"{down.slope:+.3f}" in verdict(down, 6)
    with pytest.raises(ValueError, match="at least 3"):
        trend_test([0.1, 0.2], [0.0, 0.1])
    with pytest.raises(ValueError, match="one length"):
        trend_test([0.1, 0.2, 0.3], [0.0, 0.1])
