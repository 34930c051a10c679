"""Modality inversion throughput: ours against the official code's way of running it.

Prints one JSON object per line (see DESIGN.md), metric ``items_per_s`` (samples inverted per
wall-clock second for ``steps`` optimisation steps), ``items_per_cpu_s`` (per second of this
process's CPU time, all threads: the steadier figure on a shared machine) and, for the CLIP text
tower, ``peak_mb`` (resident-set high-water above the loaded tower, each implementation in a
fresh subprocess).

Cases (random weights: speed does not need trained ones):

* ``oti / clip-text``: a transformers CLIP text tower of ViT-B/32 size (width 512, 12 layers,
  8 heads, 77 positions, vocabulary 49408), template ``"a photo of {}"`` (6 live positions, 4 of
  them a fixed prefix). Ours: :class:`CausalTextInversion` (EOS truncation + prefix keys/values
  computed once). Variant ``eos-only``: truncation without the prefix cache. Baseline: the
  official loop -- the whole 77-position padded context through every layer under a causal mask
  at every step, ``CosineEmbeddingLoss`` (mean), ``loss.backward()``, AdamW.
* ``oti / minilm``: the built-in MiniLM tower (6 unpadded positions) against the same official
  loop on the template padded to 77 positions with an attention mask.
* ``ovi / clip-vision``: a ViT-B/32-size CLIP vision tower (width 768, 12 layers, 224 px, 49
  patches), ``P = 1``. No shortcut exists (every position sees the pseudo-patches): the baseline
  is the official loop around the same tower, so the ratio shows the loop's overhead only.
* ``ovi / effnet-lite0``: the built-in CNN at 96 px, pseudo-patches at the stem's output
  (``P = 16``), against the official-style loop around the same forward. Variant ``folded-bn``:
  ours with the BatchNorms folded into the convolutions (``fold_bn=True``; equal up to float32
  rounding, not bitwise).

Both sides end with one forward of the final tokens (ours returns their features; the official
evaluation re-encodes the saved tokens), so the ratio is per optimisation run.

The ``floor_fraction`` row (OTI on MiniLM) sets ours (the lean BERT forward) and the previous
path (the tower's own transformers forward) against the matrix-product FLOPs of the live
positions at the rate this process measures for those products (see :func:`oti_floor`).

Usage:
    python benchmarks/inversion.py            # OTI batch 32, OVI batch 8, 10 steps, best of 2
    python benchmarks/inversion.py --quick    # OTI batch 8, OVI batch 2, 2 steps, one run
    python benchmarks/inversion.py --batch 16 --steps 4 --repeats 3 --only minilm,floor
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn

from modalign.bridge.inversion import (
    CausalTextInversion,
    InversionSettings,
    TemplateTokens,
    ViTInversion,
    invert,
)

NAME = "inversion"
BASELINE = "official loop: full padded context, mean CosineEmbeddingLoss, backward, AdamW"
CONTEXT = 77
# "<sot> a photo of <slot> <eot>" in the CLIP BPE vocabulary
CLIP_TEMPLATE = TemplateTokens(ids=(49406, 320, 1125, 539, 333, 49407), slot=4,
                               text="a photo of {}")


def clip_text_tower() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=8,
                         max_position_embeddings=CONTEXT, eos_token_id=49407, bos_token_id=49406)
    return CLIPTextModel(cfg).eval()


def clip_vision_tower() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=32)
    return CLIPVisionModel(cfg).eval()


def official_clip_text(tower: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The official encode_with_pseudo_tokens: 77 positions, causal mask, EOS = argmax(ids)."""
    t = CLIP_TEMPLATE
    ids = torch.tensor([list(t.ids) + [0] * (CONTEXT - len(t.ids))])
    causal = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)[None, None]

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        x = tower.embeddings.token_embedding(ids).expand(b, -1, -1)
        x = torch.cat([x[:, : t.slot], tokens, x[:, t.slot + 1:]], dim=1)
        h = tower.embeddings(inputs_embeds=x)
        h = tower.encoder(inputs_embeds=h, attention_mask=causal).last_hidden_state
        h = tower.final_layer_norm(h)
        return h[torch.arange(b), ids.expand(b, -1).argmax(-1)]

    return forward


def official_padded_bert(encoder) -> Callable[[torch.Tensor], torch.Tensor]:
    """The template padded to 77 positions with an attention mask, mean pooling over real ones."""
    t = TemplateTokens.from_tokenizer(encoder.tokenizer, "a photo of {}")
    pad = encoder.tokenizer.pad_token_id or 0
    ids = torch.tensor([list(t.ids) + [pad] * (CONTEXT - len(t.ids))])
    mask = torch.zeros(1, CONTEXT, dtype=torch.long)
    mask[:, : len(t.ids)] = 1

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        x = encoder.token_embedding(ids).expand(b, -1, -1)
        x = torch.cat([x[:, : t.slot], tokens, x[:, t.slot + 1:]], dim=1)
        return encoder.encode_embeddings(x, mask.expand(b, -1))

    return forward


def official_vit(tower: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The official encode_image_with_pseudo_tokens: nearest interpolation over the patch grid."""
    emb = tower.embeddings
    n, d = emb.num_patches, emb.class_embedding.shape[0]

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        x = F.interpolate(tokens.unsqueeze(2).transpose(1, 2), size=(n, d), mode="nearest")
        x = x.transpose(1, 2).squeeze(2)
        x = torch.cat([emb.class_embedding.expand(b, 1, -1), x], dim=1)
        x = tower.pre_layrnorm(x + emb.position_embedding.weight[None])
        h = tower.encoder(inputs_embeds=x).last_hidden_state
        return tower.post_layernorm(h[:, 0])

    return forward


def official_loop(forward: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                  num_tokens: int, token_dim: int, steps: int) -> torch.Tensor:
    """The official oti()/ovi() loop (fp32 on CPU: autocast and GradScaler are off there), then
    the features of the final tokens, as the official evaluation re-encodes the saved tokens
    (``invert`` returns them too: both sides make ``steps`` updates and one extra forward)."""
    tokens = torch.empty(targets.shape[0], num_tokens, token_dim)
    nn.init.normal_(tokens, std=0.02)
    tokens = nn.Parameter(tokens)
    optimizer = torch.optim.AdamW([tokens], lr=2e-2, weight_decay=0.01)
    criterion = nn.CosineEmbeddingLoss()
    target = torch.ones(targets.shape[0])
    for _ in range(steps):
        optimizer.zero_grad()
        feats = F.normalize(forward(tokens), dim=-1)
        loss = criterion(feats, F.normalize(targets, dim=-1), target)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return F.normalize(forward(tokens), dim=-1)


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)  # as the official code does: no weight gradients
    return module.eval()


def build_case(tower_name: str, variant: str):
    """(our forward, the official-style forward, num_tokens, token_dim, target dim)."""
    if tower_name == "clip-text":
        tower = _frozen(clip_text_tower())
        fast = CausalTextInversion(tower, CLIP_TEMPLATE, cache_prefix=variant != "eos-only")
        return fast, official_clip_text(tower), 1, 512, 512
    if tower_name == "minilm":
        from modalign.bridge.inversion import encoder_inversion
        from modalign.encoders import load_encoder

        enc = load_encoder("minilm")
        _frozen(enc)
        return encoder_inversion(enc), official_padded_bert(enc), 1, 384, 384
    if tower_name == "clip-vision":
        tower = _frozen(clip_vision_tower())
        return ViTInversion(tower, 1), official_vit(tower), 1, 768, 768
    if tower_name == "effnet-lite0":
        from modalign.bridge.inversion import effnet_stage_inversion
        from modalign.encoders import load_encoder

        enc = load_encoder("effnet-lite0", image_size=96)
        _frozen(enc)
        fwd = effnet_stage_inversion(enc, stage=0, num_tokens=16)
        ours = (effnet_stage_inversion(enc, stage=0, num_tokens=16, fold_bn=True)
                if variant == "folded-bn" else fwd)
        return ours, fwd, 16, 32, 1280
    raise ValueError(f"tower must be clip-text, minilm, clip-vision or effnet-lite0, "
                     f"got {tower_name!r}")


def time_case(tower_name: str, variant: str, batch: int, steps: int,
              repeats: int) -> dict[str, tuple[float, float]]:
    """Best-of-``repeats`` items/s (wall clock) and items per CPU-second of ours and of the
    baseline, run alternately. CPU time (all threads of this process) is the steadier figure on
    a machine shared with other work."""
    ours_fwd, base_fwd, num_tokens, token_dim, out_dim = build_case(tower_name, variant)
    targets = torch.randn(batch, out_dim, generator=torch.Generator().manual_seed(0))
    settings = InversionSettings(steps=steps, batch_size=batch)
    # warm-up (one step each), then the timed runs
    invert(targets, ours_fwd, InversionSettings(steps=1, batch_size=batch))
    official_loop(base_fwd, targets, num_tokens, token_dim, 1)
    wall = {"ours": float("inf"), "baseline": float("inf")}
    cpu = dict(wall)
    runs = {"ours": lambda: invert(targets, ours_fwd, settings),
            "baseline": lambda: official_loop(base_fwd, targets, num_tokens, token_dim, steps)}
    for _ in range(repeats):
        for impl, run in runs.items():
            t, c = time.perf_counter(), time.process_time()
            run()
            wall[impl] = min(wall[impl], time.perf_counter() - t)
            cpu[impl] = min(cpu[impl], time.process_time() - c)
    return {"items_per_s": (batch / wall["ours"], batch / wall["baseline"]),
            "items_per_cpu_s": (batch / cpu["ours"], batch / cpu["baseline"])}


def _best_cpu_seconds(run: Callable[[], None], rounds: int = 5, calls: int = 10) -> float:
    """CPU seconds of one call of ``run``: after a warm-up call, the best over ``rounds`` of the
    mean of ``calls`` calls."""
    run()
    best = float("inf")
    for _ in range(rounds):
        c = time.process_time()
        for _ in range(calls):
            run()
        best = min(best, (time.process_time() - c) / calls)
    return best


def oti_floor(batch: int, steps: int, repeats: int) -> dict[str, float]:
    """OTI on MiniLM against its floor, in one process: the matrix-product FLOPs of the live
    positions (forward, and the backward to the inputs only: the weights are frozen) at this
    machine's measured rate for those very shapes, for ``steps`` steps plus the final forward.

    Per layer and sample with ``T`` live positions, width ``d``, MLP width ``f``: forward
    ``2 T (4 d^2 + 2 d f) + 4 T^2 d`` FLOPs (Q, K, V, output and MLP products; scores and
    weighted sum); the input gradient costs the same for the linear layers and twice for the
    attention products.

    Ours is the lean BERT forward (``BidirectionalTextInversion.from_encoder``, the default);
    ``before`` is the same inversion through the tower's own transformers forward
    (``lean=False``, the path of the previous round), alternated with it. The lean forward
    computes the template's fixed positions' first-layer query, key and value once, so it does
    fewer products than the floor counts: ``own_floor_cpu_s`` is the floor of the products it
    does (the stricter figure).

    The rate is that of each weight's forward and input-gradient products run back to back (the
    weight still in cache for the second). ``streamed_floor_cpu_s`` uses the rate of the same
    products run as a pass runs them, each of the model's weights once per direction (all
    layers forward, then all input gradients in reverse): the floor a forward and backward can
    reach without fusing the two directions.
    """
    from modalign.bridge.inversion import BidirectionalTextInversion, TemplateTokens
    from modalign.encoders import load_encoder

    enc = load_encoder("minilm")
    _frozen(enc)
    template = TemplateTokens.from_tokenizer(enc.tokenizer, "a photo of {}")
    fwd = BidirectionalTextInversion.from_encoder(enc, template)
    before = BidirectionalTextInversion.from_encoder(enc, template, lean=False)
    cfg = enc.model.config
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    t = len(template.ids)
    linear = 2 * batch * t * (4 * d * d + 2 * d * f)
    attention = 4 * batch * t * t * d
    flops = layers * ((steps + 1) * (linear + attention) + steps * (linear + 2 * attention))
    # the first layer's Q, K, V products of the fixed positions, forward and input gradient
    cached = 2 * batch * (t - template.num_tokens) * 3 * d * d * (2 * steps + 1)
    targets = torch.randn(batch, d, generator=torch.Generator().manual_seed(0))
    settings = InversionSettings(steps=steps, batch_size=batch)
    runs = {"ours": fwd, "before": before}
    cpu = {name: float("inf") for name in runs}
    wall = dict(cpu)
    for run in runs.values():
        invert(targets, run, InversionSettings(steps=1, batch_size=batch))
    for _ in range(repeats):
        for name, run in runs.items():
            c, w = time.process_time(), time.perf_counter()
            invert(targets, run, settings)
            cpu[name] = min(cpu[name], time.process_time() - c)
            wall[name] = min(wall[name], time.perf_counter() - w)
    ours = cpu["ours"]
    # The rate of these products alone: each linear layer's forward and input-gradient product.
    rows = torch.randn(batch * t, f)
    weights = [torch.randn(d, d)] * 4 + [torch.randn(f, d), torch.randn(d, f)]

    def products() -> None:
        for w in weights:
            out = rows[:, : w.shape[1]] @ w.t()
            out @ w
    rate = 2 * linear / _best_cpu_seconds(products)  # FLOP per CPU-second at these shapes
    floor = flops / rate
    own = (flops - cached) / rate
    # The same products as a pass runs them: the model's own weights, each layer's forward
    # products in turn, then the input-gradient products in reverse (a weight is used once per
    # pass, so it comes from further down the memory hierarchy than in the paired loop above).
    layer_weights = [[layer.attention.self.query.weight, layer.attention.self.key.weight,
                      layer.attention.self.value.weight, layer.attention.output.dense.weight,
                      layer.intermediate.dense.weight, layer.output.dense.weight]
                     for layer in enc.model.encoder.layer]

    def streamed() -> None:
        for ws in layer_weights:
            for w in ws:
                rows[:, : w.shape[1]] @ w.t()
        for ws in reversed(layer_weights):
            for w in reversed(ws):
                rows[:, : w.shape[0]] @ w
    streamed_rate = 2 * linear * layers / _best_cpu_seconds(streamed)
    streamed_floor = flops / streamed_rate
    return {"ours_cpu_s": ours, "floor_cpu_s": floor, "fraction_of_floor": floor / ours,
            "before_cpu_s": cpu["before"], "before_fraction": floor / cpu["before"],
            "ours_wall_s": wall["ours"], "before_wall_s": wall["before"],
            "own_floor_cpu_s": own, "own_fraction": own / ours,
            "streamed_floor_cpu_s": streamed_floor, "streamed_fraction": streamed_floor / ours,
            "streamed_gflops": streamed_rate / 1e9,
            "matmul_gflops": rate / 1e9, "live_positions": t, "gflop": flops / 1e9,
            "own_gflop": (flops - cached) / 1e9}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_peak(impl: str, batch: int, steps: int) -> None:
    """In a fresh process: peak resident set above the loaded tower for one implementation."""
    ours_fwd, base_fwd, num_tokens, token_dim, out_dim = build_case("clip-text", "")
    targets = torch.randn(batch, out_dim)
    start = peak = _rss_mb()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_mb())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    if impl == "ours":
        invert(targets, ours_fwd, InversionSettings(steps=steps, batch_size=batch))
    else:
        official_loop(base_fwd, targets, num_tokens, token_dim, steps)
    stop.set()
    thread.join()
    print(json.dumps({"peak_mb": peak - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="batch 8, 2 steps, one repeat (about a minute on 2 idle cores)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, waiting threads spin "
                             "and inflate the CPU time of multi-threaded runs)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--steps", type=int, default=None, help="override the step count")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per implementation, best kept (default 2, quick 1)")
    parser.add_argument("--only", default=None,
                        help="comma-separated rows to run: clip-text, minilm, clip-vision, "
                             "effnet-lite0, floor, peak (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = args.batch or (8 if args.quick else 32)
    steps = args.steps or (2 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 2)
    if args.child:
        child_peak(args.child, batch, steps)
        return
    cases = [("oti", "clip-text", ""), ("oti", "clip-text", "eos-only"), ("oti", "minilm", ""),
             ("ovi", "clip-vision", ""), ("ovi", "effnet-lite0", ""),
             ("ovi", "effnet-lite0", "folded-bn")]
    only = set(args.only.split(",")) if args.only else None
    for method, tower_name, variant in cases:
        if only is not None and tower_name not in only:
            continue
        b = batch if method == "oti" else max(2, batch // 4)
        s = steps
        figures = time_case(tower_name, variant, b, s, repeats)
        case = {"method": method, "tower": tower_name, "batch": b, "steps": s,
                "threads": args.threads, "repeats": repeats}
        if variant:
            case["variant"] = variant
        for metric, (ours, base) in figures.items():
            print(json.dumps({"benchmark": NAME, "case": case, "metric": metric,
                              "ours": round(ours, 3), "baseline": round(base, 3),
                              "baseline_name": BASELINE, "speedup": round(ours / base, 2)}),
                  flush=True)
    if only is None or "floor" in only:
        floor = oti_floor(batch, steps, repeats)
        print(json.dumps({
            "benchmark": NAME, "case": {"method": "oti", "tower": "minilm", "batch": batch,
                                        "steps": steps, "threads": args.threads,
                                        "repeats": repeats},
            "metric": "floor_fraction", "ours": round(floor["fraction_of_floor"], 3),
            "baseline": round(floor["before_fraction"], 3),
            "baseline_name": "the tower's own transformers forward (lean=False), against the "
                             "matrix-product FLOPs of the live positions at the measured rate "
                             "of those products (same process)",
            **{k: round(v, 4) for k, v in floor.items()
               if k not in ("fraction_of_floor", "before_fraction")}}), flush=True)
    if only is not None and "peak" not in only:
        return
    peaks = {}
    for impl in ("ours", "baseline"):
        out = subprocess.run([sys.executable, __file__, "--child", impl, "--batch", str(batch),
                              "--steps", "2", "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        peaks[impl] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    print(json.dumps({"benchmark": NAME, "case": {"method": "oti", "tower": "clip-text",
                                                  "batch": batch, "steps": 2},
                      "metric": "peak_mb", "ours": round(peaks["ours"], 1),
                      "baseline": round(peaks["baseline"], 1), "baseline_name": BASELINE}),
          flush=True)


if __name__ == "__main__":
    main()
