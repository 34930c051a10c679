"""CLIP (or SigLIP) loss forward + backward: the tiled exact path against a full matrix.

Prints one JSON object per line (see DESIGN.md): for each batch size, wall ``seconds`` and
``peak_mb`` (resident-set high-water above the inputs) of ours (``modalign.losses.clip_loss``,
``impl="auto"``) and of the baseline (``logits = scale * X @ Y.T`` and ``scale * Y @ X.T``, cross
entropy both ways / 2, as open_clip's ``ClipLoss`` does it), each case and implementation in a fresh
subprocess (``--loss siglip``: ``modalign.losses.siglip_loss`` at scale 10 and bias -10 against
``-logsigmoid(z * (scale * X @ Y.T + bias)).sum() / B`` with ``z = 2 I - 1``, as big_vision
computes it); the max relative difference of the loss and of the gradients (``max_rel_diff``); the
plain matmul throughput of this machine (``matmul_gflops``) and the share of it each implementation
reaches (``matmul_share``: time its matrix products would take at that throughput / its wall time);
and ``over_own_matmuls`` (wall) / ``over_own_matmuls_cpu`` (CPU time of the process): our time
over the time of our own matrix products alone (same shapes, same tiles, same process, best of
the same repeats, the two alternated pass by pass): 1.0 is the floor of this algorithm.

Usage:
    python benchmarks/losses.py            # batch 1024, 4096, 16384 (a few minutes on 2 cores)
    python benchmarks/losses.py --quick    # batch 1024 and 4096, one round (under a minute)
    python benchmarks/losses.py --batches 16384 --threads 1 --rounds 1 --passes 5
                                           # the over_own_matmuls row
    python benchmarks/losses.py --loss siglip --batches 8192 --threads 1 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

DIM = 512
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # the SigLIP paper's initial values
BASELINE_NAME = {"clip": "open_clip-style full matrix", "siglip": "big_vision-style full matrix"}
# B x B x d products per forward + backward
MATMULS = {"clip": {"tiled": 4, "full": 3, "baseline": 6},
           "siglip": {"tiled": 4, "full": 3, "baseline": 3}}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _PeakSampler:
    """Samples the resident set every millisecond in a thread (robust where VmHWM can't reset)."""

    def __init__(self) -> None:
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.001)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _worker(loss_name: str, impl: str, batch: int, threads: int, grads_path: str | None,
            passes: int = 3) -> None:
    import torch
    import torch.nn.functional as F

    from modalign.losses.clip import clip_loss
    from modalign.losses.siglip import siglip_loss

    torch.set_num_threads(threads)
    siglip = loss_name == "siglip"

    def ours(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if siglip:
            return siglip_loss(x, y, scale, SIGLIP_BIAS, impl="auto").loss
        return clip_loss(x, y, scale, impl="auto").loss

    def baseline(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        image, text = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        if siglip:
            logits = scale * image @ text.T + SIGLIP_BIAS
            z = 2 * torch.eye(image.shape[0]) - 1
            return -F.logsigmoid(z * logits).sum() / image.shape[0]
        logits_per_image = scale * image @ text.T
        logits_per_text = scale * text @ image.T
        labels = torch.arange(image.shape[0])
        return (
            F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
        ) / 2

    fn = ours if impl == "ours" else baseline

    def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, DIM, generator=g).requires_grad_()
        y = (x.detach() + 2.0 * torch.randn(n, DIM, generator=g)).requires_grad_()  # cos ~ 0.45
        scale = torch.tensor(SIGLIP_SCALE if siglip else 1 / 0.07).log().requires_grad_()
        return x, y, scale

    # Warm up kernels and allocator on a small batch, then time the real one.
    wx, wy, ws = inputs(256)
    fn(wx, wy, ws.exp()).backward()
    x, y, log_scale = inputs(batch)
    # Best of ``passes`` for ours (its ratio to its own products is a row); the full-matrix
    # baseline 3 times up to B = 4096, once above (it holds several B x B matrices).
    repeats = passes if impl == "ours" else 3 if batch <= 4096 else 1
    best = best_cpu = float("inf")
    before = _rss_mb()

    def step() -> torch.Tensor:
        x.grad = y.grad = log_scale.grad = None
        loss = fn(x, y, log_scale.exp())
        loss.backward()
        return loss

    # The memory sampler's thread reads /proc every millisecond and takes the interpreter lock:
    # it runs on its own pass, and the timed passes run without it.
    # (The large full-matrix baseline runs once: that sampled pass is its time.)
    t0, c0 = time.perf_counter(), time.process_time()
    with _PeakSampler() as sampler:
        loss = step()
    if repeats == 1:
        best, best_cpu = time.perf_counter() - t0, time.process_time() - c0
    # Ours: its passes alternate with passes of its own matrix products alone, so that a change
    # of the machine's load reaches both sides of their ratio.
    products = _own_matmuls(x.detach(), y.detach()) if impl == "ours" else None
    if products is not None:
        products()  # warm-up
    prod = prod_cpu = float("inf")
    for _ in range(repeats if repeats > 1 else 0):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        if products is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            products()
            prod = min(prod, time.perf_counter() - t0)
            prod_cpu = min(prod_cpu, time.process_time() - c0)
    if grads_path:
        torch.save(
            {"loss": loss.detach(), "x": x.grad, "y": y.grad, "scale": log_scale.grad}, grads_path
        )
    out = {"seconds": best, "peak_mb": sampler.peak - before}
    if products is not None:
        out["over_own"], out["over_own_cpu"] = best / prod, best_cpu / prod_cpu
    print(json.dumps(out))


def _own_matmuls(x: object, y: object) -> Callable[[], None]:
    """A pass of the matrix products ours runs, alone, with its own shapes, tiles and column
    blocks.

    Tiled: per row tile and column block, the forward logits and, in the backward, their
    recomputation, ``G @ Y`` and ``G^T @ X`` (four B x B x d products); full matrix: the logits
    and the two gradient products (three).
    """
    import torch

    from modalign.losses.clip import use_tiled
    from modalign.losses.tiled import block_width, resolve_tile_size

    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    n, m = x.shape[0], y.shape[0]
    tiled = use_tiled("auto", n, m)
    tile = min(resolve_tile_size(None, m) if tiled else n, n)
    width = block_width(tile, m, x.device) if tiled else m
    logits = x.new_empty(tile * width)
    gx, gy = torch.zeros_like(x), torch.zeros_like(y)
    yt = y.t()

    def blocks() -> Iterator[tuple[int, int, int, int]]:
        for i0 in range(0, n, tile):
            for j0 in range(0, m, width):
                yield i0, min(n, i0 + tile), j0, min(m, j0 + width)

    def products() -> None:
        if tiled:
            for i0, i1, j0, j1 in blocks():
                torch.mm(x[i0:i1], yt[:, j0:j1], out=logits[: (i1 - i0) * (j1 - j0)].view(
                    i1 - i0, j1 - j0))
        for i0, i1, j0, j1 in blocks():
            s = logits[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
            torch.mm(x[i0:i1], yt[:, j0:j1], out=s)
            gx[i0:i1].addmm_(s, y[j0:j1])
            gy[j0:j1].addmm_(s.t(), x[i0:i1])

    return products


def _matmul_gflops(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(4096, DIM), torch.randn(DIM, 4096)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096 * 4096 * DIM / best / 1e9


def _run_case(loss: str, impl: str, batch: int, threads: int, grads_path: str, passes: int
              ) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--loss", loss, "--worker", impl, "--batch", str(batch)]
    cmd += ["--threads", str(threads), "--grads", grads_path, "--passes", str(passes)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _max_rel(a: object, b: object) -> float:
    import torch

    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1024 and 4096 only")
    parser.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--rounds", type=int, default=2, help="fresh processes per implementation and case"
    )
    parser.add_argument("--passes", type=int, default=3,
                        help="timed passes of ours in each process, each followed by a pass of "
                             "its own products (best of each; default 3)")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="batch sizes (default 1024 4096 16384; --quick: 1024 4096)")
    parser.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.loss, args.worker, args.batch, args.threads, args.grads, args.passes)
        return

    import torch

    from modalign.losses.clip import use_tiled

    gflops = _matmul_gflops(args.threads)
    batches = args.batches or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    if args.quick:
        args.rounds = 1
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            case = {"loss": args.loss, "batch": batch, "dim": DIM}
            res: dict[str, dict[str, float]] = {}
            grads = {}
            # Alternate the implementations over rounds (the machine may be shared): best time,
            # highest peak.
            for _ in range(args.rounds):
                for impl in ("ours", "baseline"):
                    path = str(Path(tmp) / f"{impl}.pt")
                    run = _run_case(args.loss, impl, batch, args.threads, path, args.passes)
                    best = res.setdefault(impl, run)
                    for key in ("over_own", "over_own_cpu"):  # ratios within one process
                        if key in run:
                            best[key] = min(best[key], run[key])
                    best["seconds"] = min(best["seconds"], run["seconds"])
                    best["peak_mb"] = max(best["peak_mb"], run["peak_mb"])
                    grads[impl] = torch.load(path, weights_only=True)
            for metric in ("seconds", "peak_mb"):
                row = {
                    "benchmark": "losses",
                    "case": case,
                    "metric": metric,
                    "ours": res["ours"][metric],
                    "baseline": res["baseline"][metric],
                    "baseline_name": BASELINE_NAME[args.loss],
                }
                print(json.dumps(row), flush=True)
            for metric, key in (("over_own_matmuls", "over_own"),
                                ("over_own_matmuls_cpu", "over_own_cpu")):
                row = {"benchmark": "losses", "case": case, "metric": metric,
                       "ours": res["ours"][key], "baseline": None,
                       "baseline_name": "ours' own matrix products alone, same process and shapes"}
                print(json.dumps(row), flush=True)
            ours_path = "tiled" if use_tiled("auto", batch, batch) else "full"
            products = {"ours": MATMULS[args.loss][ours_path],
                        "baseline": MATMULS[args.loss]["baseline"]}
            share = {
                k: products[k] * 2 * batch * batch * DIM / (gflops * 1e9) / res[k]["seconds"]
                for k in ("ours", "baseline")
            }
            diff = max(_max_rel(grads["ours"][k], grads["baseline"][k]) for k in grads["ours"])
            for metric, ours, base in (
                ("matmul_share", share["ours"], share["baseline"]),
                ("max_rel_diff", diff, 0.0),
                ("matmul_gflops", gflops, gflops),
            ):
                row = {
                    "benchmark": "losses",
                    "case": case,
                    "metric": metric,
                    "ours": ours,
                    "baseline": base,
                    "baseline_name": BASELINE_NAME[args.loss],
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
