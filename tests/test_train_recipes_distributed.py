"""The recipes under ``torchrun``: two gloo processes end with the weights (and each recipe's
state) of one process on the same global batch. Momentum queues and distillation targets gather;
harmonization works on each rank's embedding gradients of the gathered losses, and its counts are
summed over ranks. (Hard negatives are per-sample: nothing to gather.)"""

from __future__ import annotations

import pytest
import torch

from modalign.train.loop import train
from train_support import small_config, synthetic_store, train_in_one_and_two_processes

CONFIG = """
[data]
embeddings = "{store}"
[model]
towers = {{ image = "fake-image", text = "fake-text" }}
joint_dim = 6
head = "mlp"
hidden_dim = 16
[[objectives]]
loss = "clip"
modalities = ["image", "text"]
[optim]
lr = 1e-2
warmup_steps = 2
[train]
epochs = 2
batch_size = 8
num_threads = 1
device = "cpu"
progress = false
[momentum]
decay = 0.9
queue_size = 12
alpha = 0.4
alpha_ramp_steps = 3
[distill]
teacher = "{teacher}"
alpha = 0.3
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_process(tmp_path):
    synthetic_store(tmp_path / "store")
    teacher = train(small_config(tmp_path / "store", tmp_path / "teacher",
                                 model={"joint_dim": 8},
                                 train={"epochs": 2, "num_threads": 1})).model_dir
    config = tmp_path / "cfg.toml"
    config.write_text(CONFIG.format(store=tmp_path / "store", teacher=teacher))
    a, b = train_in_one_and_two_processes(config, tmp_path)
    assert a.step == b.step == 8 and b.trainer["world_size"] == 2
    for module in ("model", "objective", "momentum", "distill"):
        assert a.weights[module]
        for k, v in a.weights[module].items():
            torch.testing.assert_close(b.weights[module][k], v, rtol=0, atol=1e-6,
                                       msg=f"{module}.{k}")
    assert int(b.weights["momentum"]["filled"]) == 12


HARMONIZE = """
[data]
embeddings = "{store}"
keys = ["image:noto", "image:openmoji", "text"]
[model]
towers = {{ image = "fake-image", text = "fake-text" }}
joint_dim = 6
[[objectives]]
loss = "clip"
modalities = ["image:noto", "text"]
[[objectives]]
loss = "clip"
modalities = ["image:openmoji", "text"]
[optim]
lr = 1e-2
warmup_steps = 2
[train]
epochs = 2
batch_size = 8
num_threads = 1
device = "cpu"
progress = false
[harmonize]
enabled = true
drop_below = 0.9
curriculum_steps = 16
"""

@pytest.mark.slow
@pytest.mark.distributed
def test_harmonization_two_processes_match_one_process(tmp_path):
    config = tmp_path / "cfg.toml"
    synthetic_store(tmp_path / "store")
    config.write_text(HARMONIZE.format(store=tmp_path / "store"))
    a, b = train_in_one_and_two_processes(config, tmp_path)
    assert a.step == b.step == 8 and b.trainer["world_size"] == 2
    assert set(a.weights) == set(b.weights) == {"model", "objective", "harmonize"}
    for module, weights in a.weights.items():
        for k, v in weights.items():
            torch.testing.assert_close(b.weights[module][k], v, rtol=0, atol=1e-6,
                                       msg=f"{module}.{k}")
    h = a.weights["harmonize"]  # counts of the global batch (summed over ranks), not vacuous
    assert int(h["samples"]) == 8 * 8 and int(h["dropped"]) > 0
