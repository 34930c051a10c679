"""Gap, uniformity/alignment, cone, separability, spectrum: closed forms, loops, invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modalign.geometry.cone import mean_cross_cosine, mean_pairwise_cosine, mean_positive_cosine
from modalign.geometry.gap import centroid, modality_gap
from modalign.geometry.separability import linear_separability
from modalign.geometry.spectrum import effective_rank, joint_spectrum, spectrum
from modalign.geometry.uniformity import alignment, cross_uniformity, uniformity


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _rand(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


# ---- naive references: obvious loops ---------------------------------------------------------

def naive_uniformity(x: np.ndarray, t: float = 2.0) -> float:
    u = _unit(x)
    vals = [math.exp(-t * float(np.sum((u[i] - u[j]) ** 2)))
            for i in range(len(u)) for j in range(i + 1, len(u))]
    return math.log(sum(vals) / len(vals))


def naive_cross_uniformity(x: np.ndarray, y: np.ndarray, t: float = 2.0) -> float:
    ux, uy = _unit(x), _unit(y)
    vals = [math.exp(-t * float(np.sum((ux[i] - uy[j]) ** 2)))
            for i in range(len(ux)) for j in range(len(uy)) if i != j]
    return math.log(sum(vals) / len(vals))


def naive_cone(x: np.ndarray) -> float:
    u = _unit(x)
    vals = [float(u[i] @ u[j]) for i in range(len(u)) for j in range(len(u)) if i != j]
    return sum(vals) / len(vals)


# ---- uniformity / alignment -----------------------------------------------------------------

def test_uniformity_closed_forms():
    assert uniformity(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0, abs=1e-12)
    assert uniformity(np.tile([[0.3, 0.4]], (5, 1))) == pytest.approx(0.0, abs=1e-12)
    assert alignment(np.eye(3), np.eye(3)) == pytest.approx(0.0)
    assert alignment(np.eye(3), -np.eye(3)) == pytest.approx(4.0)


@pytest.mark.parametrize("block_rows", [1, 3, 7, 64])
def test_uniformity_blocks_equal_loop(block_rows):
    x, y = _rand(23, 5, 0), _rand(23, 5, 1)
    assert uniformity(x, block_rows=block_rows) == pytest.approx(naive_uniformity(x), rel=1e-12)
    assert cross_uniformity(x, y, block_rows=block_rows) == pytest.approx(
        naive_cross_uniformity(x, y), rel=1e-12)


def test_uniformity_temperature_and_raw_vectors():
    x = _rand(10, 4, 2)
    assert uniformity(x, t=0.5) == pytest.approx(naive_uniformity(x, t=0.5), rel=1e-12)
    raw = np.array([[0.0, 0.0], [3.0, 4.0]])
    assert uniformity(raw, normalize=False) == pytest.approx(-2.0 * 25.0)


def test_uniformity_has_no_self_pair_bias():
    # The naive all-pairs estimator (self-pairs included) drifts with n; ours is unbiased, so
    # its mean over many small samples matches the large-sample value.
    big = _unit(_rand(4000, 3, 3))
    reference = uniformity(big, max_rows=None)
    ours, naive = [], []
    for s in range(300):
        sub = big[np.random.default_rng(s).choice(4000, 8, replace=False)]
        ours.append(math.exp(uniformity(sub)))
        d2 = ((sub[:, None] - sub[None]) ** 2).sum(-1)
        naive.append(np.exp(-2 * d2).mean())
    assert np.mean(ours) == pytest.approx(math.exp(reference), rel=0.05)
    assert np.mean(naive) > math.exp(reference) * 1.3


def test_cross_uniformity_excludes_positive_pairs():
    x, y = _rand(12, 4, 4), _rand(12, 4, 5)
    ux, uy = _unit(x), _unit(y)
    d2 = ((ux[:, None] - uy[None]) ** 2).sum(-1)
    with_diag = math.log(np.exp(-2 * d2).mean())
    off = ~np.eye(12, dtype=bool)
    assert cross_uniformity(x, y) == pytest.approx(math.log(np.exp(-2 * d2[off]).mean()))
    assert cross_uniformity(x, y) != pytest.approx(with_diag, rel=1e-6)
    # with y = x every positive pair is identical; the off-diagonal cross pairs are then
    # exactly the distinct intra-modal pairs
    assert cross_uniformity(x, x) == pytest.approx(uniformity(x), rel=1e-12)


def test_uniformity_invariant_to_rotation_and_pair_permutation():
    x, y = _rand(30, 6, 6), _rand(30, 6, 7)
    r = _rotation(6, 8)
    perm = np.random.default_rng(9).permutation(30)
    assert uniformity(x @ r) == pytest.approx(uniformity(x), rel=1e-10)
    assert uniformity(x[perm]) == pytest.approx(uniformity(x), rel=1e-10)
    assert cross_uniformity(x @ r, y @ r) == pytest.approx(cross_uniformity(x, y), rel=1e-10)
    assert cross_uniformity(x[perm], y[perm]) == pytest.approx(cross_uniformity(x, y), rel=1e-10)
    assert alignment(x[perm] @ r, y[perm] @ r) == pytest.approx(alignment(x, y), rel=1e-10)


def test_uniformity_sample_is_seeded_and_recorded_size():
    x = _rand(500, 4, 10)
    a = uniformity(x, max_rows=100, seed=1)
    assert a == uniformity(x, max_rows=100, seed=1)
    assert a != uniformity(x, max_rows=100, seed=2)
    assert abs(a - uniformity(x, max_rows=None)) < 0.1


def test_alignment_chunked_equals_full():
    x, y = _rand(101, 5, 11), _rand(101, 5, 12)
    full = float(np.mean(np.sum((_unit(x) - _unit(y)) ** 2, axis=1)))
    for chunk in (1, 10, 1000):
        assert alignment(x, y, chunk_rows=chunk) == pytest.approx(full, rel=1e-12)


def test_torch_and_float32_memmap_inputs(tmp_path):
    x = _rand(40, 8, 13).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    ref = uniformity(x)
    assert uniformity(mm) == pytest.approx(ref, rel=1e-12)
    assert uniformity(torch.from_numpy(x)) == pytest.approx(ref, rel=1e-12)


# ---- gap --------------------------------------------------------------------------------------

def test_gap_of_permuted_copy_is_zero_and_known_shift_is_recovered():
    x = _rand(50, 4, 14)
    g = modality_gap(x, x[::-1])
    assert g.centroid_distance == pytest.approx(0.0, abs=1e-12)
    assert g.centroid_cosine == pytest.approx(1.0)
    shift = np.array([0.5, -1.0, 0.25, 2.0])
    y = x + shift
    raw = modality_gap(x, y, normalize=False)
    assert raw.centroid_distance == pytest.approx(np.linalg.norm(shift), rel=1e-12)
    np.testing.assert_allclose(raw.gap_vector, -shift, atol=1e-12)


def test_gap_of_two_gaussian_clouds_on_the_sphere_matches_loop():
    x, y = _rand(200, 5, 15, shift=1.0), _rand(150, 5, 16, shift=-1.0)
    ux, uy = _unit(x), _unit(y)
    mx, my = ux.mean(0), uy.mean(0)
    g = modality_gap(x, y, chunk_rows=7)
    assert g.centroid_distance == pytest.approx(np.linalg.norm(mx - my), rel=1e-12)
    ex = mx / np.linalg.norm(mx) - my / np.linalg.norm(my)
    assert g.renormalized_distance == pytest.approx(np.linalg.norm(ex), rel=1e-12)
    np.testing.assert_allclose(centroid(x, chunk_rows=3), mx, rtol=1e-12)


def test_gap_invariant_to_rotation():
    x, y = _rand(40, 6, 17, 0.5), _rand(40, 6, 18)
    r = _rotation(6, 19)
    assert modality_gap(x @ r, y @ r).centroid_distance == pytest.approx(
        modality_gap(x, y).centroid_distance, rel=1e-10)


def test_gap_undefined_direction_is_nan():
    g = modality_gap(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert math.isnan(g.centroid_cosine) and g.centroid_distance == pytest.approx(1.0)


# ---- cone and cosine means --------------------------------------------------------------------

def test_cone_matches_loop():
    x, y = _rand(17, 4, 20, 0.7), _rand(17, 4, 21)
    assert mean_pairwise_cosine(x, chunk_rows=5) == pytest.approx(naive_cone(x), rel=1e-12)
    ux, uy = _unit(x), _unit(y)
    cross = [float(ux[i] @ uy[j]) for i in range(17) for j in range(17) if i != j]
    assert mean_cross_cosine(x, y, chunk_rows=4) == pytest.approx(np.mean(cross), rel=1e-12)
    assert mean_positive_cosine(x, y) == pytest.approx(np.mean(np.sum(ux * uy, 1)), rel=1e-12)


def test_cone_closed_forms():
    assert mean_pairwise_cosine(np.ones((4, 3))) == pytest.approx(1.0)
    assert mean_pairwise_cosine(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)


# ---- separability -----------------------------------------------------------------------------

def test_separability_far_clouds_and_identical_distributions():
    far = linear_separability(_rand(300, 8, 22, shift=3.0), _rand(300, 8, 23, shift=-3.0))
    assert far["accuracy"] == 1.0
    same = [linear_separability(_rand(300, 8, 24 + s), _rand(300, 8, 60 + s), seed=s)["accuracy"]
            for s in range(4)]
    assert 0.35 < float(np.mean(same)) < 0.65
    assert far["n_train"] == 480 and far["n_test"] == 120 and far["rows_per_modality"] == 300


def test_separability_is_seeded():
    x, y = _rand(100, 4, 25), _rand(100, 4, 26, 0.3)
    assert linear_separability(x, y, seed=3) == linear_separability(x, y, seed=3)


def test_separability_samples_large_inputs():
    r = linear_separability(_rand(500, 4, 27), _rand(400, 4, 28), max_rows=100)
    assert r["rows_per_modality"] == 100 and r["n_train"] + r["n_test"] == 200


# ---- spectrum ---------------------------------------------------------------------------------

def test_spectrum_matches_numpy_covariance():
    x = _rand(120, 6, 29, 0.4)
    s = spectrum(x, chunk_rows=17)
    ev = np.sort(np.linalg.eigvalsh(np.cov(_unit(x).T)))[::-1]
    np.testing.assert_allclose(s.eigenvalues, ev, rtol=1e-9, atol=1e-14)
    sv = np.sqrt(np.clip(ev, 0, None))
    p = sv / sv.sum()
    assert s.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert s.explained_variance[2] == pytest.approx(ev[:2].sum() / ev.sum(), rel=1e-9)
    assert s.effective_rank <= min(x.shape)


def test_joint_spectrum_equals_stacked():
    x, y = _rand(50, 5, 30), _rand(70, 5, 31, 1.0)
    j = joint_spectrum([x, y], chunk_rows=9)
    stacked = spectrum(np.vstack([x, y]))
    np.testing.assert_allclose(j.eigenvalues, stacked.eigenvalues, rtol=1e-9, atol=1e-14)


def test_effective_rank_closed_forms():
    assert effective_rank(np.array([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(np.full(7, 2.0)) == pytest.approx(7.0)


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [uniformity, mean_pairwise_cosine, spectrum])
def test_single_modality_bad_input(fn):
    bad = _rand(10, 3, 32)
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="row 4 contains NaN"):
        fn(bad)
    with pytest.raises(ValueError, match="at least 2 rows"):
        fn(np.ones((1, 3)))
    with pytest.raises(ValueError, match="empty"):
        fn(np.ones((0, 3)))
    with pytest.raises(ValueError, match="2-D"):
        fn(np.ones(3))
    with pytest.raises(ValueError, match="floating"):
        fn(np.ones((4, 3), dtype=np.int64))


def test_paired_bad_input():
    with pytest.raises(ValueError, match="same number of rows"):
        alignment(np.ones((4, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="same embedding dimension"):
        modality_gap(np.ones((4, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="zero vector"):
        modality_gap(np.zeros((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="at least 5 rows"):
        linear_separability(np.ones((4, 3)), np.ones((9, 3)))
    with pytest.raises(ValueError, match="t: expected"):
        uniformity(np.ones((4, 3)), t=0)


def test_logistic_regression_reaches_the_regularised_optimum():
    from modalign.geometry.separability import fit_logistic_regression

    rng = np.random.default_rng(33)
    f = torch.as_tensor(rng.normal(size=(80, 3)))
    y = torch.as_tensor((rng.random(80) < 0.5).astype(np.float64))
    w = fit_logistic_regression(f, y, c=0.7).requires_grad_(True)
    z = f @ w[:-1] + w[-1]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum") \
        + w[:-1].pow(2).sum() / (2 * 0.7)
    (grad,) = torch.autograd.grad(loss, w)
    assert grad.abs().max() < 1e-6


def test_float32_input_agrees_with_float64():
    x, y = _rand(300, 16, 34), _rand(300, 16, 35, 0.5)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    assert uniformity(x32) == pytest.approx(uniformity(x), rel=1e-5)
    assert cross_uniformity(x32, y32) == pytest.approx(cross_uniformity(x, y), rel=1e-5)
    assert mean_pairwise_cosine(x32) == pytest.approx(mean_pairwise_cosine(x), abs=1e-6)
    np.testing.assert_allclose(spectrum(x32).eigenvalues, spectrum(x).eigenvalues, rtol=1e-4)
