"""Compositional hard negatives in training (DeGLA's image-grounded contrast): the loss against
a naive float64 reference, and training from the config with the shipped generator."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modalign.errors import ModalignError
from modalign.train.loop import Trainer
from modalign.train.recipes.negatives import HardNegatives, NegativesConfig, igc_loss
from train_support import WordTower, assert_resumes_bitwise, caption_store, small_config


def test_igc_loss_matches_the_naive_reference():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g,
                                                                            dtype=torch.float64)
    n = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    s = torch.tensor(3.0, dtype=torch.float64)
    got = igc_loss(q, p, n, mask, s)
    terms = []
    for i in range(4):
        negs = [float(q[i] @ n[i, k]) for k in range(2) if mask[i, k]]
        if not negs:
            continue  # rows without negatives are left out
        pos = float(q[i] @ p[i])
        terms.append(-(3 * pos - math.log(sum(math.exp(3 * v) for v in [pos, *negs]))))
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    q.requires_grad_()
    assert torch.autograd.gradcheck(lambda qq: igc_loss(qq, p, n, mask, s), (q,))


def test_trains_with_generated_and_given_negatives(tmp_path):
    caps = caption_store(tmp_path / "store")
    cfg = small_config(tmp_path / "store", tmp_path / "run", negatives={"k": 3, "weight": 0.5},
                       model={"towers": {"image": "fake-image", "text": "word-text"}},
                       train={"epochs": 2, "num_threads": 1})
    trainer = Trainer(cfg, towers={"text": WordTower()})
    assert trainer.negatives is not None and trainer.negatives.coverage == 1.0
    logged = trainer.train_step(0, 0)
    assert math.isfinite(logged["negatives"]) and logged["negatives"] > 0
    assert trainer.run().summary["steps"] == 6  # 2 epochs of 3 steps (28 training groups)
    # a given file replaces the generator; captions it does not list get no negatives
    given = tmp_path / "negs.json"
    given.write_text(json.dumps({caps[0]: ["circle red"]}))
    cfg = small_config(tmp_path / "store", tmp_path / "run2",
                       negatives={"k": 2, "file": str(given)},
                       model={"towers": {"image": "fake-image", "text": "word-text"}},
                       train={"epochs": 1, "num_threads": 1})
    trainer = Trainer(cfg, towers={"text": WordTower()})
    assert 0 < trainer.negatives.coverage < 1
    given.write_text(json.dumps({caps[0]: "circle red"}))
    with pytest.raises(ModalignError, match=r"negatives.file=.* must hold a JSON object"):
        Trainer(cfg, towers={"text": WordTower()})
    with pytest.raises(ModalignError, match=r"negatives.text_key=.caption. is not in data.keys"):
        small_config(tmp_path / "store", tmp_path / "r", negatives={"k": 2, "text_key": "caption"})
    with pytest.raises(ModalignError, match=r"needs train.accumulate = 1"):
        small_config(tmp_path / "store", tmp_path / "r", negatives={"k": 2},
                     train={"accumulate": 2})


class _Heads(torch.nn.Module):
    """A stand-in student with ``project(key, features)``: one linear map for texts."""

    def __init__(self) -> None:
        super().__init__()
        self.text = torch.nn.Linear(4, 3, dtype=torch.float64)

    def project(self, key, feats):
        return self.text(feats)


def test_tgc_and_self_distillation_match_naive_references():
    torch.manual_seed(0)
    student = _Heads()
    items = [{"value": "red circle"}, {"value": "blue square"}, {"value": ""}]
    cfg = NegativesConfig(k=2, tgc_weight=0.1, tgc_scale=10.0, distill_weight=0.005,
                          ema_decay=0.5)
    rec = HardNegatives(items, lambda t: torch.randn(len(t), 4), cfg, model=student).double()
    rows = torch.tensor([0, 1, 2])
    feats = {"text": torch.randn(3, 4, dtype=torch.float64),
             "image": torch.randn(3, 3, dtype=torch.float64)}

    def embed(module):
        return {"text": module.project("text", feats["text"]), "image": feats["image"] * 1.0}

    rec.begin_step(student, embed)  # teacher == student: no distillation yet
    emb = embed(student)
    assert float(rec.teacher_terms(emb, rows, student)["distill"].detach()) == 0.0
    with torch.no_grad():  # the student moves; the EMA teacher follows half way
        student.text.weight.add_(0.3)
    before = rec.teacher.text.weight.clone()
    rec.begin_step(student, embed)
    assert torch.allclose(rec.teacher.text.weight, 0.5 * before + 0.5 * student.text.weight)
    emb = embed(student)
    got = rec.teacher_terms(emb, rows, student)
    t, tb = emb["text"].detach(), rec._teacher_emb["text"]
    negs = student.project("text", rec.features[rows].double()).detach()
    tnegs = rec.teacher.project("text", rec.features[rows].double()).detach()
    tgc, dist, n = 0.0, 0.0, 0
    for i in range(3):
        real = [k for k in range(2) if rec.mask[i, k]]
        dist += float(((t[i] - tb[i]) ** 2).sum() + ((emb["image"][i] - feats["image"][i]) ** 2
                                                      ).sum())
        dist += sum(float(((negs[i, k] - tnegs[i, k]) ** 2).sum()) for k in real)
        if not real:
            continue  # rows without negatives are left out of the contrast
        logits = [10 * float(t[i] @ tb[i])] + [10 * float(t[i] @ negs[i, k]) for k in real]
        tgc -= logits[0] - math.log(sum(math.exp(v) for v in logits))
        n += 1
    assert float(got["tgc"].detach()) == pytest.approx(tgc / n, rel=1e-10)
    assert float(got["distill"].detach()) == pytest.approx(dist / 3, rel=1e-10)
    with pytest.raises(ModalignError, match=r"negatives\.ema_decay"):
        NegativesConfig(k=2, tgc_weight=0.1, ema_decay=1.5).check(["image", "text"], 1)


def test_tgc_and_distillation_train_from_the_config_and_resume_bitwise(tmp_path):
    caption_store(tmp_path / "store")
    negs = {"k": 2, "weight": 0.1, "tgc_weight": 0.1, "distill_weight": 0.005,
            "ema_decay": 0.9}

    def make(run):
        return small_config(tmp_path / "store", run, negatives=negs,
                            model={"towers": {"image": "fake-image", "text": "word-text"}},
                            train={"epochs": 2, "num_threads": 1, "checkpoint_every": 1,
                                   "keep_checkpoints": 9})

    trainer = Trainer(make(tmp_path / "probe"), towers={"text": WordTower()})
    logged = trainer.train_step(0, 0)
    assert logged["negatives_distill"] < 1e-10 and logged["negatives_tgc"] > 0  # EMA of equals
    logged = trainer.train_step(0, 1)
    assert logged["negatives_distill"] > 0  # the student moved away from the teacher
    weights = assert_resumes_bitwise(make, tmp_path, stop_at=4, towers={"text": WordTower()})
    assert any(k.startswith("teacher.") for k in weights["negatives"])  # the EMA is saved
