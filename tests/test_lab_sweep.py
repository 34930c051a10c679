"""The gap sweep on a tiny synthetic store: records, caching/resume, metrics, report, CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import modalign.lab.sweep as sweep_module
from lab_fakes import fake_store, fake_towers
from modalign.cli import build_parser
from modalign.evaluate.retrieval import intra_modal_retrieval
from modalign.geometry.gap import modality_gap
from modalign.geometry.separability import linear_separability
from modalign.lab import GapSetting, LabConfig, run_gap_lab
from modalign.lab.measure import SpaceData, pca_2d, project

SETTINGS = (GapSetting(epochs=2), GapSetting(temperature=0.01, epochs=2),
            GapSetting("cone", 2, epochs=1))


def tiny_config(**kw) -> LabConfig:
    base = dict(settings=SETTINGS, seeds=(0,), batch_size=8, joint_dim=6, inverted_queries=4,
                oti_steps=3, ovi_steps=3, shifts=(0.0, 1.0), permutations=200, bootstrap=50,
                warmup_steps=1, converge_queries=2, converge_steps=6)
    base.update(kw)
    return LabConfig(**base)


pytestmark = pytest.mark.usefixtures("one_thread")  # small networks: one thread is faster


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    store = fake_store(root / "store")
    res = run_gap_lab(tiny_config(), store, root / "out", towers=fake_towers(), progress=False)
    return store, root / "out", res


def test_sweep_writes_one_record_per_run_and_the_summary(lab_run) -> None:
    _, out, res = lab_run
    assert len(res.records) == len(SETTINGS)
    assert sorted(p.name for p in (out / "settings").iterdir()) == sorted(
        f"{r['name']}-s0-{r['key']}.json" for r in res.records)
    summary = json.loads((out / "lab.json").read_text())
    assert [r["name"] for r in summary["settings"]] == [s.name for s in SETTINGS]
    assert summary["verdict"] == res.verdict and summary["trend"]["n"] == 3
    largest = max(res.records, key=lambda r: r["metrics"]["gap"])
    assert summary["largest_gap"] == largest["name"]
    assert f"{largest['inversion']['oti_final_cosine']:.2f}" in summary["inversion_note"]
    # per-setting means over seeds are the record values (one seed)
    assert [r["delta_map"] for r in summary["settings"]] == [r["metrics"]["delta_map"]
                                                            for r in res.records]
    html = (out / "lab.html").read_text()
    assert res.verdict.split(";")[0] in html and html.count("<img") == 5
    assert set(res.figures) == {"benefit_vs_gap", "gap_shift", "extremes", "trajectories",
                                "misalignment_vs_benefit"}
    # no scratch setting here: the page leads with the question and says it was not measured
    assert html.index("Not measured: no setting trains") < html.index(res.verdict.split(";")[0])
    assert summary["answer"].startswith("Not measured")
    assert summary["mechanism"]["trend"]["n"] == 3
    assert summary["family_trends"]["heads"]["trend"]["n"] == 3


def test_fixed_temperature_is_kept_and_learned_one_moves(lab_run) -> None:
    _, _, res = lab_run
    by = {r["name"]: r for r in res.records}
    assert by["xavier-d1-tau0.01-e2"]["metrics"]["logit_scale"] == pytest.approx(100.0, rel=1e-5)
    assert by["xavier-d1-learned-e2"]["metrics"]["logit_scale"] != pytest.approx(1 / 0.07)


def test_record_metrics_agree_with_independent_computations(lab_run, tmp_path) -> None:
    store, out, res = lab_run
    rec = res.records[0]
    m = rec["metrics"]
    assert m["delta_map"] == pytest.approx(0.5 * (m["i2i_delta_map"] + m["t2t_delta_map"]))
    assert m["i2i_delta_map"] == pytest.approx(m["i2i_oti_map"] - m["i2i_native_map"])
    cfg = tiny_config(inverted_queries=10_000)
    data = SpaceData.load(store, cfg, fake_towers().encode_text)
    # the cone (mean cosine of distinct pairs: (|sum u|^2 - n) / (n (n - 1))) in numpy, and the
    # separability, from the test embeddings of the run's last epoch (reloaded from a copy of
    # its finished run folder: nothing trains again)
    run = tmp_path / "run"
    shutil.copytree(out / rec["run"], run)
    model, _ = sweep_module.train_setting(SETTINGS[0], 0, tiny_config(), store,
                                          fake_towers().specs, run)
    test = project(model, data.test)
    img, txt = (np.asarray(test[k].vectors, np.float64) for k in ("image", "text"))
    img, txt = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (img, txt))
    total, n = img.sum(0), len(img)
    assert m["cone_image"] == pytest.approx((total @ total - n) / (n * (n - 1)), abs=1e-6)
    assert m["separability"] == linear_separability(img, txt, seed=0)["accuracy"]
    traj = rec["trajectory"]
    assert [r["epoch"] for r in traj] == [1, 2]
    # the gap-shift curve at 0 is the trained space
    assert rec["gap_shift"][0]["amount"] == 0.0
    assert rec["gap_shift"][0]["text_retrieval_map"] == pytest.approx(m["text_retrieval_map"])
    assert rec["gap_shift"][0]["gap"] == pytest.approx(m["gap"], abs=1e-6)
    assert len(data.image_queries) == len([i for i in store.load("image", split="test").items
                                           if i["view"] == "noto"])


def measured_space(tmp_path):
    """The first setting trained on the fake store, with every query inverted: (model, the
    space's data, its record, the config, the towers)."""
    store = fake_store(tmp_path / "store")
    cfg = tiny_config(settings=SETTINGS[:1], inverted_queries=10_000)
    towers = fake_towers()
    model, _ = sweep_module.train_setting(SETTINGS[0], 0, cfg, store, towers.specs,
                                          tmp_path / "run")
    data = SpaceData.load(store, cfg, towers.encode_text)
    return model, data, sweep_module.measure_space(model, data, cfg, towers), cfg, towers


def test_native_intra_retrieval_matches_the_evaluate_task(tmp_path) -> None:
    model, data, rec, _, _ = measured_space(tmp_path)
    test = project(model, data.test)
    task = intra_modal_retrieval(test["image"], "image", query_view="noto",
                                 gallery_view="openmoji", k_values=(1,)).metrics
    assert rec["metrics"]["i2i_native_map"] == pytest.approx(task["image:openmoji_retrieval_map"])
    img, txt = test["image"].vectors, test["text"].vectors
    assert rec["metrics"]["gap"] == pytest.approx(
        modality_gap(img, txt, normalize=True).centroid_distance, abs=1e-6)


def naive_ap(scores: np.ndarray, relevant: np.ndarray) -> float:
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], bool(relevant[j])))
    hits, total = 0, 0.0
    for rank, j in enumerate(order, 1):
        if relevant[j]:
            hits += 1
            total += hits / rank
    return total / max(1, int(relevant.sum()))


def test_learned_bridge_benefit_matches_a_float64_reference(tmp_path) -> None:
    model, data, rec, cfg, towers = measured_space(tmp_path)
    test, bank = project(model, data.test), project(model, data.bank)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    def bridged(src, tgt, queries: np.ndarray) -> np.ndarray:
        # each source row paired with the normalised mean of its group's target rows
        sg, tg = src.group_ids(), tgt.group_ids()
        tv = unit(np.asarray(tgt.vectors, np.float64))
        keep = np.isin(sg, tg)
        x = unit(np.asarray(src.vectors, np.float64))[keep]
        y = unit(np.stack([tv[tg == g].sum(0) for g in sg[keep]]))
        mx, my = x.mean(0), y.mean(0)
        w = np.linalg.solve((x - mx).T @ (x - mx) + 1e-3 * np.eye(x.shape[1]),
                            (x - mx).T @ (y - my))
        return unit((unit(queries) - mx) @ w + my)

    img = unit(np.asarray(test["image"].vectors, np.float64))
    txt = unit(np.asarray(test["text"].vectors, np.float64))
    ig, tg = test["image"].group_ids(), test["text"].group_ids()
    gal = np.array([it["view"] == "openmoji" for it in test["image"].items])
    q_img, q_txt = data.image_queries, data.text_queries
    bi = bridged(bank["image"], bank["text"], img[q_img])
    bt = bridged(bank["text"], bank["image"], txt[q_txt])
    ap_i = [naive_ap(bi[k] @ img[gal].T, ig[gal] == ig[q]) for k, q in enumerate(q_img)]
    native_i = [naive_ap(img[q] @ img[gal].T, ig[gal] == ig[q]) for q in q_img]
    ap_t = []
    for k, q in enumerate(q_txt):
        others = np.arange(len(txt)) != q
        ap_t.append(naive_ap(bt[k] @ txt[others].T, tg[others] == tg[q]))
    m = rec["metrics"]
    assert m["i2i_bridge_map"] == pytest.approx(np.mean(ap_i), abs=1e-4)
    assert m["t2t_bridge_map"] == pytest.approx(np.mean(ap_t), abs=1e-4)
    assert rec["per_query"]["i2i_bridge_delta"] == pytest.approx(
        np.subtract(ap_i, native_i).tolist(), abs=1e-4)
    assert m["bridge_delta_map"] == pytest.approx(
        0.5 * (m["i2i_bridge_delta_map"] + m["t2t_bridge_delta_map"]))
    lo, hi = rec["intervals"]["i2i_bridge_delta_map"]
    assert lo <= m["i2i_bridge_delta_map"] <= hi
    off = sweep_module.measure_space(model, data, dataclasses.replace(cfg, learned_bridge=""),
                                     towers)
    assert "bridge_delta_map" not in off["metrics"]
    with pytest.raises(ValueError, match="learned_bridge"):
        dataclasses.replace(cfg, learned_bridge="svm")


def test_sweep_resumes_without_retraining_finished_runs(lab_run, tmp_path, monkeypatch) -> None:
    store, out, res = lab_run
    work = tmp_path / "out"
    import shutil

    shutil.copytree(out, work)
    killed = res.records[1]
    (work / "settings" / f"{killed['name']}-s0-{killed['key']}.json").unlink()
    built = []
    real = sweep_module.Trainer

    def counting(cfg, **kw):
        built.append(kw.get("resume"))
        return real(cfg, **kw)

    monkeypatch.setattr(sweep_module, "Trainer", counting)
    again = run_gap_lab(tiny_config(), store, work, towers=fake_towers(), progress=False)
    assert built == [True]  # only the missing record, from its finished run's checkpoint
    redone = next(r for r in again.records if r["key"] == killed["key"])
    for k in ("gap", "text_retrieval_map", "i2i_native_map", "logit_scale"):
        assert redone["metrics"][k] == pytest.approx(killed["metrics"][k], abs=1e-6)
    assert [r["metrics"] for r in again.records if r["key"] != killed["key"]] == [
        r["metrics"] for r in res.records if r["key"] != killed["key"]]


def test_keys_change_with_what_changes_the_result(lab_run) -> None:
    store, _, _ = lab_run
    fp, towers = sweep_module.store_fingerprint(store), {"fake": 1}
    cfg = tiny_config()
    key = sweep_module.run_key(SETTINGS[0], 0, cfg, fp, towers)
    assert key == sweep_module.run_key(SETTINGS[0], 0, dataclasses.replace(cfg, bootstrap=7), fp,
                                       towers)
    for other in (sweep_module.run_key(SETTINGS[0], 1, cfg, fp, towers),
                  sweep_module.run_key(SETTINGS[1], 0, cfg, fp, towers),
                  sweep_module.run_key(SETTINGS[0], 0, dataclasses.replace(cfg, lr=0.5), fp,
                                       towers),
                  sweep_module.run_key(SETTINGS[0], 0, dataclasses.replace(cfg, oti_steps=9), fp,
                                       towers)):
        assert other != key
    # measuring knobs re-measure the same training run; training knobs retrain
    specs = {"image": "fake-image", "text": "fake-text"}
    run = sweep_module.train_key(SETTINGS[0], 0, cfg, fp, specs)
    assert run == sweep_module.train_key(SETTINGS[0], 0, dataclasses.replace(cfg, oti_steps=9),
                                         fp, specs)
    assert run != sweep_module.train_key(SETTINGS[0], 0, dataclasses.replace(cfg, lr=0.5), fp,
                                         specs)


def test_settings_and_config_validate() -> None:
    s = GapSetting(temperature=0.3)
    clip = s.train_sections()["objectives"][0]
    assert clip["learnable_temperature"] is False
    assert clip["temperature"] == 0.3
    assert GapSetting("cone", 3).train_sections()["model"] == {"head_init": "cone",
                                                               "head": "mlp", "head_depth": 3}
    with pytest.raises(ValueError, match="temperature"):
        GapSetting(temperature=0.001)
    with pytest.raises(ValueError, match="head_init"):
        GapSetting("orthogonal")
    with pytest.raises(ValueError, match="head_depth"):
        GapSetting(head_depth=0)
    with pytest.raises(ValueError, match="settings"):
        LabConfig(settings=(GapSetting(), GapSetting()))
    with pytest.raises(ValueError, match="seeds"):
        tiny_config().with_seeds(0)


def test_store_without_test_split_is_rejected(tmp_path) -> None:
    store = fake_store(tmp_path / "store")
    with pytest.raises(ValueError, match="split 'nosuch'"):
        run_gap_lab(tiny_config(split="nosuch"), store, tmp_path / "out", towers=fake_towers(),
                    progress=False)


def test_cli_help_and_bad_arguments(capsys) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["lab", "gap", "--help"])
    text = capsys.readouterr().out
    assert "--quick" in text and "continues" in text and "lab.html" in text
    args = parser.parse_args(["lab", "gap", "--threads", "0"])
    with pytest.raises(ValueError, match="--threads"):
        args.func(args)
    args = parser.parse_args(["lab", "gap", "--families", "vit"])
    with pytest.raises(ValueError, match=r"families.*heads, finetune"):
        args.func(args)
    from modalign.lab.settings import full_config, select_families

    part = select_families(full_config(), "scratch,lora")
    assert {s.family for s in part.settings} == {"scratch", "lora"}
    assert sum(s.control != "" for s in part.settings) == 2  # the scratch controls come along
    with pytest.raises(ValueError, match="no setting"):
        select_families(dataclasses.replace(part, settings=part.settings[:1]), "heads")
    args = parser.parse_args(["lab", "gap", "--embeddings", str(Path("no") / "store")])
    with pytest.raises(FileNotFoundError, match="--embeddings"):
        args.func(args)


def test_pca_matches_the_covariance_eigendecomposition() -> None:
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(30, 5, generator=gen) + 2.0
    txt = torch.randn(20, 5, generator=gen)
    out = pca_2d(img, txt)
    coords = np.vstack([out["image"], out["text"]])
    both = torch.cat([img, txt]).double().numpy()
    cov = np.cov(both, rowvar=False, bias=True)
    eig = np.sort(np.linalg.eigvalsh(cov))[::-1]
    np.testing.assert_allclose(coords.var(0), eig[:2], rtol=1e-3)
    np.testing.assert_allclose(out["explained"], eig[:2] / eig.sum(), rtol=1e-6)
    # the big centroid difference lies along the first axis
    n = len(img)
    assert abs(coords[:n, 0].mean() - coords[n:, 0].mean()) > 3.0


def test_the_trainers_batch_note_about_the_labs_own_batch_is_not_shown(tmp_path) -> None:
    # The trainer warns when a batch holds over a tenth of the training groups; in the
    # laboratory the batch is its own setting (recorded), so the note is not passed on.
    import warnings

    from modalign.data.caveats import batch_warning
    from modalign.errors import SmallDataWarning

    store = fake_store(tmp_path / "store")
    groups = len({i["group"] for i in store.load("image", split="train").items})
    assert batch_warning(groups, 64) is not None  # the trainer alone would warn
    cfg = tiny_config(settings=SETTINGS[:1], batch_size=64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sweep_module.train_setting(SETTINGS[0], 0, cfg, store, fake_towers().specs,
                                   tmp_path / "run")
    assert [w for w in seen if issubclass(w.category, SmallDataWarning)] == []
