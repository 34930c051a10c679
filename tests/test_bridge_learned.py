"""Learned bridges: planted maps recovered, naive references, files, eval chaining, the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modalign.bridge.learned import (
    LearnedBridge,
    bridge_report,
    group_pairs,
    least_squares,
    procrustes,
)
from modalign.bridge.posthoc import build_chain
from modalign.cli import main
from modalign.errors import ModalignError
from modalign.evaluate.retrieval import toy_embeddings
from modalign.geometry.gap import modality_gap
from test_eval_cli import make_store

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks: one thread is faster


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]


def test_procrustes_recovers_planted_rotation_and_is_optimal() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    q = _orthogonal(6, 1)
    w = procrustes(x, x @ q)
    assert torch.allclose(w, q, atol=1e-10)
    assert torch.allclose(w.T @ w, torch.eye(6, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(procrustes(x, x), torch.eye(6, dtype=torch.float64), atol=1e-10)
    # optimality against random orthogonal matrices, on noisy targets
    y = x @ q + 0.3 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    best = (x @ procrustes(x, y) - y).norm()
    for s in range(20):
        assert best <= (x @ _orthogonal(6, 100 + s) - y).norm() + 1e-12
    reflect = torch.diag(torch.tensor([1.0] * 5 + [-1.0], dtype=torch.float64))
    rot = procrustes(x, x @ reflect, rotation=True)
    assert float(torch.linalg.det(rot)) == pytest.approx(1.0)


def test_least_squares_matches_normal_equations_loop() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(25, 4, generator=g, dtype=torch.float64)
    y = torch.randn(25, 3, generator=g, dtype=torch.float64)
    ridge = 0.5
    w = least_squares(x, y, ridge=ridge)
    # naive: gradient of |xW - y|^2 + ridge |W|^2 vanishes at the solution
    grad = 2 * x.T @ (x @ w - y) + 2 * ridge * w
    assert float(grad.abs().max()) < 1e-9
    with pytest.raises(ModalignError, match="ridge"):
        least_squares(x, y, ridge=-1.0)


@pytest.mark.parametrize("kind", ["procrustes", "lstsq", "mlp"])
def test_bridges_close_a_planted_gap(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(200, 8, generator=g), dim=1)
    y = F.normalize(x @ _orthogonal(8, 4).float() + 0.8, dim=1)  # rotated and shifted
    b = LearnedBridge(kind, "text", "image", steps=150, lr=1e-2, hidden=32).fit_pairs(x, y)
    out = b.transform({"text": x, "image": y, "text:name": x})
    assert torch.equal(out["image"], y)
    assert torch.allclose(out["text"].norm(dim=1), torch.ones(200), atol=1e-5)
    before, cos = float((x * y).sum(1).mean()), float((out["text"] * y).sum(1).mean())
    # measured: procrustes 0.90 (the renormalised shift is not orthogonal), lstsq/mlp higher
    assert cos > 0.85 and cos > before + 0.3, (before, cos)
    assert torch.equal(out["text:name"], out["text"])


def test_uncentred_procrustes_keeps_intra_modal_inner_products() -> None:
    g = torch.Generator().manual_seed(5)
    x = F.normalize(torch.randn(30, 5, generator=g), dim=1)
    y = F.normalize(torch.randn(30, 5, generator=g), dim=1)
    b = LearnedBridge("procrustes", "text", "image", center=False).fit_pairs(x, y)
    m = b.map(x)
    assert torch.allclose(m @ m.T, x @ x.T, atol=1e-5)


def test_save_load_and_chain_in_eval(tmp_path) -> None:
    emb = toy_embeddings()
    x, y = group_pairs(emb["text"], emb["image"])
    b = LearnedBridge("lstsq", "text", "image").fit_pairs(x, y)
    path = b.save(tmp_path)
    assert path.name == f"{b.bridge_id()}.json"
    chain = build_chain(["centering", f"learned:path={path.with_suffix('')}"])
    bank = {k: torch.from_numpy(np.asarray(v.vectors)) for k, v in emb.items()}
    chain.fit(bank)
    assert chain.identity()[1]["kind"] == "lstsq"
    loaded = LearnedBridge.load(path)
    assert torch.equal(loaded.map(x), b.map(x))
    with pytest.raises(ModalignError, match="expected"):
        build_chain(["learned:path=" + str(tmp_path / "missing")])


def test_group_pairs_against_loop() -> None:
    emb = toy_embeddings()
    _x, y = group_pairs(emb["text"], emb["image"])
    img = F.normalize(torch.from_numpy(np.asarray(emb["image"].vectors)), dim=1)
    groups = emb["image"].group_ids()
    for i, gid in enumerate(emb["text"].group_ids()):
        want = F.normalize(img[torch.from_numpy(groups == gid)].sum(0), dim=0)
        assert torch.allclose(y[i], want, atol=1e-6)


def test_report_and_fit_bridge_command(tmp_path, capsys) -> None:
    store = make_store(tmp_path / "store")
    out = tmp_path / "bridges"
    assert main(["fit-bridge", "--embeddings", str(store.path), "--kind", "procrustes",
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    emb = {m: store.load(m, split="test") for m in ("image", "text")}
    assert summary["before"]["gap"] == pytest.approx(
        modality_gap(emb["text"].vectors, emb["image"].vectors).centroid_distance)
    assert summary["seconds_per_1000"] > 0 and summary["num_queries"] == 16
    ident = summary["path"]
    assert main(["eval", "--embeddings", str(store.path), "--bridge", f"learned:path={ident}",
                 "--out", str(tmp_path / "rec")]) == 0
    rec = json.loads(next((tmp_path / "rec").glob("*.json")).read_text())
    assert rec["bridges"][0]["name"] == "learned"
    b = LearnedBridge.load(ident)
    assert bridge_report(b, emb)["after"] == pytest.approx(summary["after"])


# ---------------------------------------------------------------------------- Diffusion-Link


def test_q_sample_moments_and_schedule() -> None:
    from modalign.bridge.diffusion_link import cosine_alpha_bar, q_sample

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, generator=g).expand(20000, 4)
    t = torch.full((20000,), 300)
    xt = q_sample(x0, t, torch.randn(20000, 4, generator=g))
    a = float(cosine_alpha_bar(torch.tensor([300.0]))[0])
    assert torch.allclose(xt.mean(0), math.sqrt(a) * x0[0], atol=0.03)
    assert torch.allclose(xt.var(0), torch.full((4,), 1 - a), atol=0.03)
    abar = cosine_alpha_bar(torch.arange(0, 1001).double())
    assert bool((abar[1:] <= abar[:-1]).all()) and float(abar[-1]) < 1e-6


def test_topology_loss_against_loop() -> None:
    from modalign.bridge.diffusion_link import topology_loss

    g = torch.Generator().manual_seed(1)
    p, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    naive = sum((F.cosine_similarity(p[i], p[j], dim=0) - F.cosine_similarity(y[i], y[j], dim=0))
                ** 2 for i in range(5) for j in range(5)) / 25
    assert float(topology_loss(p, y)) == pytest.approx(float(naive), rel=1e-5)
    assert float(topology_loss(y @ _orthogonal(3, 2).float(), y)) < 1e-10


def _planted(n: int = 96, d: int = 4, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return x, F.normalize(x @ _orthogonal(d, 4).float() + 0.8, dim=1)


def test_diffusion_link_overfits_a_planted_map_and_is_deterministic() -> None:
    x, y = _planted()
    b = LearnedBridge("diffusion-link", "text", "image", hidden=32, steps=250, lr=3e-3,
                      batch_size=96, t_start=200, seed=0).fit_pairs(x, y)
    out = b.map(x)
    assert torch.equal(out, b.map(x))  # eta = 0 and a seeded start: deterministic
    gap_before = (x.mean(0) - y.mean(0)).norm()
    gap_after = (out.mean(0) - y.mean(0)).norm()
    assert float(gap_after) < 0.2 * float(gap_before), (float(gap_before), float(gap_after))
    cos_before, cos_after = float((x * y).sum(1).mean()), float((out * y).sum(1).mean())
    assert cos_after > 0.85 and cos_after > cos_before + 0.3, (cos_before, cos_after)
    r1 = float(((out @ y.T).argmax(1) == torch.arange(len(x))).float().mean())
    assert r1 > 5 / len(x), r1  # paired recall@1 above 5x chance (measured 8/96 at this budget)


def test_diffusion_link_from_pure_noise_ignores_the_source() -> None:
    x, y = _planted(n=64)
    b = LearnedBridge("diffusion-link", "text", "image", hidden=16, steps=5,
                      t_start=1000).fit_pairs(x, y)
    out = b.map(x)
    # every row starts from the same seeded noise: the outputs no longer depend on the source
    assert torch.allclose(b.map(x.flip(0)), out, atol=1e-5)
