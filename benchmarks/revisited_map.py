"""Revisited Oxford/Paris mAP: our memory-bounded scorer vs the revisitop-style full ranking.

The baseline follows the published evaluation code: the whole (gallery x queries) score matrix,
a full argsort of it, then per-query loops over positives and junk. Ours scores a few queries at a
time and counts, per relevant item, the non-ignored items above it.

Prints one JSON object per line: seconds, and peak_mb, the peak resident memory above what the
inputs already hold, measured in a fresh process per case and implementation.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

BENCHMARK = "revisited_map"
BASELINE = "revisitop compute_map (full score matrix + argsort)"


def make_case(n_gallery: int, n_queries: int, dim: int, seed: int = 0):
    from modalign.data.benchmarks import RevisitedGroundTruth

    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n_gallery, dim), dtype=np.float32)
    g /= np.sqrt(np.einsum("ij,ij->i", g, g))[:, None]  # no gallery-sized temporary
    q = g[rng.choice(n_gallery, n_queries, replace=False)] + 0.3 * rng.standard_normal(
        (n_queries, dim), dtype=np.float32)
    ids = [f"g{j}" for j in range(n_gallery)]
    easy, hard, junk = [], [], []
    for _ in range(n_queries):
        pick = rng.choice(n_gallery, 120, replace=False)
        easy.append(tuple(ids[j] for j in pick[:50]))
        hard.append(tuple(ids[j] for j in pick[50:90]))
        junk.append(tuple(ids[j] for j in pick[90:]))
    truth = RevisitedGroundTruth(tuple(f"q{i}" for i in range(n_queries)), tuple(easy),
                                 tuple(hard), tuple(junk))
    return torch.from_numpy(q), torch.from_numpy(g), ids, truth


def ours(q, g, ids, truth) -> float:
    from modalign.reproduce.revisited_metrics import revisited_metrics

    return revisited_metrics(q, g, ids, truth)["medium"]["map"]


def baseline(q, g, ids, truth) -> float:
    index = {s: j for j, s in enumerate(ids)}
    sim = (g @ q.T).numpy()  # (G, Q), as revisitop holds it
    ranks = np.argsort(-sim, axis=0)
    aps = []
    for i, (rel, ign) in enumerate(truth.relevant_and_ignored("medium")):
        qgnd = np.array([index[s] for s in rel])
        qjunk = np.array([index[s] for s in ign])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qjunk)]
        pos = pos - np.searchsorted(junk, pos)
        r = pos.astype(np.float64)
        j = np.arange(len(r))
        before = np.where(r == 0, 1.0, j / np.maximum(r, 1))
        aps.append(float(((before + (j + 1) / (r + 1)) / 2).sum() / len(r)))
    return float(np.mean(aps))


def current_rss_kb() -> int:
    """Resident memory now (Linux), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run_case(impl: str, n_gallery: int, n_queries: int, dim: int) -> dict[str, float]:
    torch.set_num_threads(2)
    data = make_case(n_gallery, n_queries, dim)
    fn = ours if impl == "ours" else baseline
    import gc

    gc.collect()
    before = max(current_rss_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    t0 = time.perf_counter()
    value = fn(*data)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # extra peak resident memory of the scoring itself, above what the inputs already hold
    return {"seconds": seconds, "peak_mb": max(0, after - before) / 1024, "map": value}


def in_fresh_process(impl: str, case: dict[str, int]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--worker", impl,
                          json.dumps(case)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases (under a minute)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, case = args.worker[0], json.loads(args.worker[1])
        print(json.dumps(run_case(impl, **case)))
        return
    sizes = [20_000] if args.quick else [20_000, 100_000, 300_000]
    for n_gallery in sizes:
        case = {"n_gallery": n_gallery, "n_queries": 70, "dim": 512}
        a, b = in_fresh_process("ours", case), in_fresh_process("baseline", case)
        if abs(a["map"] - b["map"]) > 1e-6:  # float32 scores summed in another order
            raise SystemExit(f"results differ: ours {a['map']} vs baseline {b['map']}")
        for metric in ("seconds", "peak_mb"):
            print(json.dumps({"benchmark": BENCHMARK, "case": case, "metric": metric,
                              "ours": round(a[metric], 4), "baseline": round(b[metric], 4),
                              "baseline_name": BASELINE}), flush=True)


if __name__ == "__main__":
    main()
