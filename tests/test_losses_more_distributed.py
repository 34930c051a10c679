"""CWCL, GRAM, MV-InfoNCE, MV-DHEL, Mod-X, m²-Mix, 1-to-K and SLAP on real gloo processes.

Each case runs on 2 and on 3 forked processes with unequal per-rank batches (SLAP, which has no
cross-sample term, on equal ones) and is compared with one process on the concatenated batch:
the loss, the gradient of every input on every rank and the gradient of the logit scale.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor, nn

from modalign.distributed import check_distributed_cases
from modalign.distributed.check import DistributedCase
from modalign.losses import LossOutput, build_loss

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


class BlockOneToK(nn.Module):
    """1-to-K with K candidates per anchor packed in one (B, K * d) tensor, so every input of a
    rank has the same number of rows (what the process check expects)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.inner = build_loss("one_to_k", modalities=["image", "caption"])

    def forward(self, embeddings: Mapping[str, Tensor], **_: object) -> LossOutput:
        image, packed = embeddings["image"], embeddings["captions"]
        captions = packed.reshape(packed.shape[0] * self.k, -1)
        groups = torch.arange(image.shape[0]).repeat_interleave(self.k)
        return self.inner({"image": image, "caption": captions}, anchor_rows=groups)


def shards(keys, sizes, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(n, dim, generator=g, dtype=torch.float64) for k in keys} for n in sizes]


def cases(sizes):
    pair = ["image", "text"]
    views = ["v0", "v1", "v2"]
    packed = [
        {
            "image": s["image"],
            "captions": torch.cat([s["image"], 2 * s["image"]], 1)
            + 0.3
            * torch.randn(
                s["image"].shape[0],
                8,
                dtype=torch.float64,
                generator=torch.Generator().manual_seed(7),
            ),
        }
        for s in shards(["image"], sizes, seed=5)
    ]
    return [
        DistributedCase(
            functools.partial(build_loss, "cwcl", modalities=pair),
            shards(pair, sizes, seed=1),
            name="cwcl",
        ),
        DistributedCase(
            functools.partial(build_loss, "gram", modalities=["t", "v", "a"]),
            shards(["t", "v", "a"], sizes, seed=2),
            name="gram",
        ),
        DistributedCase(
            functools.partial(
                build_loss, "mv_infonce", modalities=views, learnable_temperature=True
            ),
            shards(views, sizes, seed=3),
            name="mv_infonce",
        ),
        DistributedCase(
            functools.partial(
                build_loss, "mv_infonce", modalities=views, same_view_negatives=False
            ),
            shards(views, sizes, seed=3),
            name="mv_infonce-paper",
        ),
        DistributedCase(
            functools.partial(
                build_loss, "mv_dhel", modalities=views, learnable_temperature=True
            ),
            shards(views, sizes, seed=4),
            name="mv_dhel",
        ),
        DistributedCase(
            functools.partial(build_loss, "mv_dhel", modalities=views[:2], include_self=True),
            shards(views[:2], sizes, seed=4),
            name="mv_dhel-paper",
        ),
        DistributedCase(
            functools.partial(build_loss, "modx", modalities=pair),
            shards([*pair, "image_old", "text_old"], sizes, seed=6),
            name="modx",
        ),
        DistributedCase(
            functools.partial(build_loss, "m2mix", modalities=pair, learnable_temperature=True),
            shards(pair, sizes, seed=8),
            name="m2mix",
        ),
        DistributedCase(functools.partial(BlockOneToK, 2), packed, name="one_to_k"),
        DistributedCase(
            functools.partial(build_loss, "slap", modalities=pair),
            shards([*pair, "image_target", "text_target"], [3] * len(sizes), seed=9),
            name="slap",
        ),
    ]


@pytest.mark.parametrize("sizes", [(3, 5), (2, 4, 3)])
def test_every_supported_objective_matches_one_process(sizes):
    reports = check_distributed_cases(cases(sizes), start_method="fork", timeout=120)
    assert len(reports) == 10
    for report in reports:
        assert report.passed, report.summary()
        assert report.world_size == len(sizes)
        # The check compared real gradients, not only the loss.
        assert any(k.startswith("input:") for k in report.errors)
