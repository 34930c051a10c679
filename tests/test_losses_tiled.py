"""The memory-bounded reductions against the materialised matrix: values, gradients, edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modalign.losses.tiled import tiled_logsumexp, tiled_softplus_sum

torch.set_num_threads(1)
F64 = torch.float64


def leaves(n, m, d, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (spread * torch.randn(n, d, generator=g, dtype=F64)).requires_grad_()
    y = (spread * torch.randn(m, d, generator=g, dtype=F64)).requires_grad_()
    scale = torch.tensor(1.7, dtype=F64, requires_grad=True)
    bias = torch.tensor(-0.4, dtype=F64, requires_grad=True)
    return x, y, scale, bias


def loop_logits(x, y, scale, bias):
    """The logit matrix entry by entry."""
    return torch.stack(
        [
            torch.stack([scale * torch.dot(x[i], y[j]) + bias for j in range(y.shape[0])])
            for i in range(x.shape[0])
        ]
    )


def assert_same_gradients(ours, ref, inputs):
    """The gradients of ``ours`` and ``ref`` with respect to ``inputs`` agree (float64,
    rtol 1e-11); an input that neither depends on counts as a zero gradient on both sides."""
    for a, b in zip(torch.autograd.grad(ours, inputs, allow_unused=True),
                    torch.autograd.grad(ref, inputs, allow_unused=True), strict=True):
        a = torch.zeros((), dtype=F64) if a is None else a.double()
        b = torch.zeros((), dtype=F64) if b is None else b.double()
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def check_lse_against_reference(x, y, scale, bias, tile, targets, weights, normalize=False):
    """tiled_logsumexp (cross-entropies when ``targets`` = (row, column) targets) against the
    float64 loop reference: values, and gradients of a ``weights``-weighted sum (``normalize``:
    the reference's rows through ``F.normalize``, the gradients w.r.t. the raw rows)."""
    unit = (lambda t: F.normalize(t, dim=-1)) if normalize else (lambda t: t)
    logits = loop_logits(unit(x), unit(y), scale, bias)
    if targets is not None:
        rt, ct = targets
        got_r, got_c = tiled_logsumexp(x, y, scale, bias, tile_size=tile, row_targets=rt,
                                       col_targets=ct, normalize=normalize)
        ref_r = F.cross_entropy(logits, rt, reduction="none")
        ref_c = F.cross_entropy(logits.T, ct, reduction="none")
    else:
        got_r, got_c = tiled_logsumexp(x, y, scale, bias, tile_size=tile, normalize=normalize)
        ref_r, ref_c = logits.logsumexp(1), logits.logsumexp(0)
    torch.testing.assert_close(got_r, ref_r, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got_c, ref_c, rtol=1e-12, atol=1e-13)
    wr, wc = weights
    ours = (wr * got_r).sum() + (wc * got_c).sum()
    ref = (wr * ref_r).sum() + (wc * ref_c).sum()
    assert_same_gradients(ours, ref, [x, y, scale, bias])


@pytest.mark.parametrize("tile", [1, 3, 4, 7, 50])
@pytest.mark.parametrize(("rows", "cols"), [(True, True), (True, False), (False, True)])
def test_logsumexp_values_and_gradients(tile, rows, cols):
    x, y, scale, bias = leaves(7, 5, 3, seed=tile)
    got_r, got_c = tiled_logsumexp(x, y, scale, bias, rows=rows, cols=cols, tile_size=tile)
    logits = loop_logits(x, y, scale, bias)
    weights_r = torch.linspace(-1.0, 2.0, 7, dtype=F64)  # mixed-sign upstream gradients
    weights_c = torch.linspace(0.5, 1.5, 5, dtype=F64)
    ours = ref = 0.0
    if rows:
        torch.testing.assert_close(got_r, logits.logsumexp(1), rtol=1e-13, atol=1e-13)
        ours = ours + (weights_r * got_r).sum()
        ref = ref + (weights_r * logits.logsumexp(1)).sum()
    else:
        assert got_r is None
    if cols:
        torch.testing.assert_close(got_c, logits.logsumexp(0), rtol=1e-13, atol=1e-13)
        ours = ours + (weights_c * got_c).sum()
        ref = ref + (weights_c * logits.logsumexp(0)).sum()
    else:
        assert got_c is None
    assert_same_gradients(ours, ref, [x, y, scale, bias])


@pytest.mark.parametrize("tile", [1, 2, 5, 9])
def test_cross_entropy_targets_values_and_gradients(tile):
    # Rectangular, with targets: row i's positive is column (i + 2) % m, column j's is row j % n.
    x, y, scale, bias = leaves(6, 9, 4, seed=10 + tile)
    rt = (torch.arange(6) + 2) % 9
    ct = torch.arange(9) % 6
    got_r, got_c = tiled_logsumexp(
        x, y, scale, bias, row_targets=rt, col_targets=ct, tile_size=tile
    )
    logits = loop_logits(x, y, scale, bias)
    ref_r = F.cross_entropy(logits, rt, reduction="none")
    ref_c = F.cross_entropy(logits.T, ct, reduction="none")
    torch.testing.assert_close(got_r, ref_r, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got_c, ref_c, rtol=1e-12, atol=1e-13)
    w = torch.linspace(0.2, 1.0, 6, dtype=F64)
    ours = (w * got_r).sum() + got_c.sum()
    ref = (w * ref_r).sum() + ref_c.sum()
    assert_same_gradients(ours, ref, [x, y, scale, bias])


def test_overflowing_shift_is_recomputed_exactly_in_float32():
    # A negative 150 logits above the positive overflows exp in float32 under the positive shift.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    y = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.9]], requires_grad=True)
    t = torch.arange(3)
    got_r, got_c = tiled_logsumexp(x, y, 150.0, row_targets=t, col_targets=t, tile_size=2)
    logits = 150.0 * x @ y.T
    torch.testing.assert_close(got_r, F.cross_entropy(logits, t, reduction="none"))
    torch.testing.assert_close(got_c, F.cross_entropy(logits.T, t, reduction="none"))
    assert torch.isfinite(got_r).all() and torch.isfinite(got_c).all()
    (got_r.sum() + got_c.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


def check_softplus_sum(n, m, tile, seed):
    """tiled_softplus_sum against the float64 loop reference, values and gradients."""
    x, y, scale, bias = leaves(n, m, 3, seed=seed, spread=3.0)
    ours = tiled_softplus_sum(x, y, scale, bias, tile_size=tile)
    # softplus's default linearisation above 20 is off by exp(-20) in the gradient; the
    # reference uses the exact log1p(exp(l)) throughout.
    ref = F.softplus(loop_logits(x, y, scale, bias), threshold=60.0).sum()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert_same_gradients(ours, ref, [x, y, scale, bias])


@pytest.mark.parametrize("tile", [1, 4, 6, 100])
def test_softplus_sum_values_and_gradients(tile):
    check_softplus_sum(6, 5, tile, seed=20 + tile)


def test_gradcheck_small():
    x, y, scale, bias = leaves(4, 3, 2, seed=3)
    t = torch.tensor([2, 0, 1, 1])
    assert torch.autograd.gradcheck(
        lambda a, b, s, c: tiled_logsumexp(a, b, s, c, cols=False, row_targets=t, tile_size=3)[0],
        (x, y, scale, bias),
    )
    assert torch.autograd.gradcheck(
        lambda a, b, s, c: tiled_logsumexp(a, b, s, c, tile_size=2), (x, y, scale, bias)
    )
    assert torch.autograd.gradcheck(
        lambda a, b, s, c: tiled_softplus_sum(a, b, s, c, tile_size=3), (x, y, scale, bias)
    )


def test_scale_as_float_and_no_bias():
    x, y, _, _ = leaves(5, 4, 3)
    rows, cols = tiled_logsumexp(x, y, 2.0, tile_size=2)
    logits = 2.0 * x @ y.T
    torch.testing.assert_close(rows, logits.logsumexp(1))
    torch.testing.assert_close(cols, logits.logsumexp(0))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"tile_size": 0}, "tile_size must be a positive integer or None"),
        ({"tile_size": 2.5}, "tile_size must be a positive integer or None"),
        ({"rows": False, "cols": False}, "must not both be False"),
        ({"row_targets": torch.arange(3)}, "row_targets must have shape (5,)"),
        ({"col_targets": torch.arange(4), "cols": False}, "col_targets must have shape (4,)"),
    ],
)
def test_bad_arguments(kwargs, needle):
    x, y, _, _ = leaves(5, 4, 3)
    with pytest.raises(ValueError) as err:
        tiled_logsumexp(x, y, 1.0, **kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize("tile", [1, 3, 8])
@pytest.mark.parametrize("targets", ["none", "diagonal", "rectangular"])
def test_normalizing_inside_the_walk_matches_f_normalize_first(small_blocks, tile, targets):
    # Raw rows of different norms, one of them zero and one of norm below 1e-12 (both divided
    # by 1e-12, as F.normalize does): values and the gradients w.r.t. the raw rows, the scale
    # and the bias.
    n, m = (8, 8) if targets != "rectangular" else (6, 9)
    x, y, scale, bias = leaves(n, m, 4, seed=40 + tile, spread=3.0)
    with torch.no_grad():
        x[2] = 0.0
        y[3] *= 1e-13
        y[1] *= 1e-3
    chosen = {"none": None, "diagonal": (torch.arange(n), torch.arange(m)),
              "rectangular": ((torch.arange(n) + 2) % m, torch.arange(m) % n)}[targets]
    weights = torch.linspace(-1.0, 2.0, n, dtype=F64), torch.linspace(0.5, 1.5, m, dtype=F64)
    check_lse_against_reference(x, y, scale, bias, tile, chosen, weights, normalize=True)


@pytest.mark.parametrize(("rows", "cols"), [(True, False), (False, True)])
def test_normalizing_one_direction(rows, cols):
    x, y, scale, bias = leaves(5, 7, 3, seed=3, spread=2.0)
    got_r, got_c = tiled_logsumexp(x, y, scale, bias, rows=rows, cols=cols, tile_size=2,
                                   normalize=True)
    logits = loop_logits(F.normalize(x, dim=1), F.normalize(y, dim=1), scale, bias)
    got, ref = (got_r, logits.logsumexp(1)) if rows else (got_c, logits.logsumexp(0))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
    w = torch.linspace(-1.0, 1.0, ref.shape[0], dtype=F64)
    assert_same_gradients((w * got).sum(), (w * ref).sum(), [x, y, scale, bias])


def test_normalizing_with_an_overflowing_shift_in_float32():
    # Unit rows at scale 150: row 0's positive is -150 and another logit about +111, so its
    # exponentials overflow the positive-logit shift and the row is recomputed exactly.
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], requires_grad=True)
    y = torch.tensor([[-0.5, 0.0], [0.0, 1.0], [1.0, 0.9]], requires_grad=True)
    t = torch.arange(3)
    got_r, got_c = tiled_logsumexp(x, y, 150.0, row_targets=t, col_targets=t, tile_size=2,
                                   normalize=True)
    x64, y64 = (v.detach().double().requires_grad_() for v in (x, y))
    logits = 150.0 * F.normalize(x64, dim=1) @ F.normalize(y64, dim=1).T
    check_float32_against_float64((got_r, got_c), logits, t, (x, y), (x64, y64), grad_atol=1e-5)


def check_float32_against_float64(got, logits64, targets, leaves32, leaves64, grad_atol):
    """Float32 cross-entropies ``got`` (rows, columns) against those of the float64 ``logits64``
    (rtol 1e-5), and the gradients of their sums w.r.t. the float32 and float64 leaves."""
    ref = (F.cross_entropy(logits64, targets, reduction="none"),
           F.cross_entropy(logits64.T, targets, reduction="none"))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4)
    (got[0].sum() + got[1].sum()).backward()
    (ref[0].sum() + ref[1].sum()).backward()
    for a, b in zip(leaves32, leaves64, strict=True):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=grad_atol)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 2-3 columns on the CPU, so every tile is walked in several column blocks (and
    the backward's weights in strips of one row)."""
    import modalign.losses.tiled as tiled

    monkeypatch.setattr(tiled, "BLOCK_ELEMENTS", 6)
    monkeypatch.setattr(tiled, "MIN_BLOCK_COLUMNS", 1)
    monkeypatch.setattr(tiled, "WEIGHT_STRIP_ELEMENTS", 2)
    return tiled


@pytest.mark.parametrize("tile", [1, 2, 3, 5])
def test_column_blocks_match_the_reference_with_and_without_targets(small_blocks, tile):
    assert small_blocks.block_width(tile, 9, torch.device("cpu")) < 9
    x, y, scale, bias = leaves(7, 9, 4, seed=30 + tile)
    g = torch.Generator().manual_seed(tile)
    rt = torch.randint(0, 9, (7,), generator=g)  # repeated and missing targets
    ct = torch.randint(0, 7, (9,), generator=g)
    wr, wc = torch.linspace(-1.0, 2.0, 7, dtype=F64), torch.linspace(0.5, 1.5, 9, dtype=F64)
    for targets in (False, True):
        check_lse_against_reference(x, y, scale, bias, tile, (rt, ct) if targets else None,
                                    (wr, wc))


@pytest.mark.parametrize("blocks", [False, True])
def test_exponent_floor_at_a_large_scale_keeps_float32_exact(request, blocks):
    # Scale 100 on unit vectors: exp(S - shift) reaches exp(-200), far below float32's smallest
    # normal number; the floored exponentials must give the float64 values and gradients.
    if blocks:
        request.getfixturevalue("small_blocks")
    from modalign.losses.tiled import _exp_floor

    g = torch.Generator().manual_seed(5)
    x64 = F.normalize(torch.randn(12, 6, generator=g, dtype=F64), dim=1)
    y64 = F.normalize(-x64 + 0.3 * torch.randn(12, 6, generator=g, dtype=F64), dim=1)
    t = torch.arange(12)
    x32, y32 = x64.float().requires_grad_(), y64.float().requires_grad_()
    x64, y64 = x32.detach().double().requires_grad_(), y32.detach().double().requires_grad_()
    scale = torch.tensor(100.0)
    assert _exp_floor(x32.detach(), y32.detach(), scale) is not None  # the clamp path runs
    assert _exp_floor(x32.detach(), y32.detach(), torch.tensor(10.0)) is None
    got = tiled_logsumexp(x32, y32, scale, row_targets=t, col_targets=t, tile_size=5)
    check_float32_against_float64(got, 100.0 * x64 @ y64.T, t, (x32, y32), (x64, y64),
                                  grad_atol=1e-4)


def _count_shared_blocks(monkeypatch, tiled, mode="all"):
    """Count the blocks that take one exponential. ``mode="mixed"`` sends every other block to
    the two-exponential path instead (both paths then meet in one call), ``"none"`` all."""
    counts = {"shared": 0, "two": 0}
    original = tiled._SharedExp.shift

    def shift(self, ti, bj):
        plan = original(self, ti, bj)
        if mode == "none" or (mode == "mixed" and (ti + bj) % 2):
            plan = None
        counts["shared" if plan is not None else "two"] += 1
        return plan

    monkeypatch.setattr(tiled._SharedExp, "shift", shift)
    return counts


@pytest.mark.parametrize("mode", ["all", "mixed", "none"])
@pytest.mark.parametrize("targets", [False, True])
def test_shared_and_two_exponential_blocks_agree_with_the_reference(small_blocks, monkeypatch,
                                                                   mode, targets):
    counts = _count_shared_blocks(monkeypatch, small_blocks, mode)
    x, y, scale, bias = leaves(7, 9, 4, seed=40)
    g = torch.Generator().manual_seed(41)
    rt, ct = torch.randint(0, 9, (7,), generator=g), torch.randint(0, 7, (9,), generator=g)
    wr, wc = torch.linspace(-1.0, 2.0, 7, dtype=F64), torch.linspace(-0.5, 1.5, 9, dtype=F64)
    check_lse_against_reference(x, y, scale, bias, 3, (rt, ct) if targets else None, (wr, wc))
    # Blocks of 3 rows x 2 columns: 3 tiles x 5 blocks per pass; the forward asks only with
    # targets, the backward (both directions) always.
    assert counts["shared"] + counts["two"] == (30 if targets else 15)
    if mode == "all":
        assert counts["two"] == 0
    elif mode == "mixed":
        assert counts["shared"] > 0 and counts["two"] > 0
    else:
        assert counts["shared"] == 0


@pytest.mark.parametrize("scale_value", [10.0, 100.0])
def test_one_exponential_in_float32_matches_float64(monkeypatch, scale_value):
    # Unit vectors with positives at cosine ~0.7. At scale 10 the block shift is 0 (no
    # subtraction, no clamp); at scale 100 (logits up to 100 > log(max / N) in float32) it is
    # not, and exponents below the floor are clamped.
    import modalign.losses.tiled as tiled

    g = torch.Generator().manual_seed(7)
    x64 = F.normalize(torch.randn(40, 16, generator=g, dtype=F64), dim=1)
    y64 = F.normalize(x64 + 0.7 * torch.randn(40, 16, generator=g, dtype=F64), dim=1)
    x32, y32 = x64.float().requires_grad_(), y64.float().requires_grad_()
    x64, y64 = x32.detach().double().requires_grad_(), y32.detach().double().requires_grad_()
    t = torch.arange(40)
    plan = tiled._SharedExp(torch.full((40,), 30.0), torch.full((40,), 30.0), 8, 40,
                            bound=scale_value, shifts_bound=False)
    sigma, floor = plan.shift(0, 0)
    assert (sigma == 0.0 and floor is None) if scale_value == 10.0 else (
        sigma != 0.0 and floor is not None)
    counts = _count_shared_blocks(monkeypatch, tiled)
    r32, c32 = tiled_logsumexp(x32, y32, scale_value, row_targets=t, col_targets=t, tile_size=8)
    logits = scale_value * x64 @ y64.T
    r64 = F.cross_entropy(logits, t, reduction="none")
    c64 = F.cross_entropy(logits.T, t, reduction="none")
    torch.testing.assert_close(r32.double(), r64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c32.double(), c64, rtol=1e-5, atol=1e-5)
    (r32.mean() + c32.mean()).backward()
    (r64.mean() + c64.mean()).backward()
    for got, ref in ((x32.grad, x64.grad), (y32.grad, y64.grad)):  # float32 logits: ~1e-5
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=2e-5 * ref.abs().max())
    assert counts["two"] == 0 and counts["shared"] == 2 * 5  # 5 tiles, forward and backward


def test_shared_block_shift_refuses_what_it_cannot_represent():
    from modalign.losses.tiled import _SharedExp

    a = torch.tensor([30.0, -60.0])  # a positive logit far below the block's largest logit
    plan = _SharedExp(a, torch.tensor([30.0, 20.0]), 2, 2, bound=100.0, shifts_bound=False)
    assert plan.shift(0, 0) is None  # float32: 100 - (-60 + 61.x) > log(max / 2)
    assert _SharedExp(a.double(), torch.tensor([30.0, 20.0], dtype=F64), 2, 2, bound=100.0,
                      shifts_bound=False).shift(0, 0) == (0.0, None)
    nan = _SharedExp(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0]), 2, 2,
                     bound=1.0, shifts_bound=False)
    assert nan.shift(0, 0) is None


@pytest.mark.parametrize("tile", [1, 3, 4])
def test_softplus_sum_in_column_blocks(small_blocks, tile):
    check_softplus_sum(7, 9, tile, seed=50 + tile)


def test_exact_recompute_in_chunks_equals_one_piece():
    from modalign.losses.tiled import _exact_lse

    x, y, _, _ = leaves(6, 5, 3, seed=60)
    x, y, s = x.detach(), y.detach(), torch.tensor(2.0, dtype=F64)
    which_r, which_c = torch.tensor([0, 2, 3, 5]), torch.tensor([1, 4, 2])
    full = s * x @ y.T
    for budget in (1, 7, 10**6):
        torch.testing.assert_close(_exact_lse(x, y, s, which_r, 1, budget),
                                   full[which_r].logsumexp(1))
        torch.testing.assert_close(_exact_lse(x, y, s, which_c, 0, budget),
                                   full[:, which_c].logsumexp(0))
