"""``torchrun --nproc_per_node 2 -m modalign train`` (gloo, CPU) equals one process on the same
global batch: each rank trains on its shard, the objectives gather across ranks and DDP averages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from modalign.train.checkpoint import load_checkpoint
from modalign.train.config import load_config
from modalign.train.loop import train
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
loss = "{loss}"
modalities = ["image", "text"]
[[objectives]]
loss = "uniformity"
modalities = ["image", "text"]
weight = 0.2
[optim]
lr = 1e-2
warmup_steps = 2
[train]
epochs = 2
batch_size = 8
accumulate = {accumulate}
num_threads = 1
device = "cpu"
progress = false
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # GradCache accumulation (2 micro-batches per rank) rides along: DDP's no_sync on the first
    # micro-batch, the gradient all-reduce on the last.
    synthetic_store(tmp_path / "store")
    config = tmp_path / "cfg.toml"
    config.write_text(CONFIG.format(store=tmp_path / "store", loss="clip", accumulate=2))
    args = ["-m", "modalign", "train", "--config", str(config)]
    train(load_config(config, [f"run.dir={tmp_path / 'one'}"]))  # one process, in this one
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", *args, "--run.dir", str(tmp_path / "two")],
                         env=_env(), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "one" / "checkpoints"), load_checkpoint(
        tmp_path / "two" / "checkpoints")
    assert a.step == b.step == 8
    assert b.trainer["world_size"] == 2
    for module in ("model", "objective"):
        for k, v in a.weights[module].items():
            torch.testing.assert_close(b.weights[module][k], v, rtol=0, atol=1e-6,
                                       msg=f"{module}.{k}")
    assert int(b.trainer["optimizer"]["state"][0]["step"]) == 8
