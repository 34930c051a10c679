"""Start-up of the ``modalign`` command: time to its first output, against the floors.

Rows (one JSON object per line), each the median over ``--repeats`` fresh processes:

- ``version``: ``modalign --version``; baseline: building the parser with every stage module
  imported (what the command did before stage modules were loaded lazily); floor: the bare
  interpreter (``python -c pass``).
- ``eval``: ``modalign eval --embeddings STORE --task retrieval`` on a small store written here,
  until its first line of output; baseline: the same with every stage module imported first;
  floor: ``python -c "import torch"``, which the evaluation needs.
- ``eval-usage-error``: ``modalign eval`` with a bad ``--task``: answered before torch loads.
- ``eval-model``: ``modalign eval --model MODEL --data emoji:limit=N`` for a small model trained
  here (in a private ``MODALIGN_HOME``) whose towers' store is cached, until its first line of
  output (the table: the whole evaluation); baseline: the same after forgetting the remembered
  tower identities, so the towers are built to compute the store key (what the command did
  before); floor: ``python -c "import torch"``.

``seconds`` is wall time to the first byte on stdout or stderr, ``cpu_seconds`` the child's user +
system CPU time for the whole run; on a shared machine wall time is inflated by other work, the CPU
time less so, and the ratios compare runs of the same process.

    python benchmarks/startup.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCHMARK = "startup"


def first_output(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(seconds to the first output byte, CPU seconds of the child, exit code)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    first = None
    streams = [proc.stdout, proc.stderr]
    while streams:
        ready, _, _ = select.select(streams, [], [])
        for s in ready:
            chunk = os.read(s.fileno(), 65536)
            if chunk and first is None:
                first = time.perf_counter() - t0
            if not chunk:
                streams.remove(s)
    code = proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return (first if first is not None else time.perf_counter() - t0), cpu, code


def measure(argv: list[str], env: dict[str, str], repeats: int,
            before: Callable[[], None] | None = None) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        if before is not None:
            before()
        runs.append(first_output(argv, env))
    codes = {c for _, _, c in runs}
    return {"seconds": statistics.median(r[0] for r in runs),
            "cpu_seconds": statistics.median(r[1] for r in runs), "exit_codes": sorted(codes)}


def make_store(path: Path) -> None:
    import numpy as np

    from modalign.embed.store import EmbeddingStore

    gen = np.random.default_rng(0)
    store = EmbeddingStore(path)
    centers = gen.normal(size=(64, 32))
    for modality in ("image", "text"):
        rows, vecs = [], []
        for g in range(64):
            vecs.append(centers[g] + 0.5 * gen.normal(size=32))
            rows.append({"id": f"{modality}/{g}", "modality": modality, "view": "v",
                         "group": f"g{g}", "split": "test"})
        store.add_array(modality, np.asarray(vecs, np.float32), rows)


def make_model(home: Path, data: str) -> Path:
    """Train a small CLIP model on ``data`` (frozen towers, two epochs) under ``home``; the
    store of its towers on ``data`` is encoded on the way. Returns the model folder."""
    os.environ["MODALIGN_HOME"] = str(home)
    from modalign.train.config import load_config
    from modalign.train.loop import train

    cfg = load_config("clip", [f"data.dataset={data}", "train.epochs=2", "train.batch_size=32",
                               f"run.dir={home / 'run'}", "validate.patience=0"])
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON rows only
        train(cfg)
    return home / "run" / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 processes per row (default 7)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--data", default="emoji:limit=48",
                        help="data of the eval-model row (default emoji:limit=48)")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 7)
    py = sys.executable
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    eager = ("import modalign.cli as c; c.build_parser(); print('modalign', "
             "c.__version__)")
    eager_run = ("import sys, modalign.cli as c; c.build_parser(); "
                 "sys.exit(c.main(sys.argv[1:]))")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_store(store)
        home = Path(tmp) / "home"
        model = make_model(home, args.data)
        model_env = {**env, "MODALIGN_HOME": str(home)}
        from modalign.encoders.identity import CACHE

        def forget() -> None:
            (home / CACHE).unlink(missing_ok=True)

        cases = {
            "version": ([py, "-m", "modalign", "--version"],
                        [py, "-c", eager], [py, "-c", "pass"]),
            "eval": ([py, "-m", "modalign", "eval", "--embeddings", str(store), "--task",
                      "retrieval", "--out", str(Path(tmp) / "records")],
                     [py, "-c", eager_run, "eval", "--embeddings", str(store), "--task",
                      "retrieval", "--out", str(Path(tmp) / "records")],
                     [py, "-c", "import torch; print()"]),
            "eval-usage-error": ([py, "-m", "modalign", "eval", "--embeddings", str(store),
                                  "--task", "nope"], None, [py, "-c", "pass"]),
            "eval-model": ([py, "-m", "modalign", "eval", "--model", str(model), "--data",
                            args.data, "--out", str(Path(tmp) / "records")],
                           [py, "-m", "modalign", "eval", "--model", str(model), "--data",
                            args.data, "--out", str(Path(tmp) / "records")],
                           [py, "-c", "import torch; print()"]),
        }
        baselines = {"eval-model": "tower identities forgotten: the towers are built to "
                                   "compute the store key"}
        for name, (ours, baseline, floor) in cases.items():
            run_env = model_env if name == "eval-model" else env
            row: dict[str, object] = {"benchmark": BENCHMARK, "case": name,
                                      "command": " ".join(["modalign", *ours[3:]]).replace(
                                          tmp, "TMP"), "repeats": repeats}
            m = measure(ours, run_env, repeats)
            row.update(m)
            f = measure(floor, run_env, repeats)
            row["floor_seconds"], row["floor_cpu_seconds"] = f["seconds"], f["cpu_seconds"]
            row["over_floor"] = m["seconds"] / f["seconds"]
            if baseline is not None:
                b = measure(baseline, run_env, repeats,
                            before=forget if name == "eval-model" else None)
                row["baseline"] = baselines.get(
                    name, "every stage module imported to build the parser")
                row["baseline_seconds"], row["baseline_cpu_seconds"] = (b["seconds"],
                                                                        b["cpu_seconds"])
                row["speedup_cpu"] = b["cpu_seconds"] / max(m["cpu_seconds"], 1e-9)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
