"""Post-hoc bridges against loop-style references (float64), plus their defining properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modalign.bridge.posthoc import (
    BridgeChain,
    Centering,
    CloseNoise,
    InvGC,
    MeanShift,
    build_bridge,
    build_chain,
    close_noise,
    inverse_graph_convolution,
    local_inverse_graph_convolution,
)


def unit(n, d, seed, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64) + shift, dim=1)


# ----------------------------------------------------------- loop-style references (InvGC paper)


def reference_full(test, train, r, normalize=True):
    S = test @ train.T
    mean = S.sum() / (S.shape[0] * S.shape[1])
    out = test - (S - mean) @ train / S.shape[1] * r
    return F.normalize(out, dim=1) if normalize else out


def reference_local(test, train, r, k, normalize=True):
    S = test @ train.T
    adjacency = torch.zeros_like(S)
    top = torch.topk(S, k, dim=1)
    for i in range(len(test)):  # the original per-row assignment
        for j, v in zip(top.indices[i].tolist(), top.values[i].tolist()):
            adjacency[i, j] = v
    out = test - adjacency @ train / k * r
    return F.normalize(out, dim=1) if normalize else out


def reference_invgc(test_gallery, train_gallery, train_query, r_g, r_q, local, pool_rate):
    if local:
        m_g = reference_local(test_gallery, train_gallery, r_g, int(pool_rate * len(train_gallery)))
        m_q = reference_local(test_gallery, train_query, r_q, int(pool_rate * len(train_query)))
    else:
        m_g = reference_full(test_gallery, train_gallery, r_g)
        m_q = reference_full(test_gallery, train_query, r_q)
    return F.normalize(0.5 * m_g + 0.5 * m_q, dim=1)


# ----------------------------------------------------------- InvGC


@pytest.mark.parametrize("normalize", [True, False])
def test_full_invgc_equals_reference(normalize):
    test, train = unit(17, 6, 0, 0.3), unit(40, 6, 1, 0.3)
    for r in (0.0, 0.3, 2.0):
        assert torch.allclose(inverse_graph_convolution(test, train, r, normalize=normalize),
                              reference_full(test, train, r, normalize), atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 50, 10**6])
def test_local_invgc_equals_loop_reference(chunk_size):
    test, train = unit(13, 5, 2), unit(50, 5, 3)
    for k in (1, 4, 50):
        got = local_inverse_graph_convolution(test, train, 0.7, k, chunk_size=chunk_size)
        assert torch.allclose(got, reference_local(test, train, 0.7, k), atol=1e-12)


def test_local_with_whole_bank_equals_full_without_centring():
    test, train = unit(9, 5, 4), unit(30, 5, 5)
    uncentred = F.normalize(test - 0.4 / 30 * (test @ train.T) @ train, dim=1)
    assert torch.allclose(local_inverse_graph_convolution(test, train, 0.4, 30), uncentred,
                          atol=1e-12)


@pytest.mark.parametrize("local", [False, True])
def test_invgc_bridge_equals_reference_and_leaves_queries(local):
    bank = {"image": unit(200, 6, 6, 0.5), "text": unit(300, 6, 7, -0.5)}
    test = {"image": unit(25, 6, 8, 0.5), "text": unit(25, 6, 9, -0.5)}
    bridge = InvGC("image", "text", r_gallery=0.4, r_query=0.2, local_adj=local, pool_rate=0.05)
    out = bridge.fit(bank).transform(test)
    ref = reference_invgc(test["image"], bank["image"], bank["text"], 0.4, 0.2, local, 0.05)
    assert torch.allclose(out["image"], ref, atol=1e-12)
    assert out["text"] is test["text"]
    # Views of the gallery modality are transformed with the modality's banks.
    viewed = bridge.transform({"image:noto": test["image"]})["image:noto"]
    assert torch.allclose(viewed, ref, atol=1e-12)


def test_zero_rate_is_identity_up_to_normalisation():
    bank = {"image": unit(50, 4, 1), "text": unit(50, 4, 2)}
    x = unit(10, 4, 3)
    for local in (False, True):
        out = InvGC(r_gallery=0.0, r_query=0.0, local_adj=local).fit(bank).transform({"image": x})
        assert torch.allclose(out["image"], x, atol=1e-12)


def test_localadj_lowers_similarity_to_its_neighbours():
    test, train = unit(40, 8, 10), unit(400, 8, 11)
    k = 8
    before = torch.topk(test @ train.T, k, dim=1)
    after = local_inverse_graph_convolution(test, train, 0.5, k)
    sims_after = (after @ train.T).gather(1, before.indices)
    assert float(sims_after.mean()) < float(before.values.mean())


# ----------------------------------------------------------- centering and mean shift


def test_centering_removes_the_gap_vector():
    bank = {"image": unit(300, 6, 0, 1.0), "text": unit(300, 6, 1, -1.0)}
    c = Centering(renormalize=False).fit(bank)
    out = c.transform(bank)
    for key in bank:
        assert torch.allclose(out[key].mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    gap_before = (bank["image"].mean(0) - bank["text"].mean(0)).norm()
    renorm = Centering().fit(bank).transform(bank)
    gap_after = (renorm["image"].mean(0) - renorm["text"].mean(0)).norm()
    assert float(gap_after) < 0.5 * float(gap_before)
    assert torch.allclose(renorm["text"].norm(dim=1), torch.ones(300, dtype=torch.float64))
    for i in range(3):  # explicit per-row reference
        assert torch.allclose(out["text"][i], bank["text"][i] - bank["text"].mean(0))


def test_centering_of_unknown_key_names_it():
    c = Centering().fit({"image": unit(5, 3, 0)})
    with pytest.raises(ValueError, match="audio"):
        c.transform({"audio": unit(5, 3, 1)})


def test_mean_shift_moves_the_centroid_by_the_gap():
    bank = {"text": unit(100, 5, 2, -1.0), "image": unit(100, 5, 3, 1.0)}
    shift = MeanShift("text", "image", scale=0.5, renormalize=False).fit(bank)
    out = shift.transform(bank)
    expected = bank["text"].mean(0) + 0.5 * (bank["image"].mean(0) - bank["text"].mean(0))
    assert torch.allclose(out["text"].mean(0), expected, atol=1e-12)
    assert out["image"] is bank["image"]


# ----------------------------------------------------------- CLOSE noise


def test_close_noise_unit_norm_and_identity_in_eval():
    x = {"text": unit(64, 32, 0), "image": unit(64, 32, 1)}
    noise = CloseNoise(std=0.1, seed=123)  # not the seed that drew x: eps must not be parallel to x
    assert noise.transform(x) == x  # eval mode by default
    out = noise.train().transform(x)
    assert torch.allclose(out["text"].norm(dim=1), torch.ones(64, dtype=torch.float64))
    assert out["image"] is x["image"]
    assert not torch.allclose(out["text"], x["text"])


def test_close_noise_expected_cosine():
    d, std = 256, 0.08
    x = unit(4000, d, 2).float()
    cos = (close_noise(x, std, generator=torch.Generator().manual_seed(1)) * x).sum(1)
    assert float(cos.mean()) == pytest.approx(1 / math.sqrt(1 + d * std**2), abs=0.01)


def test_close_noise_gradient_matches_reference():
    x = unit(5, 4, 3).requires_grad_(True)
    eps = torch.randn(5, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = close_noise(x, 0.2, generator=torch.Generator().manual_seed(4))
    ref = (x + 0.2 * eps) / (x + 0.2 * eps).norm(dim=1, keepdim=True)
    assert torch.allclose(y, ref, atol=1e-12)
    w = torch.randn(5, 4, dtype=torch.float64)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    assert torch.allclose(g, g_ref, atol=1e-12)


def test_close_mean_shift_then_noise():
    bank = {"text": unit(200, 6, 5, -1.0), "image": unit(200, 6, 6, 1.0)}
    zero_noise = CloseNoise(std=0.0, shift_target="image", seed=0).fit(bank).train()
    out = zero_noise.transform({"text": bank["text"]})["text"]
    gap = bank["image"].mean(0) - bank["text"].mean(0)
    assert torch.allclose(out, F.normalize(bank["text"] + gap, dim=1), atol=1e-12)


# ----------------------------------------------------------- chains and specs


def test_chain_fits_each_bridge_on_the_transformed_bank():
    bank = {"image": unit(120, 6, 0, 0.8), "text": unit(120, 6, 1, -0.8)}
    test = {"image": unit(20, 6, 2, 0.8), "text": unit(20, 6, 3, -0.8)}
    chain = build_chain(["centering", "localadj:r_gallery=0.3,pool_rate=0.05"],
                        gallery="image", query="text").fit(bank)
    centred_bank = Centering().fit(bank).transform(bank)
    step = Centering().fit(bank).transform(test)
    expected = InvGC("image", "text", r_gallery=0.3, local_adj=True, pool_rate=0.05).fit(
        centred_bank).transform(step)
    got = chain.transform(test)
    for key in test:
        assert torch.allclose(got[key], expected[key], atol=1e-12)
    assert [b["name"] for b in chain.identity()] == ["centering", "localadj"]
    assert isinstance(BridgeChain([]).fit(bank).transform(test)["text"], torch.Tensor)


def test_build_bridge_parses_and_rejects():
    b = build_bridge("close:std=0.12,seed=3,modalities=text")
    assert b.identity()["std"] == 0.12 and b.identity()["seed"] == 3
    assert build_bridge("invgc:query=audio", query="text").identity()["query"] == "audio"
    with pytest.raises(ValueError, match="expected one of"):
        build_bridge("whitening")
    with pytest.raises(ValueError, match="unknown or malformed"):
        build_bridge("invgc:rate=1")
    with pytest.raises(ValueError, match="unknown or malformed"):
        build_bridge("localadj:local_adj=false")
    with pytest.raises(ValueError, match="pool_rate"):
        build_bridge("localadj:pool_rate=0")
    with pytest.raises(ValueError, match="fit"):
        InvGC().transform({"image": unit(3, 2, 0)})
