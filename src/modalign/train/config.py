"""Training configuration: typed sections read from TOML/YAML, every key overridable by name.

A config file has the sections ``[data]``, ``[model]``, ``[[objectives]]``, ``[optim]``,
``[train]``, ``[augment]``, ``[validate]`` and ``[run]``. Any key can be overridden with a dotted
name, ``optim.lr=1e-3`` (``--set optim.lr=1e-3`` or ``--optim.lr 1e-3`` on the command line);
values are parsed as TOML literals (``1e-3``, ``true``, ``["image", "text"]``, ``{text = 0.1}``)
and fall back to plain strings.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from modalign.errors import ModalignError
from modalign.io import read_user_text
from modalign.model import HeadSettings, ModelConfig
from modalign.spec import parse_value, split_key_value
from modalign.train.recipes.distill import HELP as DISTILL_HELP
from modalign.train.recipes.distill import DistillConfig
from modalign.train.recipes.fdt import HELP as FDT_HELP
from modalign.train.recipes.fdt import FDTOptions, FDTSection
from modalign.train.recipes.harmonize import HELP as HARMONIZE_HELP
from modalign.train.recipes.harmonize import HarmonizeConfig
from modalign.train.recipes.mcl import HELP as MCL_HELP
from modalign.train.recipes.mcl import MCLConfig
from modalign.train.recipes.momentum import HELP as MOMENTUM_HELP
from modalign.train.recipes.momentum import MomentumConfig
from modalign.train.recipes.negatives import HELP as NEGATIVES_HELP
from modalign.train.recipes.negatives import NegativesConfig
from modalign.train.schedule import LoopSettings, OptimizerSettings, field_values
from modalign.vocabulary import metric_key, upgrade_training_metric

BUILTIN_CONFIGS = ("clip", "clip_unif_align", "clip_intra", "three_modal")


@dataclass
class DataConfig:
    """Where the training pairs come from."""

    embeddings: str = ""
    dataset: str = "emoji"
    keys: list[str] = field(default_factory=lambda: ["image", "text"])
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class ModelSection(HeadSettings):
    """The model built on top of the towers (see ``modalign.model.ModelConfig``); the head
    fields come from :class:`~modalign.model.HeadSettings`."""

    towers: dict[str, str] = field(default_factory=dict)


@dataclass
class OptimConfig(OptimizerSettings):
    """AdamW with linear warmup and a cosine or constant schedule (``lr`` and ``weight_decay``
    from :class:`~modalign.train.schedule.OptimizerSettings`)."""

    tower_lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 20
    schedule: str = "cosine"
    grad_clip: float = 0.0


@dataclass
class TrainSection(LoopSettings):
    """The loop (length, batch, seed and checkpoints from
    :class:`~modalign.train.schedule.LoopSettings`)."""

    accumulate: int = 1
    unfreeze: dict[str, int] = field(default_factory=dict)
    precision: str = "fp32"
    device: str = "auto"
    num_threads: int = 0
    progress: bool = True


@dataclass
class AugmentConfig:
    """Augmentations (see docs/training.md for which apply to cached features)."""

    sample_items: bool = True
    embedding_noise: dict[str, float] = field(default_factory=dict)
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    color_jitter: float = 0.2


@dataclass
class ValidateConfig:
    """Per-epoch validation on ``data.val_split``."""

    pair: list[str] = field(default_factory=list)
    metric: str = ""
    patience: int = 0


@dataclass
class LoraSection:
    """LoRA adapters (through peft) on the towers of these modalities; see
    ``modalign.encoders.lora``."""

    towers: list[str] = field(default_factory=list)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: dict[str, list[str]] = field(default_factory=dict)


@dataclass(kw_only=True)
class LateOptions:
    """The keys of a late-interaction run (the ``[late]`` section and
    :class:`~modalign.late.model.LateSettings` share them).

    Attributes:
        query: key of the queries, ``modality`` or ``modality:view``.
        documents: keys whose rows make up a group's document.
        dim: token dimension of the heads' output.
        temperature: initial temperature of the (learned) logit scale.
        scoring: ``"maxsim"``, or ``"single"`` (cosine of the mean tokens: the single-vector
            baseline trained with the same heads and loss).

    Examples:
        >>> LateOptions(dim=8).documents
        ['image', 'text:name']
    """

    query: str = "text:alias"
    documents: list[str] = field(default_factory=lambda: ["image", "text:name"])
    dim: int = 64
    temperature: float = 0.5
    scoring: str = "maxsim"


@dataclass
class LateSection(LateOptions):
    """Late interaction: heads to a small token space trained on MaxSim scores (CLaMR);
    see ``modalign.late``."""

    enabled: bool = False


@dataclass
class RunConfig:
    """Where outputs go."""

    dir: str = ""
    name: str = ""


HELP: dict[str, str] = {
    "data.embeddings": "embedding store folder (tower features of every item)",
    "data.dataset": "dataset spec ('emoji', a manifest or a built folder): without "
                    "data.embeddings its store for the configured towers is used (and built "
                    "when missing); unfrozen towers read their raw inputs from it",
    "data.keys": "embedding keys of one training tuple: a modality ('image': any of its views) "
                 "or 'modality:view' ('image:noto')",
    "data.train_split": "split to train on",
    "data.val_split": "split to validate on ('' to skip validation)",
    "model.towers": "encoder spec per modality, e.g. {image = 'effnet-lite0'}; empty: the "
                    "encoders recorded in the store",
    "model.joint_dim": "size of the joint space",
    "model.head": "head kind: 'linear' or 'mlp'",
    "model.head_depth": "linear layers of an mlp head (>= 2)",
    "model.hidden_dim": "hidden width of an mlp head",
    "model.head_init": "'xavier' or 'cone' (each modality starts in its own narrow cone)",
    "model.cone_offset": "norm of the random final bias of a 'cone' head",
    "model.input_norm": "'l2' normalises tower features before the head, 'none' keeps them",
    "model.center_features": "subtract the training-split feature mean before the head",
    "model.temperature": "temperature tau of the scale stored with the model (the first "
                         "scaled objective term trains it)",
    "optim.lr": "learning rate of the heads and the objectives' temperatures",
    "optim.tower_lr": "learning rate of unfrozen tower stages",
    "optim.weight_decay": "AdamW weight decay of weight matrices (none on biases and "
                          "temperatures)",
    "optim.betas": "AdamW betas, e.g. [0.9, 0.98]",
    "optim.eps": "AdamW epsilon",
    "optim.warmup_steps": "linear warmup steps",
    "optim.schedule": "'cosine' (decays to zero at the last step) or 'constant'",
    "optim.grad_clip": "clip the gradient norm to this value (0: off)",
    "train.epochs": "passes over the training groups",
    "train.batch_size": "global contrastive batch (all processes together)",
    "train.seed": "seed of initialisation, batch order and item sampling",
    "train.accumulate": "micro-batches per step; > 1 caches embeddings (GradCache) so the "
                        "contrastive batch stays global",
    "train.unfreeze": "last k stages of a tower to fine-tune, e.g. {image = 2}; those items are "
                      "encoded on the fly (needs data.dataset)",
    "train.precision": "'fp32' or 'bf16' (autocast; CUDA only)",
    "train.device": "'auto', 'cpu', 'cuda' or 'cuda:N'",
    "train.num_threads": "torch CPU threads (0: torch's default)",
    "train.checkpoint_every": "also checkpoint every N steps (0: at epoch ends only)",
    "train.keep_checkpoints": "how many recent checkpoints to keep",
    "train.max_steps": "stop after this many steps (0: no limit)",
    "train.progress": "show a progress bar",
    "augment.sample_items": "draw a random item of each group per key at every step (a "
                            "concept's names/aliases/prompts, an image's styles); false: the "
                            "group's first item",
    "augment.embedding_noise": "Gaussian noise std added to the joint embeddings of these keys "
                               "during training, then renormalised (CLOSE), e.g. {text = 0.1}",
    "augment.crop_scale": "random resized crop area range [low, high] (unfrozen image towers)",
    "augment.color_jitter": "brightness/contrast/saturation jitter (unfrozen image towers)",
    "validate.pair": "the two keys validation retrieves between (default: the first two "
                     "data.keys)",
    "validate.metric": "metric that picks the best epoch: QUERY-to-GALLERY_recall@1 or "
                       "_recall@5 of the validation pair (e.g. image-to-text_recall@1), "
                       "mean_recall@1, or -gap (a leading '-' means lower is better); default: "
                       "the first key of the pair retrieving the second, recall@1",
    "validate.patience": "stop after this many epochs without improvement (0: never)",
    "lora.towers": "modalities whose tower gets LoRA adapters, e.g. ['text'] (their items are "
                   "encoded on the fly, as with train.unfreeze; adapters train at "
                   "optim.tower_lr)",
    "lora.rank": "LoRA rank r",
    "lora.alpha": "LoRA alpha (the update is scaled by alpha / rank)",
    "lora.dropout": "dropout on the adapters' input",
    "lora.target_modules": "module names per modality, e.g. {text = ['query', 'value']}; "
                           "default: the tower's attention and MLP projections (pointwise "
                           "convolutions for EfficientNet)",
    "late.enabled": "train a late-interaction model (token heads, MaxSim loss) from the "
                    "token arrays of data.embeddings (modalign embed --tokens) instead of the "
                    "single-vector model; uses train.epochs/batch_size/seed/max_steps, optim.lr "
                    "and weight_decay",
    "late.query": "key of the queries, 'modality' or 'modality:view'",
    "late.documents": "keys whose rows' tokens make up a group's document",
    "late.dim": "token dimension of the late-interaction heads",
    "late.temperature": "initial temperature of the learned MaxSim logit scale",
    "late.scoring": "'maxsim', or 'single' (cosine of mean tokens: the single-vector baseline "
                    "with the same heads and loss)",
    "run.dir": "run folder (default: <modalign home>/runs/<run.name>)",
    "run.name": "run name (default: the config file's name)",
}
HELP.update(MOMENTUM_HELP)
HELP.update(DISTILL_HELP)
HELP.update(NEGATIVES_HELP)
HELP.update(HARMONIZE_HELP)
HELP.update(FDT_HELP)
HELP.update(MCL_HELP)


@dataclass
class TrainConfig:
    """A whole training run, as data.

    Examples:
        >>> cfg = TrainConfig.from_dict({"optim": {"lr": 0.01}},
        ...                             overrides=["train.batch_size=32"])
        >>> cfg.optim.lr, cfg.train.batch_size
        (0.01, 32)
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    objectives: list[dict[str, Any]] = field(default_factory=lambda: [
        {"loss": "clip", "modalities": ["image", "text"], "weight": 1.0}])
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    late: LateSection = field(default_factory=LateSection)
    run: RunConfig = field(default_factory=RunConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    harmonize: HarmonizeConfig = field(default_factory=HarmonizeConfig)
    fdt: FDTSection = field(default_factory=FDTSection)
    mcl: MCLConfig = field(default_factory=MCLConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what ``config.resolved.json`` holds)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], overrides: Iterable[str] = ()) -> TrainConfig:
        """Build from a nested dict plus ``"section.key=value"`` overrides; validates."""
        merged = json.loads(json.dumps(dict(d)))
        for ov in overrides:
            key, value = parse_override(ov)
            set_dotted(merged, key, value)
        merged = upgrade_config(merged, warn=True)
        unknown = sorted(set(merged) - set(SECTIONS) - {"objectives"})
        if unknown:
            raise ModalignError(f"config has unknown sections {unknown}; expected "
                             f"{sorted([*SECTIONS, 'objectives'])}")
        kwargs: dict[str, Any] = {}
        for name, section in SECTIONS.items():
            values = merged.get(name, {})
            if not isinstance(values, Mapping):
                raise ModalignError(f"config section [{name}] must be a table, got {values!r}")
            kwargs[name] = _build_section(name, section, values)
        if "objectives" in merged:
            kwargs["objectives"] = _objectives(merged["objectives"])
        cfg = cls(**kwargs)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad key."""
        t, o, d = self.train, self.optim, self.data
        if len(d.keys) < 1 or len(set(d.keys)) != len(d.keys):
            raise ModalignError(f"data.keys must be distinct embedding keys, got {d.keys!r}")
        for name, v in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size),
                        ("train.accumulate", t.accumulate)):
            if not isinstance(v, int) or v < 1:
                raise ModalignError(f"{name} must be a positive int, got {v!r}")
        if t.batch_size % t.accumulate:
            raise ModalignError(f"train.batch_size={t.batch_size} must be divisible by "
                             f"train.accumulate={t.accumulate}")
        if t.precision not in ("fp32", "bf16"):
            raise ModalignError(f"train.precision must be 'fp32' or 'bf16', got {t.precision!r}")
        if o.schedule not in ("cosine", "constant"):
            raise ModalignError(f"optim.schedule must be 'cosine' or 'constant', "
                                f"got {o.schedule!r}")
        if not (isinstance(self.model.temperature, (int, float)) and self.model.temperature > 0
                and math.isfinite(self.model.temperature)):
            raise ModalignError(f"model.temperature must be a finite number > 0, "
                                f"got {self.model.temperature!r}")
        if not o.lr > 0 or not o.tower_lr > 0:
            raise ModalignError(f"optim.lr and optim.tower_lr must be > 0, "
                                f"got {o.lr}, {o.tower_lr}")
        if len(o.betas) != 2:
            raise ModalignError(f"optim.betas must be two numbers, got {o.betas!r}")
        for m, k in t.unfreeze.items():
            if not isinstance(k, int) or k < 0:
                raise ModalignError(f"train.unfreeze[{m!r}] must be an int >= 0, got {k!r}")
        if len(self.augment.crop_scale) != 2 or not (
                0 < self.augment.crop_scale[0] <= self.augment.crop_scale[1] <= 1):
            raise ModalignError("augment.crop_scale must be [low, high] with 0 < low <= high <= 1, "
                             f"got {self.augment.crop_scale!r}")
        for key, s in self.augment.embedding_noise.items():
            if not isinstance(s, (int, float)) or s < 0:
                raise ModalignError(f"augment.embedding_noise[{key!r}] must be a number >= 0, "
                                    f"got {s!r}")
        pair = self.validation_pair()
        if pair is not None and len(pair) != 2:
            raise ModalignError(f"validate.pair must name two keys, got {self.validate.pair!r}")
        self.validation_metric(warn=False)
        if not self.objectives:
            raise ModalignError("objectives must list at least one "
                                "{loss = ..., modalities = [...]}")
        check_objectives(self.objectives, self.data.keys)
        self.momentum.check(t.batch_size)
        self.distill.check()
        self.negatives.check(d.keys, t.accumulate)
        self.harmonize.check(t.accumulate)
        self.mcl.check(d.keys)
        own_runs = [name for name, on in (("late.enabled", self.late.enabled),
                                          ("fdt.enabled", self.fdt.enabled),
                                          ("mcl.stages > 1", self.mcl.enabled)) if on]
        if len(own_runs) > 1:
            raise ModalignError(f"{' and '.join(own_runs)} cannot be combined: each trains a "
                                "model of its own; use one of them")
        if self.harmonize.enabled and self.negatives.enabled:
            raise ModalignError("harmonize.enabled and negatives.k > 0 cannot be combined (the "
                                "negatives' own embeddings are not harmonized); use one of them")
        self.lora_settings()
        if self.fdt.enabled:
            self.fdt_settings()
        # the model section must build a valid ModelConfig (with placeholder dims)
        self.model_config({k: "x" for k in self.modalities()} if not self.model.towers
                          else self.model.towers, {m: 1 for m in self.modalities()})

    def modalities(self) -> list[str]:
        """The modalities (keys without views) of ``data.keys``, sorted."""
        return sorted({k.split(":", 1)[0] for k in self.data.keys})

    def validation_pair(self) -> list[str] | None:
        """The two keys validation compares, or ``None`` when validation is off."""
        if not self.data.val_split:
            return None
        if self.validate.pair:
            return list(self.validate.pair)
        return list(self.data.keys[:2]) if len(self.data.keys) >= 2 else None

    def validation_metric(self, warn: bool = True, metric: str | None = None
                          ) -> tuple[str, float]:
        """``(key, sign)``: the training-log key that picks the best epoch and +1 (higher is
        better) or -1 (a leading ``-``). Older keys (``i2t_r1``, ...) are read, with a
        ``FutureWarning`` naming today's key when ``warn``. ``metric`` resolves another value
        of ``validate.metric`` against this config's validation pair.

        Examples:
            >>> cfg = TrainConfig.from_dict({"data": {"keys": ["image", "text"],
            ...                                       "val_split": "val"}})
            >>> cfg.validation_metric()
            ('image-to-text_recall@1', 1.0)
        """
        raw = (self.validate.metric if metric is None else metric).strip()
        sign = -1.0 if raw.startswith("-") else 1.0
        name = raw.lstrip("-")
        pair = self.validation_pair() or (list(self.data.keys[:2]) if len(self.data.keys) >= 2
                                          else ["first", "second"])
        allowed = [metric_key(q, g, f"recall@{k}") for q, g in (pair, pair[::-1])
                   for k in (1, 5)] + ["mean_recall@1", "gap"]
        if not name:
            return metric_key(pair[0], pair[1], "recall@1"), sign
        new = upgrade_training_metric(name, pair)
        if new is not None and new in allowed:
            if warn:
                warnings.warn(f"validate.metric = {raw!r} is deprecated; use "
                              f"{('-' if sign < 0 else '') + new!r} (training logs now write "
                              "QUERY-to-GALLERY_MEASURE keys)", FutureWarning, stacklevel=2)
            return new, sign
        if name not in allowed:
            raise ModalignError(f"validate.metric must be one of {allowed} for the validation "
                                f"pair {pair} (prefix '-' for lower-is-better), got {raw!r}")
        return name, sign

    def model_config(self, towers: Mapping[str, str],
                     feature_dims: Mapping[str, int]) -> ModelConfig:
        """The :class:`~modalign.model.ModelConfig` this run trains, given the towers."""
        m = self.model
        mods = self.modalities()
        towers = {k: towers[k] for k in mods if k in towers}
        missing = sorted(set(mods) - set(towers))
        if missing:
            raise ModalignError(f"model.towers has no encoder spec for {missing}; set it in the "
                             "config or embed those modalities into the store first")
        return ModelConfig(
            towers=dict(towers), feature_dims={k: int(feature_dims[k]) for k in mods},
            **field_values(m, HeadSettings),
            trainable_towers=sorted({k for k, v in self.train.unfreeze.items() if v > 0}
                                    | set(self.lora.towers)),
            lora={k: v.to_dict() for k, v in self.lora_settings().items()})

    # -- late interaction ----------------------------------------------------------------------
    def late_settings(self) -> Any:
        """The :class:`~modalign.late.model.LateSettings` of a ``[late]`` run."""
        from modalign.late.model import LateSettings

        la = self.late
        late = field_values(la, LateOptions) | {"documents": list(la.documents),
                                                "temperature": float(la.temperature)}
        s = LateSettings(store=self.data.embeddings, run_dir=self.run.dir,
                         train_split=self.data.train_split, **late,
                         **field_values(self.train, LoopSettings),
                         **field_values(self.optim, OptimizerSettings))
        s.check()
        return s

    def fdt_settings(self) -> Any:
        """The :class:`~modalign.train.recipes.fdt.FDTSettings` of an ``[fdt]`` run."""
        from modalign.train.recipes.fdt import FDTSettings

        f, t, o = self.fdt, self.train, self.optim
        s = FDTSettings(store=self.data.embeddings, run_dir=self.run.dir,
                        keys=list(self.data.keys),
                        **(field_values(f, FDTOptions) | {"temperature": float(f.temperature)}),
                        warmup_steps=o.warmup_steps,
                        train_split=self.data.train_split, val_split=self.data.val_split,
                        num_threads=t.num_threads, **field_values(t, LoopSettings),
                        **field_values(o, OptimizerSettings))
        s.check()
        return s

    # -- LoRA --------------------------------------------------------------------------------
    def lora_settings(self) -> dict[str, Any]:
        """Modality -> :class:`~modalign.encoders.lora.LoraSettings` of ``[lora]``; checks the
        section (no modality both LoRA-adapted and unfrozen, known modalities)."""
        from modalign.encoders.lora import LoraSettings

        lo = self.lora
        mods = self.modalities()
        for m in [*lo.towers, *lo.target_modules]:
            if m not in mods:
                raise ModalignError(f"lora: modality {m!r} is not among data.keys' modalities "
                                    f"{mods}")
        both = sorted(m for m in lo.towers if self.train.unfreeze.get(m, 0) > 0)
        if both:
            raise ModalignError(f"lora.towers and train.unfreeze both name {both}: choose LoRA "
                                "adapters or unfrozen stages for a tower")
        return {m: LoraSettings(rank=lo.rank, alpha=float(lo.alpha), dropout=float(lo.dropout),
                                target_modules=list(lo.target_modules.get(m, [])))
                for m in lo.towers}


SECTIONS: dict[str, type] = {name: hint for name, hint in get_type_hints(TrainConfig).items()
                             if name != "objectives"}
"""Section name -> its dataclass, in file order (the fields of :class:`TrainConfig`)."""


OLDER_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "model.logit_scale_init": ("model.temperature",
                               lambda scale: 1 / float(scale) if float(scale) > 0 else scale),
}
"""Older dotted config key -> (today's key, how its value converts)."""


def upgrade_config(d: Mapping[str, Any], *, warn: bool = False) -> dict[str, Any]:
    """A config dict with the :data:`OLDER_KEYS` rewritten to today's keys (a ``FutureWarning``
    naming the new key per older one when ``warn``; ``config.resolved.json`` of earlier runs is
    read without one).

    Examples:
        >>> upgrade_config({"model": {"logit_scale_init": 20.0}})
        {'model': {'temperature': 0.05}}
    """
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in d.items()}
    for old, (new, convert) in OLDER_KEYS.items():
        section, key = old.split(".")
        values = out.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        value = values.pop(key)
        new_section, new_key = new.split(".")
        if new_key in out.setdefault(new_section, {}):
            raise ModalignError(f"give {new} only ({old} is its older spelling)")
        if warn:
            warnings.warn(f"{old} is deprecated; use {new} (converted: {new} = "
                          f"{convert(value)!r})", FutureWarning, stacklevel=3)
        out[new_section][new_key] = convert(value)
    return out


def check_objectives(objectives: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    """Build every objective term now (before any data is read) and name what is wrong: an
    unknown loss, a misspelled parameter (with the accepted ones), modalities that are not in
    ``data.keys``, a negative or non-finite weight."""
    import inspect

    from modalign.losses.objective import LossTerm
    from modalign.losses.registry import available_losses, build_loss, loss_class

    for i, spec in enumerate(objectives):
        where = f"objectives[{i}]"
        loss = spec.get("loss")
        if loss not in available_losses():
            raise ModalignError(f"{where}.loss={loss!r} is unknown; expected one of "
                                f"{available_losses()}")
        try:
            term = LossTerm.from_dict(spec)
        except (TypeError, ValueError) as e:
            raise ModalignError(f"{where} ({loss}): {e}") from None
        missing = [m for m in term.modalities if m not in keys]
        if missing:
            raise ModalignError(f"{where}.modalities {list(term.modalities)}: {missing} not in "
                                f"data.keys {list(keys)}; add them to data.keys or use those keys")
        if not math.isfinite(term.weight) or term.weight < 0:
            raise ModalignError(f"{where}.weight={term.weight}: expected a finite number >= 0 "
                                "(a negative weight would maximise the loss)")
        params = dict(term.params)
        cls = loss_class(loss)
        if getattr(cls, "needs_dataset_size", False):
            params.setdefault("dataset_size", 2)  # set from the data when training starts
        if getattr(cls, "needs_joint_dim", False):
            params.setdefault("dim", 2)  # model.joint_dim, set when training starts
        names = getattr(cls, "parameter_names", None)
        if callable(names):  # a LossModule: its own, the shared and the older keywords
            accepted, known = names(), names(older=True)
            open_ended = getattr(cls, "open_parameters", False)
        else:
            signature = inspect.signature(cls).parameters
            accepted = known = sorted(n for n in signature if n not in ("self", "modalities"))
            open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.values())
        unknown = sorted(set(params) - set(known))
        if unknown and not open_ended:
            raise ModalignError(f"{where} ({loss}): unknown parameters {unknown}; {loss} accepts "
                                f"{accepted} besides loss, modalities, weight and label")
        try:
            build_loss(loss, modalities=list(term.modalities), **params)
        except (TypeError, ValueError) as e:
            raise ModalignError(f"{where} ({loss}): {e}") from None


RESUMABLE_KEYS = frozenset({"train.epochs", "train.max_steps", "train.progress",
                            "train.checkpoint_every", "train.keep_checkpoints",
                            "validate.patience", "run.dir", "run.name"})
"""Settings a ``--resume`` may change: how long to train and how often to log and checkpoint."""


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> ``(old, new)`` for every setting that differs between two config dicts.

    Examples:
        >>> config_changes({"optim": {"lr": 0.1}, "objectives": []},
        ...                {"optim": {"lr": 0.5}, "objectives": []})
        {'optim.lr': (0.1, 0.5)}
    """
    out: dict[str, tuple[Any, Any]] = {}
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    out[f"{section}.{k}"] = (a.get(k), b.get(k))
        elif a != b:
            out[section] = (a, b)
    return out


def _build_section(name: str, cls: type, values: Mapping[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ModalignError(f"[{name}] has unknown keys {unknown}; "
                            f"expected some of {sorted(known)}")
    out = {}
    for k, v in values.items():
        f = known[k]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        out[k] = _coerce(f"{name}.{k}", v, default)
    return cls(**out)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check ``value`` has the type of ``default`` (ints accepted for floats)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ModalignError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        value = _number_string(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModalignError(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        value = _number_string(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModalignError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ModalignError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)):
            raise ModalignError(f"{key} must be a list, got {value!r}")
        return list(value)
    if isinstance(default, dict):
        if not isinstance(value, Mapping):
            raise ModalignError(f"{key} must be a table like {{name = value}}, got {value!r}")
        return dict(value)
    return value


def _number_string(value: Any) -> Any:
    """A string that spells a number, as that number (YAML reads ``5e-3`` as a string)."""
    if not isinstance(value, str):
        return value
    for cast in (int, float):
        try:
            return cast(value.strip())
        except ValueError:
            pass
    return value


def _objectives(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ModalignError(f"objectives must be a list of tables, got {value!r}")
    out = []
    for i, spec in enumerate(value):
        if not isinstance(spec, Mapping) or "loss" not in spec:
            raise ModalignError(f"objectives[{i}] must be a table with a 'loss' key, got {spec!r}")
        out.append(dict(spec))
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"section.key=value"`` into the dotted key and the parsed value.

    Examples:
        >>> parse_override("optim.lr=1e-3")
        ('optim.lr', 0.001)
    """
    key, value = split_key_value(text, "override", "section.key=value, e.g. optim.lr=1e-3")
    if "." not in key and key != "objectives":
        raise ModalignError(f"override key {key!r} must be dotted, e.g. optim.lr")
    return key, parse_value(value)


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``d["a"]["b"] = value`` for ``key = "a.b"`` (creating tables on the way)."""
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ModalignError(f"override {key!r}: {p!r} is not a table")
        node = nxt
    node[parts[-1]] = value


def builtin_config_path(name: str) -> Path:
    """The file of a built-in config (``clip``, ``clip_unif_align``, ``clip_intra``, ...)."""
    if name not in BUILTIN_CONFIGS:
        raise ModalignError(f"config={name!r} is not a built-in; expected one of {BUILTIN_CONFIGS} "
                         "or a .toml/.yaml file")
    return Path(__file__).resolve().parent.parent / "configs" / f"{name}.toml"


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML or YAML config file (or a built-in name) into a nested dict."""
    p = Path(path)
    if not p.suffix and not p.exists():
        p = builtin_config_path(str(path))
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} not found; pass a .toml/.yaml file or "
                                f"one of the built-ins {BUILTIN_CONFIGS}")
    text = read_user_text(p, "config")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.constructor.ConstructorError as e:
            line = e.problem_mark.line + 1 if e.problem_mark else "?"
            raise ModalignError(f"config {str(p)!r}, line {line}: "
                                f"refused, {e.problem}; a config holds plain values only "
                                "(numbers, strings, lists, tables)") from None
        except yaml.YAMLError as e:
            raise ModalignError(f"config {str(p)!r}: not valid YAML ({e})") from None
    elif p.suffix in (".toml", ""):
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ModalignError(f"config {str(p)!r}: not valid TOML ({e})") from None
    else:
        raise ModalignError(f"config={str(p)!r}: expected a .toml, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ModalignError(f"config {str(p)!r} must hold a table of sections")
    return data


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a config file (TOML/YAML, or a built-in name) and apply ``section.key=value`` overrides.

    Examples:
        >>> cfg = load_config("clip", overrides=["train.epochs=2"])
        >>> cfg.train.epochs, cfg.objectives[0]["loss"]
        (2, 'clip')
    """
    data = read_config_file(path) if path is not None else {}
    cfg = TrainConfig.from_dict(data, overrides)
    if not cfg.run.name and path is not None:
        cfg.run.name = Path(path).stem
    return cfg


def flag_specs() -> list[tuple[str, str]]:
    """``(dotted key, help)`` of every settable key, for generating command-line flags."""
    out = []
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            out.append((f"{name}.{f.name}", HELP.get(f"{name}.{f.name}", "")))
    out.append(("objectives", "the objectives as a TOML list of tables"))
    return out
