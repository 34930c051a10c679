"""Intra-modal misalignment, plateau steps, the generated answer, scratch towers, and a sweep
whose towers train from scratch on a tiny raw dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lab_fakes import attach_fake_dataset, fake_store, fake_towers
from modalign.bridge.inversion import InversionSettings, invert
from modalign.lab import GapSetting, LabConfig, answer, run_gap_lab
from modalign.lab.answer import pooled_interval
from modalign.lab.misalign import intra_map, measure_misalignment, plateau_step, through_other
from modalign.lab.towers import ScratchImageTower, ScratchTextTower, scratch_inversion

pytestmark = pytest.mark.usefixtures("one_thread")  # small networks: one thread is faster


def naive_ap(scores: list[float], relevant: list[bool]) -> float:
    """Average precision of one ranking, ties broken pessimistically (relevant last)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], relevant[j]))
    hits, total = 0, 0.0
    for rank, j in enumerate(order, 1):
        if relevant[j]:
            hits += 1
            total += hits / rank
    return total / max(1, sum(relevant))


def test_misalignment_matches_a_naive_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(7, 5, generator=gen, dtype=torch.float64), dim=-1)
    gal = F.normalize(torch.randn(9, 5, generator=gen, dtype=torch.float64), dim=-1)
    other = F.normalize(torch.randn(11, 5, generator=gen, dtype=torch.float64), dim=-1)
    qg = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    gg = torch.tensor([0, 1, 2, 3, 4, 5, 0, 6, 1])
    og = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 6, 2, 1])
    res = measure_misalignment(q, qg, gal, gg, other, og)
    for i in range(len(q)):
        rel = [bool(gg[j] == qg[i]) for j in range(len(gal))]
        native = naive_ap([float(q[i] @ gal[j]) for j in range(len(gal))], rel)
        through = []
        for j in range(len(gal)):
            rows = [other[k] for k in range(len(other)) if og[k] == gg[j]]
            rep = F.normalize(torch.stack(rows).sum(0), dim=0)
            through.append(float(q[i] @ rep))
        assert res.native_ap[i] == pytest.approx(native, abs=1e-6)
        assert res.through_ap[i] == pytest.approx(naive_ap(through, rel), abs=1e-6)
    d = res.through_ap - res.native_ap
    assert res.misalignment == pytest.approx(d.mean())
    assert res.better_through == pytest.approx(np.mean(d > 1e-12) + 0.5 * np.mean(d == 0))


def test_through_other_gives_groups_without_items_a_zero_row() -> None:
    reps = through_other(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([2, 2]),
                         torch.tensor([2, 7]))
    assert torch.allclose(reps, torch.tensor([[1.0, 2.0], [0.0, 0.0]]) / 5 ** 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="other"):
        through_other(torch.zeros(2, 2), torch.tensor([1]), torch.tensor([1]))


def test_intra_map_is_scale_free_and_plateau_step() -> None:
    v = torch.tensor([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [0.1, 0.8]])
    groups = torch.tensor([0, 0, 1, 1])
    rows = np.array([0, 2])
    gallery = np.array([1, 3])
    assert intra_map(v, rows, gallery, groups) == 1.0
    assert intra_map(v * torch.tensor([[5.0], [0.1], [2.0], [7.0]]), rows, gallery, groups) == 1.0
    assert plateau_step(np.array([1.0, 0.5, 0.3, 0.295, 0.3])) == 3
    assert plateau_step(np.array([1.0, 0.5, 0.3]), tol=0.0) == 3


def test_answer_is_written_from_the_pooled_queries() -> None:
    rows = [{"name": "scratch-learned-e8", "family": "scratch", "control": "", "gap": 0.9,
             "text_retrieval_recall@1": 0.2, "train_text_retrieval_recall@1": 0.6},
            {"name": "xavier-d1-learned-e20", "family": "heads", "control": "", "gap": 0.1,
             "text_retrieval_recall@1": 0.3}]
    mis = [0.2, 0.3, 0.1, 0.25]
    delta = [-0.1, -0.2, -0.15, -0.05]
    rec = {"name": "scratch-learned-e8", "metrics": {"better_through": 0.75},
           "inversion": {"delta_map_converged": -0.12, "converge_steps": 50},
           "per_query": {"i2i_misalignment": mis[:2], "t2t_misalignment": mis[2:],
                         "i2i_delta": delta[:2], "t2t_delta": delta[2:]}}
    text = answer(rows, [rec])
    lo, hi = pooled_interval(mis)
    assert text.startswith("Yes, there is intra-modal misalignment")
    assert f"{np.mean(mis):+.3f}" in text and f"[{lo:+.3f}, {hi:+.3f}]" in text
    assert "made intra-modal retrieval worse" in text and "-0.120" in text
    assert "0.200 test / 0.600 train" in text and "75%" in text
    flat = {**rec, "per_query": {k: [0.0, 0.0] for k in rec["per_query"]}}
    assert answer(rows, [flat]).startswith("No clear sign")
    control = {**rows[0], "name": "scratch-learned-e8+intra", "control": "intra",
               "misalignment": -0.05, "delta_map": 0.01}
    assert "scratch-learned-e8+intra: gap 0.90, misalignment -0.050, inversion +0.010" in answer(
        [*rows, control], [rec])
    poor = [{**rows[0], "text_retrieval_recall@1": 0.01}]
    assert "retrieve(s) poorly" in answer(poor, [rec])


def test_answer_covers_the_learned_bridge_and_fine_tuned_towers() -> None:
    rows = [{"name": "scratch-learned-e8", "family": "scratch", "control": "", "gap": 0.9,
             "text_retrieval_recall@1": 0.2, "train_text_retrieval_recall@1": 0.6},
            {"name": "finetune-k2-learned-e3", "family": "finetune", "control": "", "gap": 0.3,
             "text_retrieval_recall@1": 0.25, "train_text_retrieval_recall@1": 0.5,
             "i2i_tower_before_map": 0.56, "i2i_tower_after_map": 0.41,
             "i2i_native_map": 0.38, "t2t_tower_before_map": 0.85,
             "t2t_tower_after_map": 0.80, "t2t_native_map": 0.7}]
    delta = [-0.1, -0.2, -0.15, -0.05]
    bridge = [0.1, 0.2, 0.3, 0.2]
    pq = {"i2i_misalignment": [0.1, 0.2], "t2t_misalignment": [0.1, 0.3],
          "i2i_delta": delta[:2], "t2t_delta": delta[2:],
          "i2i_bridge_delta": bridge[:2], "t2t_bridge_delta": bridge[2:]}
    rec = {"name": "scratch-learned-e8", "metrics": {"better_through": 0.5}, "inversion": {},
           "per_query": pq, "bridge": "lstsq"}
    tuned = {**rec, "name": "finetune-k2-learned-e3",
             "per_query": {**pq, "i2i_bridge_delta": [-0.3, -0.2], "t2t_bridge_delta": [-0.1,
                                                                                        -0.2]}}
    text = answer(rows, [rec, tuned])
    lo, hi = pooled_interval(bridge)
    dlo, dhi = pooled_interval(np.subtract(bridge, delta))
    assert "made intra-modal retrieval worse, a learned bridge repaired part of it." in text
    assert f"learned bridge (lstsq, fitted on the training split's joint embeddings) changed it " \
           f"by {np.mean(bridge):+.3f} ([{lo:+.3f}, {hi:+.3f}])" in text
    assert f"{np.mean(bridge) - np.mean(delta):+.3f} ([{dlo:+.3f}, {dhi:+.3f}], paired)" in text
    # the fine-tuned towers get their own sentence, with the towers' intra-modal erosion
    tail = text[text.index("Pretrained towers trained further"):]
    assert "finetune-k2-learned-e3: gap 0.30" in tail and "changed it by -0.200" in tail
    assert "image->image 0.560 -> 0.410 (joint 0.380)" in tail
    assert "scratch" not in tail
    # without the bridge's per-query values (older records) the bridge is left out
    old = {**rec, "per_query": {k: v for k, v in pq.items() if "bridge" not in k}}
    assert "learned bridge" not in answer(rows[:1], [old])
    assert answer(rows[1:], [tuned]).startswith("Not measured") and "finetune-k2" in answer(
        rows[1:], [tuned])


def test_fine_tuned_and_lora_settings_form_one_trend_group() -> None:
    from modalign.lab.sweep import summarize

    settings = (GapSetting(family="finetune", unfreeze=2, epochs=1),
                GapSetting(family="finetune", unfreeze=2, epochs=3),
                GapSetting(family="lora", epochs=3), GapSetting(), GapSetting(epochs=5))
    records = []
    for k, s in enumerate(settings):
        pq = {"i2i_misalignment": [0.1 * k], "t2t_misalignment": [0.0],
              "i2i_delta": [0.01 * k], "t2t_delta": [0.0], "i2i_bridge_delta": [0.02],
              "t2t_bridge_delta": [0.0]}
        records.append({"name": s.name, "metrics": {
            "gap": 0.1 + 0.1 * k, "delta_map": 0.005 * k, "misalignment": 0.05 * k,
            "bridge_delta_map": 0.01, "better_through": 0.5, "text_retrieval_recall@1": 0.2},
            "inversion": {}, "per_query": pq})
    cfg = LabConfig(settings=settings, seeds=(0,), permutations=50, bootstrap=20)
    out = summarize(records, cfg)
    assert out["family_trends"]["tuned"]["settings"] == [s.name for s in settings[:3]]
    assert out["family_trends"]["tuned"]["trend"]["n"] == 3
    assert out["family_trends"]["heads"]["trend"] is None  # 2 settings: not tested
    row = out["settings"][0]
    assert row["bridge_delta_map"] == 0.01
    assert row["bridge_delta_map_ci"] == pooled_interval([0.02, 0.0], seed=0)
    assert "Pretrained towers trained further" in out["answer"]


def test_scratch_towers_invert_exactly_and_mask_only_while_training() -> None:
    text = ScratchTextTower(width=16, dim=8, layers=1, heads=2, token_mask=0.5, seed=1)
    fwd = scratch_inversion(text)
    word = text.tokenizer("dog", add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    with torch.no_grad():
        batch = text.preprocess(["a photo of dog"])
        direct = text.encode(batch)
        via = fwd(text.embed(torch.tensor([word]))[:, None, 0])
    torch.testing.assert_close(via, direct, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    masked = text.preprocess(["one two three four five six seven eight"] * 8)["input_ids"]
    assert (masked == text.tokenizer.mask_token_id).any()
    ids = masked[masked != text.tokenizer.mask_token_id]
    assert not (ids == text.tokenizer.mask_token_id).any()
    image = ScratchImageTower(image_size=32, width=8, dim=6, seed=2)
    _, h, w = image.stage_shape(len(image.stages) - 1)
    fwd = scratch_inversion(image, num_tokens=h * w)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h_in = x
        for stage in image.stages[:-1]:
            h_in = stage(h_in)
        tokens = h_in.flatten(2).transpose(1, 2)  # one pseudo-patch per position, raster order
        torch.testing.assert_close(fwd(tokens), image.encode(x), atol=1e-5, rtol=1e-5)
    res = invert(torch.randn(3, 6), fwd, InversionSettings(steps=5), keys=["a", "b", "c"])
    assert res.features.shape == (3, 6)
    assert all(p.requires_grad for p in image.parameters())  # weights untouched, grads restored


def scratch_config(**kw) -> LabConfig:
    base = dict(settings=(GapSetting(epochs=2), GapSetting(temperature=0.01, epochs=2),
                          GapSetting(family="scratch", epochs=2)),
                seeds=(0,), batch_size=8, e2e_batch_size=8, scratch_batch_size=8,
                scratch_warmup_steps=1, joint_dim=6, inverted_queries=4,
                oti_steps=3, ovi_steps=3, shifts=(0.0, 1.0), permutations=100, bootstrap=20,
                warmup_steps=1, converge_queries=2, converge_steps=5, scratch_image_size=16,
                scratch_width=8, scratch_text_width=16, scratch_layers=1, scratch_dim=8,
                ovi_tokens=4)
    base.update(kw)
    return LabConfig(**base)


def test_sweep_with_towers_trained_from_scratch(tmp_path) -> None:
    store = fake_store(tmp_path / "store")
    attach_fake_dataset(store, tmp_path / "data")
    cfg = scratch_config(converge_families=("scratch",))
    res = run_gap_lab(cfg, store, tmp_path / "out", towers=fake_towers(), progress=False)
    rec = next(r for r in res.records if r["name"] == "scratch-learned-e2")
    assert rec["setting"]["family"] == "scratch"
    m = rec["metrics"]
    # tower before training: the scratch store's features (the initial towers), independently
    scratch_store = next((tmp_path / "out").glob("scratch-store-*"))
    from modalign.embed.store import EmbeddingStore

    before = EmbeddingStore(scratch_store).load("image", split="test")
    noto = np.array([i for i, it in enumerate(before.items) if it["view"] == "noto"])
    moji = np.array([i for i, it in enumerate(before.items) if it["view"] == "openmoji"])
    groups = torch.from_numpy(before.group_ids())
    queries = noto[np.linspace(0, len(noto) - 1, 4).round().astype(int)]
    expected = intra_map(torch.from_numpy(np.asarray(before.vectors)), queries, moji, groups)
    assert m["i2i_tower_before_map"] == pytest.approx(expected)
    assert m["i2i_tower_after_map"] != pytest.approx(m["i2i_tower_before_map"])
    assert m["misalignment"] == pytest.approx(0.5 * (m["i2i_misalignment"]
                                                     + m["t2t_misalignment"]))
    assert 0 <= m["train_text_retrieval_recall@1"] <= 1
    inv = rec["inversion"]
    assert inv["converge_steps"] == 5 and 1 <= inv["oti_plateau_step"] <= 5
    # converged inversions only in the families named (the frozen-tower spaces skip them)
    heads = [r for r in res.records if r["setting"].get("family", "heads") == "heads"]
    assert heads and not any("delta_map_converged" in r["inversion"] for r in heads)
    assert "delta_map_converged" in inv
    summary = json.loads((tmp_path / "out" / "lab.json").read_text())
    assert summary["answer"].split(",")[0] in (
        "Yes", "No: ranking through the other modality is worse than ranking natively",
        "No clear sign of intra-modal misalignment")
    assert "scratch-learned-e2" in summary["answer"]
    html = (tmp_path / "out" / "lab.html").read_text()
    assert html.index("The question") < html.index("Verdict")
    # a second run reads every record back
    again = run_gap_lab(cfg, store, tmp_path / "out", towers=fake_towers(), progress=False)
    assert [r["key"] for r in again.records] == [r["key"] for r in res.records]


def test_family_settings_validate_and_name() -> None:
    with pytest.raises(ValueError, match="converge_families"):
        scratch_config(converge_families=("vit",))
    assert GapSetting(family="finetune", unfreeze=2, epochs=3).name == "finetune-k2-learned-e3"
    assert GapSetting(control="intra").name == "xavier-d1-learned-e20+intra"
    assert GapSetting().to_dict() == {"head_init": "xavier", "head_depth": 1,
                                      "temperature": None, "epochs": 20}
    assert GapSetting(control="intra").keys() == ["image", "text", "image:noto",
                                                  "image:openmoji"]
    losses = [o["loss"] for o in GapSetting(control="unifalign").train_sections()["objectives"]]
    assert losses == ["clip", "uniformity", "alignment"]
    with pytest.raises(ValueError, match="unfreeze"):
        GapSetting(family="finetune")
    with pytest.raises(ValueError, match="family"):
        GapSetting(family="vit")
    with pytest.raises(ValueError, match="control"):
        GapSetting(control="gram")


def test_fine_tuned_and_lora_settings_train_the_pretrained_towers(tmp_path) -> None:
    from modalign.lab.endtoend import trainer_sections
    from modalign.lab.sweep import training_config

    store = fake_store(tmp_path / "store")
    attach_fake_dataset(store, tmp_path / "data")
    cfg = scratch_config()
    specs = {"image": "effnet-lite0", "text": "minilm"}
    ft = GapSetting(family="finetune", unfreeze=2, epochs=1)
    tc = training_config(ft, 0, cfg, store, specs,
                         end_to_end=trainer_sections(ft, cfg, store, None))
    assert tc.train.unfreeze == {"image": 2, "text": 2} and not tc.lora.towers
    assert tc.data.dataset == str(tmp_path / "data") and tc.optim.tower_lr == cfg.tower_lr
    assert tc.train.batch_size == cfg.e2e_batch_size
    lo = GapSetting(family="lora", epochs=1)
    tc = training_config(lo, 0, cfg, store, specs,
                         end_to_end=trainer_sections(lo, cfg, store, None))
    assert tc.lora.towers == ["image", "text"] and tc.lora.rank == cfg.lora_rank
    assert not any(tc.train.unfreeze.values()) and tc.optim.tower_lr == cfg.lora_lr
    heads = training_config(GapSetting(), 0, cfg, store, specs)
    assert not heads.train.unfreeze and heads.train.batch_size == cfg.batch_size
