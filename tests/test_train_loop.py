"""The training loop on synthetic stores: learning, run folder, determinism, GradCache, towers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modalign.model import MultiTowerModel
from modalign.train.checkpoint import load_checkpoint
from modalign.train.loop import Trainer, train
from train_support import (
    TinyImageTower,
    small_config,
    synthetic_store,
    tiny_image_dataset,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    synthetic_store(path)
    return path


def _weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints").weights


def test_run_learns_and_writes_a_complete_run_folder(store, tmp_path):
    torch.set_num_threads(1)
    cfg = small_config(store, tmp_path / "run", train={"epochs": 6})
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"]
    assert max(r["image-to-text_recall@1"] for r in rows) > 3 / 16  # chance is 1/8 on 8 val groups
    for key in ("image-to-text_recall@1", "image-to-text_recall@5", "text-to-image_recall@1",
                "text-to-image_recall@5", "mean_recall@1", "gap", "logit_scales",
                "samples_per_s"):
        assert key in rows[0]
    best = max(rows, key=lambda r: r["image-to-text_recall@1"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metric"] == "image-to-text_recall@1"
    assert (summary["best"]["image-to-text_recall@1"] == best["image-to-text_recall@1"]
            == result.summary["best"]["image-to-text_recall@1"])
    assert len((tmp_path / "run" / "summary.json").read_text().strip().splitlines()) == 1
    resolved = json.loads((tmp_path / "run" / "config.resolved.json").read_text())
    assert resolved["config"]["train"]["epochs"] == 6
    # the model folder holds the best epoch, and reproduces its validation retrieval
    model = MultiTowerModel.from_pretrained(result.model_dir)
    from modalign.embed.store import EmbeddingStore
    from modalign.evaluate.metrics import retrieval_metrics

    s = EmbeddingStore(store)
    img, txt = s.load("image", split="val"), s.load("text", split="val")
    r = retrieval_metrics(torch.from_numpy(model.project_array("image", img.vectors)),
                          torch.from_numpy(model.project_array("text", txt.vectors)),
                          torch.from_numpy(img.group_ids()), torch.from_numpy(txt.group_ids()),
                          k_values=(1,))
    assert r.metrics["recall@1"] == pytest.approx(best["image-to-text_recall@1"])
    assert float(model.logit_scale.detach()) == pytest.approx(
        next(iter(rows[best["epoch"] - 1]["logit_scales"].values())), rel=1e-5)


def test_same_seed_same_weights_and_other_seed_differs(store, tmp_path):
    torch.set_num_threads(1)
    a = small_config(store, tmp_path / "a", train={"epochs": 2})
    b = small_config(store, tmp_path / "b", train={"epochs": 2})
    c = small_config(store, tmp_path / "c", train={"epochs": 2, "seed": 1})
    for cfg in (a, b, c):
        train(cfg)
    wa, wb, wc = (_weights(tmp_path / n)["model"] for n in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["heads.image.layers.0.weight"], wc["heads.image.layers.0.weight"])


def test_existing_run_folder_needs_resume(store, tmp_path):
    cfg = small_config(store, tmp_path / "run", train={"epochs": 1})
    train(cfg)
    with pytest.raises(ValueError, match="--resume"):
        train(cfg)


def test_early_stopping_after_patience_epochs_without_improvement(store, tmp_path):
    # a learning rate this small leaves retrieval unchanged, so epoch 1 stays the best
    cfg = small_config(store, tmp_path / "run", train={"epochs": 6},
                       optim={"lr": 1e-12, "warmup_steps": 0}, validate={"patience": 2})
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1].get("early_stop") and result.summary["stopped_early"]
    assert [bool(r.get("best")) for r in rows] == [True, False, False]


def test_max_steps_and_embedding_noise_and_mlp_heads(store, tmp_path):
    cfg = small_config(store, tmp_path / "run", train={"epochs": 5, "max_steps": 6},
                       model={"head": "mlp", "hidden_dim": 16},
                       augment={"embedding_noise": {"text": 0.1}})
    result = train(cfg)
    assert result.summary["steps"] == 6
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["epoch"] == pytest.approx(1.5)


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    named = {f"model.{k}": p for k, p in trainer.model.named_parameters()}
    named |= {f"objective.{k}": p for k, p in trainer.objective.named_parameters()}
    return {k: p.grad.clone() for k, p in named.items() if p.grad is not None}


@pytest.mark.parametrize("objectives", [
    [{"loss": "clip", "modalities": ["image", "text"]}],
    [{"loss": "siglip", "modalities": ["image", "text"]},
     {"loss": "uniformity", "modalities": ["image", "text"], "weight": 0.3}],
])
def test_gradcache_accumulation_equals_the_full_batch_gradient(store, tmp_path, objectives):
    grads = {}
    for k in (1, 4):
        cfg = small_config(store, tmp_path / f"r{k}", objectives=objectives,
                           train={"batch_size": 16, "accumulate": k},
                           model={"head": "mlp", "hidden_dim": 16})
        trainer = Trainer(cfg)
        trainer.model.double()
        trainer.objective.double()
        trainer.compute_gradients(epoch=0, index=1)
        grads[k] = _grads(trainer)
    assert grads[1].keys() == grads[4].keys() and len(grads[1]) >= 5
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[4][name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_three_keys_with_views_and_an_intra_modal_term(store, tmp_path):
    cfg = small_config(
        store, tmp_path / "run", train={"epochs": 2},
        data={"keys": ["image:noto", "image:openmoji", "text"]},
        objectives=[{"loss": "clip", "modalities": ["image:noto", "text"]},
                    {"loss": "intra", "modalities": ["image:noto", "image:openmoji"]}],
        validate={"pair": ["image:openmoji", "text"]})
    result = train(cfg)
    assert result.summary["steps"] == 8
    assert sorted(MultiTowerModel.from_pretrained(result.model_dir).modalities) == ["image", "text"]


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory):
    return tiny_image_dataset(tmp_path_factory.mktemp("imgdata"))


def test_unfrozen_tower_tail_trains_and_the_rest_stays_frozen(image_dataset, tmp_path):
    root, store = image_dataset
    cfg = small_config(store, tmp_path / "run", data={"dataset": str(root)},
                       model={"towers": {"image": "tiny-image", "text": "hash-text"}},
                       train={"epochs": 2, "unfreeze": {"image": 1}, "batch_size": 4},
                       optim={"tower_lr": 1e-2})
    start = TinyImageTower()
    result = train(cfg, towers={"image": TinyImageTower()})
    saved = load_file(str(result.model_dir / "model.safetensors"))
    assert torch.equal(saved["towers.image.stem.weight"], start.stem.weight.detach())
    assert not torch.equal(saved["towers.image.top.weight"], start.top.weight.detach())
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["model"]["trainable_towers"] == ["image"]


def test_unfreeze_without_a_dataset_is_a_clear_error(image_dataset, tmp_path):
    _, store = image_dataset
    cfg = small_config(store, tmp_path / "run", train={"unfreeze": {"image": 1}},
                       model={"towers": {"image": "tiny-image", "text": "hash-text"}})
    with pytest.raises(ValueError, match=r"data\.dataset"):
        Trainer(cfg, towers={"image": TinyImageTower()})


def test_batch_larger_than_the_split_is_rejected(store, tmp_path):
    cfg = small_config(store, tmp_path / "run", train={"batch_size": 64})
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(cfg)


def test_resuming_a_finished_or_early_stopped_run_trains_no_further(store, tmp_path):
    cfg = small_config(store, tmp_path / "run", train={"epochs": 6},
                       optim={"lr": 1e-12, "warmup_steps": 0}, validate={"patience": 1})
    first = train(cfg)
    again = train(cfg, resume=True)
    assert first.summary["stopped_early"] and again.summary["steps"] == first.summary["steps"] == 8
    rows = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(rows) == 2


@pytest.mark.parametrize("n_modal", ["symile", "gram"])
def test_three_modalities_with_an_n_modal_objective(tmp_path, n_modal):
    synthetic_store(tmp_path / "store3", audio_dim=5)
    cfg = small_config(tmp_path / "store3", tmp_path / "run", train={"epochs": 2},
                       data={"keys": ["image", "text", "audio"]},
                       objectives=[{"loss": n_modal, "modalities": ["image", "text", "audio"]},
                                   {"loss": "clip", "modalities": ["image", "text"],
                                    "weight": 0.5}])
    result = train(cfg)
    model = MultiTowerModel.from_pretrained(result.model_dir)
    assert model.modalities == ["audio", "image", "text"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["train_loss"]) for r in rows)
    assert len(rows[0]["logit_scales"]) == 2  # one temperature per objective term


@pytest.mark.filterwarnings("ignore:batch .* holds more than a tenth")
def test_data_without_a_val_split_trains_without_validation_and_says_so(tmp_path):
    from modalign.embed.store import EmbeddingStore

    rng = np.random.default_rng(0)
    store = EmbeddingStore(tmp_path / "store")
    for modality, dim in (("image", 12), ("text", 8)):
        rows = [{"id": f"{modality}{g}", "modality": modality, "view": "v", "group": f"g{g}",
                 "split": "train" if g < 24 else "test", "labels": {}} for g in range(32)]
        store.add_array(modality, rng.normal(size=(32, dim)).astype(np.float32), rows,
                        info={"encoder": {"name": f"fake-{modality}"}})
    cfg = small_config(tmp_path / "store", tmp_path / "run", train={"epochs": 1})
    with pytest.warns(UserWarning, match="no 'val' split.*data.val_split"):
        result = train(cfg)
    assert (tmp_path / "run" / "summary.json").exists() and result.model_dir.exists()
    named = small_config(tmp_path / "store", tmp_path / "run2", train={"epochs": 1},
                         data={"val_split": "dev"})
    with pytest.raises(ValueError, match="split 'dev'"):
        train(named)  # a split the user named must exist


def test_a_run_started_by_an_older_version_resumes_with_todays_keys(store, tmp_path):
    cfg = small_config(store, tmp_path / "run", train={"epochs": 2},
                       validate={"metric": "i2t_r1"})
    with pytest.warns(FutureWarning, match="use 'image-to-text_recall@1'"):
        train(cfg)
    # rewrite the log and config as an older version wrote them
    log = tmp_path / "run" / "log.jsonl"
    old = {"image-to-text_recall@1": "i2t_r1", "image-to-text_recall@5": "i2t_r5",
           "text-to-image_recall@1": "t2i_r1", "text-to-image_recall@5": "t2i_r5",
           "mean_recall@1": "mean_r1"}
    rows = [{old.get(k, k): v for k, v in json.loads(line).items()}
            for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = train(small_config(store, tmp_path / "run", train={"epochs": 3}), resume=True)
    best = max(rows[:2], key=lambda r: r["i2t_r1"])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert "i2t_r1" in lines[0] and "image-to-text_recall@1" in lines[2]
    assert again.summary["metric"] == "image-to-text_recall@1"
    if lines[2].get("best"):
        best = {"i2t_r1": lines[2]["image-to-text_recall@1"]}
    assert again.summary["best"]["image-to-text_recall@1"] == best["i2t_r1"]


def test_the_fused_optimizer_steps_like_the_plain_per_tensor_adamw(store, tmp_path):
    """The trainer's AdamW uses the fused kernel; in float64 its updates equal those of
    PyTorch's plain per-tensor AdamW with the same groups, from the same gradients."""
    trainer = Trainer(small_config(store, tmp_path / "r"))
    trainer.model.double()
    trainer.objective.double()
    opt = trainer.optimizer
    assert opt.defaults["fused"] is True
    params = [p for g in opt.param_groups for p in g["params"]]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = [p.detach().clone() for p in params]
    it = iter(twins)
    reference = torch.optim.AdamW(
        [{**{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")},
          "params": [next(it) for _ in g["params"]]} for g in opt.param_groups],
        foreach=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            q.grad = p.grad.clone()
        opt.step()
        reference.step()
    for p, q, p0 in zip(params, twins, start, strict=True):
        assert not torch.equal(p.detach(), p0)  # the steps moved every parameter
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


def test_pair_losses_skip_a_second_normalisation_with_the_same_loss_and_gradients(store,
                                                                                 tmp_path):
    """The heads hand the objective unit rows, so the trainer switches off the pair losses'
    own L2: in float64 the loss and the gradients (of the rows before their one normalisation,
    and of the temperatures) equal those with it on; the trainer's losses agree to float32."""
    import copy

    from modalign.losses.clip import PairLogitLoss
    from modalign.losses.objective import build_objective
    from modalign.train.build import skip_second_normalisation

    objectives = [{"loss": "clip", "modalities": ["image", "text"]},
                  {"loss": "pairwise", "base_loss": "siglip",
                   "modalities": ["image", "text", "image:noto"], "weight": 0.5}]
    plain = build_objective(objectives).double()
    skipped = copy.deepcopy(plain)
    assert skip_second_normalisation(skipped) == 4
    gen = torch.Generator().manual_seed(0)
    raw = {k: torch.randn(12, 5, generator=gen, dtype=torch.float64)
           for k in ("image", "text", "image:noto")}
    results = []
    for objective in (plain, skipped):
        leaves = {k: v.clone().requires_grad_() for k, v in raw.items()}
        unit = {k: torch.nn.functional.normalize(v, dim=-1) for k, v in leaves.items()}
        loss = objective(unit).loss
        params = list(objective.parameters())
        grads = torch.autograd.grad(loss, [*leaves.values(), *params])
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-13, atol=0)
    for a, b in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)

    cfg = small_config(store, tmp_path / "r", objectives=objectives,
                       data={"keys": ["image", "text", "image:noto"]},
                       train={"batch_size": 16}, augment={"embedding_noise": {"text": 0.1}})
    losses = []
    for skip in (True, False):
        trainer = Trainer(cfg)
        pair_losses = [m for m in trainer.objective.modules() if isinstance(m, PairLogitLoss)]
        assert len(pair_losses) == 4 and not any(m.normalize for m in pair_losses)
        for m in pair_losses:
            m.normalize = not skip
        losses.append(trainer.compute_gradients(epoch=0, index=1).loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
