"""The trainer's parts: host-side check schedule, CLOSE noise, GradCache, store resolution,
and the layering rule that no library module imports a command-line module."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

import modalign
from modalign.embed.resolve import dataset_store, open_store, recorded_towers
from modalign.errors import ModalignError
from modalign.losses.output import LossOutput
from modalign.losses.registry import register_loss
from modalign.losses.validation import validation_enabled
from modalign.train import loop
from modalign.train.gradcache import gradcache_backward
from modalign.train.loop import Trainer, train
from train_support import small_config, synthetic_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    synthetic_store(path)  # 32 training groups
    return path


@register_loss("test-records-checks")
class RecordsChecks(torch.nn.Module):
    """An alignment loss that records, per call, whether the losses' input checks were on."""

    seen: ClassVar[list[bool]] = []
    blow_up_at: ClassVar[int | None] = None  # the 1-based call whose loss is infinite

    def __init__(self, modalities):
        super().__init__()
        self.modalities = modalities

    def forward(self, embeddings, *, groups=None, indices=None):
        RecordsChecks.seen.append(validation_enabled())
        a, b = (embeddings[m] for m in self.modalities)
        loss = -(F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(1).mean()
        if len(RecordsChecks.seen) == RecordsChecks.blow_up_at:
            loss = loss + float("inf")
        return LossOutput(loss, {})


def _records_config(store, run_dir, **train_section):
    return small_config(store, run_dir, train={"batch_size": 2, "epochs": 1, **train_section},
                        objectives=[{"loss": "test-records-checks",
                                     "modalities": ["image", "text"]}])


def test_input_checks_run_on_the_first_step_every_n_steps_and_at_the_epoch_end(
        store, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "CHECK_EVERY", 5)
    RecordsChecks.seen, RecordsChecks.blow_up_at = [], None
    result = train(_records_config(store, tmp_path / "run"))
    assert result.summary["steps"] == 16
    due = [s == 0 or (s + 1) % 5 == 0 or s == 15 for s in range(16)]
    assert RecordsChecks.seen == due
    assert due.count(True) == 5


def test_checks_also_precede_each_checkpoint(store, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "CHECK_EVERY", 100)
    RecordsChecks.seen, RecordsChecks.blow_up_at = [], None
    train(_records_config(store, tmp_path / "run", checkpoint_every=6))
    assert [s for s, on in enumerate(RecordsChecks.seen) if on] == [0, 5, 11, 15]


def test_validation_switched_off_by_the_user_stays_off(store, tmp_path):
    from modalign.losses.validation import validation

    RecordsChecks.seen, RecordsChecks.blow_up_at = [], None
    with validation(False):
        train(_records_config(store, tmp_path / "run"))
    assert RecordsChecks.seen == [False] * 16


def test_a_non_finite_loss_between_checks_is_named_by_its_step(store, tmp_path):
    RecordsChecks.seen, RecordsChecks.blow_up_at = [], 3
    with pytest.raises(ModalignError) as err:
        train(_records_config(store, tmp_path / "run"))
    msg = str(err.value)
    assert "the loss is inf at step 3 (epoch 1;" in msg
    assert "checked after step 16 (steps 2-16 since the last check)" in msg
    assert "nothing after step 1 was saved" in msg
    assert not (tmp_path / "run" / "checkpoints" / "latest.json").exists()
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_embedding_noise_is_close_noise_with_a_seeded_cpu_generator(store, tmp_path):
    cfg = small_config(store, tmp_path / "run", augment={"embedding_noise": {"text": 0.3}})
    trainer = Trainer(cfg)
    emb = {"image": torch.randn(4, 8), "text": F.normalize(torch.randn(4, 8), dim=-1)}
    out = trainer._noisy(emb, step=7)
    # the reference: normalize(z + sigma * eps), eps drawn on the CPU from the step's seed
    g = torch.Generator().manual_seed(0 * 1_000_003 + 7 * 7919 + 0)
    expected = F.normalize(emb["text"] + 0.3 * torch.randn(4, 8, generator=g), dim=-1)
    assert torch.equal(out["text"], expected)
    assert out["image"] is emb["image"]
    assert not torch.equal(trainer._noisy(emb, step=8)["text"], expected)


def test_gradcache_matches_the_full_batch_gradient_in_float64():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 3).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)

    def embed(module, sl):
        return {"a": module(x[sl]), "b": y[sl]}

    def loss(emb):
        logits = F.normalize(emb["a"], dim=-1) @ F.normalize(emb["b"], dim=-1).T * 10
        return LossOutput(F.cross_entropy(logits, torch.arange(12)))

    full = loss(embed(head, slice(None)))
    full.loss.backward()
    reference = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    out = gradcache_backward(head, embed, loss, batch=12, k=3)
    assert torch.equal(out.loss, full.loss)
    for p, g in zip(head.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="k=5"):
        gradcache_backward(head, embed, loss, batch=12, k=5)


def test_store_resolution_lives_in_embed(store, tmp_path):
    assert recorded_towers(open_store(store), ["image", "text", "audio"]) == {
        "image": "fake-image", "text": "fake-text"}
    with pytest.raises(FileNotFoundError, match=r"data\.embeddings="):
        open_store(tmp_path, option="data.embeddings")
    csv = tmp_path / "pairs.csv"
    csv.write_text("text:caption,group\na red apple,1\na blue car,2\n")
    with pytest.raises(ModalignError, match=r"dataset=.*no items of \['image'\]"):
        dataset_store(str(csv), ["image", "text"], encode=False)


def test_no_library_module_imports_a_command_line_module():
    root = Path(modalign.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)} -> {n}" for n in names
                          if n == "modalign.cli" or n.endswith(".cli")]
    assert offenders == []
