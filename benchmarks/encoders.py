"""Throughput of the built-in towers (items/s, preprocessing included) and peak memory per case.

Cases: minilm (emoji-name-like texts), effnet-lite0 at 96 and 224 px (RGBA icons in memory),
logmel (1.5 s clips at 22.05 kHz, resampled). Baselines, measured in the same run:
minilm against plain ``transformers`` ``AutoModel`` + mean pooling + L2 (the computation
sentence-transformers does); the image and audio towers against the same tower fed one item per
call (what an unbatched loop costs). Peak memory of each case runs in a fresh process.

    python benchmarks/encoders.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image, ImageDraw

BENCHMARK = "encoders"
CASES = {
    "minilm": {"tower": "minilm"},
    "effnet-lite0-96": {"tower": "effnet-lite0", "image_size": 96},
    "effnet-lite0-224": {"tower": "effnet-lite0", "image_size": 224},
    "logmel": {"tower": "logmel", "seconds": 1.5, "rate": 22050},
}


def _texts(n: int) -> list[str]:
    words = ["grinning", "face", "with", "big", "eyes", "red", "heart", "cat", "smiling", "hand",
             "flag", "of", "woman", "running", "light", "skin", "tone", "sun", "behind", "cloud"]
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=rng.integers(2, 7))) for _ in range(n)]


def _icons(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    icons = []
    for _ in range(n):
        im = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x0, y0 = rng.integers(0, 100, size=2)
            colour = (*(int(c) for c in rng.integers(0, 256, size=3)), 255)
            draw.ellipse((int(x0), int(y0), int(x0) + 60, int(y0) + 60), fill=colour)
        icons.append(im)
    return icons


def _clips(n: int, seconds: float, rate: int) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    return [((0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t)
              + 0.05 * rng.standard_normal(t.size)).astype(np.float32), rate) for _ in range(n)]


def _build(case: str, impl: str, n: int) -> tuple[Callable[[list], None], list]:
    """Return ``(embed, items)``: ``embed(items)`` runs ``impl`` (``ours`` or ``baseline``)."""
    params = CASES[case]
    if case == "minilm":
        texts = _texts(n)
        if impl == "ours":
            from modalign.encoders import load_encoder

            tower = load_encoder("minilm")
            return (lambda items: _batched(tower, items, 64)), texts
        from transformers import AutoModel, AutoTokenizer

        from modalign.encoders.minilm import default_model_dir

        folder = str(default_model_dir())
        tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

        def plain(items: list) -> None:
            for i in range(0, len(items), 64):
                ids = tok(items[i:i + 64], padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
                hidden = model(**ids).last_hidden_state
                mask = ids["attention_mask"].unsqueeze(-1).float()
                torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

        return plain, texts
    from modalign.encoders import load_encoder

    if case == "logmel":
        inputs: list = _clips(n, params["seconds"], params["rate"])
        tower = load_encoder("logmel")
    else:
        inputs = _icons(n)
        tower = load_encoder("effnet-lite0", image_size=params["image_size"])
    batch_size = 64 if impl == "ours" else 1
    return (lambda items: _batched(tower, items, batch_size)), inputs


def _batched(tower, items: list, batch_size: int) -> None:
    for i in range(0, len(items), batch_size):
        tower.encode(tower.preprocess(items[i:i + batch_size]))


def _items_per_s(case: str, n: int, repeats: int) -> tuple[float, float]:
    """Items/s of ours and of the baseline: best of ``repeats`` passes, the two interleaved so
    that both see the same load on a shared machine, after one warm-up batch each."""
    runs = {impl: _build(case, impl, n) for impl in ("ours", "baseline")}
    best = dict.fromkeys(runs, math.inf)
    with torch.no_grad():
        for embed, items in runs.values():
            embed(items[:8])
        for _ in range(repeats):
            for impl, (embed, items) in runs.items():
                start = time.perf_counter()
                embed(items)
                best[impl] = min(best[impl], time.perf_counter() - start)
    return n / best["ours"], n / best["baseline"]


def _peak_mb(case: str, impl: str, n: int) -> float:
    """Run one case in a fresh process and return its peak resident memory (MB)."""
    out = subprocess.run([sys.executable, __file__, "--child", case, impl, str(n)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _child(case: str, impl: str, n: int) -> None:
    torch.set_num_threads(2)
    embed, items = _build(case, impl, n)
    with torch.no_grad():
        embed(items)
    print(_high_water_mb())


def _high_water_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` belongs to the process image, unlike
    ``ru_maxrss``, which Linux carries over from the parent across fork and exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items, under a minute")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--skip-memory", action="store_true",
                        help="skip the peak-memory runs (one fresh process per case)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    torch.set_num_threads(2)
    sizes = {"minilm": 256, "effnet-lite0-96": 128, "effnet-lite0-224": 64, "logmel": 64}
    if args.quick:
        sizes = {k: max(16, v // 8) for k, v in sizes.items()}
    repeats = 1 if args.quick else 3
    baseline_names = {"minilm": "transformers AutoModel + mean pooling + L2, batch 64"}
    for case in args.cases:
        n = sizes[case]
        info = {**CASES[case], "items": n, "batch": 64, "threads": 2}
        baseline_name = baseline_names.get(case, "same tower, one item per call")
        ours, base = _items_per_s(case, n, repeats)
        print(json.dumps({"benchmark": BENCHMARK, "case": info, "metric": "items_per_s",
                          "ours": round(ours, 2), "baseline": round(base, 2),
                          "baseline_name": baseline_name}), flush=True)
        if not args.skip_memory:
            print(json.dumps({"benchmark": BENCHMARK, "case": info, "metric": "peak_mb",
                              "ours": round(_peak_mb(case, "ours", n), 1),
                              "baseline": round(_peak_mb(case, "baseline", n), 1),
                              "baseline_name": baseline_name}), flush=True)


if __name__ == "__main__":
    main()
