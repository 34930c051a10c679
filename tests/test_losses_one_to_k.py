"""1-to-K InfoNCE: loop reference, K = 1 is CLIP, invariances, multi-hot = sum of CEs, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from loss_reference_checks import assert_same_value_and_grad, log_softmax_entry, randn, unit
from modalign.losses import build_loss
from modalign.losses.one_to_k import one_to_k_loss


def reference_one_to_k(a, c, groups, scale):
    """The official formula with explicit loops: (i2t + t2i) / 2 / K, K = N / B."""
    b, n = a.shape[0], c.shape[0]
    au = [unit(a[i]) for i in range(b)]
    cu = [unit(c[t]) for t in range(n)]
    k = n / b
    i2t = 0.0
    for i in range(b):
        row = [scale * (au[i] @ cu[t]) for t in range(n)]
        for t in range(n):
            if int(groups[t]) == i:
                i2t = i2t - log_softmax_entry(row, t)
    t2i = 0.0
    for t in range(n):
        row = [scale * (cu[t] @ au[i]) for i in range(b)]
        t2i = t2i - log_softmax_entry(row, int(groups[t]))
    return (i2t / b + t2i / n) / 2 / k


def test_matches_loop_reference_with_shuffled_and_unequal_groups():
    a, c = randn(3, 4, seed=1), randn(7, 4, seed=2)
    groups = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    assert_same_value_and_grad(
        lambda x, y: one_to_k_loss(x, y, groups, 6.0).loss,
        lambda x, y: reference_one_to_k(x, y, groups, 6.0),
        [a, c],
    )


def test_k_equal_one_is_the_clip_loss():
    a, c = randn(5, 3, seed=3), randn(5, 3, seed=4)
    logits = 4.0 * F.normalize(a, dim=1) @ F.normalize(c, dim=1).T
    labels = torch.arange(5)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(one_to_k_loss(a, c, labels, 4.0).loss, clip)


def test_invariant_to_permuting_candidates_within_each_block():
    a, c = randn(3, 4, seed=5), randn(9, 4, seed=6)
    groups = torch.arange(3).repeat_interleave(3)
    perm = torch.tensor([2, 0, 1, 3, 5, 4, 8, 7, 6])  # languages shuffled within each image block
    torch.testing.assert_close(
        one_to_k_loss(a, c, groups, 5.0).loss, one_to_k_loss(a, c[perm], groups[perm], 5.0).loss
    )


def test_multi_hot_term_is_the_sum_of_single_positive_ces():
    a, c = randn(3, 4, seed=7), randn(6, 4, seed=8)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = 3.0 * F.normalize(a, dim=1) @ F.normalize(c, dim=1).T
    total = sum(
        F.cross_entropy(logits, torch.tensor([2 * i + k for i in range(3)]), reduction="sum")
        for k in range(2)
    )
    torch.testing.assert_close(
        one_to_k_loss(a, c, groups, 3.0).parts["anchors-to-candidates"], total / 3 / 2
    )


def test_module_reads_groups_and_clamps_tau_range():
    loss = build_loss("one_to_k", modalities=["img", "caption"])
    emb = {
        "img": randn(2, 3, dtype=torch.float32),
        "caption": randn(4, 3, seed=1, dtype=torch.float32),
    }
    out = loss(emb, anchor_rows=torch.tensor([0, 1, 1, 0]))
    assert out.loss.ndim == 0
    with torch.no_grad():
        loss.log_logit_scale.fill_(-3.0)
    loss.clamp_()
    assert abs(float(loss.logit_scale().detach()) - 2.0) < 1e-5  # tau <= 0.5
    with pytest.raises(ValueError, match="anchor_rows"):
        loss(emb)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 4), k=st.integers(1, 3), d=st.integers(1, 4), scale=st.floats(0.1, 30))
def test_hypothesis_against_reference(b, k, d, scale):
    a, c = randn(b, d, seed=b + 10 * k), randn(b * k, d, seed=d + 100)
    groups = torch.randperm(b * k, generator=torch.Generator().manual_seed(b)) % b
    assert_same_value_and_grad(
        lambda x, y: one_to_k_loss(x, y, groups, scale).loss,
        lambda x, y: reference_one_to_k(x, y, groups, scale),
        [a, c],
        rtol=1e-7,
    )


@pytest.mark.parametrize(
    ("groups", "word"),
    [
        (torch.tensor([0, 1, 0]), "anchor_rows"),  # wrong length
        (torch.tensor([0.0, 1.0, 0.0, 1.0]), "anchor_rows"),  # not integer
        (torch.tensor([0, 2, 0, 1]), "anchor_rows"),  # out of range
        (torch.tensor([0, 0, 0, 0]), "anchor_rows"),  # anchor 1 has no candidate
    ],
)
def test_bad_groups_name_the_argument(groups, word):
    with pytest.raises(ValueError, match=word):
        one_to_k_loss(torch.ones(2, 3), torch.ones(4, 3), groups, 1.0)


def test_bad_embeddings_and_scale():
    with pytest.raises(ValueError, match="candidates"):
        one_to_k_loss(torch.ones(2, 3), torch.ones(2, 4), torch.tensor([0, 1]), 1.0)
    with pytest.raises(ValueError, match="anchors"):
        one_to_k_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([0, 1]), 1.0)
    with pytest.raises(ValueError, match="logit_scale"):
        one_to_k_loss(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0, 1]), 0.0)
