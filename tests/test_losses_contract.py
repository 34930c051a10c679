"""The loss contract: class-level declarations that hold, groups refused rather than ignored,
one temperature convention (older keywords read with a FutureWarning), LossOutput everywhere,
part names in the QUERY-to-GALLERY vocabulary."""

from __future__ import annotations

import importlib
import inspect
import math
import warnings

import pytest
import torch

from loss_pins import CASES, compute
from modalign.errors import ModalignError
from modalign.losses import LossTerm, Objective, build_loss, build_objective
from modalign.losses.base import LossModule, ScaledLoss, ScaleOptions, log_scale_bounds
from modalign.losses.registry import available_losses, loss_class
from modalign.model import ModelConfig
from modalign.train.config import TrainConfig, upgrade_config
from modalign.vocabulary import parse_direction

torch.set_num_threads(1)
F64 = torch.float64

# name -> (supports_groups, needs_indices, needs_dataset_size, (min, max) modalities, distributed)
DECLARED = {
    "clip": (True, False, False, (2, 2), True),
    "intra": (True, False, False, (2, 2), True),
    "siglip": (True, False, False, (2, 2), True),
    "uniformity": (False, False, False, (1, None), True),
    "alignment": (False, False, False, (2, 2), True),
    "cross_uniformity": (True, False, False, (2, 2), True),
    "cua": (True, False, False, (2, 2), True),
    "cuaxu": (True, False, False, (2, 2), True),
    "cma": (True, False, False, (2, 2), False),
    "cwcl": (False, False, False, (2, 2), True),
    "isogclr": (False, True, True, (2, 2), False),
    "one_to_k": (False, False, False, (2, 2), True),
    "slap": (False, False, False, (2, 2), False),
    "modx": (False, False, False, (2, 2), True),
    "symile": (False, False, False, (2, None), False),
    "gram": (False, False, False, (2, None), True),
    "mv_infonce": (False, False, False, (2, None), True),
    "mv_dhel": (False, False, False, (2, None), True),
    "m2mix": (False, False, False, (2, 2), True),
    "m3col": (False, False, False, (2, 2), False),
    "pairwise": (False, False, False, (2, None), False),
    "clsr": (False, False, False, (2, 2), True),  # registered by modalign.train.recipes
}
BUILTIN = [n for n in available_losses() if loss_class(n).__module__.startswith("modalign.")]


def test_every_builtin_loss_declares_what_it_needs():
    assert sorted(DECLARED) == sorted(BUILTIN)
    for name, (groups, indices, size, count, distributed) in DECLARED.items():
        cls = loss_class(name)
        assert issubclass(cls, LossModule), name
        got = (cls.supports_groups, cls.needs_indices, cls.needs_dataset_size,
               (cls.min_modalities, cls.max_modalities), cls.distributed)
        assert got == (groups, indices, size, count, distributed), name
        assert ("gather" in cls.parameter_names()) == distributed or name == "slap", name


def _case_inputs(case):
    name, params, keys, kwargs = CASES[case]
    params = dict(params)
    if params.get("generator") == "seeded":
        params["generator"] = torch.Generator().manual_seed(3)
    n = 3 if name in ("symile", "gram", "mv_infonce", "mv_dhel", "pairwise") else 2
    module = build_loss(name, modalities=keys[:n], **params)
    g = torch.Generator().manual_seed(1)
    rows = {"text": 6} if name == "one_to_k" else {}
    emb = {k: torch.randn(rows.get(k, 6 if name != "one_to_k" else 3), 5, generator=g, dtype=F64)
           for k in keys}
    if name == "one_to_k":
        kwargs = {"anchor_rows": torch.tensor([0, 1, 2, 0, 1, 2])}
    return module, emb, {k: v for k, v in kwargs.items() if k != "groups"}


# one_to_k reads groups= as the older name of anchor_rows= (tested below)
@pytest.mark.parametrize("case", [c for c in sorted(CASES) if c not in ("clip_groups",
                                                                          "one_to_k")])
def test_groups_are_used_or_refused_never_ignored(case):
    """A loss that declares groups gives another value with them; the others refuse them."""
    module, emb, kwargs = _case_inputs(case)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    if not module.supports_groups:
        with pytest.raises(ModalignError, match=f"{type(module).__name__}.*does not use groups"):
            module(emb, groups=groups, **kwargs)
        return
    plain = module(emb, **kwargs).loss
    assert not torch.allclose(module(emb, groups=groups, **kwargs).loss, plain)


def test_cma_uses_groups_only_when_label_aware():
    emb = {"image": torch.randn(4, 3, dtype=F64), "text": torch.randn(4, 3, dtype=F64)}
    groups = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ModalignError, match="does not use groups"):
        build_loss("cma", modalities=["image", "text"])(emb, groups=groups)
    aware = build_loss("cma", modalities=["image", "text"], label_aware=True)
    assert aware(emb, groups=groups).loss != aware(emb, groups=torch.arange(4)).loss


def test_objective_refuses_a_term_that_would_ignore_groups_naming_it():
    obj = build_objective([{"loss": "clip", "modalities": ["image", "text"]},
                           {"loss": "uniformity", "modalities": ["image", "text"]}])
    emb = {"image": torch.randn(4, 3), "text": torch.randn(4, 3)}
    with pytest.raises(ModalignError, match=r"\['uniformity\[image,text\]'\]"):
        obj(emb, groups=torch.tensor([0, 0, 1, 1]))
    obj(emb)  # without groups every term runs


def test_objective_routes_indices_anchor_rows_and_dataset_size_by_declaration():
    obj = Objective([
        LossTerm("isogclr", ("image", "text")),
        LossTerm("one_to_k", ("image", "caption")),
        LossTerm("clip", ("image", "text")),
    ], dataset_size=9)
    assert obj.terms[0].dataset_size == 9 and obj.needs_indices and not obj.distributed
    g = torch.Generator().manual_seed(0)
    emb = {"image": torch.randn(3, 4, generator=g), "text": torch.randn(3, 4, generator=g),
           "caption": torch.randn(6, 4, generator=g)}
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    out = obj(emb, indices=torch.tensor([1, 4, 8]), anchor_rows=rows)
    alone = build_loss("one_to_k", modalities=["image", "caption"])(emb, anchor_rows=rows)
    torch.testing.assert_close(out.parts["one_to_k[image,caption]"], alone.loss)
    with pytest.raises(ValueError, match="dataset_size"):
        Objective([LossTerm("isogclr", ("image", "text"))])


def test_temperature_keywords_and_their_older_log_scale_spellings_agree():
    new = build_loss("clip", modalities=["a", "b"], temperature=math.exp(-2.0),
                     learnable_temperature=False, temperature_bounds=(math.exp(-3.0), 1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = build_loss("clip", modalities=["a", "b"], init_logit_scale=2.0,
                         learnable_scale=False, scale_bounds=(0.0, 3.0))
    assert sorted(str(w.message).split(";")[0] for w in caught) == [
        "'init_logit_scale' is deprecated", "'learnable_scale' is deprecated",
        "'scale_bounds' is deprecated"]
    assert all(w.category is FutureWarning and w.filename == __file__ for w in caught)
    assert torch.equal(new.log_logit_scale, old.log_logit_scale)
    assert float(old.log_logit_scale) == 2.0 and not isinstance(old.log_logit_scale,
                                                                torch.nn.Parameter)
    assert new.scale_bounds == pytest.approx(old.scale_bounds, abs=1e-15)
    with pytest.raises(ModalignError, match="give 'temperature' only"):
        build_loss("clip", modalities=["a", "b"], temperature=0.1, init_logit_scale=2.0)
    with pytest.raises(ModalignError, match=r"unknown parameters \['temprature'\]"):
        build_loss("clip", modalities=["a", "b"], temprature=0.1)
    for bad in ({"temperature": 0.0}, {"temperature_bounds": (0.5, 0.1)},
                {"init_logit_bias": math.inf}):
        with pytest.raises(ModalignError, match=next(iter(bad))):
            ScaleOptions(**bad)


def test_a_learnable_temperature_is_clamped_a_fixed_one_is_left_alone():
    assert log_scale_bounds((0.01, 1.0)) == (0.0, math.log(100.0))
    learn = build_loss("clip", modalities=["a", "b"], temperature=0.5)
    fixed = build_loss("clip", modalities=["a", "b"], temperature=2.0, learnable_temperature=False)
    with torch.no_grad():
        learn.log_logit_scale.fill_(9.0)
    learn.clamp_()
    fixed.clamp_()
    assert learn.temperature() == pytest.approx(0.01)
    assert fixed.temperature() == pytest.approx(2.0)


def test_isogclr_reads_its_older_keywords_and_a_fixed_temperature_stays():
    with pytest.warns(FutureWarning, match="'temperature'"):
        old = build_loss("isogclr", modalities=["a", "b"], dataset_size=4, tau_init=0.05,
                         tau_min=0.02, tau_max=0.5)
    new = build_loss("isogclr", modalities=["a", "b"], dataset_size=4, temperature=0.05,
                     temperature_bounds=(0.02, 0.5))
    assert (old.tau_min, old.tau_max) == (new.tau_min, new.tau_max) == (0.02, 0.5)
    assert torch.equal(old.tau, new.tau)
    fixed = build_loss("isogclr", modalities=["a", "b"], dataset_size=4,
                       learnable_temperature=False)
    emb = {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}
    for loss in (new, fixed):
        loss(emb, indices=torch.arange(4))
    assert torch.all(fixed.tau == 0.01) and not torch.all(new.tau == 0.05)


def test_one_to_k_and_modx_read_their_older_keywords():
    g = torch.Generator().manual_seed(0)
    emb = {"image": torch.randn(2, 4, generator=g, dtype=F64),
           "text": torch.randn(4, 4, generator=g, dtype=F64)}
    rows = torch.tensor([0, 1, 1, 0])
    loss = build_loss("one_to_k", modalities=["image", "text"])
    with pytest.warns(FutureWarning, match="pass anchor_rows="):
        old = loss(emb, groups=rows)
    assert torch.equal(old.loss, loss(emb, anchor_rows=rows).loss)
    from modalign.losses.modx import modx_loss

    x = [torch.randn(5, 3, generator=g, dtype=F64) for _ in range(4)]
    with pytest.warns(FutureWarning, match="logit_scale=1/tau"):
        by_tau = modx_loss(*x, temperature=0.25).loss
    torch.testing.assert_close(by_tau, modx_loss(*x, 4.0).loss, rtol=1e-14, atol=0)


def test_every_functional_loss_returns_loss_output():
    seen = 0
    for name in sorted({loss_class(n).__module__ for n in BUILTIN}):
        module = importlib.import_module(name)
        for fn_name, fn in vars(module).items():
            if fn_name.endswith("_loss") and inspect.isfunction(fn) and fn.__module__ == name:
                assert inspect.signature(fn).return_annotation == "LossOutput", fn_name
                seen += 1
    assert seen == 16


@pytest.mark.parametrize("case", sorted(CASES))
def test_part_names_are_in_the_training_log_vocabulary(case):
    renamed = {"groups": "anchor_rows"} if case == "one_to_k" else None
    for key in compute(case, renamed)["parts"]:
        leaf = key.split("/")[-1]
        assert "->" not in leaf and "_to_" not in leaf and leaf not in ("i2t", "t2i"), key
        if "-to-" in leaf:
            query, gallery = parse_direction(leaf)
            assert query and gallery


def test_scaled_losses_share_one_constructor_for_the_scale():
    """No scaled loss restates the ScaleOptions keywords in its own signature."""
    for name in BUILTIN:
        cls = loss_class(name)
        if not issubclass(cls, ScaledLoss):
            continue
        own = inspect.signature(cls.__init__).parameters
        assert not {"temperature", "learnable_temperature", "init_logit_scale"} & set(own), name


def test_model_and_train_configs_name_the_temperature():
    base = {"towers": {"image": "effnet-lite0"}, "feature_dims": {"image": 6}}
    assert ModelConfig.from_dict({**base, "logit_scale_init": 20.0,
                                  "learn_logit_scale": False}).temperature == 0.05
    with pytest.warns(FutureWarning, match="use temperature"):
        assert ModelConfig(**base, logit_scale_init=20.0).temperature == 0.05
    with pytest.warns(FutureWarning, match="model.logit_scale_init is deprecated; use "
                                           "model.temperature"):
        cfg = TrainConfig.from_dict({"model": {"logit_scale_init": 10.0}})
    assert cfg.model.temperature == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert upgrade_config({"model": {"logit_scale_init": 4.0}}) == {
            "model": {"temperature": 0.25}}
    with pytest.raises(ModalignError, match=r"model\.temperature"):
        TrainConfig.from_dict({"model": {"temperature": -1.0}})


def test_log_scales_are_read_from_the_modules_in_term_order():
    obj = build_objective([
        {"loss": "cua", "modalities": ["image", "text"]},
        {"loss": "pairwise", "modalities": ["image", "text", "audio"], "pairs": "anchor",
         "temperature": 0.05},
        {"loss": "isogclr", "modalities": ["image", "text"]},
    ], dataset_size=4)
    scales = obj.log_scales()
    assert list(scales) == ["cua[image,text]", "pairwise[image,text,audio]/losses.0",
                            "pairwise[image,text,audio]/losses.1"]
    assert scales["cua[image,text]"] is obj.terms[0].log_logit_scale  # the tensor itself
    second = scales["pairwise[image,text,audio]/losses.1"]
    assert float(second.detach().exp()) == pytest.approx(20.0)
