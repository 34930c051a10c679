"""``scripts/gpu-check.sh`` runs end to end with ``--device cpu`` (the CPU against itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["sh", str(SCRIPT), "--no-install", *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.slow
def test_gpu_check_passes_on_cpu() -> None:
    res = _run("--device", "cpu", "--steps", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    checks = [ln for ln in lines if ln.startswith(("PASS ", "FAIL "))]
    names = {ln.split()[1].rstrip(":") for ln in checks}
    assert {"loss-tiled/fp32", "loss-tiled/bf16", "oti/hf-clip", "ovi/hf-clip", "oti/hf-siglip",
            "ovi/hf-siglip", "train/clip", "train/three_modal", "reproduce"} <= names
    assert all(ln.startswith("PASS ") for ln in checks) and lines[-1] == "all checks passed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_gpu_check_fails_without_cuda() -> None:
    res = _run("--device", "cuda", "--skip", "loss", "inversion", "training", "reproduce")
    assert res.returncode == 1 and "FAIL setup: --device cuda but CUDA is not available" in (
        res.stdout)
