"""Gather with gradients and the N-rank == 1-rank check, on real gloo processes."""

from __future__ import annotations

import functools

import pytest
import torch

from modalign.distributed import (
    GatherGrad,
    all_sizes,
    gather_with_grad,
    get_rank,
    get_world_size,
    parse_gather,
)
from modalign.distributed.check import (
    DistributedCase,
    DistributedMismatchError,
    check_distributed,
    check_distributed_cases,
)
from modalign.losses import build_loss

torch.set_num_threads(1)
F64 = torch.float64


def test_single_process_defaults():
    assert get_world_size() == 1 and get_rank() == 0
    assert all_sizes(7) == [7]
    x = torch.randn(4, 3, requires_grad=True)
    g = gather_with_grad(x, GatherGrad.GLOBAL)
    assert g.tensor is x and (g.offset, g.total, g.world_size) == (0, 4, 1)
    assert not gather_with_grad(x, GatherGrad.NONE).tensor.requires_grad
    assert gather_with_grad(x, GatherGrad.LOCAL).tensor.requires_grad


def test_parse_gather():
    assert parse_gather("GLOBAL") is GatherGrad.GLOBAL
    assert parse_gather("local") is GatherGrad.LOCAL
    assert parse_gather(None) is None
    with pytest.raises(ValueError, match="gather must be one of"):
        parse_gather("sum")
    with pytest.raises(ValueError, match="mode must be a GatherGrad"):
        gather_with_grad(torch.ones(2, 2), "global")  # type: ignore[arg-type]


def _shards(sizes, seed, d=5):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(n, d, generator=g, dtype=F64),
            "text": torch.randn(n, d, generator=g, dtype=F64),
        }
        for n in sizes
    ]


def _groups(sizes):
    # Ids shared within and across ranks, so positives straddle rank boundaries.
    ids = torch.arange(sum(sizes)) // 2
    ids[-1] = ids[0]
    return list(torch.split(ids, list(sizes)))


DISTRIBUTED_LOSSES = [
    ("clip", {"impl": "full"}, True),
    ("clip", {"impl": "tiled", "tile_size": 2}, True),
    ("clip", {"impl": "tiled", "tile_size": 3, "init_logit_bias": 0.5}, False),
    ("siglip", {"impl": "full"}, True),
    ("siglip", {"impl": "tiled", "tile_size": 2}, True),
    ("uniformity", {}, False),
    ("alignment", {}, False),
    ("cross_uniformity", {}, True),
    ("cua", {}, False),
    ("cuaxu", {"learnable_temperature": True}, True),
    ("intra", {"impl": "tiled", "tile_size": 4}, False),
    ("pairwise", {"base_loss": "clip"}, False),
]


def _cases(sizes):
    cases = []
    for k, (name, params, with_groups) in enumerate(DISTRIBUTED_LOSSES):
        factory = functools.partial(build_loss, name, modalities=["image", "text"], **params)
        label = f"{name}{params}"
        cases.append(DistributedCase(factory, _shards(sizes, k), name=label))
        if with_groups:
            cases.append(
                DistributedCase(
                    factory, _shards(sizes, 100 + k), _groups(sizes), name=label + "+groups"
                )
            )
    # A negative control: without the cross-rank gradient the check must fail.
    local = functools.partial(build_loss, "clip", modalities=["image", "text"], gather="local")
    cases.append(DistributedCase(local, _shards(sizes, 999), name="clip-local-control"))
    return cases


@pytest.mark.distributed
@pytest.mark.parametrize("sizes", [(3, 5), (3, 5, 4)], ids=["2-ranks", "3-ranks"])
def test_every_distributed_loss_matches_single_process(sizes):
    reports = check_distributed_cases(_cases(sizes), raise_on_mismatch=False, start_method="fork")
    *checked, control = reports
    for report in checked:
        assert report.passed, report.summary()
        assert report.rank_sizes == sizes
        assert any(k.startswith("input:image@rank") for k in report.errors)
    # LOCAL leaves the loss value right but drops the gradient that crosses ranks.
    assert not control.passed
    assert "loss" not in control.failures
    assert any(k.startswith("input:") for k in control.failures)
    with pytest.raises(DistributedMismatchError, match="clip-local-control"):
        raise DistributedMismatchError(control)


@pytest.mark.distributed
def test_check_distributed_single_case_api_and_param_gradients():
    factory = functools.partial(build_loss, "siglip", modalities=["image", "text"])
    report = check_distributed(factory, _shards((2, 4), seed=7), start_method="fork")
    assert report.passed and report.world_size == 2
    assert {"param:log_logit_scale", "param:logit_bias"} <= set(report.errors)
    assert sum(report.loss_ranks) / 2 == pytest.approx(report.loss_single, rel=1e-12)


def test_check_distributed_rejects_bad_cases():
    factory = functools.partial(build_loss, "clip", modalities=["image", "text"])
    with pytest.raises(ValueError, match="one mapping per rank"):
        check_distributed(factory, _shards((3,), seed=0))
    bad = _shards((2, 2), seed=0)
    bad[1] = {"image": bad[1]["image"]}
    with pytest.raises(ValueError, match=r"inputs_per_rank\[1\] has keys"):
        check_distributed(factory, bad)
    with pytest.raises(ValueError, match="groups_per_rank must hold one tensor per rank"):
        check_distributed(factory, _shards((2, 2), 0), groups_per_rank=[torch.tensor([0, 1])])
