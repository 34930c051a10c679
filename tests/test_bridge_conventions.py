"""Every bridge follows one set of conventions: parameters from the signature, ``*_`` fitted
attributes, one not-fitted error, ``fit_transform``, and a pickle-free save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from modalign.bridge.base import (
    FORMAT_VERSION,
    BaseBridge,
    NotFittedError,
    load_bridge,
    save_bridge,
)
from modalign.bridge.learned import LearnedBridge, SavedBridge
from modalign.bridge.posthoc import (
    BridgeChain,
    Centering,
    CloseNoise,
    InvGC,
    MeanShift,
    build_bridge,
    build_chain,
)
from modalign.errors import ModalignError
from modalign.io import NewerFormatError


def bank_and_test(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)

    def unit(n, shift):
        return F.normalize(torch.randn(n, 6, generator=g, dtype=dtype) + shift, dim=1)
    bank = {"image": unit(60, 1.0), "text": unit(60, -1.0)}
    test = {"image": unit(12, 1.0), "text": unit(12, -1.0), "image:noto": unit(5, 1.0)}
    return bank, test


def fresh_bridges():
    """One of each kind, unfitted (the learned one fits on the bank's matched rows)."""
    return [Centering(), MeanShift("text", "image", scale=0.5), InvGC(r_gallery=0.2),
            InvGC(local_adj=True, pool_rate=0.1), CloseNoise(std=0.0, shift_target="image"),
            LearnedBridge("lstsq", "text", "image", ridge=0.1),
            BridgeChain([Centering(), InvGC("image", "text", local_adj=True, pool_rate=0.1)])]


@pytest.mark.parametrize("index", range(7))
def test_parameters_come_from_the_signature_and_fitted_state_ends_in_underscore(index):
    bridge = fresh_bridges()[index]
    params = bridge.get_params(deep=False)
    assert list(params) == type(bridge).param_names()
    assert not [a for a in vars(bridge) if a.endswith("_") and not a.startswith("_")]
    clone = type(bridge)(**params)
    assert clone.get_params(deep=False).keys() == params.keys()
    bank, _ = bank_and_test()
    bridge.fit(bank)
    assert bridge.is_fitted() and all(a.endswith("_") for a in bridge.fitted_attributes)
    with pytest.raises(ModalignError, match="unknown parameter"):
        bridge.set_params(no_such_thing=1)


@pytest.mark.parametrize("bridge", [Centering(), MeanShift(), InvGC(),
                                    LearnedBridge("procrustes", "text", "image"),
                                    CloseNoise(shift_target="image").train(),
                                    BridgeChain([MeanShift()])])
def test_one_not_fitted_error(bridge):
    _, test = bank_and_test()
    with pytest.raises(NotFittedError, match="not fitted") as err:
        bridge.transform(test)
    assert isinstance(err.value, ModalignError) and isinstance(err.value, ValueError)
    with pytest.raises(NotFittedError):
        save_bridge(bridge, "unused")


def test_close_noise_without_a_shift_needs_no_fit():
    _, test = bank_and_test()
    out = CloseNoise(std=0.1, seed=0).train().transform(test)
    assert torch.allclose(out["text"].norm(dim=1), torch.ones(12, dtype=torch.float64))


@pytest.mark.parametrize("index", range(7))
def test_fit_transform_equals_fit_then_transform(index):
    bank, _ = bank_and_test()
    a, b = fresh_bridges()[index], fresh_bridges()[index]
    one = a.fit_transform(bank)
    two = b.fit(bank).transform(bank)
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_values_match_the_formulas_in_float64():
    bank, test = bank_and_test()
    out = Centering(renormalize=False).fit(bank).transform(test)
    assert torch.allclose(out["image:noto"], test["image:noto"] - bank["image"].mean(0),
                          rtol=0, atol=1e-12)
    shift = MeanShift("text", "image", scale=0.5, renormalize=False).fit(bank)
    expected = test["text"] + 0.5 * (bank["image"].mean(0) - bank["text"].mean(0))
    assert torch.allclose(shift.transform(test)["text"], expected, rtol=0, atol=1e-12)
    chain = BridgeChain([Centering(renormalize=False), MeanShift(renormalize=False)]).fit(bank)
    centred = {k: v - v.mean(0) for k, v in bank.items()}
    gap = centred["image"].mean(0) - centred["text"].mean(0)  # ~0: centring removed the gap
    manual = test["text"] - bank["text"].mean(0) + gap
    assert torch.allclose(chain.transform(test)["text"], manual, rtol=0, atol=1e-12)


def test_set_params_checks_like_the_constructor_and_forgets_the_fit():
    bank, _ = bank_and_test()
    b = InvGC().fit(bank)
    assert b.set_params(r_gallery=0.4) is b and b.r_gallery == 0.4 and not b.is_fitted()
    with pytest.raises(ValueError, match="pool_rate"):
        b.set_params(pool_rate=0)
    chain = build_chain(["centering", "invgc"], gallery="image", query="text")
    assert chain.get_params()["1__r_query"] == 0.1
    chain.set_params(**{"1__r_query": 0.3, "0__renormalize": False})
    assert chain.bridges[1].r_query == 0.3 and chain.bridges[0].renormalize is False
    with pytest.raises(ModalignError, match="<i>__<param>"):
        chain.set_params(**{"5__r_query": 0.3})
    assert repr(MeanShift(scale=0.5)) == "MeanShift(scale=0.5)"


@pytest.mark.parametrize("index", range(7))
def test_save_and_load_give_the_same_transform(tmp_path, index):
    bank, test = bank_and_test()
    bridge = fresh_bridges()[index].fit(bank)
    path = save_bridge(bridge, tmp_path / "b", extra={"note": "x"})
    meta = json.loads(path.read_text())
    assert meta["format"] == "modalign.bridge" and meta["format_version"] == FORMAT_VERSION
    assert meta["extra"] == {"note": "x"}
    again = load_bridge(tmp_path / "b")
    assert type(again) is type(bridge) and again.identity() == bridge.identity()
    if isinstance(bridge, CloseNoise):
        bridge.train(), again.train()
    before, after = bridge.transform(test), again.transform(test)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_a_chain_with_a_saved_learned_bridge_round_trips(tmp_path):
    bank, test = bank_and_test(torch.float32)
    learned = LearnedBridge("procrustes", "text", "image").fit(bank)
    stem = learned.save(tmp_path).with_suffix("")
    chain = build_chain(["centering", f"learned:path={stem}"]).fit(bank)
    assert isinstance(chain.bridges[1], SavedBridge)
    assert chain.bridges[1].get_params() == {"path": str(stem)}
    save_bridge(chain, tmp_path / "chain")
    again = load_bridge(tmp_path / "chain.json")
    assert isinstance(again, BridgeChain) and type(again.bridges[1]) is LearnedBridge
    assert torch.equal(again.transform(test)["text"], chain.transform(test)["text"])


def test_files_written_before_format_versions_still_load(tmp_path):
    bank, test = bank_and_test(torch.float32)
    new = LearnedBridge("lstsq", "text", "image").fit(bank)
    save_file({k: v.contiguous() for k, v in new.tensors_.items()},
              str(tmp_path / "lstsq-old.safetensors"))
    (tmp_path / "lstsq-old.json").write_text(json.dumps({
        "format": "modalign.LearnedBridge", "id": "lstsq-old", "kind": "lstsq",
        "source": "text", "target": "image", "settings": new.settings, "extra": {}}))
    for old in (LearnedBridge.load(tmp_path / "lstsq-old"), load_bridge(tmp_path / "lstsq-old"),
                build_bridge(f"learned:path={tmp_path / 'lstsq-old'}")):
        assert torch.equal(old.transform(test)["text"], new.transform(test)["text"])
        assert old.bridge_id() == new.bridge_id()


def test_refused_files(tmp_path):
    bank, _ = bank_and_test()
    path = save_bridge(Centering().fit(bank), tmp_path / "c")
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(NewerFormatError, match="upgrade modalign"):
        load_bridge(tmp_path / "c")
    path.write_text(json.dumps({**meta, "format_version": "1"}))
    with pytest.raises(ModalignError, match="format_version '1' is not an integer"):
        load_bridge(tmp_path / "c")
    unversioned = {k: v for k, v in meta.items() if k != "format_version"}
    path.write_text(json.dumps(unversioned))  # version 0: the layout of version 1, read as is
    assert torch.equal(load_bridge(tmp_path / "c").transform(bank)["text"],
                       Centering().fit(bank).transform(bank)["text"])
    path.write_text(json.dumps({**meta, "class": "os.system"}))
    with pytest.raises(ModalignError, match="expected one of"):
        load_bridge(tmp_path / "c")
    with pytest.raises(ModalignError, match=r"c2\.json and c2\.safetensors"):
        load_bridge(tmp_path / "c2")
    with pytest.raises(ModalignError, match="expected matched rows"):
        LearnedBridge().fit({"text": bank["text"], "image": bank["image"][:10]})


def test_every_bridge_is_a_base_bridge():
    from modalign.bridge.posthoc import BRIDGES

    assert all(issubclass(cls, BaseBridge) for cls, _ in BRIDGES.values())


class Scale(BaseBridge):
    """A user's own bridge: multiply one modality by a fitted norm ratio."""

    name = "scale"
    fitted_attributes = ("ratio_",)

    def __init__(self, modality: str = "text") -> None:
        self.modality = modality

    def fit(self, bank):
        self.ratio_ = bank["image"].norm(dim=1).mean() / bank[self.modality].norm(dim=1).mean()
        return self

    def transform(self, embeddings):
        self.check_fitted()
        return {k: v * self.ratio_ if k == self.modality else v for k, v in embeddings.items()}


def test_a_users_bridge_gets_the_conventions_and_does_not_shadow_ours(tmp_path):
    bank, test = bank_and_test()
    bank = {**bank, "text": 2 * bank["text"]}
    chain = BridgeChain([Scale(), Centering()]).fit(bank)
    assert chain.get_params()["0__modality"] == "text" and chain.identity()[0]["name"] == "scale"
    save_bridge(chain, tmp_path / "mine")
    meta = json.loads((tmp_path / "mine.json").read_text())
    assert [b["class"] for b in meta["bridges"]] == [f"{__name__}.Scale", "Centering"]
    again = load_bridge(tmp_path / "mine")
    assert type(again.bridges[0]) is Scale and float(again.bridges[0].ratio_) == 0.5
    assert torch.equal(again.transform(test)["text"], chain.transform(test)["text"])
