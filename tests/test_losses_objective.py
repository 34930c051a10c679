"""Objectives as data: weighted terms, part names, clamping, pairwise N-modal sums."""

from __future__ import annotations

import math

import pytest
import torch

from modalign.losses import LossTerm, Objective, PairwiseLoss, available_losses, build_objective
from modalign.losses.clip import ClipLoss, clip_loss
from modalign.losses.gap import alignment_loss, uniformity_loss
from modalign.losses.intra import IntraModalLoss

torch.set_num_threads(1)


def embeddings(n=6, d=4, keys=("image", "text", "audio", "image:openmoji"), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, d, generator=g, dtype=torch.float64) for k in keys}


def test_registry_lists_this_area_s_losses():
    names = set(available_losses())
    assert {
        "clip",
        "siglip",
        "uniformity",
        "alignment",
        "cross_uniformity",
        "cua",
        "cuaxu",
        "intra",
        "pairwise",
    } <= names


def test_objective_from_dicts_is_the_weighted_sum_with_named_parts():
    emb = embeddings()
    obj = build_objective(
        [
            {"loss": "clip", "modalities": ["image", "text"], "temperature": math.exp(-2.0)},
            {"loss": "uniformity", "modalities": ["image", "text"], "weight": 1.0},
            {"loss": "alignment", "modalities": ["image", "text"], "weight": 1.0},
            {"loss": "intra", "modalities": ["image", "image:openmoji"], "weight": 0.5},
        ]
    ).double()
    out = obj(emb)
    x, y, z = emb["image"], emb["text"], emb["image:openmoji"]
    clip = clip_loss(x, y, torch.tensor(2.0, dtype=torch.float64).exp()).loss
    unif = (uniformity_loss(x).loss + uniformity_loss(y).loss) / 2
    intra = clip_loss(x, z, math.exp(math.log(1 / 0.07))).loss
    expected = clip + unif + alignment_loss(x, y).loss + 0.5 * intra
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    assert set(out.parts) >= {
        "clip[image,text]",
        "clip[image,text]/image-to-text",
        "uniformity[image,text]",
        "uniformity[image,text]/image",
        "alignment[image,text]",
        "intra[image,image:openmoji]",
    }
    torch.testing.assert_close(out.parts["clip[image,text]"], clip, rtol=1e-6, atol=0)
    assert set(out.detached()) >= {"loss", "clip[image,text]"}


def test_objective_accepts_loss_terms_and_modules_and_clamps_every_scale():
    clip = ClipLoss(["image", "text"])
    obj = Objective(
        [
            LossTerm(clip, ("image", "text"), weight=2.0, label="main"),
            LossTerm("intra", ("text", "audio")),
        ]
    )
    assert obj.labels == ["main", "intra[text,audio]"]
    with torch.no_grad():
        for p in obj.parameters():
            p.fill_(50.0)
    obj.clamp_()
    for p in obj.parameters():
        assert float(p.detach()) == pytest.approx(math.log(100), abs=1e-6)
    out = obj(embeddings(keys=("image", "text", "audio")))
    torch.testing.assert_close(out.loss, 2.0 * out.parts["main"] + out.parts["intra[text,audio]"])


def test_objective_forwards_groups():
    emb = embeddings(keys=("image", "text"))
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    obj = build_objective({"terms": [{"loss": "clip", "modalities": ["image", "text"]}]}).double()
    got = obj(emb, groups=groups).loss
    want = clip_loss(emb["image"], emb["text"], obj.terms[0].logit_scale(), groups=groups).loss
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("pairs", "anchor", "expected"),
    [
        ("all", None, [("image", "text"), ("image", "audio"), ("text", "audio")]),
        ("anchor", "text", [("text", "image"), ("text", "audio")]),
        ([["audio", "image"]], None, [("audio", "image")]),
    ],
)
def test_pairwise_pairs(pairs, anchor, expected):
    loss = PairwiseLoss(["image", "text", "audio"], pairs=pairs, anchor=anchor)
    assert loss.pairs == expected


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pairwise_weighted_sum_or_mean_equals_a_loop(reduction):
    emb = embeddings(keys=("image", "text", "audio"))
    weights = [1.0, 0.5, 2.0]
    loss = PairwiseLoss(
        ["image", "text", "audio"],
        base_loss="clip",
        weights=weights,
        reduction=reduction,
        learnable_temperature=False,
    ).double()
    out = loss(emb)
    terms = [clip_loss(emb[a], emb[b], 1 / 0.07).loss for a, b in loss.pairs]
    total = sum(w * t for w, t in zip(weights, terms, strict=True))
    if reduction == "mean":
        total = total / sum(weights)
    torch.testing.assert_close(out.loss, total, rtol=1e-6, atol=0)
    assert set(out.parts) >= {"image,text", "image,audio", "text,audio", "image,text/image-to-text"}


def test_pairwise_skip_missing_and_its_absence():
    emb = embeddings(keys=("image", "text"))
    strict = PairwiseLoss(["image", "text", "audio"])
    with pytest.raises(ValueError, match="missing modalities"):
        strict(emb)
    lenient = PairwiseLoss(["image", "text", "audio"], skip_missing=True)
    assert set(lenient(emb).parts) == {
        "image,text",
        "image,text/image-to-text",
        "image,text/text-to-image",
    }


def test_intra_is_symmetric_infonce_between_views():
    emb = embeddings(keys=("image", "image:openmoji"))
    out = IntraModalLoss(["image", "image:openmoji"], learnable_temperature=False)(emb)
    ref = clip_loss(emb["image"], emb["image:openmoji"], 1 / 0.07).loss
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ([], "non-empty list"),
        ([{"loss": "clip"}], "needs 'loss' and 'modalities'"),
        ([{"loss": "nope", "modalities": ["a", "b"]}], "loss='nope' is unknown"),
        ([{"loss": "clip", "modalities": ["a", "a"]}], "must be distinct"),
        ([{"loss": "clip", "modalities": ["a", "b"], "weight": float("nan")}], "must be finite"),
        ([{"loss": "clip", "modalities": ["a", "b"]}] * 2, "two terms are labelled"),
        ({"objective": []}, "mapping with 'terms'"),
    ],
)
def test_bad_specs(spec, needle):
    with pytest.raises(ValueError, match=needle):
        build_objective(spec)


def test_pairwise_bad_config():
    with pytest.raises(ValueError, match="weights must hold 3"):
        PairwiseLoss(["a", "b", "c"], weights=[1.0])
    with pytest.raises(ValueError, match="anchor must be one of"):
        PairwiseLoss(["a", "b"], pairs="anchor", anchor="z")
    with pytest.raises(ValueError, match="uses a modality not in"):
        PairwiseLoss(["a", "b"], pairs=[["a", "z"]])
    with pytest.raises(ValueError, match="reduction must be"):
        PairwiseLoss(["a", "b"], reduction="max")
