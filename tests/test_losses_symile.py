"""Symile: MIP properties, O(N) and O(N^2) negatives against loops, M = 2, missing modalities."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from loss_reference_checks import assert_same_value_and_grad, log_softmax_entry, randn
from modalign.losses import build_loss
from modalign.losses.symile import all_tuple_products, multilinear_inner_product, symile_loss


def mip(*vs):
    return sum(torch.prod(torch.stack([v[k] for v in vs])) for k in range(vs[0].shape[0]))


def reference_symile_n(xs, scale, perms):
    """O(N): candidate j of anchor a is prod_r xs[r][perms[a, r][j]]; the diagonal is the truth."""
    m, b = len(xs), xs[0].shape[0]
    total = 0.0
    for a in range(m):
        for i in range(b):
            row = []
            for j in range(b):
                if j == i:
                    row.append(scale * mip(*[x[i] for x in xs]))
                else:
                    others = [xs[r][int(perms[a, r, j])] for r in range(m) if r != a]
                    row.append(scale * mip(xs[a][i], *others))
            total = total - log_softmax_entry(row, i) / b
    return total / m


def reference_symile_n_squared(xs, scale):
    """O(N^2): every tuple of the other modalities' rows is a candidate; positive = (i, ..., i)."""
    m, b = len(xs), xs[0].shape[0]
    total = 0.0
    for a in range(m):
        others = [x for r, x in enumerate(xs) if r != a]
        tuples = list(itertools.product(range(b), repeat=m - 1))
        for i in range(b):
            row = [
                scale * mip(xs[a][i], *[o[t] for o, t in zip(others, tup, strict=True)])
                for tup in tuples
            ]
            total = total - log_softmax_entry(row, tuples.index((i,) * (m - 1))) / b
    return total / m


def test_mip_symmetric_multilinear_and_pair_sign_invariant():
    a, b, c = randn(6, seed=1), randn(6, seed=2), randn(6, seed=3)
    v = multilinear_inner_product(a, b, c)
    torch.testing.assert_close(v, mip(a, b, c))
    for perm in itertools.permutations([a, b, c]):
        torch.testing.assert_close(multilinear_inner_product(*perm), v)
    torch.testing.assert_close(multilinear_inner_product(2.5 * a, b, c), 2.5 * v)
    # A known non-identifiability: flipping the sign of two modalities changes nothing.
    torch.testing.assert_close(multilinear_inner_product(-a, -b, c), v)


def test_all_tuple_products_cover_every_combination_once_positive_at_i():
    xs = [randn(3, 2, seed=s) for s in range(3)]
    prods = all_tuple_products(xs[1:])  # the candidates of anchor 0 for M = 3
    assert prods.shape == (9, 2)

    def key(v):
        return tuple(round(float(t), 9) for t in v)

    wanted = sorted(key(xs[1][j] * xs[2][k]) for j, k in itertools.product(range(3), repeat=2))
    assert sorted(key(row) for row in prods) == wanted
    assert len({key(row) for row in prods}) == 9
    for i in range(3):
        torch.testing.assert_close(prods[i], xs[1][i] * xs[2][i])
    assert all_tuple_products(xs).shape == (27, 2)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_n_squared_matches_loop_reference_for_any_m(m):
    xs = [randn(3, 4, seed=10 * m + s) for s in range(m)]
    assert_same_value_and_grad(
        lambda *t: symile_loss(t, 3.0, negatives="n_squared").loss,
        lambda *t: reference_symile_n_squared(t, 3.0),
        xs,
    )


def test_n_negatives_match_loop_reference_with_injected_permutations():
    xs = [randn(5, 4, seed=s) for s in range(3)]
    g = torch.Generator().manual_seed(0)
    perms = torch.stack([torch.randperm(5, generator=g) for _ in range(9)]).reshape(3, 3, 5)
    assert_same_value_and_grad(
        lambda *t: symile_loss(t, 4.0, permutations=perms).loss,
        lambda *t: reference_symile_n(t, 4.0, perms),
        xs,
    )


def test_identity_permutation_is_ce_on_mip_of_paired_rows():
    x, y, z = (randn(4, 3, seed=s) for s in range(3))
    ident = torch.arange(4).expand(3, 3, 4)
    logits = torch.einsum("id,jd,jd->ij", x, y, z)
    out = symile_loss([x, y, z], 2.0, permutations=ident)
    expected = F.cross_entropy(2.0 * logits, torch.arange(4))
    torch.testing.assert_close(out.parts["anchor_0"], expected)


def test_two_modalities_are_clip_directions_for_both_variants():
    # Symile's own n_squared raises IndexError for M = 2; here it is one CLIP direction per anchor.
    x, y = randn(5, 3, seed=1), randn(5, 3, seed=2)
    logits = 3.0 * x @ y.T
    labels = torch.arange(5)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    ident = torch.arange(5).expand(2, 2, 5)
    torch.testing.assert_close(symile_loss([x, y], 3.0, permutations=ident).loss, clip)
    torch.testing.assert_close(symile_loss([x, y], 3.0, negatives="n_squared").loss, clip)


def test_missing_modalities_drop_incomplete_samples():
    loss = build_loss("symile", modalities=["a", "b", "c"], negatives="n_squared")
    emb = {k: randn(5, 3, seed=i) for i, k in enumerate("abc")}
    observed = {
        "b": torch.tensor([True, False, True, True, True]),
        "c": torch.tensor([True, True, True, False, True]),
    }
    keep = torch.tensor([True, False, True, False, True])
    expected = symile_loss([emb[k][keep] for k in "abc"], loss.logit_scale(), negatives="n_squared")
    torch.testing.assert_close(loss(emb, observed=observed).loss, expected.loss)
    nothing = {"a": torch.zeros(5, dtype=torch.bool)}
    out = loss(emb, observed=nothing)
    assert float(out.loss) == 0.0
    with pytest.raises(ValueError, match="observed"):
        loss(emb, observed={"a": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="observed"):
        loss(emb, observed={"zzz": torch.ones(5, dtype=torch.bool)})


def test_module_random_negatives_are_seeded():
    emb = {k: randn(6, 3, seed=i, dtype=torch.float32) for i, k in enumerate(["x", "y", "z"])}
    a = build_loss("symile", modalities=["x", "y", "z"], generator=torch.Generator().manual_seed(2))
    b = build_loss("symile", modalities=["x", "y", "z"], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a(emb).loss, b(emb).loss)


@settings(max_examples=10, deadline=None)
@given(m=st.integers(2, 3), b=st.integers(1, 4), d=st.integers(1, 3), scale=st.floats(0.1, 20))
def test_hypothesis_n_squared_against_reference(m, b, d, scale):
    xs = [randn(b, d, seed=s + 7 * m) for s in range(m)]
    assert_same_value_and_grad(
        lambda *t: symile_loss(t, scale, negatives="n_squared").loss,
        lambda *t: reference_symile_n_squared(t, scale),
        xs,
        rtol=1e-7,
        atol=1e-9,
    )


def test_bad_input():
    x = torch.ones(3, 2)
    with pytest.raises(ValueError, match="modalities"):
        symile_loss([x], 1.0)
    with pytest.raises(ValueError, match=r"modalities\[1\]"):
        symile_loss([x, torch.ones(2, 2)], 1.0)
    with pytest.raises(ValueError, match="permutations"):
        symile_loss([x, x], 1.0, permutations=torch.zeros(2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="negatives"):
        symile_loss([x, x], 1.0, negatives="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logit_scale"):
        symile_loss([x, x], -2.0)
