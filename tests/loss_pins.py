"""Cases whose values and gradients were recorded before the losses were consolidated.

``tests/data/loss_pins.json`` holds, per case, the loss, its parts (under the part names of the
time) and the gradient of the loss with respect to every input, in float64, as computed by the
loss modules built with their defaults; ``test_losses_pinned.py`` recomputes them with today's
code. Write the file again only for a deliberate change of results:
``python tests/loss_pins.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from modalign.losses import build_loss

PIN_FILE = Path(__file__).parent / "data" / "loss_pins.json"

B, D = 6, 5


def inputs(keys: list[str], seed: int, rows: dict[str, int] | None = None
           ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn((rows or {}).get(k, B), D, generator=g, dtype=torch.float64)
            for k in keys}


def _pair(name: str, **params: Any) -> tuple[str, dict[str, Any], list[str], dict[str, Any]]:
    return name, params, ["image", "text"], {}


# case id -> (loss name, constructor params, embedding keys, call keyword arguments)
CASES: dict[str, tuple[str, dict[str, Any], list[str], dict[str, Any]]] = {
    "clip": _pair("clip", impl="full"),
    "clip_tiled": _pair("clip", impl="tiled", tile_size=4),
    "clip_groups": ("clip", {"impl": "full"}, ["image", "text"],
                    {"groups": torch.tensor([0, 1, 0, 2, 1, 3])}),
    "clip_bias": _pair("clip", impl="full", init_logit_bias=0.5),
    "siglip": _pair("siglip", impl="full"),
    "siglip_tiled": _pair("siglip", impl="tiled", tile_size=4),
    "intra": ("intra", {}, ["image", "image:style"], {}),
    "uniformity": _pair("uniformity"),
    "alignment": _pair("alignment"),
    "cross_uniformity": _pair("cross_uniformity"),
    "cua": _pair("cua"),
    "cuaxu": _pair("cuaxu"),
    "cma": _pair("cma"),
    "cwcl": _pair("cwcl"),
    "isogclr": ("isogclr", {"dataset_size": 10, "rho": 8.0}, ["image", "text"],
                {"indices": torch.tensor([0, 2, 3, 5, 7, 9])}),
    "one_to_k": ("one_to_k", {}, ["image", "text"], {"groups": torch.tensor([0, 1, 2, 0, 1, 2])}),
    "slap": ("slap", {}, ["audio", "text", "audio_target", "text_target"], {}),
    "modx": ("modx", {}, ["image", "text", "image_old", "text_old"], {}),
    "symile": ("symile", {"negatives": "n_squared"}, ["a", "b", "c"], {}),
    "gram": ("gram", {}, ["text", "video", "audio"], {}),
    "mv_infonce": ("mv_infonce", {}, ["v0", "v1", "v2"], {}),
    "mv_dhel": ("mv_dhel", {}, ["v0", "v1", "v2"], {}),
    "pairwise": ("pairwise", {"pairs": "anchor"}, ["image", "text", "audio"], {}),
    "m2mix": ("m2mix", {"generator": "seeded"}, ["image", "text"], {}),
    "m3col": ("m3col", {"generator": "seeded"}, ["image", "text"], {}),
}

ROWS = {"one_to_k": {"image": 3}}


def compute(case: str, renamed: dict[str, str] | None = None) -> dict[str, Any]:
    """Loss, parts and input gradients of ``case`` (float64 inputs, seed fixed per case);
    ``renamed`` maps a call keyword of the case to the name to pass it under."""
    name, params, keys, kwargs = CASES[case]
    kwargs = {(renamed or {}).get(k, k): v for k, v in kwargs.items()}
    params = dict(params)
    if params.get("generator") == "seeded":
        params["generator"] = torch.Generator().manual_seed(3)
    module = build_loss(name, modalities=keys[:3] if name in ("symile", "gram", "mv_infonce",
                                                              "mv_dhel", "pairwise") else keys[:2],
                        **params)
    emb = {k: v.requires_grad_(True) for k, v in inputs(keys, len(case), ROWS.get(case)).items()}
    out = module(emb, **kwargs)
    if name == "isogclr":  # a second step reads the state the first one wrote
        out = module(emb, **kwargs)
    grads = torch.autograd.grad(out.loss, list(emb.values()), allow_unused=True)
    return {
        "loss": float(out.loss.detach()),
        "parts": {k: float(v.detach()) for k, v in out.parts.items()},
        "grads": {k: None if g is None else g.tolist()
                  for k, g in zip(emb, grads, strict=True)},
        "state": {k: v.tolist() for k, v in module.state_dict().items() if v.numel() < 50},
    }


if __name__ == "__main__":
    PIN_FILE.parent.mkdir(exist_ok=True)
    PIN_FILE.write_text(json.dumps({c: compute(c) for c in CASES}) + "\n")
