"""OoD scores and metrics: exact values, naive references, torchmetrics, bootstrap, the task."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from modalign.errors import ModalignError
from modalign.evaluate.ood import (
    auroc,
    average_precision,
    bootstrap_difference,
    bootstrap_intervals,
    energy_scores,
    fpr_at_tpr,
    knn_scores,
    max_logit_scores,
    mcm_scores,
    ood_detection,
    ood_metrics,
    split_by_label,
)
from modalign.evaluate.retrieval import toy_embeddings

# ---------------------------------------------------------------------------- naive references


def naive_auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    total = 0.0
    for a, b in itertools.product(pos, neg):
        total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(pos) * len(neg))


def naive_ap(pos: np.ndarray, neg: np.ndarray) -> float:
    scores = np.concatenate([pos, neg])
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        tp = float((pos >= t).sum())
        fp = float((neg >= t).sum())
        recall = tp / len(pos)
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return ap


def naive_fpr(pos: np.ndarray, neg: np.ndarray, tpr: float = 0.95) -> float:
    candidates = [t for t in sorted(set(pos.tolist())) if (pos >= t).mean() >= tpr]
    t = max(candidates)
    return float((neg >= t).mean())


def random_scores(seed: int, n_pos: int, n_neg: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pos, neg = rng.normal(0.5, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)
    if ties:
        pos, neg = np.round(pos, 1), np.round(neg, 1)
    return pos, neg


# ---------------------------------------------------------------------------- metrics


def test_spec_example_exact() -> None:
    pos, neg = np.array([0.9, 0.8, 0.7]), np.array([0.75, 0.1])
    m = ood_metrics(pos, neg)
    assert m["auroc"] == pytest.approx(5 / 6, abs=1e-12)
    assert m["aupr_in"] == pytest.approx(11 / 12, abs=1e-12)
    assert m["fpr@95tpr"] == 0.5
    # OOD positive, negated scores: -0.1 (OOD), -0.7 (ID), -0.75 (OOD): AP = 1/2 + 1/2 * 2/3
    assert m["aupr_out"] == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3), abs=1e-12)


def test_all_tied() -> None:
    m = ood_metrics(np.ones(4), np.ones(3))
    assert m["auroc"] == 0.5 and m["fpr@95tpr"] == 1.0
    assert m["aupr_in"] == pytest.approx(4 / 7)


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True), (3, False)])
def test_against_naive(seed: int, ties: bool) -> None:
    pos, neg = random_scores(seed, 37, 23, ties)
    assert auroc(pos, neg) == pytest.approx(naive_auroc(pos, neg), abs=1e-12)
    assert average_precision(pos, neg) == pytest.approx(naive_ap(pos, neg), abs=1e-12)
    assert average_precision(-neg, -pos) == pytest.approx(naive_ap(-neg, -pos), abs=1e-12)
    for tpr in (0.95, 0.9, 0.5, 1.0):
        assert fpr_at_tpr(pos, neg, tpr) == naive_fpr(pos, neg, tpr)


@pytest.mark.parametrize("seed,ties", [(4, False), (5, True)])
def test_against_torchmetrics(seed: int, ties: bool) -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    pos, neg = random_scores(seed, 300, 200, ties)
    preds = torch.from_numpy(np.concatenate([pos, neg]))
    target = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long()
    assert auroc(pos, neg) == pytest.approx(float(tm.binary_auroc(preds, target)), abs=1e-6)
    ap = float(tm.binary_average_precision(preds, target))
    assert average_precision(pos, neg) == pytest.approx(ap, abs=1e-6)
    # ROC points: fpr at the first threshold whose tpr reaches 0.95 is ours.
    fpr, tpr, _ = tm.binary_roc(preds, target)
    first = int(torch.nonzero(tpr >= 0.95 - 1e-12)[0])
    assert fpr_at_tpr(pos, neg) == pytest.approx(float(fpr[first]), abs=1e-6)


def test_invariant_to_increasing_transform() -> None:
    pos, neg = random_scores(6, 50, 40, True)
    a = ood_metrics(pos, neg)
    b = ood_metrics(np.exp(3 * pos) + 1, np.exp(3 * neg) + 1)
    assert a == pytest.approx(b, abs=1e-12)


def test_bootstrap_contains_estimate_and_is_seeded() -> None:
    pos, neg = random_scores(7, 200, 150, False)
    ci = bootstrap_intervals(pos, neg, n_boot=200, seed=3)
    point = ood_metrics(pos, neg)
    for key, (lo, hi) in ci.items():
        assert lo <= point[key] <= hi and lo < hi
    assert bootstrap_intervals(pos, neg, n_boot=200, seed=3) == ci
    with pytest.raises(ModalignError, match="n_boot"):
        bootstrap_intervals(pos, neg, n_boot=1)


def test_paired_difference() -> None:
    pos, neg = random_scores(8, 120, 90, False)
    same = bootstrap_difference(pos, neg, np.exp(pos), np.exp(neg), n_boot=50)
    assert all(v == (0.0, 0.0, 0.0) for v in same.values())
    rng = np.random.default_rng(1)
    better = pos + rng.normal(0.5, 0.1, len(pos))
    d = bootstrap_difference(pos, neg, better, neg, n_boot=200, seed=2)
    point, lo, hi = d["auroc"]
    assert point == pytest.approx(auroc(better, neg) - auroc(pos, neg))
    assert 0 < lo <= point <= hi
    with pytest.raises(ModalignError, match="same inputs"):
        bootstrap_difference(pos, neg, pos[:-1], neg, n_boot=10)


def test_metric_errors() -> None:
    with pytest.raises(ModalignError, match="non-empty"):
        auroc(np.array([]), np.array([1.0]))
    with pytest.raises(ModalignError, match="finite"):
        ood_metrics(np.array([np.nan]), np.array([1.0]))
    with pytest.raises(ModalignError, match="tpr"):
        fpr_at_tpr(np.ones(2), np.ones(2), tpr=0.0)


# ---------------------------------------------------------------------------- scores


def test_mcm_properties() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.rand(5, 7, generator=g) * 2 - 1
    uniform = torch.full((3,), 1 / 7, dtype=torch.float64)
    assert torch.allclose(mcm_scores(torch.zeros(3, 7)), uniform)
    assert torch.allclose(mcm_scores(s + 0.3), mcm_scores(s))
    assert torch.allclose(mcm_scores(s[:, torch.randperm(7, generator=g)]), mcm_scores(s))
    naive = torch.tensor([max(np.exp(r / 0.5) / np.exp(r / 0.5).sum()) for r in s.double().numpy()])
    assert torch.allclose(mcm_scores(s, 0.5), naive.double())
    e = energy_scores(s, 0.5)
    naive_e = torch.tensor([0.5 * np.log(np.exp(r / 0.5).sum()) for r in s.double().numpy()])
    assert torch.allclose(e, naive_e.double())
    assert torch.equal(max_logit_scores(s), s.double().amax(1))
    with pytest.raises(ModalignError, match="temperature"):
        mcm_scores(s, 0.0)
    with pytest.raises(ModalignError, match="similarities"):
        mcm_scores(torch.zeros(3))


def test_knn_against_loop() -> None:
    g = torch.Generator().manual_seed(1)
    x, bank = torch.randn(9, 5, generator=g), torch.randn(20, 5, generator=g)
    got = knn_scores(x, bank, k=3, block=4)
    xn, bn = torch.nn.functional.normalize(x.double(), dim=1), torch.nn.functional.normalize(
        bank.double(), dim=1)
    for i in range(9):
        sims = sorted((float(xn[i] @ bn[j]) for j in range(20)), reverse=True)
        assert float(got[i]) == pytest.approx(sims[2], abs=1e-12)
    with pytest.raises(ModalignError, match="k=25"):
        knn_scores(x, bank, k=25)


# ---------------------------------------------------------------------------- the task


def test_ood_detection_task_separates_planted_ood() -> None:
    emb = toy_embeddings(groups=16, dim=16)["image"]
    ind, ood = split_by_label(emb, "subgroup", ["s3"])
    names = sorted(set(ind.labels("subgroup")))
    # Prototypes = mean ID embedding of each class: OOD rows match none of them well.
    protos = torch.stack([torch.from_numpy(np.asarray(ind.vectors)[
        np.array(ind.labels("subgroup")) == c]).mean(0) for c in names])
    r = ood_detection(ind, ood, protos, names, label="subgroup", bank=ind, n_boot=50,
                      temperature=0.1)
    assert r.task == "ood"
    for score in ("mcm", "energy", "max_logit", "knn"):
        assert r.metrics[f"{score}/auroc_lo"] <= r.metrics[f"{score}/auroc"] <= r.metrics[
            f"{score}/auroc_hi"]
    assert r.metrics["knn/auroc"] == 1.0  # the bank contains every ID row (k=1: cosine 1)
    assert r.metrics["id_acc1"] > 0.5
    with pytest.raises(ModalignError, match="knn"):
        ood_detection(ind, ood, protos, names, label="subgroup", n_boot=0)
    with pytest.raises(ModalignError, match="scores"):
        ood_detection(ind, ood, protos, names, label="subgroup", scores=["nope"], n_boot=0)


# ---------------------------------------------------------------------------- the command


def test_eval_ood_cli_records_metrics_and_intervals(tmp_path):
    from modalign.cli import main
    from modalign.evaluate.records import read_record
    from modalign.evaluate.zeroshot import save_class_embeddings
    from test_eval_cli import make_store

    store = make_store(tmp_path / "store")
    # group grp-1 is held out as OOD; the class file holds every subgroup.
    emb = store.load("image", split="test")
    names = sorted(set(emb.labels("subgroup")))
    protos = torch.randn(len(names), 16)
    save_class_embeddings(tmp_path / "classes.safetensors", names, protos)
    out = tmp_path / "records"
    argv = ["eval", "--embeddings", str(store.path), "--task", "ood", "--label", "subgroup",
            "--ood-values", "group=grp-1", "--class-embeddings",
            str(tmp_path / "classes.safetensors"), "--bootstrap", "20", "--out", str(out)]
    assert main(argv) == 0
    rec = read_record(next(out.glob("*.json")))
    m, ci = rec["metrics"], rec["intervals"]
    assert rec["task"] == "ood" and rec["protocol"]["num_ood"] == 8
    assert ci["mcm/auroc"][0] <= m["mcm/auroc"] <= ci["mcm/auroc"][1]
    assert rec["bootstrap"]["replicates"] == 20 and "mcm/auroc_lo" not in m
    assert "knn/fpr@95tpr" in m
    # the same figures from the stored rows, in numpy: zero-shot accuracy of the ID rows and the
    # AUROC of the MCM score (max softmax of the cosines, tau = 1; ID positive, ties count 1/2)
    unit = emb.vectors / np.linalg.norm(emb.vectors, axis=1, keepdims=True)
    p = protos.numpy().astype(np.float64)
    cos = unit @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
    is_ood = np.array([it["labels"]["group"] == "grp-1" for it in emb.items])
    truth = np.array([names.index(it["labels"]["subgroup"]) for it in emb.items])
    np.testing.assert_allclose(m["id_acc1"], np.mean(cos.argmax(1)[~is_ood] == truth[~is_ood]),
                               rtol=0, atol=1e-12)
    mcm = np.exp(cos).max(1) / np.exp(cos).sum(1)
    diff = mcm[~is_ood][:, None] - mcm[is_ood][None, :]
    np.testing.assert_allclose(m["mcm/auroc"], np.mean((diff > 0) + 0.5 * (diff == 0)),
                               rtol=0, atol=1e-6)
    assert main([*argv[:-6], "--out", str(out)]) == 2  # no prototypes and no model


@pytest.mark.parametrize("bad", ["group", "group=", "=grp-1", "group= , "])
def test_ood_values_must_be_label_equals_values(bad):
    from modalign.evaluate.runner import parse_ood_values

    expected = f"--ood-values {bad!r}: expected LABEL=V1[,V2...], e.g. group=Flags"
    with pytest.raises(ModalignError) as info:
        parse_ood_values(bad)
    assert str(info.value) == expected


def test_ood_values_are_split_and_stripped_once():
    from modalign.evaluate.runner import parse_ood_values

    assert parse_ood_values(" group = Flags, Smileys & Emotion ,") == (
        "group", ["Flags", "Smileys & Emotion"])


def test_classes_for_zero_shot_and_ood_come_from_one_resolver(tmp_path):
    from modalign.errors import ModalignError
    from modalign.evaluate.zeroshot import resolve_classes, save_class_embeddings

    with pytest.raises(ModalignError, match="--task ood with --embeddings needs class"):
        resolve_classes("ood", ["a"], label="x", class_embeddings=None, model_dir=None,
                        templates=("{}",))
    path = tmp_path / "classes.safetensors"
    save_class_embeddings(path, ["cat", "dog"], torch.eye(2))
    names, protos, templates = resolve_classes("zeroshot", ["ignored"], label="x",
                                               class_embeddings=str(path), model_dir=None,
                                               templates=("a photo of {}",))
    assert names == ["cat", "dog"] and templates == () and protos.shape == (2, 2)
