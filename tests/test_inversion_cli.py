"""`modalign invert` and the keyed, resumable store of inverted features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modalign.bridge.inversion import InversionSettings, invert
from modalign.bridge.inversion.store import invert_chunks, invert_into_store, inverted_arrays
from modalign.cli import main
from modalign.embed import EmbeddingStore

torch.set_num_threads(1)


class Affine:
    """A cheap deterministic forward that counts its calls."""

    modality = "text"
    num_tokens = 1
    token_dim = 4

    def __init__(self) -> None:
        self.w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def __call__(self, tokens):
        self.calls += 1
        return torch.tanh(tokens[:, 0] @ self.w)

    def identity(self):
        return {"kind": "affine"}


def rows(n: int, modality: str = "image"):
    return [{"id": f"e{i}", "modality": modality, "view": "noto", "group": f"g{i}",
             "split": "test", "labels": {"subgroup": f"s{i % 2}"}} for i in range(n)]


def test_store_rows_match_invert_and_carry_metadata(tmp_path):
    store, fwd = EmbeddingStore(tmp_path), Affine()
    targets = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    s = InversionSettings(steps=20, batch_size=2)
    name = invert_into_store(store, targets, rows(5), fwd, s, method="oti",
                             context={"split": "test"})
    emb = store.load(name)
    ref = invert(targets, fwd, s, keys=[f"e{i}" for i in range(5)])
    np.testing.assert_allclose(emb.vectors, ref.features.numpy(), atol=1e-6)
    assert [it["id"] for it in emb.items] == [f"e{i}" for i in range(5)]
    assert {it["modality"] for it in emb.items} == {"text"}
    assert {it["source_modality"] for it in emb.items} == {"image"}
    np.testing.assert_allclose([it["final_cosine"] for it in emb.items], ref.final_cosine.numpy(),
                               atol=1e-6)
    info = store.info(name)["inversion"]
    assert info["settings"]["steps"] == 20 and info["split"] == "test"
    assert list(inverted_arrays(store, "oti")) == [name]
    assert "text" not in store.modalities  # never mistaken for a native array
    assert not list(tmp_path.glob("*.partial.npy")) and not list(tmp_path.glob("*.progress.json"))


def test_same_settings_reuse_changed_settings_recompute(tmp_path):
    store, fwd = EmbeddingStore(tmp_path), Affine()
    targets = torch.randn(3, 3)
    s = InversionSettings(steps=4)
    first = invert_into_store(store, targets, rows(3), fwd, s, method="oti")
    calls = fwd.calls
    assert invert_into_store(store, targets, rows(3), fwd, s, method="oti") == first
    assert fwd.calls == calls
    assert invert_into_store(store, targets, rows(3), fwd, InversionSettings(steps=5),
                             method="oti") != first
    assert invert_into_store(store, targets + 1, rows(3), fwd, s, method="oti") != first
    assert invert_into_store(store, targets, rows(3), fwd, s, method="oti",
                             context={"split": "val"}) != first


def test_an_interrupted_run_resumes_and_equals_an_uninterrupted_one(tmp_path):
    targets = torch.randn(7, 3, generator=torch.Generator().manual_seed(2))
    s = InversionSettings(steps=10, batch_size=3)
    whole = EmbeddingStore(tmp_path / "whole")
    name = invert_into_store(whole, targets, rows(7), Affine(), s, method="oti")

    class StopError(Exception):
        pass

    def stop_after_first(done, cos_sum):
        raise StopError

    store = EmbeddingStore(tmp_path / "cut")
    with pytest.raises(StopError):
        invert_into_store(store, targets, rows(7), Affine(), s, method="oti",
                          on_chunk=stop_after_first)
    assert (store.path / f"{name}.progress.json").exists() and name not in store.arrays
    fwd, seen = Affine(), []
    resumed = invert_into_store(store, targets, rows(7), fwd, s, method="oti",
                                on_chunk=lambda d, c: seen.append(d))
    assert resumed == name
    assert seen == [3, 3, 1]  # 3 restored, then the remaining two chunks
    assert fwd.calls == 2 * (s.steps + 1)  # only the two unfinished chunks ran
    np.testing.assert_array_equal(store.load(name).vectors, whole.load(name).vectors)


def test_invert_chunks_writes_a_shard_of_rows_and_resumes_inside_it(tmp_path):
    from modalign.embed.arrays import ArrayWriter

    targets = torch.randn(9, 3, generator=torch.Generator().manual_seed(3))
    ids = [f"e{i}" for i in range(9)]
    s = InversionSettings(steps=6, batch_size=4)
    shard = range(2, 7)  # rows 2..6 of the whole, row 0 of the array

    def read(a, b):
        return targets[a:b]

    writer = ArrayWriter(tmp_path, "cut", key="k", rows=len(shard), dim=3)
    first = next(invert_chunks(writer, read, ids, Affine(), s, rows=shard, chunk=2))
    assert first[:2] == (2, 4) and writer.done == 2  # stopped after one written chunk
    writer = ArrayWriter(tmp_path, "cut", key="k", rows=len(shard), dim=3)  # reopened: resumes
    fwd = Affine()
    spans = [(a, b) for a, b, _ in invert_chunks(writer, read, ids, fwd, s, rows=shard, chunk=2)]
    assert spans == [(4, 6), (6, 7)] and fwd.calls == 2 * (s.steps + 1)
    writer.finish()
    ref = invert(targets[2:7], Affine(), s, keys=ids[2:7])  # the samples depend on their keys only
    np.testing.assert_allclose(np.load(tmp_path / "cut.npy"), ref.features.numpy(), atol=1e-6)


def test_store_input_errors(tmp_path):
    store = EmbeddingStore(tmp_path)
    with pytest.raises(ValueError, match="targets"):
        invert_into_store(store, torch.randn(2, 3), rows(3), Affine(), InversionSettings(),
                          method="oti")
    dup = rows(2)
    dup[1]["id"] = "e0"
    with pytest.raises(ValueError, match="unique ids"):
        invert_into_store(store, torch.randn(2, 3), dup, Affine(), InversionSettings(),
                          method="oti")
    with pytest.raises(ValueError, match="method"):
        invert_into_store(store, torch.randn(2, 3), rows(2), Affine(), InversionSettings(),
                          method="o.ti")


@pytest.fixture(scope="module")
def model_and_store(tmp_path_factory):
    from modalign.model import ModelConfig, MultiTowerModel

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    cfg = ModelConfig(towers={"image": "effnet-lite0", "text": "minilm"},
                      feature_dims={"image": 1280, "text": 384}, joint_dim=16)
    model_dir = MultiTowerModel(cfg).save_pretrained(root / "model")
    store = EmbeddingStore(root / "store")
    gen = np.random.default_rng(0)
    store.add_array("image", gen.random((4, 1280), dtype=np.float32), rows(4, "image"))
    text_rows = [{**r, "view": "name" if i < 2 else "alias"} for i, r in enumerate(rows(4, "text"))]
    store.add_array("text", gen.standard_normal((4, 384)).astype(np.float32), text_rows)
    return model_dir, store


def test_cli_image_to_text_writes_a_keyed_array(model_and_store, capsys):
    model_dir, store = model_and_store
    args = ["invert", "--model", str(model_dir), "--embeddings", str(store.path),
            "--direction", "image-to-text", "--steps", "8", "--batch-size", "3", "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    emb = store.load(summary["array"])
    assert summary["array"].startswith("text.oti.") and emb.vectors.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=1e-5)
    info = store.info(summary["array"])["inversion"]
    assert info["direction"] == "image-to-text" and info["forward"]["template"] == "a photo of {}"
    assert main(args) == 0  # rerun: the same array is reused
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["array"] == summary["array"]


def test_cli_text_to_image_on_the_cnn_with_a_view(model_and_store, capsys):
    model_dir, store = model_and_store
    assert main(["invert", "--model", str(model_dir), "--embeddings", str(store.path),
                 "--direction", "text-to-image", "--view", "name", "--steps", "2",
                 "--num-tokens", "4", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    emb = store.load(summary["array"])
    assert summary["array"].startswith("image.ovi.") and len(emb) == 2
    assert {it["view"] for it in emb.items} == {"name"}
    assert store.info(summary["array"])["inversion"]["forward"]["num_tokens"] == 4


@pytest.mark.parametrize(("extra", "word"), [
    (["--direction", "image-to-audio"], "direction"),
    (["--direction", "sideways"], "direction"),
    (["--direction", "image-to-text", "--view", "nope"], "views"),
])
def test_cli_errors_are_reported(model_and_store, capsys, extra, word):
    model_dir, store = model_and_store
    code = main(["invert", "--model", str(model_dir), "--embeddings", str(store.path),
                 "--no-progress", *extra])
    assert code == 2 and word in capsys.readouterr().err


def test_cli_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        main(["invert", "--help"])
    out = capsys.readouterr().out
    for word in ("--direction", "image-to-text", "--steps", "--template", "resum", "joint space"):
        assert word in out
