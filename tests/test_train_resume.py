"""``modalign train --resume`` after a SIGKILL at a random step gives the uninterrupted weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modalign.train.checkpoint import load_checkpoint
from train_support import synthetic_store

CONFIG = """
[data]
embeddings = "{store}"
[model]
towers = {{ image = "fake-image", text = "fake-text" }}
joint_dim = 8
head = "mlp"
hidden_dim = 16
[[objectives]]
loss = "clip"
modalities = ["image", "text"]
[optim]
lr = 1e-2
warmup_steps = 5
[train]
epochs = 6
batch_size = 8
checkpoint_every = 3
num_threads = 1
device = "cpu"
progress = false
[augment]
embedding_noise = {{ text = 0.05 }}
"""


def _cmd(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "modalign", "train", "--config", str(config),
            "--run.dir", str(run_dir), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _latest_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tmp_path):
    synthetic_store(tmp_path / "store", n_groups=96)  # 64 train groups: 8 steps/epoch, 48 in all
    config = tmp_path / "cfg.toml"
    config.write_text(CONFIG.format(store=tmp_path / "store"))
    kill_at = random.SystemRandom().randint(3, 40)

    full = tmp_path / "full"
    subprocess.run(_cmd(config, full), check=True, env=_env(), capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(config, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _latest_step(killed) < kill_at and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert proc.poll() is None, f"the run finished before step {kill_at}; cannot test the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped = _latest_step(killed)
    assert kill_at <= stopped < 48, (kill_at, stopped)

    resumed = subprocess.run(_cmd(config, killed, "--resume"), env=_env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = load_checkpoint(full / "checkpoints"), load_checkpoint(killed / "checkpoints")
    assert a.step == b.step == 48
    for module in ("model", "objective"):
        assert a.weights[module].keys() == b.weights[module].keys()
        for k, v in a.weights[module].items():
            assert torch.equal(v, b.weights[module][k]), (kill_at, stopped, module, k)
    # the optimizer moments match too, and so do the logged losses and metrics
    sa, sb = a.trainer["optimizer"]["state"], b.trainer["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)

    def rows(run: Path) -> list[dict]:
        out = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("samples_per_s", "train_seconds")}
                for r in out]

    assert rows(full) == rows(killed)
    assert len(rows(full)) == 6
    model_a = load_file(str(full / "model" / "model.safetensors"))
    model_b = load_file(str(killed / "model" / "model.safetensors"))
    assert all(torch.equal(v, model_b[k]) for k, v in model_a.items())
