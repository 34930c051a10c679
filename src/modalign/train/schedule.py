"""Training-schedule fields that several settings dataclasses share, written once.

Each class here is a keyword-only dataclass base: a settings class that derives from it gets its
fields (same names, same defaults), keeps its own fields positional, and may re-declare a field
whose default differs for it. The config keys users write stay flat (``optim.lr``, ``late.lr``,
``train.epochs``).

Examples:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Run(LoopSettings, OptimizerSettings):
    ...     name: str = "run"
    >>> r = Run("mine", epochs=3)
    >>> r.name, r.epochs, r.lr, r.keep_checkpoints
    ('mine', 3, 0.001, 2)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from modalign.errors import ModalignError
from modalign.train.checkpoint import open_run

__all__ = ["LoopSettings", "OptimizerSettings", "TokenRunSettings", "field_values"]


@dataclass(kw_only=True)
class OptimizerSettings:
    """AdamW's learning rate and weight decay.

    Examples:
        >>> OptimizerSettings(lr=0.01)
        OptimizerSettings(lr=0.01, weight_decay=0.1)
    """

    lr: float = 1e-3
    weight_decay: float = 0.1


@dataclass(kw_only=True)
class LoopSettings:
    """A training loop's length, batch, seed and checkpoints.

    Attributes:
        epochs: passes over the training groups.
        batch_size: the contrastive batch.
        seed: seed of initialisation, batch order and sampling.
        max_steps: stop after this many steps (0: no limit).
        checkpoint_every: also checkpoint every N steps (0: at epoch ends only).
        keep_checkpoints: how many recent checkpoints to keep.

    Examples:
        >>> LoopSettings(max_steps=5).epochs
        10
    """

    epochs: int = 10
    batch_size: int = 256
    seed: int = 0
    max_steps: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2


@dataclass(kw_only=True)
class TokenRunSettings(LoopSettings, OptimizerSettings):
    """A training run on the token arrays of an embedding store (late interaction, FDT): the
    loop and optimiser fields plus where the data and the outputs are.

    Attributes:
        store: the embedding store folder (with token arrays: ``modalign embed --tokens``).
        run_dir: the run folder (checkpoints, the trained model, the summary).
        train_split: the split trained on.

    Examples:
        >>> TokenRunSettings(store="emb").train_split
        'train'
    """

    store: str = ""
    run_dir: str = ""
    train_split: str = "train"

    def open_run(self, section: str, settings_name: str, resumable: frozenset[str],
                 resume: bool) -> tuple[Path, Path, bool]:
        """The run folder (``run_dir``, default ``<section>-run``), its checkpoint folder and
        whether the run resumes (:func:`modalign.train.checkpoint.open_run` on these settings);
        refuses settings without a store.

        Examples:
            >>> try:
            ...     TokenRunSettings().open_run("late", "settings.json", frozenset(), False)
            ... except ModalignError as e:
            ...     print(e)
            a [late] run needs data.embeddings: a store with token arrays (modalign embed --tokens)
        """
        if not self.store:
            raise ModalignError(f"a [{section}] run needs data.embeddings: a store with token "
                                "arrays (modalign embed --tokens)")
        run_dir = Path(self.run_dir or f"{section}-run")
        root, resumed = open_run(run_dir, asdict(self), settings_name, resumable, section, resume)
        return run_dir, root, resumed


def field_values(settings: Any, base: type) -> dict[str, Any]:
    """The values of ``base``'s dataclass fields on ``settings`` (an instance of ``base`` or of a
    class with the same field names), for building another settings class from them.

    Examples:
        >>> field_values(TokenRunSettings(epochs=3, lr=0.01), OptimizerSettings)
        {'lr': 0.01, 'weight_decay': 0.1}
    """
    return {f.name: getattr(settings, f.name) for f in fields(base)}
