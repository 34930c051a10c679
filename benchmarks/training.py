"""Frozen-tower training on the emoji data at batch 256: throughput and time to a test R@1.

For each built-in config the trainer runs epoch by epoch on cached tower features; after every
epoch (outside the timed part) image->text R@1 is measured on the validation and test splits
(positives: same concept). Rows per config:

- ``samples_per_s``: training tuples per second over the whole run (steps only);
- ``seconds_to_r1_025``: training seconds until test R@1 first reaches 0.25 (NaN if never);
- ``test_r1``: test R@1 of the epoch with the best validation R@1 (model selection on val).

Baseline, measured in the same run: a plain hand-written PyTorch loop on the same cached
features (linear heads, the open_clip-style symmetric cross-entropy with a learnable clamped logit
scale, AdamW with lr 1e-3 and weight decay 0.1, the same batch and item sampling). Every case runs
in a fresh process, which also reports its peak resident memory (``peak_mb``).

    python benchmarks/training.py --quick        # clip only, 4 epochs
    python benchmarks/training.py                # every built-in config, 30 epochs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

BENCHMARK = "training"
BATCH = 256
THRESHOLD = 0.25


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _first_reaching(curve: list[tuple[float, float]], threshold: float) -> float:
    return next((t for t, r in curve if r >= threshold), math.nan)


def run_ours(name: str, epochs: int, threads: int) -> dict:
    """Train config ``name`` with the library's Trainer; R@1 per epoch on val and test."""
    from modalign.train.config import load_config
    from modalign.train.loop import Trainer, resolve_store

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(name, [f"run.dir={tmp}", f"train.epochs={epochs}", "train.progress=false",
                                 f"train.batch_size={BATCH}", f"train.num_threads={threads}"])
        resolve_store(cfg)  # cached features exist before timing starts
        trainer = Trainer(cfg, run_dir=tmp)
        val, test = trainer.split_tables("val"), trainer.split_tables("test")
        metric = cfg.validation_metric()[0]  # image-to-text_recall@1
        seconds, samples, curve, val_r1 = 0.0, 0, [], []
        for epoch in range(epochs):
            t0 = time.perf_counter()
            for index in range(trainer.steps_per_epoch):
                trainer.train_step(epoch, index)
            seconds += time.perf_counter() - t0
            samples += trainer.steps_per_epoch * BATCH
            curve.append((seconds, trainer.evaluate(test)[metric]))
            val_r1.append(trainer.evaluate(val)[metric])
    best = int(np.argmax(val_r1))
    return {"samples_per_s": samples / seconds, "curve": curve, "test_r1": curve[best][1],
            "peak_mb": _peak_mb(), "keys": cfg.data.keys}


def run_baseline(name: str, epochs: int, threads: int) -> dict:
    """A plain PyTorch loop: linear heads + symmetric CE on the same cached image/text features."""
    from modalign.train.config import load_config
    from modalign.train.loop import resolve_store

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    store = resolve_store(load_config(name))
    rng = np.random.default_rng(0)

    def split(modality: str, s: str):
        emb = store.load(modality, split=s)
        return torch.from_numpy(np.array(emb.vectors, dtype=np.float32)), emb.group_ids()

    (xi, gi), (xt, gt) = split("image", "train"), split("text", "train")
    rows_i: dict[int, list[int]] = {}
    rows_t: dict[int, list[int]] = {}
    for r, g in enumerate(gi.tolist()):
        rows_i.setdefault(g, []).append(r)
    for r, g in enumerate(gt.tolist()):
        rows_t.setdefault(g, []).append(r)
    groups = np.array(sorted(set(rows_i) & set(rows_t)))
    head_i = torch.nn.Linear(xi.shape[1], 256)
    head_t = torch.nn.Linear(xt.shape[1], 256)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW([*head_i.parameters(), *head_t.parameters(), log_scale], lr=1e-3,
                            weight_decay=0.1)

    def r1(s: str) -> float:
        (qi, qg), (ct, cg) = split("image", s), split("text", s)
        with torch.no_grad():
            zi = F.normalize(head_i(qi), dim=-1)
            zt = F.normalize(head_t(ct), dim=-1)
            top = (zi @ zt.T).argmax(dim=1).numpy()
        return float(np.mean(cg[top] == qg))

    seconds, samples, curve, val_r1 = 0.0, 0, [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = rng.permutation(groups)
        for b in range(len(perm) // BATCH):
            batch = perm[b * BATCH:(b + 1) * BATCH]
            ii = [rows_i[g][rng.integers(len(rows_i[g]))] for g in batch]
            tt = [rows_t[g][rng.integers(len(rows_t[g]))] for g in batch]
            zi = F.normalize(head_i(xi[ii]), dim=-1)
            zt = F.normalize(head_t(xt[tt]), dim=-1)
            logits = log_scale.exp() * zi @ zt.T
            labels = torch.arange(len(batch))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                log_scale.clamp_(0, math.log(100))
        seconds += time.perf_counter() - t0
        samples += (len(perm) // BATCH) * BATCH
        curve.append((seconds, r1("test")))
        val_r1.append(r1("val"))
    best = int(np.argmax(val_r1))
    return {"samples_per_s": samples / seconds, "curve": curve, "test_r1": curve[best][1],
            "peak_mb": _peak_mb()}


def _in_fresh_process(kind: str, name: str, epochs: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", kind, name, "--epochs", str(epochs),
                          "--threads", str(threads)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="clip only, 4 epochs")
    parser.add_argument("--configs", nargs="*", default=None, help="built-in config names")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--case", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    epochs = args.epochs or (4 if args.quick else 30)
    if args.case:
        kind, name = args.case
        result = (run_ours if kind == "ours" else run_baseline)(name, epochs, args.threads)
        print(json.dumps(result))
        return
    from modalign.train.config import BUILTIN_CONFIGS

    names = args.configs or (["clip"] if args.quick else list(BUILTIN_CONFIGS))
    for name in names:
        ours = _in_fresh_process("ours", name, epochs, args.threads)
        base = _in_fresh_process("baseline", name, epochs, args.threads)
        case = {"config": name, "batch": BATCH, "epochs": epochs, "threads": args.threads}
        rows = {
            "samples_per_s": (ours["samples_per_s"], base["samples_per_s"]),
            "seconds_to_r1_025": (_first_reaching(ours["curve"], THRESHOLD),
                                  _first_reaching(base["curve"], THRESHOLD)),
            "test_r1": (ours["test_r1"], base["test_r1"]),
            "peak_mb": (ours["peak_mb"], base["peak_mb"]),
        }
        for metric, (o, b) in rows.items():
            print(json.dumps({"benchmark": BENCHMARK, "case": case, "metric": metric,
                              "ours": round(o, 4), "baseline": round(b, 4),
                              "baseline_name": "plain PyTorch loop: linear heads + CLIP loss "
                                               "(image, text) on the same cached features"}),
                  flush=True)


if __name__ == "__main__":
    main()
