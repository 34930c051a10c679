"""M3CoL: loop reference, no mixing is CLIP, the pi(i) = i target bug is fixed, invariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from loss_reference_checks import assert_same_value_and_grad, log_softmax_entry, randn, unit
from modalign.losses import build_loss
from modalign.losses.m3col import m3col_loss, mixup_targets, sample_m3col_mixing


def reference_term(src, other, scale, perm, w):
    """One mixed term with loops; targets built entry by entry (fixed: entries added)."""
    b = src.shape[0]
    mixed = [unit(w[i] * src[i] + (1 - w[i]) * src[int(perm[i])]) for i in range(b)]
    ou = [unit(other[j]) for j in range(b)]
    target = [[0.0] * b for _ in range(b)]
    for i in range(b):
        target[i][i] += float(w[i])
        target[i][int(perm[i])] += 1 - float(w[i])
    forward = 0.0
    for i in range(b):
        row = [scale * (mixed[i] @ ou[j]) for j in range(b)]
        forward = forward - sum(target[i][j] * log_softmax_entry(row, j) for j in range(b))
    reverse = 0.0
    for j in range(b):
        column_sum = sum(target[i][j] for i in range(b))
        row = [scale * (ou[j] @ mixed[i]) for i in range(b)]
        reverse = reverse - sum(
            target[i][j] / column_sum * log_softmax_entry(row, i) for i in range(b)
        )
    return (forward / b + reverse / b) / 2


def reference_m3col(x, y, scale, perm, w):
    return reference_term(x, y, scale, perm, w) + reference_term(y, x, scale, perm, w)


def test_matches_loop_reference_including_a_fixed_point():
    x, y = randn(5, 4, seed=1), randn(5, 4, seed=2)
    perm = torch.tensor([0, 2, 1, 4, 3])  # pi(0) = 0
    w = torch.tensor([0.3, 0.6, 1.0, 0.1, 0.8], dtype=torch.float64)
    assert_same_value_and_grad(
        lambda a, b: m3col_loss(a, b, 10.0, perm, w).loss,
        lambda a, b: reference_m3col(a, b, 10.0, perm, w),
        [x, y],
    )


def test_no_mixing_is_twice_the_clip_loss():
    x, y = randn(4, 3, seed=3), randn(4, 3, seed=4)
    logits = 10.0 * F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
    labels = torch.arange(4)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    out = m3col_loss(x, y, 10.0, torch.tensor([3, 2, 1, 0]), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(out.parts["mixed-x"], clip)
    torch.testing.assert_close(out.loss, 2 * clip)


def test_fixed_point_rows_sum_to_one_regression():
    # The reference code overwrote P[i, i] = b_i with 1 - b_i when pi(i) = i.
    targets = mixup_targets(torch.tensor([0, 1, 3, 2]), torch.tensor([0.3, 0.7, 0.4, 0.9]))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(targets[0, 0], torch.tensor(1.0))


def test_invariant_to_relabelling_the_batch():
    x, y = randn(5, 3, seed=5), randn(5, 3, seed=6)
    perm = torch.tensor([1, 2, 0, 4, 3])
    w = torch.tensor([0.2, 0.5, 0.9, 0.4, 1.0], dtype=torch.float64)
    sigma = torch.tensor([3, 0, 4, 1, 2])
    inverse = torch.argsort(sigma)
    relabelled_perm = inverse[perm[sigma]]
    torch.testing.assert_close(
        m3col_loss(x, y, 10.0, perm, w).loss,
        m3col_loss(x[sigma], y[sigma], 10.0, relabelled_perm, w[sigma]).loss,
    )


@settings(max_examples=12, deadline=None)
@given(b=st.integers(2, 5), d=st.integers(2, 4), seed=st.integers(0, 1000), scale=st.floats(1, 30))
def test_hypothesis_against_reference(b, d, seed, scale):
    perm, w = sample_m3col_mixing(b, generator=torch.Generator().manual_seed(seed))
    w = w.double()
    x, y = randn(b, d, seed=seed), randn(b, d, seed=seed + 1)
    assert_same_value_and_grad(
        lambda p, q: m3col_loss(p, q, scale, perm, w).loss,
        lambda p, q: reference_m3col(p, q, scale, perm, w),
        [x, y],
        rtol=1e-7,
        atol=1e-9,
    )


def test_sampling_mixes_about_half_and_module_is_reproducible():
    perm, w = sample_m3col_mixing(2000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(perm.sort().values, torch.arange(2000))
    assert 0.4 < float((w < 1).double().mean()) < 0.6
    emb = {"a": randn(4, 3, dtype=torch.float32), "b": randn(4, 3, seed=1, dtype=torch.float32)}
    l1 = build_loss("m3col", modalities=["a", "b"], generator=torch.Generator().manual_seed(3))
    l2 = build_loss("m3col", modalities=["a", "b"], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(l1(emb).loss, l2(emb).loss)


@pytest.mark.parametrize(
    ("perm", "w", "word"),
    [
        (torch.tensor([0, 0, 1]), torch.ones(3), "permutation"),
        (torch.tensor([0, 1]), torch.ones(3), "permutation"),
        (torch.tensor([0, 1, 2]), torch.full((3,), 1.5), "mix_weights"),
        (torch.tensor([0, 1, 2]), torch.ones(2), "mix_weights"),
    ],
)
def test_bad_mixing_input(perm, w, word):
    with pytest.raises(ValueError, match=word):
        m3col_loss(torch.ones(3, 2), torch.ones(3, 2), 10.0, perm, w)


def test_bad_embeddings():
    with pytest.raises(ValueError, match="y"):
        m3col_loss(torch.ones(3, 2), torch.ones(3, 3), 10.0, torch.arange(3), torch.ones(3))
    with pytest.raises(ValueError, match="x"):
        m3col_loss(torch.zeros(3, 2), torch.ones(3, 2), 10.0, torch.arange(3), torch.ones(3))
