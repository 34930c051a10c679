"""OTI and OVI throughput per backbone family of Cross the Gap, at the paper's tower sizes.

Prints one JSON object per line: ``family``, ``method``, ``batch``, ``steps``, ``items_per_s``
(samples inverted per wall-clock second, extrapolated to the paper's 150 OTI / 1000 OVI steps from
the measured seconds per step) and ``items_per_cpu_s`` (the same per second of this process's CPU
time). Random weights at the published sizes (nothing is downloaded):

* ``hf-clip``: transformers CLIP ViT-B/32 (text width 512, 12 layers; vision width 768, 49
  patches); OTI on the exact fast causal path (EOS truncation + prefix cache);
* ``hf-siglip``: transformers SigLIP B/16 (text width 768, 12 layers, 64 positions run in full;
  vision 196 patches, attention-pooling head), P = 4;
* ``openai-layout``: the OpenAI ``clip`` package's ViT-B/32 model (the open_clip layout), full
  77-position text;
* ``slip``: SLIP ViT-B/16 (timm-layout trunk, CLIP text tower with a model-level causal mask:
  OTI cut at the EOT), P = 1.

Usage:
    python benchmarks/inversion_families.py --batch 8 --steps 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from modalign.bridge.inversion import (
    InversionSettings,
    OpenAITextInversion,
    OpenAIVisionInversion,
    TemplateTokens,
    clip_vision_inversion,
    invert,
    text_model_inversion,
)

CLIP_TEMPLATE = TemplateTokens((49406, 320, 1125, 539, 333, 49407), slot=4, text="a photo of {}")
SIGLIP_TEMPLATE = TemplateTokens((262, 266, 1304, 267, 333, 1) + (1,) * 58, slot=4,
                                 text="a photo of {} (padded to 64)")


def families() -> dict:
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from modalign.reproduce.slip import SLIPModel

    torch.manual_seed(0)
    out = {}
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=8, eos_token_id=49407),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=32),
        projection_dim=512)).eval()
    out["hf-clip"] = (lambda: text_model_inversion(clip, CLIP_TEMPLATE),
                      lambda: clip_vision_inversion(clip, 1))
    siglip = SiglipModel(SiglipConfig(
        text_config=dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=64),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=16))).eval()
    out["hf-siglip"] = (lambda: text_model_inversion(siglip, SIGLIP_TEMPLATE),
                        lambda: clip_vision_inversion(siglip, 4))
    spec = importlib.util.find_spec("clip")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "model.py"
        mspec = importlib.util.spec_from_file_location("openai_clip_model", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        oai = module.CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12).float().eval()
        out["openai-layout"] = (lambda: OpenAITextInversion(oai, CLIP_TEMPLATE),
                                lambda: OpenAIVisionInversion(oai, 1))
    slip = SLIPModel().eval()
    out["slip"] = (lambda: OpenAITextInversion(slip, CLIP_TEMPLATE),
                   lambda: OpenAIVisionInversion(slip, 1))
    return out


def measure(fwd, batch: int, steps: int, paper_steps: int) -> dict:
    with torch.no_grad():
        dim = fwd(torch.zeros(1, fwd.num_tokens, fwd.token_dim)).shape[-1]
    targets = F.normalize(torch.randn(batch, dim), dim=-1)
    invert(targets[:1], fwd, InversionSettings(steps=1))  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    invert(targets, fwd, InversionSettings(steps=steps, batch_size=batch))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # one extra forward at the end: charge it once, as over the paper's steps
    per_step_wall, per_step_cpu = wall / (steps + 0.5), cpu / (steps + 0.5)
    return {"items_per_s": round(batch / (per_step_wall * paper_steps), 4),
            "items_per_cpu_s": round(batch / (per_step_cpu * paper_steps), 4),
            "s_per_step": round(per_step_wall, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="families to run")
    p.add_argument("--methods", nargs="*", default=["oti", "ovi"], help="oti and/or ovi")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for family, (make_oti, make_ovi) in families().items():
        if args.only and family not in args.only:
            continue
        for method, make, paper_steps in (("oti", make_oti, 150), ("ovi", make_ovi, 1000)):
            if method not in args.methods:
                continue
            row = {"benchmark": "inversion_families", "family": family, "method": method,
                   "batch": args.batch, "steps": args.steps, "paper_steps": paper_steps,
                   "threads": args.threads, **measure(make(), args.batch, args.steps,
                                                      paper_steps)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
