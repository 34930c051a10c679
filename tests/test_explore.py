"""modalign explore without a browser: the page data against naive references, CLI, server."""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from explore_support import naive_top_k, synthetic_joint, unit
from modalign.cli import main
from modalign.embed.store import Embeddings
from modalign.errors import ModalignError
from modalign.explore import ExploreOptions, build_explore, render_page
from modalign.explore.build import ExploreSpace, sample_groups, top_k_per_modality
from modalign.explore.projection import PCA2, make_projection, umap_available


def _pos(data, m):
    """Global point indices of modality ``m``."""
    i = data["modalities"].index(m)
    return range(data["offsets"][i], data["offsets"][i + 1])


def _test_rows(joint):
    return {m: e.filter(split="test") for m, e in joint.items()}


# ------------------------------------------------------------------------------ building blocks


def test_pca_matches_the_covariance_eigenvectors():
    x = np.random.default_rng(1).normal(size=(80, 5)) @ np.diag([3, 2, 1, 0.5, 0.1])
    pca = PCA2().fit(x)
    c = np.cov(x.T)
    w, v = np.linalg.eigh(c)
    top = v[:, ::-1][:, :2].T
    for i in range(2):
        assert abs(abs(float(top[i] @ pca.components[i])) - 1) < 1e-9
    assert np.allclose(pca.explained, (w[::-1][:2] / w.sum()), atol=1e-9)
    y = pca.transform(x)
    assert np.allclose(y.mean(0), 0, atol=1e-9)
    assert np.allclose(y, (x - x.mean(0)) @ pca.components.T)


def test_top_k_per_modality_matches_a_full_sort_and_skips_the_row_itself():
    rng = np.random.default_rng(2)
    a, b = unit(rng.normal(size=(9, 6))), unit(rng.normal(size=(7, 6)))
    vecs = {"a": torch.tensor(a, dtype=torch.float32), "b": torch.tensor(b, dtype=torch.float32)}
    out = top_k_per_modality(vecs, k=3)
    allq = np.concatenate([a, b])
    for q in range(16):
        assert out["a"][0][q].tolist() == naive_top_k(allq[q], a, 3, exclude=q if q < 9 else -1)
        assert out["b"][0][q].tolist() == [9 + j for j in
                                           naive_top_k(allq[q], b, 3, q - 9 if q >= 9 else -1)]
        assert np.allclose(out["a"][1][q], a[out["a"][0][q]] @ allq[q], atol=1e-6)
    # a modality with fewer than k other rows pads with -1
    small = top_k_per_modality({"a": vecs["a"][:2], "b": vecs["b"]}, k=3)
    assert small["a"][0][0].tolist() == [1, -1, -1]


def test_sample_groups_keeps_whole_groups_seeded_and_within_the_budget():
    groups = {"image": [f"g{i // 2}" for i in range(40)], "text": [f"g{i}" for i in range(20)]}
    rows, n = sample_groups(groups, 31, seed=3)
    kept_i = {groups["image"][i] for i in rows["image"]}
    kept_t = {groups["text"][i] for i in rows["text"]}
    assert kept_i == kept_t and len(kept_i) == n == 10  # 3 rows per group, 10 * 3 <= 31
    assert len(rows["image"]) + len(rows["text"]) <= 31
    again, _ = sample_groups(groups, 31, seed=3)
    other, _ = sample_groups(groups, 31, seed=4)
    assert all(np.array_equal(rows[m], again[m]) for m in rows)
    assert any(not np.array_equal(rows[m], other[m]) for m in rows)
    everything, n_all = sample_groups(groups, 60, seed=0)
    assert n_all == 20 and len(everything["image"]) == 40


# ------------------------------------------------------------------------------ the page data


def test_states_match_naive_neighbours_native_bridged_and_shifted():
    joint, values = synthetic_joint(n_groups=45, dim=12)
    shown, bank = _test_rows(joint), {m: e.filter(split="train") for m, e in joint.items()}
    opts = ExploreOptions(k=4, bridge="centering", amounts=(0.0, 0.5, 1.0))
    data = build_explore(shown, bank=bank, values=values, options=opts)
    img, txt = unit(shown["image"].vectors), unit(shown["text"].vectors)
    n_i = len(img)
    allv = np.concatenate([img, txt])
    native = data["states"]["native"]
    for q in (0, 3, n_i + 2):
        row = native["nn"]["text"][q * 4:(q + 1) * 4]
        assert row == [n_i + j for j in naive_top_k(allv[q], txt, 4,
                                                    q - n_i if q >= n_i else -1)]
    # centering: subtract the train-split mean of each modality, renormalise
    mu = {m: unit(bank[m].vectors).mean(0) for m in bank}
    ci, ct = unit(img - mu["image"]), unit(txt - mu["text"])
    bridged = data["states"]["bridge"]
    assert bridged["nn"]["text"][:4] == [n_i + j for j in naive_top_k(ci[0], ct, 4)]
    # shift: text moved by lambda * (mean(image) - mean(text)) of the bank, renormalised
    g = mu["image"] - mu["text"]
    moved = unit(txt + 1.0 * g)
    shifted = data["states"]["shift:1"]
    assert shifted["nn"]["text"][:4] == [n_i + j for j in naive_top_k(img[0], moved, 4)]
    assert data["states"]["shift:0"] == {"alias": "native"}
    gap_native = np.linalg.norm(img.mean(0) - txt.mean(0))
    gap_moved = np.linalg.norm(img.mean(0) - moved.mean(0))
    assert native["diagnosis"]["gap"] == pytest.approx(gap_native, abs=1e-4)
    assert shifted["diagnosis"]["gap"] == pytest.approx(gap_moved, abs=1e-4)
    assert shifted["diagnosis"]["gap"] < native["diagnosis"]["gap"]
    cone_t = (np.sum(txt.sum(0) ** 2) - len(txt)) / (len(txt) * (len(txt) - 1))
    assert native["diagnosis"]["cone"]["text"] == pytest.approx(cone_t, abs=1e-4)
    sq = ((txt[:, None] - txt[None]) ** 2).sum(-1)[np.triu_indices(len(txt), 1)]
    assert native["diagnosis"]["uniformity"]["text"] == pytest.approx(
        np.log(np.exp(-2 * sq).mean()), abs=1e-4)
    # the image modality does not move: its numbers are the native ones
    assert shifted["diagnosis"]["uniformity"]["image"] == native["diagnosis"]["uniformity"]["image"]
    assert shifted["diagnosis"]["cone"]["text"] != native["diagnosis"]["cone"]["text"]
    assert 0.5 <= native["diagnosis"]["separability"] <= 1
    # the moved modality's map positions are the same projection applied to the moved rows
    pca = PCA2().fit(allv)
    assert np.allclose(np.array(data["shift"]["xy"]["shift:1"]).T, pca.transform(moved),
                       atol=2e-4)
    assert data["shift"]["fitted_on"] == "bank" and data["pair"] == ["image", "text"]
    assert data["points"]["text"][n_i] == values[shown["text"].items[0]["id"]]
    assert len(data["pairs"]) == n_i  # one line per group shown in both modalities


def test_twins_link_to_their_source_and_list_naive_neighbours():
    joint, _ = synthetic_joint(n_groups=24, dim=10, splits=False)
    rng = np.random.default_rng(5)
    src = [2, 7, 11]
    rows = [{**joint["image"].items[i], "modality": "text", "source_modality": "image",
             "final_cosine": 0.9} for i in src]
    rows.append({**rows[0], "id": "not/shown"})
    vecs = rng.normal(size=(4, 10)).astype(np.float32)
    inverted = {"text.oti.abc": Embeddings(vecs, rows, joint["image"].group_index)}
    data = build_explore(joint, inverted=inverted, options=ExploreOptions(k=3, bridge=None))
    (tw,) = data["twins"]
    assert tw["method"] == "OTI" and tw["modality"] == "text" and tw["of"] == src
    txt = unit(joint["text"].vectors)
    n_i = len(joint["image"])
    assert tw["nn"]["text"][3:6] == [n_i + j for j in naive_top_k(vecs[1], txt, 3)]
    assert tw["final_cosine"] == [0.9, 0.9, 0.9]
    bad = {"text.oti.x": Embeddings(vecs[:, :4], rows, joint["image"].group_index)}
    with pytest.raises(ModalignError, match="dimension"):
        build_explore(joint, inverted=bad, options=ExploreOptions(bridge=None))


def test_three_modalities_list_neighbours_in_each_and_move_the_chosen_pair():
    joint, _ = synthetic_joint(n_groups=15, dim=8, splits=False)
    audio = Embeddings(joint["text"].vectors[::-1].copy() + 0.1,
                       [{**it, "id": it["id"].replace("text", "audio"), "modality": "audio"}
                        for it in joint["text"].items], joint["text"].group_index)
    three = {**joint, "audio": audio}
    data = build_explore(three, options=ExploreOptions(k=2, bridge="centering",
                                                       pair=("text", "audio"), amounts=(0, 1)))
    assert data["modalities"] == ["image", "text", "audio"] and data["offsets"] == [0, 15, 30, 45]
    assert set(data["states"]["native"]["nn"]) == {"image", "text", "audio"}
    assert len(data["pairs"]) == 3 * 15
    assert data["shift"]["moved"] == "audio" and len(data["shift"]["xy"]["shift:1"][0]) == 15
    au = unit(audio.vectors)
    assert data["states"]["native"]["nn"]["audio"][:2] == [30 + j for j in
                                                           naive_top_k(unit(joint["image"]
                                                                            .vectors)[0], au, 2)]


def test_sampling_above_max_points_says_so():
    joint, _ = synthetic_joint(n_groups=40, dim=8, splits=False)
    data = build_explore(joint, options=ExploreOptions(max_points=30, bridge=None))
    s = data["sampling"]
    assert s["sampled"] and s["shown_rows"] <= 30 and s["total_rows"] == 80
    assert s["shown_rows"] == 2 * s["groups_shown"]
    html = render_page(data)
    assert f"Sampled: {s['shown_rows']:,} of 80 rows shown" in html


def test_hover_values_thumbnail_images_name_other_files_and_cut_long_text(tmp_path):
    from PIL import Image

    from modalign.explore.build import _describe

    Image.new("RGBA", (64, 32), (255, 0, 0, 128)).save(tmp_path / "a.png")
    (tmp_path / "b.wav").write_bytes(b"RIFF")
    (tmp_path / "c.png").write_bytes(b"not an image")
    text, thumb = _describe(str(tmp_path / "a.png"), 32)
    with Image.open(io.BytesIO(base64.b64decode(thumb.split(",", 1)[1]))) as im:
        assert text == "a.png" and im.size == (32, 16)
    assert _describe(str(tmp_path / "b.wav"), 40) == ("b.wav", "")
    assert _describe(str(tmp_path / "c.png"), 40) == (str(tmp_path / "c.png"), "")
    long = "x" * 500
    assert _describe(long, 40)[0] == "x" * 199 + "…" and _describe(None, 40) == ("", "")


def test_bad_input_raises_modalign_errors():
    joint, _ = synthetic_joint(n_groups=10, dim=8, splits=False)
    with pytest.raises(ModalignError, match="at least two modalities"):
        build_explore({"image": joint["image"]})
    other = Embeddings(np.ones((10, 5), np.float32), joint["text"].items,
                       joint["text"].group_index)
    with pytest.raises(ModalignError, match="different dimensions"):
        build_explore({"image": joint["image"], "text": other})
    with pytest.raises(ModalignError, match="--pair"):
        build_explore(joint, options=ExploreOptions(pair=("image", "audio")))
    with pytest.raises(ModalignError, match="--k"):
        ExploreOptions(k=0)
    with pytest.raises(ModalignError, match="--projection"):
        make_projection("tsne")
    nan = Embeddings(np.full((10, 8), np.nan, np.float32), joint["text"].items,
                     joint["text"].group_index)
    with pytest.raises(ModalignError, match="NaN"):
        build_explore({"image": joint["image"], "text": nan})


def test_page_is_offline_and_escapes_item_text():
    joint, values = synthetic_joint(n_groups=8, dim=8, splits=False)
    values["text/0"] = "</script><script>alert(1)</script>"
    html = render_page(build_explore(joint, values=values, options=ExploreOptions(bridge=None)))
    assert "alert(1)" in html and "<script>alert(1)" not in html and "</script><script>alert" \
        not in html
    assert "src=\"http" not in html and "cdn." not in html.lower().split("plotly.js v")[0]
    assert html.count("<script") == 3  # data, plotly, client


def test_umap_projection_is_wired_through_fit_and_transform(monkeypatch):
    calls = []

    class FakeUMAP:
        def __init__(self, **kw):
            calls.append(("init", kw))

        def fit(self, x):
            calls.append(("fit", x.shape))
            return self

        def transform(self, x):
            calls.append(("transform", x.shape))
            return np.asarray(x)[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    monkeypatch.setattr("modalign.explore.projection.umap_available", lambda: True)
    joint, _ = synthetic_joint(n_groups=10, dim=8, splits=False)
    data = build_explore(joint, options=ExploreOptions(projection="umap", bridge=None,
                                                       amounts=(0.0, 1.0)))
    assert data["projection"]["name"] == "umap"
    assert calls[0][1]["metric"] == "cosine" and calls[1] == ("fit", (20, 8))
    assert ("transform", (10, 8)) in calls  # the moved modality, same fitted map


def test_umap_without_the_extra_names_it(monkeypatch):
    monkeypatch.setattr("modalign.explore.projection.umap_available", lambda: False)
    with pytest.raises(ModalignError, match="explore-umap"):
        make_projection("umap")


# ------------------------------------------------------------------------------ command line


def _model_and_store(tmp_path):
    from modalign.model import ModelConfig, MultiTowerModel
    from train_support import synthetic_store

    store = synthetic_store(tmp_path / "store", n_groups=36)
    torch.manual_seed(0)
    cfg = ModelConfig(towers={"image": "fake-image", "text": "fake-text"},
                      feature_dims={"image": 12, "text": 8}, joint_dim=8)
    model_dir = MultiTowerModel(cfg).save_pretrained(tmp_path / "run" / "model")
    return store, model_dir


def test_cli_writes_the_page_from_a_model_and_its_store_with_matching_twins(tmp_path, capsys):
    from modalign.io import file_hash
    from modalign.model import MultiTowerModel

    store, model_dir = _model_and_store(tmp_path)
    model = MultiTowerModel.from_pretrained(model_dir)
    test_images = store.load("image", split="test")
    twin_rows = [{**it, "modality": "text", "source_modality": "image", "final_cosine": 0.8}
                 for it in test_images.items[:3]]
    twin_vecs = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    mine = {"inversion": {"method": "oti", "model_weights":
                          file_hash(model_dir / "model.safetensors")}}
    other = {"inversion": {"method": "oti", "model_weights": "another-model"}}
    store.add_array("text.oti.mine", twin_vecs, twin_rows, info=mine)
    store.add_array("text.oti.other", twin_vecs, twin_rows, info=other)
    out = tmp_path / "page" / "explore.html"
    assert main(["explore", "--model", str(model_dir), "--embeddings", str(store.path),
                 "--out", str(out), "--k", "3", "--bridge", "meanshift:source=text,"
                 "target=image", "--shifts", "0,1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["twins"] == ["text.oti.mine"] and summary["points"] == 24
    html = out.read_text()
    payload = html.split('id="explore-data">', 1)[1].split("</script>", 1)[0]
    data = json.loads(payload)
    # the shown rows are the model's projection of the store's test features
    img = unit(model.project_array("image", test_images.vectors))
    txt = unit(model.project_array("text", store.load("text", split="test").vectors))
    n_i = len(img)
    assert data["states"]["native"]["nn"]["text"][:3] == [n_i + j for j in
                                                          naive_top_k(img[0], txt, 3)]
    assert data["bridge"]["identity"][0]["name"] == "meanshift"
    assert data["shift"]["fitted_on"] == "bank" and data["shift"]["amounts"] == [0.0, 1.0]


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    store, model_dir = _model_and_store(tmp_path)
    cases = [
        (["explore", "--embeddings", str(store.path), "--serve"], "--serve"),
        (["explore", "--model", str(model_dir), "--embeddings", str(store.path), "--pair",
          "image"], "--pair"),
        (["explore", "--model", str(model_dir), "--embeddings", str(store.path), "--split",
          "nosuch"], "--split"),
        (["explore", "--model", str(model_dir), "--embeddings", str(store.path), "--shifts",
          "a,b"], "--shifts"),
        (["explore"], "explore: pass --model"),
    ]
    for argv, needle in cases:
        assert main([*argv, "--out", str(tmp_path / "x.html")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    if not umap_available():
        assert main(["explore", "--model", str(model_dir), "--embeddings", str(store.path),
                     "--projection", "umap", "--out", str(tmp_path / "x.html")]) == 2
        assert "explore-umap" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the server


def _post(url, body, timeout=10):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_binds_loopback_and_answers_text_and_image_queries():
    from PIL import Image

    from modalign.explore.serve import make_server

    joint, _ = synthetic_joint(n_groups=12, dim=8, splits=False)
    opts = ExploreOptions(k=3, bridge=None)
    space = ExploreSpace.from_embeddings(joint, opts)
    data = build_explore(joint, options=opts, space=space)
    target = {"text": np.arange(8, dtype=np.float32) - 3, "image": np.ones(8, np.float32)}
    seen = []

    def encode(modality, value):
        seen.append((modality, type(value).__name__))
        return target[modality]

    server = make_server(render_page(data, serve=True), space, encode, port=0)
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(base + "/", timeout=10) as r:
            page = r.read().decode()
        assert 'id="query-form"' in page and '"serve":true' in page
        status, res = _post(base + "/query", {"modality": "text", "text": "a cat"})
        assert status == 200
        txt = unit(joint["text"].vectors)
        assert res["nn"]["text"] == [12 + j for j in naive_top_k(target["text"], txt, 3)]
        assert np.allclose(res["xy"], space.projection.transform(unit(target["text"][None]))[0],
                           atol=1e-3)
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        status, res = _post(base + "/query", {"modality": "image", "image": url})
        assert status == 200 and res["modality"] == "image"
        assert seen == [("text", "str"), ("image", "PngImageFile")]
        for bad, needle in (({"modality": "audio"}, "'modality'"),
                            ({"modality": "text", "text": ""}, "'text'"),
                            ({"modality": "image", "image": "data:image/png;base64,AAAA"},
                             "readable image")):
            status, res = _post(base + "/query", bad)
            assert status == 400 and needle in res["error"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_serve_command_listens_on_loopback_and_stops_on_ctrl_c(tmp_path):
    import os
    import signal
    import subprocess

    store, model_dir = _model_and_store(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "modalign", "explore", "--model", str(model_dir),
         "--embeddings", str(store.path), "--out", str(tmp_path / "e.html"), "--serve",
         "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "serving on" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            line = proc.stderr.readline()
        url = line.split("serving on ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as r:
            assert 'id="query-form"' in r.read().decode()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
