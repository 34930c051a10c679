"""Training N-tower models: configs, the loop, checkpoints and resume, torchrun.

Examples:
    >>> from modalign.train import load_config
    >>> load_config("clip", ["train.epochs=3"]).train.epochs
    3
"""

from modalign.train.config import TrainConfig, load_config
from modalign.train.loop import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "load_config", "train"]
