"""Retrieval evaluation and post-hoc bridges: ours against a baseline, one JSON object per line.

Cases:
    * ``map``: mAP over the full ranking, ``modalign.evaluate.metrics.retrieval_metrics`` against
      torchmetrics' ``RetrievalMAP`` (fed one block of queries at a time, so its memory stays
      reasonable; its result is the same mean). Both start from the embeddings, so both include
      computing the scores. Rows: ``seconds``, ``peak_mb`` and ``map`` (the values themselves).
    * ``invgc`` / ``localadj``: the bridge on a test gallery with training banks of ``bank``
      items, ours against the loop-style form of the original release (full similarity matrix,
      per-row assignment of the top-k).

Every (case, implementation) runs in a fresh subprocess (2 torch threads): it loads the inputs,
warms up on a tiny slice (imports, thread pools), then reports the wall time of the measured call,
its CPU time (less sensitive to other load on a shared machine), and its peak resident memory
above what the process held just before it.

Usage: ``python benchmarks/retrieval.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BENCHMARK = "retrieval"


# --------------------------------------------------------------------------------------------
# data


def make_map_data(queries: int, gallery: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Queries with 1-5 positives each among ``gallery`` items; the rest are distractors.

    Vectors sit in a cone (a shared direction plus group centre plus noise), as contrastive
    embeddings do, so every score is positive (torchmetrics drops relevant items scoring <= 0).
    """
    gen = np.random.default_rng(seed)
    positives = gen.integers(1, 6, size=queries)
    if positives.sum() > gallery:
        raise ValueError("gallery too small for the positives")
    gallery_groups = np.concatenate([np.repeat(np.arange(queries), positives),
                                     queries + np.arange(gallery - positives.sum())])
    gen.shuffle(gallery_groups)
    n_groups = int(gallery_groups.max()) + 1
    direction = np.zeros(dim, np.float32)
    direction[0] = 1.0
    centres = gen.standard_normal((n_groups, dim), dtype=np.float32) / np.sqrt(dim)

    def draw(groups: np.ndarray) -> np.ndarray:
        noise = gen.standard_normal((len(groups), dim), dtype=np.float32) * (1.5 / np.sqrt(dim))
        x = direction + centres[groups] + noise
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    query_groups = np.arange(queries)
    return {"queries": draw(query_groups), "gallery": draw(gallery_groups),
            "query_groups": query_groups.astype(np.int64),
            "gallery_groups": gallery_groups.astype(np.int64)}


def make_bank_data(test: int, bank: int, dim: int, seed: int = 1) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)

    def unit(n: int, shift: float) -> np.ndarray:
        x = gen.standard_normal((n, dim), dtype=np.float32) + shift
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return {"test_gallery": unit(test, 0.3), "train_gallery": unit(bank, 0.3),
            "train_query": unit(bank, -0.3)}


# --------------------------------------------------------------------------------------------
# implementations (run inside a worker process)


def map_ours(d: dict[str, torch.Tensor]) -> float:
    from modalign.evaluate.metrics import retrieval_metrics

    result = retrieval_metrics(d["queries"], d["gallery"], d["query_groups"],
                               d["gallery_groups"], k_values=(1,))
    return result.metrics["map"]


def map_floor(d: dict[str, torch.Tensor]) -> float:
    """The floor of any exact full-ranking mAP: the score matmul plus one counting pass.

    Same query blocks as ours; each block's scores are compared once with one threshold per query
    and counted. Returns the mean count (not a mAP) so that the work cannot be skipped.
    """
    from modalign.evaluate.metrics import DEFAULT_CHUNK_SIZE

    q, g = d["queries"], d["gallery"]
    block = max(1, DEFAULT_CHUNK_SIZE // len(g))
    total = 0
    for start in range(0, len(q), block):
        scores = q[start : start + block] @ g.T
        total += int((scores >= scores[:, :1]).sum())
    return total / len(q)


def map_torchmetrics(d: dict[str, torch.Tensor], block: int = 250) -> float:
    from torchmetrics.retrieval import RetrievalMAP

    metric = RetrievalMAP()
    q, g, qg, gg = d["queries"], d["gallery"], d["query_groups"], d["gallery_groups"]
    total = 0.0
    for start in range(0, len(q), block):
        scores = q[start : start + block] @ g.T
        target = qg[start : start + block, None] == gg[None, :]
        indexes = torch.arange(start, start + len(scores))[:, None].expand_as(scores)
        metric.update(scores.flatten(), target.flatten(), indexes=indexes.flatten())
        total += float(metric.compute()) * len(scores)
        metric.reset()
    return total / len(q)


def invgc_ours(d: dict[str, torch.Tensor], local_adj: bool) -> float:
    from modalign.bridge.posthoc import InvGC

    bridge = InvGC("image", "text", r_gallery=0.3, r_query=0.3, local_adj=local_adj,
                   pool_rate=0.01)
    bridge.fit({"image": d["train_gallery"], "text": d["train_query"]})
    out = bridge.transform({"image": d["test_gallery"]})["image"]
    return float(out.double().sum())


def invgc_loop_style(d: dict[str, torch.Tensor], local_adj: bool) -> float:
    """The original release's form: full similarity matrix, per-row top-k assignment."""

    def full(test: torch.Tensor, train: torch.Tensor, r: float) -> torch.Tensor:
        S = test @ train.T
        mean = S.sum() / (S.shape[0] * S.shape[1])
        return F.normalize(test - (S - mean) @ train / S.shape[1] * r, dim=1)

    def local(test: torch.Tensor, train: torch.Tensor, r: float) -> torch.Tensor:
        S = test @ train.T
        k = int(0.01 * len(train))
        adjacency = torch.zeros_like(S)
        top = torch.topk(S, k, dim=1)
        for i in range(len(test)):
            adjacency[i][top.indices[i]] = top.values[i]
        return F.normalize(test - adjacency @ train / k * r, dim=1)

    step = local if local_adj else full
    m_g = step(d["test_gallery"], d["train_gallery"], 0.3)
    m_q = step(d["test_gallery"], d["train_query"], 0.3)
    return float(F.normalize(0.5 * m_g + 0.5 * m_q, dim=1).double().sum())


IMPLEMENTATIONS = {
    ("map", "ours"): map_ours,
    ("map", "baseline"): map_torchmetrics,
    ("map", "floor"): map_floor,
    ("invgc", "ours"): lambda d: invgc_ours(d, False),
    ("invgc", "baseline"): lambda d: invgc_loop_style(d, False),
    ("localadj", "ours"): lambda d: invgc_ours(d, True),
    ("localadj", "baseline"): lambda d: invgc_loop_style(d, True),
}
BASELINE_NAMES = {"map": "torchmetrics.retrieval.RetrievalMAP (1.9)",
                  "invgc": "InvGC loop-style reference (full similarity matrix)",
                  "localadj": "InvGC LocalAdj loop-style reference (per-row top-k loop)"}


def _warm_up_data(task: str, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tiny slice of the inputs, so imports and thread pools are set up before measuring."""
    if task == "map":
        g, gg = d["gallery"][:500], d["gallery_groups"][:500]
        return {"queries": g[:20], "gallery": g, "query_groups": gg[:20], "gallery_groups": gg}
    return {k: v[:300] for k, v in d.items()}


def worker(task: str, impl: str, data_dir: str) -> None:
    torch.set_num_threads(2)
    data = {p.stem: torch.from_numpy(np.load(p)) for p in Path(data_dir).glob("*.npy")}
    IMPLEMENTATIONS[(task, impl)](_warm_up_data(task, data))
    _reset_peak_rss()
    before = _status_mb("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    value = IMPLEMENTATIONS[(task, impl)](data)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _status_mb("VmHWM")
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds,
                      "peak_mb": max(0.0, peak - before), "value": value}))


def _reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of resident memory (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


# --------------------------------------------------------------------------------------------
# driver


def run_case(task: str, case: dict, data: dict[str, np.ndarray]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, array in data.items():
            np.save(Path(tmp) / f"{name}.npy", array)
        results = {}
        impls = ("ours", "baseline", "floor") if task == "map" else ("ours", "baseline")
        for impl in impls:
            out = subprocess.run([sys.executable, __file__, "--worker", task, impl, tmp],
                                 capture_output=True, text=True, check=True)
            results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    for metric, key in (("seconds", "seconds"), ("cpu_seconds", "cpu_seconds"),
                        ("peak_mb", "peak_mb"),
                        (task if task == "map" else "checksum", "value")):
        row = {"benchmark": BENCHMARK, "case": case, "metric": metric,
               "ours": results["ours"][key], "baseline": results["baseline"][key],
               "baseline_name": BASELINE_NAMES[task]}
        if "floor" in results and key != "value":
            row["floor"] = results["floor"][key]
            row["floor_name"] = "score matmul + one counting pass (same query blocks)"
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--tasks", default="map,invgc,localadj",
                        help="comma-separated cases to run (default all: map,invgc,localadj)")
    parser.add_argument("--worker", nargs=3, metavar=("TASK", "IMPL", "DATA"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    queries, gallery, test, bank = (200, 10_000, 500, 5_000) if args.quick else \
        (5000, 50_000, 5000, 50_000)
    dim = 256
    tasks = set(args.tasks.split(","))
    if "map" in tasks:
        run_case("map", {"task": "map", "queries": queries, "gallery": gallery, "dim": dim,
                         "positives": "1-5"}, make_map_data(queries, gallery, dim))
    bank_tasks = [t for t in ("invgc", "localadj") if t in tasks]
    bank_data = make_bank_data(test, bank, dim) if bank_tasks else {}
    for task in bank_tasks:
        run_case(task, {"task": task, "test_gallery": test, "bank": bank, "dim": dim,
                        "pool_rate": 0.01}, bank_data)


if __name__ == "__main__":
    main()
