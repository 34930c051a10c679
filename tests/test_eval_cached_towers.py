"""eval --model --data with a cached store: towers are built only when the store must be
(re)encoded, the numbers equal those of the path that builds them, and a changed weight file,
config file or folder is noticed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modalign import encoders
from modalign.data import load_dataset
from modalign.data.dataset import Item, PairedDataset
from modalign.embed.encode import array_key, inputs_hash
from modalign.embed.paths import default_store_dir
from modalign.embed.store import EmbeddingStore
from modalign.encoders import register_encoder
from modalign.encoders.identity import CACHE, remember_identity, remembered_identity
from modalign.evaluate.runner import run
from modalign.io import cached_file_hash
from modalign.model import ModelConfig, MultiTowerModel
from modalign.paths import home

DIM = 6
BUILDS: list[str] = []


class Projected:
    """A text tower of one's own: letter counts (16 bins) times a weight matrix read from a
    ``.npy`` file; its identity hashes that file, as the built-in towers hash their weights."""

    dim = DIM

    def __init__(self, weights: str, modality: str | None) -> None:
        self.name, self.modality, self.weights = f"proj:{weights}", modality or "text", weights
        self.matrix = torch.from_numpy(np.load(weights))
        BUILDS.append(str(modality))

    def preprocess(self, inputs):
        out = torch.zeros(len(inputs), 16, dtype=torch.float64)
        for row, text in enumerate(inputs):
            for ch in text:
                out[row, ord(ch) % 16] += 1.0
        return out

    def encode(self, batch):
        return (batch @ self.matrix).float()

    def identity(self):
        return {"name": self.name, "dim": self.dim, "weights_hash": cached_file_hash(self.weights)}


def _proj(arg, modality, **options):
    return Projected(arg, modality)


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    monkeypatch.setattr(encoders, "_REGISTRY", dict(encoders._REGISTRY))
    register_encoder("proj", _proj, description="text: letter counts times a matrix")
    BUILDS.clear()


def _weights(folder, seed):
    folder.mkdir(exist_ok=True)
    path = folder / "w.npy"
    np.save(path, np.random.default_rng(seed).normal(size=(16, DIM)))
    return path


@pytest.fixture
def setup(tmp_path):
    """A manifest of 40 pairs (text, title), a tower spec and an untrained model folder."""
    words = ["red", "blue", "green", "small", "large", "old", "new", "soft"]
    rows = ["text,title:name,group,split"]
    for i in range(40):
        a, b = words[i % 8], words[(i // 8) % 8]
        rows.append(f"a {a} {b} thing {i},{b} {a} {i},g{i},{'test' if i % 2 else 'train'}")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("\n".join(rows) + "\n")
    spec = f"proj:{_weights(tmp_path / 'tower', 0)}"
    torch.manual_seed(0)
    cfg = ModelConfig(towers={"text": spec, "title": spec}, feature_dims={"text": DIM,
                      "title": DIM}, joint_dim=4)
    model = MultiTowerModel(cfg).save_pretrained(tmp_path / "model")
    return manifest, spec, model


def _eval(manifest, model):
    out = run(model=model, data=manifest, modalities="text,title", split="all", k=(1, 5),
              bootstrap=50)
    return out.result.metrics


def test_a_cached_store_needs_no_tower_and_gives_the_numbers_of_the_building_path(setup):
    manifest, _, model = setup
    first = _eval(manifest, model)  # encodes the store, builds both towers
    assert sorted(BUILDS) == ["text", "title"]
    BUILDS.clear()
    again = _eval(manifest, model)
    assert BUILDS == []  # the store key came from the remembered identities
    (home() / CACHE).unlink()
    rebuilt = _eval(manifest, model)  # the path before: towers built to compute the key
    assert sorted(BUILDS) == ["text", "title"]
    assert first == again == rebuilt
    assert len(first) == 24 and first["text_retrieval_recall@5"] > 0


def test_a_changed_weight_file_is_noticed_and_the_store_re_encoded(setup):
    manifest, spec, model = setup
    _eval(manifest, model)
    ds = load_dataset(str(manifest))
    store = EmbeddingStore(default_store_dir(ds, {"text": spec, "title": spec}))
    old_key = store.info("text")["hash"]
    _weights(setup[0].parent / "tower", 1)  # same path, new values
    BUILDS.clear()
    _eval(manifest, model)
    assert sorted(BUILDS) == ["text", "title"]
    assert store.info("text")["hash"] != old_key
    tower = Projected(spec.split(":", 1)[1], "text")
    items = ds.select(modality="text")
    expected = tower.encode(tower.preprocess([it.value for it in items])).numpy()
    np.testing.assert_allclose(store.load("text").vectors, expected, rtol=1e-6)


def test_a_remembered_identity_is_forgotten_when_anything_beside_the_weights_changes(tmp_path):
    weights = _weights(tmp_path / "tower", 0)
    spec = f"proj:{weights}"
    identity = remember_identity(spec, "text", Projected(str(weights), "text"))
    assert remembered_identity(spec, "text") == identity
    assert remembered_identity(spec, "title") is None  # each modality is its own entry
    (tmp_path / "tower" / "config.json").write_text("{}")  # a file added beside the weights
    assert remembered_identity(spec, "text") is None
    remember_identity(spec, "text", Projected(str(weights), "text"))
    assert remembered_identity(spec, "text") == identity
    (tmp_path / "tower" / "config.json").write_text('{"max_length": 8}')  # an edited config
    assert remembered_identity(spec, "text") is None
    remember_identity(spec, "text", Projected(str(weights), "text"))
    np.save(weights, np.load(weights) * 2)  # new weights
    assert remembered_identity(spec, "text") is None


def test_another_environment_has_its_own_entries(tmp_path, monkeypatch):
    weights = _weights(tmp_path / "tower", 0)
    spec = f"proj:{weights}"
    monkeypatch.delenv("HF_HOME", raising=False)
    identity = remember_identity(spec, "text", Projected(str(weights), "text"))
    assert remembered_identity(spec, "text") == identity
    with monkeypatch.context() as m:
        m.setattr("sys.prefix", str(tmp_path / "other-venv"))  # its weights may be other files
        assert remembered_identity(spec, "text") is None
    with monkeypatch.context() as m:
        m.setenv("HF_HOME", str(tmp_path / "hub"))  # hub names resolve to other folders
        assert remembered_identity(spec, "text") is None
    with monkeypatch.context() as m:
        m.chdir(tmp_path / "tower")  # a relative path in a spec names another file
        assert remembered_identity(spec, "text") is None
    assert remembered_identity(spec, "text") == identity


def test_towers_that_cannot_be_checked_are_not_remembered(tmp_path, monkeypatch):
    class NoFiles:
        name, modality, dim = "proj:x", "text", 2

        def identity(self):
            return {"name": self.name}

    assert remember_identity("proj:x", "text", NoFiles()) == {"name": "proj:x"}
    assert remembered_identity("proj:x", "text") is None  # it hashed no file
    weights = _weights(tmp_path / "t", 0)
    remember_identity(f"unknown:{weights}", "text", Projected(str(weights), "text"))
    assert remembered_identity(f"unknown:{weights}", "text") is None  # no registered factory
    monkeypatch.setattr("modalign.encoders.identity.MAX_FILES", 2)
    for name in ("a.json", "b.json"):
        (tmp_path / "t" / name).write_text("{}")
    remember_identity(f"proj:{weights}", "text", Projected(str(weights), "text"))
    assert remembered_identity(f"proj:{weights}", "text") is None  # too many files to stamp


def test_the_array_key_is_stable_across_versions():
    """The key of a cached array must not move unless what is stored changes: a new key
    re-encodes every store of every user (STORE_FORMAT's note says when that is right)."""
    ds = PairedDataset("toy", [Item("a", "text", "v", "a red apple", "g1", "test"),
                               Item("b", "text", "v", "a blue car", "g2", "test")])
    identity = {"name": "minilm", "modality": "text", "dim": 384, "architecture": "BertModel",
                "weights_hash": "fc3ed5e01ab46127",
                "preprocessing": "BertTokenizer, truncation at 256 tokens", "pooling": "mean + L2"}
    # the key stores written since STORE_FORMAT 3 hold for these inputs (inputs_hash before
    # array_key was split out of it computed the same)
    assert array_key(ds, ds.items, identity) == "78bdcfe783f077b5"

    class Tower:
        def identity(self):
            return identity

    assert inputs_hash(ds, ds.items, Tower()) == array_key(ds, ds.items, identity)


def test_normalised_and_plain_vectors_never_stand_in_for_each_other(tmp_path):
    from modalign.embed import embed_dataset

    words = ["a red apple", "a blue car", "an old green door"]
    ds = PairedDataset("toy", [Item(f"t{i}", "text", "v", w, f"g{i}", "test")
                               for i, w in enumerate(words)])
    tower = Projected(str(_weights(tmp_path / "t", 0)), "text")
    plain = tower.encode(tower.preprocess(words)).numpy()
    store = embed_dataset(ds, {"text": tower}, tmp_path / "s", progress=False)
    np.testing.assert_allclose(store.load("text").vectors, plain, rtol=1e-6)
    store = embed_dataset(ds, {"text": tower}, tmp_path / "s", progress=False, normalize=True)
    unit = plain / np.linalg.norm(plain, axis=1, keepdims=True)
    np.testing.assert_allclose(store.load("text").vectors, unit, rtol=1e-5)
    assert store.info("text")["normalized"] is True
    store = embed_dataset(ds, {"text": tower}, tmp_path / "s", progress=False)
    np.testing.assert_allclose(store.load("text").vectors, plain, rtol=1e-6)


def test_modalign_embed_builds_no_tower_when_its_arrays_are_current(setup, capsys):
    from modalign.cli import main

    manifest, spec, _ = setup
    argv = ["embed", "--data", str(manifest), "--tower", f"text={spec}", "--tower",
            f"title={spec}"]
    assert main(argv) == 0
    assert sorted(BUILDS) == ["text", "title"]
    BUILDS.clear()
    assert main(argv) == 0  # current arrays: no tower built, the store reported as before
    assert BUILDS == []
    assert main([*argv, "--normalize"]) == 0  # normalised arrays have keys of their own
    assert sorted(BUILDS) == ["text", "title"]
    BUILDS.clear()
    _weights(manifest.parent / "tower", 1)  # new weights: the arrays are stale again
    assert main(argv) == 0
    assert sorted(BUILDS) == ["text", "title"]
    assert '"arrays": ["text", "title"]' in capsys.readouterr().out
