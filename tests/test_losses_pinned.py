"""Every loss gives the values, parts and gradients it gave before the losses were consolidated
(float64, within 1e-12), and loads the state dicts it wrote then.

The recorded figures are in ``tests/data/loss_pins.json`` (see ``tests/loss_pins.py``); the part
names of the time are mapped to today's names below: the record of what was renamed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from loss_pins import CASES, PIN_FILE, compute
from modalign.losses import build_loss

PINS = json.loads(PIN_FILE.read_text())

# Part names that changed (old -> new), besides "a->b" -> "a-to-b" everywhere.
RENAMED_PARTS = {
    "cma": {"i2t": "image-to-text", "t2i": "text-to-image"},
    "cwcl": {"frozen_to_trained": "image-to-text", "trained_to_frozen": "text-to-image"},
    "one_to_k": {"anchor_to_candidates": "image-to-text", "candidate_to_anchor": "text-to-image"},
    "slap": {"a_to_b": "audio-to-text", "b_to_a": "text-to-audio", "a_to_a": "audio-to-audio",
             "b_to_b": "text-to-text"},
    "modx": {"x_to_y": "image-to-text", "y_to_x": "text-to-image"},
    "gram": {"anchor_to_tuple": "text-to-video+audio", "tuple_to_anchor": "video+audio-to-text"},
    "m2mix": {"x_anchor": "image-to-mixed", "y_anchor": "text-to-mixed"},
    "m3col": {"mixed_x": "mixed-image", "mixed_y": "mixed-text"},
}
# Call keywords that changed (old -> new).
RENAMED_KEYWORDS = {"one_to_k": {"groups": "anchor_rows"}}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_parts_and_gradients_are_unchanged(case):
    old = PINS[case]
    new = compute(case, RENAMED_KEYWORDS.get(case))
    assert close(new["loss"], old["loss"]), (new["loss"], old["loss"])
    names = RENAMED_PARTS.get(case, {})
    expected = {names.get(k, k.replace("->", "-to-")): v for k, v in old["parts"].items()}
    assert set(new["parts"]) == set(expected)
    for key, value in expected.items():
        assert close(new["parts"][key], value), key
    for key, grad in old["grads"].items():
        if grad is None:
            assert new["grads"][key] is None
            continue
        a, b = torch.tensor(new["grads"][key]), torch.tensor(grad)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dicts_written_before_still_load(case):
    name, params, keys, _ = CASES[case]
    params = {k: v for k, v in params.items() if k != "generator"}
    n = 3 if name in ("symile", "gram", "mv_infonce", "mv_dhel", "pairwise") else 2
    module = build_loss(name, modalities=keys[:n], **params)
    old = {k: torch.tensor(v) for k, v in PINS[case]["state"].items()}
    module.load_state_dict(old, strict=True)  # modx wrote no temperature then: it keeps tau = 1
    state = module.state_dict()
    for key, value in old.items():
        assert torch.equal(state[key].to(value.dtype), value), key
    assert set(state) - set(old) <= {"log_logit_scale"}
