"""Frozen-tower training at batch 256 on cached emoji features: the trainer against a plain loop.

Both run in this process, one after the other, on the same work: the ``clip`` config's cached
image and text features, the same linear heads from the same initial weights (L2 on the
features, minus the training-feature mean, a linear map, L2), the same symmetric CLIP loss with
a learnable clamped logit scale, the same AdamW groups and learning-rate schedule, and the same
batches (the plain loop draws the trainer's groups and items with its own numpy code, from the
same seeds). ``ours`` is :meth:`modalign.train.loop.Trainer.train_epoch`, the hot loop of
``modalign train`` (host-side checks every ``CHECK_EVERY`` steps and at epoch ends); the
baseline is a hand-written PyTorch loop over the same tensors. Every case runs with one torch
thread, after one untimed warm-up epoch of each.

Rows (JSON lines), ours and baseline each:

- ``samples_per_s``: training tuples per wall second over the epochs (best of ``--repeats``);
- ``samples_per_cpu_s``: the same over process CPU seconds (less inflated on a shared machine);
- ``peak_mb``: peak resident memory above the resident memory at the start of the case
  (``VmHWM`` reset through ``/proc/self/clear_refs`` after ``malloc_trim``), over building the
  loop and training; the median over repeats;
- ``test_r1``: image->text R@1 on the test split (positives: same concept) of the final weights;
- ``max_epoch_loss_rel_diff`` (ours only): the largest relative difference between the two
  loops' mean training loss of an epoch: near 0 when both do the same work.

Usage:
    python benchmarks/training.py --quick    # 10 epochs, best of 3 (under a minute)
    python benchmarks/training.py            # 30 epochs, best of 3
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

BENCHMARK = "training"
CONFIG = "clip"
BATCH = 256
BASELINE_NAME = ("plain PyTorch loop: the same linear heads, CLIP loss, AdamW, schedule and "
                 "batches on the same cached features")


# -- memory --------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _start_peak() -> float:
    """Release freed heap to the system, reset the high-water mark; the resident MB now."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") / 1024


def _peak_since(start_mb: float) -> float:
    return _status_kb("VmHWM") / 1024 - start_mb


# -- evaluation (the same for both) ---------------------------------------------------------------
def _r1(zi: torch.Tensor, gi: np.ndarray, zt: torch.Tensor, gt: np.ndarray) -> float:
    top = (zi @ zt.T).argmax(dim=1).numpy()
    return float(np.mean(gt[top] == gi))


# -- ours ----------------------------------------------------------------------------------------
def run_ours(cfg: Any, epochs: int) -> dict[str, Any]:
    from modalign.train.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        start = _start_peak()
        trainer = Trainer(cfg, run_dir=tmp)
        seconds = cpu = 0.0
        losses = []
        for _ in range(epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train_epoch()
            seconds += time.perf_counter() - t0
            cpu += time.process_time() - c0
            losses.append(trainer.epoch_loss_sum / trainer.epoch_samples)
            trainer.epoch, trainer.index = trainer.epoch + 1, 0  # what run() does between epochs
            trainer.epoch_loss_sum, trainer.epoch_samples = 0.0, 0
        peak = _peak_since(start)
        tables = trainer.split_tables("test")
        (ki, ti), (kt, tt) = tables.items()
        zi = torch.from_numpy(trainer.model.project_array(ki, ti.features))
        zt = torch.from_numpy(trainer.model.project_array(kt, tt.features))
        samples = trainer.step * trainer.batch_size
    return {"seconds": seconds, "cpu": cpu, "samples": samples, "peak_mb": peak,
            "losses": losses, "test_r1": _r1(zi, ti.group_ids, zt, tt.group_ids)}


# -- the plain loop ------------------------------------------------------------------------------
def _rows_by_group(group_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(group_ids, kind="stable")
    start = np.full(int(group_ids.max()) + 1, -1)
    count = np.zeros(int(group_ids.max()) + 1, dtype=np.int64)
    uniq, first, n = np.unique(group_ids[order], return_index=True, return_counts=True)
    start[uniq], count[uniq] = first, n
    return order, start, count


def run_plain(cfg: Any, epochs: int, store: Any) -> dict[str, Any]:
    """Linear heads + CLIP loss + AdamW written out by hand, on the trainer's batches."""
    seed, o = cfg.train.seed, cfg.optim
    start_mb = _start_peak()
    feats, gids, tables = {}, {}, {}
    for m in ("image", "text"):  # the clip config's keys: every view of each modality
        emb = store.load(m, split=cfg.data.train_split)
        feats[m] = torch.from_numpy(np.array(emb.vectors, dtype=np.float32))
        gids[m] = emb.group_ids()
        tables[m] = _rows_by_group(gids[m])
    groups = np.intersect1d(np.unique(gids["image"]), np.unique(gids["text"]))
    torch.manual_seed(seed)
    heads, centers = {}, {}
    for m in ("image", "text"):  # the trainer's init: sorted modalities, Xavier, zero bias
        lin = torch.nn.Linear(feats[m].shape[1], cfg.model.joint_dim)
        torch.nn.init.xavier_uniform_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
        heads[m] = lin
        centers[m] = F.normalize(feats[m], dim=-1).mean(0)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW(
        [{"params": [heads[m].weight for m in heads], "weight_decay": o.weight_decay},
         {"params": [heads[m].bias for m in heads] + [log_scale], "weight_decay": 0.0}],
        lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    steps_per_epoch = len(groups) // BATCH
    total = steps_per_epoch * cfg.train.epochs

    def lr_at(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - o.warmup_steps)
                                                 / max(1, total - o.warmup_steps))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    labels = torch.arange(BATCH)
    seconds = cpu = 0.0
    losses = []
    for epoch in range(epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(groups))
        loss_sum = torch.zeros(())
        for b in range(steps_per_epoch):
            batch = groups[perm[b * BATCH:(b + 1) * BATCH]]
            z = {}
            for k, m in enumerate(("image", "text")):
                order, first, count = tables[m]
                pick = np.random.default_rng([seed, epoch, b, k, 0xD2A3]).integers(0, count[batch])
                x = feats[m][torch.from_numpy(order[first[batch] + pick])]
                z[m] = F.normalize(heads[m](F.normalize(x, dim=-1) - centers[m]), dim=-1)
            logits = log_scale.exp() * z["image"] @ z["text"].T
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                log_scale.clamp_(0, math.log(100))
            loss_sum += loss.detach()
        losses.append(float(loss_sum) / steps_per_epoch)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
    peak = _peak_since(start_mb)
    with torch.no_grad():
        z = {}
        for m in ("image", "text"):
            emb = store.load(m, split="test")
            x = torch.from_numpy(np.array(emb.vectors, dtype=np.float32))
            z[m] = (F.normalize(heads[m](F.normalize(x, dim=-1) - centers[m]), dim=-1), emb)
    r1 = _r1(z["image"][0], z["image"][1].group_ids(), z["text"][0], z["text"][1].group_ids())
    return {"seconds": seconds, "cpu": cpu, "samples": steps_per_epoch * epochs * BATCH,
            "peak_mb": peak, "losses": losses, "test_r1": r1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 epochs (under a minute)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per case (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="cases per loop (best of)")
    args = parser.parse_args()
    epochs = args.epochs or (10 if args.quick else 30)

    from modalign.train.config import load_config
    from modalign.train.loop import resolve_store

    torch.set_num_threads(1)
    cfg = load_config(CONFIG, [f"train.epochs={epochs}", "train.progress=false",
                               f"train.batch_size={BATCH}", "train.num_threads=1",
                               "train.device=cpu"])
    store = resolve_store(cfg)  # cached features exist before anything is measured
    # both loops read that store as it is (the trainer does not re-check it against the towers)
    cfg.data.embeddings = str(store.path)
    cases: dict[str, Callable[[int], dict[str, Any]]] = {
        "ours": lambda n: run_ours(cfg, n), "baseline": lambda n: run_plain(cfg, n, store)}
    for case in cases.values():  # warm-up: first-call costs of torch and of the store
        case(1)
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in cases}
    for r in range(args.repeats):  # alternate which loop goes first
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            results[name].append(cases[name](epochs))
    best = {k: max(v, key=lambda x: x["samples"] / x["seconds"]) for k, v in results.items()}
    rows = {
        "samples_per_s": {k: max(x["samples"] / x["seconds"] for x in v)
                          for k, v in results.items()},
        "samples_per_cpu_s": {k: max(x["samples"] / x["cpu"] for x in v)
                              for k, v in results.items()},
        "peak_mb": {k: statistics.median(x["peak_mb"] for x in v) for k, v in results.items()},
        "test_r1": {k: best[k]["test_r1"] for k in results},
    }
    case = {"config": CONFIG, "batch": BATCH, "epochs": epochs, "threads": 1,
            "repeats": args.repeats, "steps": best["ours"]["samples"] // BATCH}
    for metric, v in rows.items():
        print(json.dumps({"benchmark": BENCHMARK, "case": case, "metric": metric,
                          "ours": round(v["ours"], 4), "baseline": round(v["baseline"], 4),
                          "ratio": round(v["ours"] / v["baseline"], 4) if v["baseline"] else None,
                          "baseline_name": BASELINE_NAME}), flush=True)
    diff = max(abs(a - b) / abs(b) for a, b in zip(best["ours"]["losses"],
                                                  best["baseline"]["losses"], strict=True))
    print(json.dumps({"benchmark": BENCHMARK, "case": case, "metric": "max_epoch_loss_rel_diff",
                      "ours": diff, "baseline_name": BASELINE_NAME}), flush=True)


if __name__ == "__main__":
    main()
