"""Benchmark: ``modalign.geometry.diagnose`` (streamed, sampled) vs the plain full-matrix way.

Two paired float32 modalities of ``n x 256`` (a Gaussian cloud and a noisy, shifted copy) are
written to ``.npy`` files and opened memory-mapped. Each case runs in a fresh process so that peak
memory (max RSS, memory-mapped pages included) of one case does not mask another.

* ours: ``diagnose`` on the memory maps, every metric except MIR (streamed exact passes for gap,
  alignment, cone, spectrum and the cosine means; seeded samples for uniformity above 8,192 rows,
  k-NN metrics above 10,000 rows and separability above 20,000 rows).
* baseline: the arrays loaded into memory and every metric computed exactly on full matrices
  with torch: ``torch.pdist``/``torch.cdist`` for (cross-)uniformity, the ``n x n`` similarity
  matrices for cone, hubness, agreement and margins, ``eigh`` of the covariance, and the logistic
  regression on all rows. It needs several ``n x n`` float32 matrices, so it only runs at small n.

Prints one JSON object per line: metrics ``seconds`` (wall clock), ``cpu_seconds`` (CPU time of
the process, all threads: on a shared machine it shows the work done when the wall clock is
inflated by other load) and ``peak_mb`` (max RSS).
``--quick`` runs n = 1,000 and 3,000 (both) and 20,000 (ours only) in about a minute.

Examples:
    python benchmarks/geometry.py --quick
    python benchmarks/geometry.py               # 5k, 10k, 20k both; 1,000,000 ours only
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 256
NAME = "geometry"
BASELINE_NAME = "full-matrix torch (pdist/cdist, n x n similarities, all rows)"


def make_data(folder: Path, n: int, seed: int = 0, chunk: int = 65536) -> tuple[Path, Path]:
    """Write paired float32 ``x.npy`` and ``y.npy`` of ``n x DIM`` chunk by chunk."""
    px, py = folder / f"x_{n}.npy", folder / f"y_{n}.npy"
    if px.exists() and py.exists():
        return px, py
    rng = np.random.default_rng(seed)
    shift = rng.normal(size=DIM).astype(np.float32) * 0.3
    x = np.lib.format.open_memmap(px, mode="w+", dtype=np.float32, shape=(n, DIM))
    y = np.lib.format.open_memmap(py, mode="w+", dtype=np.float32, shape=(n, DIM))
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        a = rng.normal(size=(m, DIM)).astype(np.float32)
        x[s:s + m] = a
        y[s:s + m] = a + 0.8 * rng.normal(size=(m, DIM)).astype(np.float32) + shift
    x.flush()
    y.flush()
    del x, y
    return px, py


def run_ours(px: Path, py: Path) -> None:
    from modalign.geometry.diagnose import DiagnoseOptions, diagnose

    x, y = np.load(px, mmap_mode="r"), np.load(py, mmap_mode="r")
    diagnose({"image": x, "text": y}, options=DiagnoseOptions(compute_mir=False))


def run_baseline(px: Path, py: Path) -> None:
    import torch

    x = torch.from_numpy(np.load(px)).float()
    y = torch.from_numpy(np.load(py)).float()
    x = x / x.norm(dim=1, keepdim=True)
    y = y / y.norm(dim=1, keepdim=True)
    n, k = x.shape[0], 10
    _ = (x.mean(0) - y.mean(0)).norm()                                   # gap
    _ = (x - y).norm(dim=1).pow(2).mean()                                # alignment
    for z in (x, y):                                                     # uniformity
        _ = torch.pdist(z).pow(2).mul(-2).exp().mean().log()
    d = torch.cdist(x, y).pow(2).mul(-2)                                 # cross-uniformity
    d.fill_diagonal_(-math.inf)
    _ = torch.logsumexp(d.flatten(), 0) - math.log(n * (n - 1))
    del d
    for z in (x, y):                                                     # cone
        s = z @ z.T
        _ = (s.sum() - s.diagonal().sum()) / (n * (n - 1))
        del s
    for z in (x, y, torch.cat([x, y])):                                  # spectrum
        _ = torch.linalg.eigvalsh(torch.cov(z.T.double()))
    s = x @ y.T                                                          # hubness, margins
    _ = torch.bincount(s.topk(k, dim=1).indices.flatten(), minlength=n)
    _ = torch.bincount(s.T.topk(k, dim=1).indices.flatten(), minlength=n)
    pos = s.diagonal().clone()
    s.fill_diagonal_(-math.inf)
    _ = (pos - s.max(dim=1).values).mean()
    del s
    for own, other in ((x, y), (y, x)):                                  # agreement
        intra = own @ own.T
        intra.fill_diagonal_(-math.inf)
        inter = other @ own.T
        inter.fill_diagonal_(-math.inf)
        a, b = intra.topk(k, dim=1).indices, inter.topk(k, dim=1).indices
        del intra, inter
        _ = (a[:, :, None] == b[:, None, :]).any(2).float().mean()
    feats = torch.cat([x, y]).double()                                   # separability
    labels = torch.cat([torch.zeros(n), torch.ones(n)]).double()
    w = torch.zeros(DIM, dtype=torch.float64, requires_grad=True)
    b0 = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b0], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(feats @ w + b0, labels)
        loss = loss + w.pow(2).sum() / (2 * len(labels))
        loss.backward()
        return loss

    opt.step(closure)


def worker(kind: str, n: int, folder: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    px, py = folder / f"x_{n}.npy", folder / f"y_{n}.npy"
    t, c = time.perf_counter(), time.process_time()
    (run_ours if kind == "ours" else run_baseline)(px, py)
    seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": peak_mb}))


def measure(kind: str, n: int, folder: Path, threads: int) -> dict[str, float] | None:
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--n", str(n),
                           "--folder", str(folder), "--threads", str(threads)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"{kind} at n={n} failed: {proc.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small cases, under a minute")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--folder", type=Path, default=None, help="where to write the data")
    ap.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.n, args.folder, args.threads)
        return
    both = [1000, 3000] if args.quick else [5000, 10000, 20000]
    ours_only = [20000] if args.quick else [1_000_000]
    with tempfile.TemporaryDirectory(prefix="modalign-bench-", dir=args.folder) as tmp:
        folder = Path(tmp)
        for n in both + ours_only:
            make_data(folder, n)
            ours = measure("ours", n, folder, args.threads)
            base = measure("baseline", n, folder, args.threads) if n in both else None
            case = {"n": n, "dim": DIM}
            for metric in ("seconds", "cpu_seconds", "peak_mb"):
                row = {"benchmark": NAME, "case": case, "metric": metric,
                       "ours": None if ours is None else round(ours.get(metric, math.nan), 3),
                       "baseline": None if base is None else round(base.get(metric, math.nan), 3),
                       "baseline_name": BASELINE_NAME}
                if base is None and n not in both:
                    # the baseline holds ~3 n x n float32 matrices at once (pdist is n^2/2)
                    row["note"] = (f"baseline not run: it needs about {3 * 4 * n * n / 1e9:.0f} GB "
                                   "for its n x n matrices")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
