"""``torchrun --nproc_per_node 2 -m modalign train`` (gloo, CPU) equals one process on the same
global batch: each rank trains on its shard, the objectives gather across ranks and DDP averages."""

from __future__ import annotations

import pytest
import torch

from train_support import synthetic_store, train_in_one_and_two_processes

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


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # GradCache accumulation (2 micro-batches per rank) rides along: DDP's no_sync on the first
    # micro-batch, the gradient all-reduce on the last.
    synthetic_store(tmp_path / "store")
    config = tmp_path / "cfg.toml"
    config.write_text(CONFIG.format(store=tmp_path / "store", loss="clip", accumulate=2))
    a, b = train_in_one_and_two_processes(config, tmp_path)
    assert a.step == b.step == 8
    assert b.trainer["world_size"] == 2
    for module in ("model", "objective"):
        for k, v in a.weights[module].items():
            torch.testing.assert_close(b.weights[module][k], v, rtol=0, atol=1e-6,
                                       msg=f"{module}.{k}")
    assert int(b.trainer["optimizer"]["state"][0]["step"]) == 8
