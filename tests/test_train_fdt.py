"""Finite discrete tokens (FDT): sparsemax against naive float64 references (values and
gradients), the pooled code weights, and an [fdt] run from the config that learns, resumes
bitwise and refuses bad settings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from modalign.cli import main
from modalign.errors import ModalignError
from modalign.train.config import TrainConfig
from modalign.train.recipes.fdt import (
    FDTModel,
    FDTSettings,
    code_weights,
    evaluate_fdt,
    sparsemax,
    train_fdt,
)
from train_support import token_store


def sparsemax_loop(z: list[float]) -> list[float]:
    """Martins & Astudillo's algorithm, one row, plain Python: sort, find the support size."""
    zs = sorted(z, reverse=True)
    k, total = 0, 0.0
    for j, v in enumerate(zs, start=1):
        if 1 + j * v > total + v:
            k, total = j, total + v
        else:
            break
    tau = (total - 1) / k
    return [max(v - tau, 0.0) for v in z]


def simplex_projection(z: np.ndarray) -> np.ndarray:
    """argmin_p ||p - z||^2 over the simplex, by bisection on tau (a different algorithm)."""
    lo, hi = z.min() - 1, z.max()
    for _ in range(200):
        tau = (lo + hi) / 2
        lo, hi = (tau, hi) if np.maximum(z - tau, 0).sum() > 1 else (lo, tau)
    return np.maximum(z - (lo + hi) / 2, 0)


def test_sparsemax_matches_the_sort_loop_and_the_projection_in_float64():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 9, generator=g, dtype=torch.float64) * 2
    z[3] = torch.tensor([1.0, 1.0, 1.0, -5, -5, -5, -5, -5, -5], dtype=torch.float64)  # ties
    p = sparsemax(z)
    ref = torch.tensor([sparsemax_loop(row) for row in z.tolist()], dtype=torch.float64)
    assert torch.allclose(p, ref, atol=1e-12, rtol=0)
    for row, got in zip(z.numpy(), p.numpy(), strict=True):
        assert np.allclose(got, simplex_projection(row), atol=1e-9)
    assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(20, dtype=torch.float64))
    assert (p == 0).any()  # sparse: some codes get exactly zero weight
    # gradients: the closed-form backward against finite differences, and against autograd
    # through the naive formula max(z - tau(z), 0) with tau from the support
    zz = z[:6].clone().requires_grad_()
    assert torch.autograd.gradcheck(sparsemax, (zz,))
    w = torch.randn(6, 9, generator=g, dtype=torch.float64)
    (sparsemax(zz) * w).sum().backward()
    z2 = z[:6].clone().requires_grad_()
    support = (ref[:6] > 0).to(torch.float64)
    tau = ((z2 * support).sum(1, keepdim=True) - 1) / support.sum(1, keepdim=True)
    (torch.clamp(z2 - tau, min=0) * w).sum().backward()
    assert torch.allclose(zz.grad, z2.grad, atol=1e-12)
    with pytest.raises(ModalignError, match="finite"):
        sparsemax(torch.tensor([[0.0, math.inf]]))


def test_code_weights_pool_over_real_tokens_only():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True],
                         [True, False, False, False]])
    padded = scores.clone()
    padded[~mask] = 50.0  # a pad with a huge score must not win the max
    w = code_weights(padded, mask)
    ref = [sparsemax_loop(scores[i, mask[i]].max(0).values.tolist()) for i in range(3)]
    assert torch.allclose(w, torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    perm = torch.tensor([1, 0, 2, 3])  # token order does not matter
    assert torch.allclose(code_weights(padded[:, perm], mask[:, perm])[:2], w[:2], atol=1e-12)
    soft = code_weights(scores, torch.ones(3, 4, dtype=torch.bool), "softmax")
    assert torch.allclose(soft, torch.softmax(scores.max(1).values, -1))
    with pytest.raises(ModalignError, match="no tokens"):
        code_weights(scores, torch.zeros(3, 4, dtype=torch.bool))


def test_fdt_embedding_is_the_weighted_sum_of_codes():
    torch.manual_seed(0)
    m = FDTModel({"text": 4}, codes=12, dim=5, hidden_dim=8, temperature=1.0).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    z, w = m.embed("text", x, mask)
    q = m.queries["text"](x)
    s = (q @ m.codebook.T / math.sqrt(5)).max(1).values
    ref = torch.tensor([sparsemax_loop(r) for r in s.tolist()], dtype=torch.float64)
    assert torch.allclose(w, ref, atol=1e-10)
    f = ref @ m.codebook
    assert torch.allclose(z, f / f.norm(dim=1, keepdim=True), atol=1e-10)


def test_fdt_trains_from_the_config_and_resumes_bitwise(tmp_path):
    store = token_store(tmp_path / "store")
    base = ["--set", "fdt.enabled=true", "--set", f"data.embeddings='{store}'",
            "--set", "fdt.codes=32",
            "--set", "fdt.dim=16", "--set", "fdt.hidden_dim=32", "--set", "optim.lr=1e-2",
            "--set", "optim.warmup_steps=2", "--set", "train.batch_size=8"]
    assert main(["train", *base, "--set", "train.epochs=6",
                 "--set", f"run.dir='{tmp_path / 'full'}'"]) == 0
    untrained = FDTModel({"image": 10, "text": 7}, codes=32, dim=16, hidden_dim=32)
    keys = ["image", "text"]
    before = evaluate_fdt(untrained, store, keys, "test")["image-to-text_recall@1"]
    after = evaluate_fdt(tmp_path / "full" / "model", store, keys, "test")
    assert after["image-to-text_recall@1"] >= before + 0.25  # 8 test groups
    rows = [json.loads(r) for r in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4 * (i + 1) for i in range(6)]

    # stopped after 6 steps (mid-epoch checkpoint at step 6) and resumed: the same weights
    part = tmp_path / "part"
    settings = TrainConfig.from_dict({}, [a for a in base[1::2]] + [
        "train.epochs=6", f"run.dir='{part}'", "train.checkpoint_every=3",
        "train.max_steps=6"]).fdt_settings()
    train_fdt(settings)
    settings.max_steps = 0
    assert train_fdt(settings, resume=True)["steps"] == 24
    a = FDTModel.from_pretrained(tmp_path / "full" / "model").state_dict()
    b = FDTModel.from_pretrained(part / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (part / "log.jsonl").read_text() == (tmp_path / "full" / "log.jsonl").read_text()


def test_fdt_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ModalignError, match=r"fdt\.weighting"):
        TrainConfig.from_dict({}, ["fdt.enabled=true", "fdt.weighting='max'"])
    with pytest.raises(ModalignError, match="two or more"):
        TrainConfig.from_dict({}, ["fdt.enabled=true", "data.keys=['image']",
                                   "objectives=[{loss='uniformity', modalities=['image']}]"])
    with pytest.raises(ModalignError, match="cannot be combined"):
        TrainConfig.from_dict({}, ["fdt.enabled=true", "mcl.stages=2"])
    with pytest.raises(ModalignError, match=r"data\.embeddings"):
        train_fdt(FDTSettings(run_dir=str(tmp_path / "r")))
    with pytest.raises(ModalignError, match="not an FDT model"):
        FDTModel.from_pretrained(tmp_path)
