"""The training loop: heads (and optionally tower tails) trained with any objective, resumable.

One step: draw the global batch of groups, take this process's shard, compute joint embeddings
(projected cached features; raw inputs through unfrozen towers), apply the objective, step AdamW,
clamp the objective's temperatures. With ``train.accumulate = k > 1`` the step runs GradCache-style
so the contrastive batch stays global: embeddings of the ``k`` micro-batches are computed without
gradients, the loss on the whole batch gives the gradient with respect to every embedding, and
each micro-batch is then re-embedded with gradients and back-propagated with that gradient.

After every epoch the validation split is embedded (all its items for the two validation keys) and
retrieval R@1/R@5 both ways and the centroid gap are printed and appended to ``log.jsonl``; the best
epoch by ``validate.metric`` is saved as the run's model folder; ``validate.patience`` stops early.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from modalign import __version__
from modalign.embed.store import EmbeddingStore
from modalign.encoders.lora import adapter_dropout_on, save_adapters
from modalign.errors import ModalignError, SmallDataWarning
from modalign.evaluate.vocabulary import (
    describe_metric,
    metric_key,
    parse_metric_key,
    upgrade_training_row,
)
from modalign.io import append_jsonl, read_json, read_jsonl, write_json_atomic, write_jsonl_atomic
from modalign.losses.objective import Objective, build_objective
from modalign.losses.output import LossOutput
from modalign.model import MultiTowerModel, base_modality
from modalign.paths import home
from modalign.train import distributed as D
from modalign.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from modalign.train.config import RESUMABLE_KEYS, DataConfig, TrainConfig, config_changes
from modalign.train.data import KeyTable, PairedFeatures, augment_image, load_key, shard
from modalign.train.recipes.distill import ContrastiveDistillation, load_teacher
from modalign.train.recipes.harmonize import GradientHarmonization
from modalign.train.recipes.momentum import MomentumDistillation, alpha_at
from modalign.train.recipes.negatives import HardNegatives

LOG_NAME = "log.jsonl"
SUMMARY_NAME = "summary.json"
CONFIG_NAME = "config.resolved.json"
MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainResult:
    """Where a run's outputs are and its one-line summary."""

    run_dir: Path
    model_dir: Path
    summary: dict[str, Any]


def default_run_dir(config: TrainConfig) -> Path:
    """``config.run.dir``, else ``<modalign home>/runs/<run name or 'run'>``."""
    if config.run.dir:
        return Path(config.run.dir)
    return home() / "runs" / (config.run.name or "run")


def check_resume(run_dir: Path, config: TrainConfig) -> None:
    """Refuse a ``--resume`` whose settings differ from the run's, except the keys in
    :data:`~modalign.train.config.RESUMABLE_KEYS` (how long to train, logging cadence)."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return
    # sections added since the run started (e.g. a new recipe) count as their defaults
    old = {**TrainConfig().to_dict(), **read_json(path).get("config", {})}
    new = config.to_dict()
    for settings in (old, new):  # an older spelling of the same metric is the same setting
        section = settings["validate"] = dict(settings.get("validate") or {})
        try:
            key, sign = config.validation_metric(warn=False, metric=section.get("metric", ""))
        except ModalignError:
            continue
        section["metric"] = ("-" if sign < 0 else "") + key
    refused = {k: v for k, v in config_changes(old, new).items() if k not in RESUMABLE_KEYS}
    if refused:
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ModalignError(
            f"--resume: {run_dir} was started with other settings ({diff}); a resume may only "
            f"change {', '.join(sorted(RESUMABLE_KEYS))}. Start a new run (another run.dir) "
            "to train with the new settings")


def tower_specs(config: TrainConfig, store: EmbeddingStore) -> dict[str, str]:
    """Encoder spec per modality: ``model.towers``, else the encoder recorded in the store."""
    specs = dict(config.model.towers)
    for m in config.modalities():
        if m in specs:
            continue
        try:
            enc = store.info(m).get("encoder") or {}
        except ValueError:
            enc = {}
        name = enc.get("name") if isinstance(enc, Mapping) else None
        if name:
            specs[m] = str(name)
    return specs


def resolve_store(config: TrainConfig, ctx: D.DistContext | None = None) -> EmbeddingStore:
    """The store of ``data.embeddings``; else the default store of ``data.dataset`` and the
    configured towers, brought up to date by rank 0 (missing or stale arrays are encoded)."""
    if config.data.embeddings:
        path = Path(config.data.embeddings)
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(f"data.embeddings={str(path)!r} is not an embedding store "
                                    "(no manifest.json); build one with 'modalign embed'")
        return EmbeddingStore(path)
    if not config.data.dataset:
        raise ModalignError("set data.embeddings (a store folder) or data.dataset (e.g. 'emoji')")
    from modalign.data import load_dataset
    from modalign.embed.cli import DEFAULT_TOWERS
    from modalign.embed.encode import embed_dataset
    from modalign.embed.paths import default_store_dir

    ds = load_dataset(config.data.dataset)
    specs = {m: config.model.towers.get(m) or DEFAULT_TOWERS.get(m, "") for m in ds.modalities
             if m in config.modalities()}
    missing = [m for m in config.modalities() if not specs.get(m)]
    if missing:
        raise ModalignError(f"data.dataset={config.data.dataset!r} has no items of {missing} or no "
                         f"default tower for them; it has {ds.modalities}")
    path = default_store_dir(ds, specs)
    store = EmbeddingStore(path)
    if ctx is None or ctx.is_main:
        # embed_dataset re-encodes an array whose inputs or tower changed and reuses the rest
        embed_dataset(ds, {m: _load_tower(specs[m], m) for m in specs}, path,
                      progress=sys.stderr.isatty())
    if ctx is not None:
        D.barrier(ctx)
    return store


class _RawInputs:
    """Raw inputs (file paths, texts) of store rows, for towers that encode on the fly."""

    def __init__(self, dataset_spec: str) -> None:
        from modalign.data import load_dataset

        if not dataset_spec:
            raise ModalignError("data.dataset must name the dataset when train.unfreeze is set "
                             "(unfrozen towers encode raw inputs)")
        self.dataset = load_dataset(dataset_spec)
        self.by_id = {it.id: it for it in self.dataset.items}

    def inputs(self, items: list[dict[str, Any]]) -> list[Any]:
        out = []
        for row in items:
            it = self.by_id.get(row["id"])
            if it is None:
                raise ModalignError(f"item {row['id']!r} of the store is not in data.dataset")
            out.append(str(self.dataset.resolve(it)) if it.modality != "text" else it.value)
        return out


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it.

    Args:
        config: the run's configuration.
        towers: optional tower objects by modality (used instead of loading ``model.towers`` by
            spec; the way to train with a custom or test tower).
        run_dir: output folder (default :func:`default_run_dir`).
        resume: continue from the run folder's latest checkpoint.
    """

    def __init__(self, config: TrainConfig, *, towers: Mapping[str, Any] | None = None,
                 run_dir: str | Path | None = None, resume: bool = False) -> None:
        self.config = config
        self.ctx = D.setup(config.train.device)
        if config.train.num_threads > 0:
            torch.set_num_threads(config.train.num_threads)
        if config.train.precision == "bf16" and self.ctx.device.type != "cuda":
            raise ModalignError("train.precision='bf16' needs a CUDA device; use 'fp32' on CPU")
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
        self.resume = resume
        if resume:
            check_resume(self.run_dir, config)
        self.store = resolve_store(config, self.ctx)
        self.data = PairedFeatures(self.store, config.data.keys, config.data.train_split)
        if len(self.data) < 2:
            raise ModalignError(
                f"data.train_split={config.data.train_split!r} holds {len(self.data)} group(s) "
                f"with every key of {config.data.keys}; contrastive training needs at least 2 "
                "(each batch needs negatives)")
        self.batch_size = config.train.batch_size
        self.local_batch = self.batch_size // self.ctx.world_size
        if self.batch_size % self.ctx.world_size:
            raise ModalignError(f"train.batch_size={self.batch_size} must be divisible by the "
                             f"{self.ctx.world_size} processes")
        if self.local_batch % config.train.accumulate:
            raise ModalignError(f"the per-process batch {self.local_batch} must be divisible by "
                             f"train.accumulate={config.train.accumulate}")
        self.steps_per_epoch = self.data.num_batches(self.batch_size)
        _print_batch_warning(len(self.data.groups), self.batch_size, self.ctx.is_main)
        total = self.steps_per_epoch * config.train.epochs
        self.total_steps = min(total, config.train.max_steps) if config.train.max_steps else total

        torch.manual_seed(config.train.seed)
        specs = tower_specs(config, self.store)
        for m, t in (towers or {}).items():
            specs.setdefault(m, getattr(t, "name", m))
        dims = {m: self._feature_dim(m) for m in config.modalities()}
        self.model = MultiTowerModel(config.model_config(specs, dims))
        self.model.log_logit_scale.requires_grad_(False)  # the objectives learn their own scale
        if self.model.logit_bias is not None:
            self.model.logit_bias.requires_grad_(False)
        if self.model.config.center_features:
            for m in config.modalities():
                feats = torch.cat([t.features for k, t in self.data.tables.items()
                                   if base_modality(k) == m])
                if self.model.config.input_norm == "l2":
                    feats = F.normalize(feats, dim=-1)
                self.model.set_feature_center(m, feats.mean(0))
        self.raw_keys: list[str] = []
        tower_params: list[nn.Parameter] = []
        for m, k in config.train.unfreeze.items():
            if k <= 0:
                continue
            tower = (towers or {}).get(m) or _load_tower(specs[m], m)
            if not hasattr(tower, "trainable_tail"):
                raise ModalignError(f"train.unfreeze[{m!r}]: tower {specs[m]!r} cannot be partly "
                                 "unfrozen (it has no trainable_tail(k))")
            tower.freeze()
            tower_params += tower.trainable_tail(k)
            self.model.attach_tower(m, tower)
            self.raw_keys += [key for key in config.data.keys if base_modality(key) == m]
        tower_params += self._attach_lora_towers(towers or {}, specs)
        self.raw = _RawInputs(config.data.dataset) if self.raw_keys else None
        for m, t in (towers or {}).items():
            if m not in self.model.towers:
                self.model.attach_tower(m, t)

        self.objective: Objective = build_objective(
            [_with_dataset_size(spec, len(self.data)) for spec in config.objectives]
        ).to(self.ctx.device)
        self.momentum = (MomentumDistillation(self.model, config.data.keys, config.model.joint_dim,
                                              config.momentum).to(self.ctx.device)
                         if config.momentum.enabled else None)
        self.distill = self._distillation(dims)
        self.negatives = self._hard_negatives(specs, towers or {})
        self.harmonize = (GradientHarmonization(config.objectives, self.objective.labels,
                                                config.harmonize)
                          if config.harmonize.enabled else None)
        self.module = D.wrap(self.model, self.ctx)
        self.optimizer = self._optimizer(tower_params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.val = self._validation_tables()
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if config.train.precision == "bf16" else nullcontext())
        # loop state (restored on resume)
        self.step = 0
        self.epoch = 0
        self.index = 0
        self.best: float | None = None
        self.best_epoch = -1
        self.bad_epochs = 0
        self.epoch_loss_sum = 0.0
        self.epoch_samples = 0
        self.epoch_seconds = 0.0
        self.train_seconds = 0.0
        self.stopped_early = False

    # -- construction helpers ----------------------------------------------------------------
    def _attach_lora_towers(self, towers: Mapping[str, Any], specs: Mapping[str, str]
                            ) -> list[nn.Parameter]:
        """``[lora]``: wrap each listed tower with peft LoRA adapters and attach it to the model
        (its items are encoded on the fly); returns the adapter parameters."""
        from modalign.encoders.lora import apply_lora

        params: list[nn.Parameter] = []
        for m, settings in self.config.lora_settings().items():
            tower = towers.get(m) or _load_tower(specs[m], m)
            params += apply_lora(tower, settings)
            self.model.attach_tower(m, tower)
            self.raw_keys += [key for key in self.config.data.keys if base_modality(key) == m]
        return params

    def _feature_dim(self, modality: str) -> int:
        dims = {self.data.feature_dim(k) for k in self.config.data.keys
                if base_modality(k) == modality}
        if len(dims) != 1:
            raise ModalignError(f"keys of modality {modality!r} have different feature dims {dims}")
        return dims.pop()

    def _distillation(self, dims: Mapping[str, int]) -> ContrastiveDistillation | None:
        cfg = self.config
        if not cfg.distill.enabled:
            return None
        if self.raw_keys:
            raise ModalignError("distill.teacher cannot be combined with train.unfreeze: the "
                                "teacher reads cached tower features")
        teacher = load_teacher(cfg.distill.teacher, dims)
        return ContrastiveDistillation(teacher, cfg.data.keys, cfg.distill).to(self.ctx.device)

    def _hard_negatives(self, specs: Mapping[str, str],
                        towers: Mapping[str, Any]) -> HardNegatives | None:
        cfg = self.config.negatives
        if not cfg.enabled:
            return None
        m = base_modality(cfg.text_key)
        tower = towers.get(m) or _load_tower(specs[m], m)

        @torch.no_grad()
        def encode(texts: list[str]) -> torch.Tensor:
            return torch.cat([tower.encode(tower.preprocess(texts[i:i + 256])).float().cpu()
                              for i in range(0, len(texts), 256)])

        given = None
        if cfg.file:
            given = read_json(cfg.file)
            if not isinstance(given, dict) or not all(
                    isinstance(v, list) and all(isinstance(t, str) for t in v)
                    for v in given.values()):
                raise ModalignError(f"negatives.file={cfg.file!r} must hold a JSON object "
                                    "{caption: [negative caption, ...]}")
        items = self.data.tables[cfg.text_key].items
        return HardNegatives(items, encode, cfg, given).to(self.ctx.device)

    def _optimizer(self, tower_params: list[nn.Parameter]) -> torch.optim.Optimizer:
        o = self.config.optim
        tower_ids = {id(p) for p in tower_params}
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad or id(p) in tower_ids:
                continue
            (decay if p.ndim >= 2 and not name.endswith("center") else no_decay).append(p)
        obj_params = [p for p in self.objective.parameters() if p.requires_grad]
        obj_params += self._recipe_params()
        groups = [{"params": decay, "lr": o.lr, "weight_decay": o.weight_decay},
                  {"params": no_decay + obj_params, "lr": o.lr, "weight_decay": 0.0}]
        if tower_params:
            groups.append({"params": [p for p in tower_params if p.ndim >= 2], "lr": o.tower_lr,
                           "weight_decay": o.weight_decay})
            groups.append({"params": [p for p in tower_params if p.ndim < 2], "lr": o.tower_lr,
                           "weight_decay": 0.0})
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, betas=tuple(o.betas), eps=o.eps)  # type: ignore[arg-type]

    def _lr_factor(self, step: int) -> float:
        o = self.config.optim
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * progress))

    def _validation_tables(self) -> dict[str, KeyTable] | None:
        pair = self.config.validation_pair()
        if pair is None:
            return None
        split = self.config.data.val_split
        if split == DataConfig.val_split and not _has_split(self.store, pair, split):
            # The default split is missing (a user's manifest with only train/test): train
            # without validation and say so; a split the user named must exist.
            warnings.warn(f"the data has no {split!r} split, so this run trains without "
                          "validation; set data.val_split to validate on another split "
                          "(e.g. --set data.val_split=test)", stacklevel=2)
            return None
        return {k: KeyTable.from_embeddings(k, load_key(self.store, k, split)) for k in pair}

    # -- one step ----------------------------------------------------------------------------
    def _batch(self, epoch: int, index: int) -> tuple[dict[str, torch.Tensor], dict[str, list],
                                                      torch.Tensor]:
        """This rank's features (cached keys), raw inputs (unfrozen keys) and sample indices.

        A sample's index is its group's position among the training groups (stable across
        epochs; what per-sample objectives such as iSogCLR key their state on)."""
        seed = self.config.train.seed
        groups = self.data.batch_groups(seed=seed, epoch=epoch, index=index,
                                        batch_size=self.batch_size)
        rows = self.data.draw_rows(groups, seed=seed, epoch=epoch, index=index,
                                   sample=self.config.augment.sample_items)
        rows = {k: shard(r, self.ctx.rank, self.ctx.world_size) for k, r in rows.items()}
        self._rows = rows  # this rank's table rows per key (hard negatives look theirs up)
        indices = torch.from_numpy(np.searchsorted(self.data.groups,
                                                   shard(groups, self.ctx.rank,
                                                         self.ctx.world_size)))
        cached = {k: r for k, r in rows.items() if k not in self.raw_keys}
        feats = {k: v.to(self.ctx.device) for k, v in self.data.features(cached).items()}
        raw: dict[str, list] = {}
        for k in self.raw_keys:
            assert self.raw is not None
            table = self.data.tables[k]
            inputs = self.raw.inputs([table.items[i] for i in rows[k]])
            if base_modality(k) == "image":
                rng = np.random.default_rng([seed, epoch, index, self.ctx.rank, 0x1A6E])
                from modalign.encoders.images import to_rgb

                inputs = [augment_image(to_rgb(x), rng, crop_scale=self.config.augment.crop_scale,
                                        color_jitter=self.config.augment.color_jitter)
                          for x in inputs]
            raw[k] = inputs
        return feats, raw, indices

    def _embed(self, module: nn.Module, feats: Mapping[str, torch.Tensor],
               raw: Mapping[str, list], sl: slice) -> dict[str, torch.Tensor]:
        towers = self.model.towers
        batches = {k: _to_device(towers[base_modality(k)].preprocess(v[sl]), self.ctx.device)
                   for k, v in raw.items()}
        with self.autocast:
            out = module({k: v[sl] for k, v in feats.items()}, batches)
        return {k: v.float() for k, v in out.items()}

    def _noisy(self, emb: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """CLOSE-style noise on the configured keys: ``normalize(z + sigma * eps)``."""
        noise = self.config.augment.embedding_noise
        if not noise:
            return emb
        g = torch.Generator(device="cpu").manual_seed(
            int(self.config.train.seed) * 1_000_003 + step * 7919 + self.ctx.rank)
        out = dict(emb)
        for k in sorted(noise):
            if k in out and noise[k] > 0:
                eps = torch.randn(out[k].shape, generator=g).to(out[k])
                out[k] = F.normalize(out[k] + noise[k] * eps, dim=-1)
        return out

    def _loss(self, emb: dict[str, torch.Tensor], indices: torch.Tensor) -> LossOutput:
        # Every group appears once per batch, so positives match by row (groups=None).
        with self.autocast:
            out = self.objective(self._noisy(emb, self.step),
                                 indices=indices.to(self.ctx.device))
        loss, parts = out.loss, dict(out.parts)
        if self.momentum is not None:
            alpha = alpha_at(self.config.momentum, self.step, self.steps_per_epoch)
            mom = self.momentum.loss(emb, alpha)
            loss, parts["momentum"] = loss + self.config.momentum.weight * mom, mom.detach()
        if self.distill is not None:
            dcd = self.distill.loss(emb)
            loss, parts["distill"] = loss + self.config.distill.weight * dcd, dcd.detach()
        if self.negatives is not None:
            neg = self._negatives_loss(emb)
            loss, parts["negatives"] = loss + self.config.negatives.weight * neg, neg.detach()
        return out if loss is out.loss else LossOutput(loss, parts)

    def _negatives_loss(self, emb: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Image-grounded contrast of every other key against the text key's hard negatives."""
        assert self.negatives is not None
        t = self.config.negatives.text_key
        rows = torch.from_numpy(np.asarray(self._rows[t])).to(self.ctx.device)
        terms = [self.negatives.loss(emb[a], emb[t], rows, lambda f: self.model.project(t, f))
                 for a in emb if a != t]
        return torch.stack(terms).mean()

    def compute_gradients(self, epoch: int, index: int) -> LossOutput:
        """Fill ``.grad`` of every trained parameter for global batch ``index`` of ``epoch``."""
        feats, raw, indices = self._batch(epoch, index)
        self.module.train()
        for tower in self.model.towers.values():
            tower.eval()  # unfrozen stages train their weights; BatchNorm statistics stay fixed
            adapter_dropout_on(tower)  # LoRA's own dropout (when configured) still applies
        self.optimizer.zero_grad(set_to_none=True)
        if self.momentum is not None:
            self.momentum.begin_step(self.model,
                                     lambda m: self._embed(m, feats, raw, slice(None)))
        if self.distill is not None:
            self.distill.begin_step(feats)
        k = self.config.train.accumulate
        if self.harmonize is not None:
            out = self._harmonized_backward(feats, raw, indices)
        elif k == 1:
            out = self._loss(self._embed(self.module, feats, raw, slice(None)), indices)
            out.loss.backward()
        else:
            out = self._gradcache_backward(feats, raw, indices, k)
        if self.momentum is not None:
            self.momentum.enqueue()
        D.average_gradients(self._replicated_params(), self.ctx)
        return out

    def _harmonized_backward(self, feats: Mapping[str, torch.Tensor], raw: Mapping[str, list],
                             indices: torch.Tensor) -> LossOutput:
        """Backward with the pairwise terms' embedding gradients harmonized (``[harmonize]``)."""
        assert self.harmonize is not None
        emb = self._embed(self.module, feats, raw, slice(None))
        keys = list(emb)
        leaves = {k: v.detach().requires_grad_() for k, v in emb.items()}
        out = self._loss(leaves, indices)
        weights = dict(zip(self.objective.labels, self.objective.weights, strict=True))
        pair = {lab: weights[lab] * out.parts[lab] for lab in self.harmonize.pairwise}
        rest = out.loss - torch.stack(list(pair.values())).sum()

        def grad_of(loss: torch.Tensor) -> dict[str, torch.Tensor]:
            gs = torch.autograd.grad(loss, [leaves[k] for k in keys], retain_graph=True,
                                     allow_unused=True)
            return {k: g if g is not None else torch.zeros_like(leaves[k])
                    for k, g in zip(keys, gs, strict=True)}

        adjusted = self.harmonize.apply({lab: grad_of(v) for lab, v in pair.items()}, self.step)
        total = grad_of(rest)
        for grads in adjusted.values():
            for k in keys:
                total[k] = total[k] + grads[k]
        params = [p for p in self._replicated_params() if p.requires_grad]
        if params:  # temperatures: the plain gradient of the whole loss
            out.loss.backward(inputs=params)
        torch.autograd.backward([emb[k] for k in keys], [total[k] for k in keys])
        return out

    def _replicated_params(self) -> list[nn.Parameter]:
        """Trained parameters outside the DDP module (averaged over ranks by hand)."""
        return list(self.objective.parameters()) + self._recipe_params()

    def _recipe_params(self) -> list[nn.Parameter]:
        return [p for r in self._recipes() for p in r.trainable()]

    def _recipes(self) -> list[Any]:
        return [r for r in (self.momentum, self.distill, self.negatives, self.harmonize)
                if r is not None]

    def train_step(self, epoch: int, index: int) -> dict[str, float]:
        """One optimizer step on global batch ``index`` of ``epoch``; returns logged values."""
        out = self.compute_gradients(epoch, index)
        if self.config.optim.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.objective.clamp_()
        for recipe in self._recipes():
            recipe.clamp_()
        self.step += 1
        logged = out.detached()
        if self.ctx.world_size > 1:
            logged["loss"] = D.mean_over_ranks(logged["loss"], self.ctx)
        return logged

    def _gradcache_backward(self, feats: Mapping[str, torch.Tensor], raw: Mapping[str, list],
                            indices: torch.Tensor, k: int) -> LossOutput:
        """Loss on the whole local batch, gradients pushed back one micro-batch at a time."""
        n = self.local_batch
        size = n // k
        slices = [slice(i * size, (i + 1) * size) for i in range(k)]
        inner = self.module.module if isinstance(self.module, D.DistributedDataParallel) \
            else self.module
        with torch.no_grad():
            parts = [self._embed(inner, feats, raw, sl) for sl in slices]
        cached = {key: torch.cat([p[key] for p in parts]).requires_grad_() for key in parts[0]}
        out = self._loss(cached, indices)
        out.loss.backward()
        for i, sl in enumerate(slices):
            sync = nullcontext() if (i == k - 1 or not hasattr(self.module, "no_sync")) \
                else self.module.no_sync()
            with sync:
                emb = self._embed(self.module, feats, raw, sl)
                terms = [(emb[key] * cached[key].grad[sl]).sum() for key in emb
                         if cached[key].grad is not None]
                if terms:
                    torch.stack(terms).sum().backward()
        return out

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Retrieval R@1/R@5 both ways and the centroid gap between the validation keys."""
        return {} if self.val is None else self.evaluate(self.val)

    def split_tables(self, split: str) -> dict[str, KeyTable]:
        """The two validation keys' rows of ``split`` (to evaluate another split the same way)."""
        pair = self.config.validation_pair() or list(self.config.data.keys[:2])
        if len(pair) != 2:
            raise ModalignError(f"evaluation needs two keys, got {pair}")
        return {k: KeyTable.from_embeddings(k, load_key(self.store, k, split)) for k in pair}

    @torch.no_grad()
    def evaluate(self, tables: Mapping[str, KeyTable]) -> dict[str, float]:
        """R@1/R@5 both ways (positives: same group) and the centroid gap of two keys' rows.

        Keys follow :mod:`modalign.evaluate.vocabulary`: ``image-to-text_recall@1`` is the first
        key retrieving the second, ``text-to-image_recall@1`` the reverse; also
        ``mean_recall@1`` and ``gap``.
        """
        from modalign.evaluate.metrics import retrieval_metrics
        from modalign.geometry.gap import modality_gap

        (ka, ta), (kb, tb) = tables.items()
        za, zb = self._embed_table(ka, ta), self._embed_table(kb, tb)
        ga, gb = torch.from_numpy(ta.group_ids), torch.from_numpy(tb.group_ids)
        a2b = retrieval_metrics(za, zb, ga, gb, k_values=(1, 5)).metrics
        b2a = retrieval_metrics(zb, za, gb, ga, k_values=(1, 5)).metrics
        gap = modality_gap(za.numpy(), zb.numpy(), normalize=False).centroid_distance
        out = {metric_key(q, g, f"recall@{k}"): m[f"recall@{k}"]
               for q, g, m in ((ka, kb, a2b), (kb, ka, b2a)) for k in (1, 5)}
        return {**out, "mean_recall@1": 0.5 * (a2b["recall@1"] + b2a["recall@1"]),
                "gap": float(gap)}

    def _embed_table(self, key: str, table: KeyTable, batch_size: int = 1024) -> torch.Tensor:
        self.model.eval()
        try:
            if key not in self.raw_keys:
                return torch.from_numpy(self.model.project_array(key, table.features, batch_size))
            assert self.raw is not None
            inputs = self.raw.inputs(table.items)
            return self.model.encode(key, inputs, batch_size=64).float().cpu()
        finally:
            self.model.train()

    # -- checkpoints ---------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                "epoch": self.epoch, "index": self.index,
                "best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "stopped_early": self.stopped_early,
                "epoch_loss_sum": self.epoch_loss_sum, "epoch_samples": self.epoch_samples,
                "epoch_seconds": self.epoch_seconds, "train_seconds": self.train_seconds,
                "world_size": self.ctx.world_size}

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.run_dir / CHECKPOINTS, self.step,
                            self._checkpoint_modules(),
                            self._trainer_state(), keep=self.config.train.keep_checkpoints)
        D.barrier(self.ctx)

    def _checkpoint_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"model": self.model, "objective": self.objective}
        if self.momentum is not None:
            modules["momentum"] = self.momentum  # EMA weights, queues, pointer, scale
        if self.distill is not None:
            modules["distill"] = self.distill  # the student's logit scale (not the teacher)
        if self.negatives is not None:
            modules["negatives"] = self.negatives  # its logit scale (features are recomputed)
        if self.harmonize is not None:
            modules["harmonize"] = self.harmonize  # how often it fired so far
        return modules

    def _restore(self) -> bool:
        root = self.run_dir / CHECKPOINTS
        if not (root / "latest.json").is_file():
            return False
        ckpt = load_checkpoint(root)
        self.model.load_state_dict(ckpt.weights["model"])
        self.objective.load_state_dict(ckpt.weights["objective"])
        if self.momentum is not None:
            self.momentum.load_state_dict(ckpt.weights["momentum"])
        if self.distill is not None:
            self.distill.load_state_dict(ckpt.weights["distill"])
        if self.negatives is not None:
            self.negatives.load_state_dict(ckpt.weights["negatives"])
        if self.harmonize is not None:
            self.harmonize.load_state_dict(ckpt.weights["harmonize"])
        t = ckpt.trainer
        self.optimizer.load_state_dict(t["optimizer"])
        self.scheduler.load_state_dict(t["scheduler"])
        set_rng_state(t["rng"])
        self.step = ckpt.step
        self.epoch, self.index = int(t["epoch"]), int(t["index"])
        self.best = t["best"]
        self.best_epoch, self.bad_epochs = int(t["best_epoch"]), int(t["bad_epochs"])
        self.stopped_early = bool(t["stopped_early"])
        self.epoch_loss_sum = float(t["epoch_loss_sum"])
        self.epoch_samples = int(t["epoch_samples"])
        self.epoch_seconds = float(t["epoch_seconds"])
        self.train_seconds = float(t["train_seconds"])
        log = self.run_dir / LOG_NAME
        if self.ctx.is_main and log.is_file():  # drop rows logged after the checkpoint
            write_jsonl_atomic(log, [r for r in read_jsonl(log) if r.get("step", 0) <= self.step])
        return True

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to the end (or early stop) and write the run folder; returns its summary."""
        cfg = self.config
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        D.barrier(self.ctx)
        resumed = self._restore() if self.resume else False
        if resumed and self.ctx.is_main:  # record the settings this run continues with
            old = read_json(self.run_dir / CONFIG_NAME) if (
                self.run_dir / CONFIG_NAME).is_file() else {}
            changes = config_changes(old.get("config", cfg.to_dict()), cfg.to_dict())
            history = [*old.get("resumed", []), {"step": self.step, "changed": {
                k: {"old": a, "new": b} for k, (a, b) in changes.items()}}]
            write_json_atomic(self.run_dir / CONFIG_NAME, {
                **old, "config": cfg.to_dict(), "total_steps": self.total_steps,
                "resumed": history})
        if not resumed and self.ctx.is_main:
            if (self.run_dir / CHECKPOINTS / "latest.json").exists():
                raise ModalignError(f"run folder {self.run_dir} already holds checkpoints; pass "
                                 "--resume to continue it or choose another run.dir")
            (self.run_dir / LOG_NAME).unlink(missing_ok=True)
            write_json_atomic(self.run_dir / CONFIG_NAME, {
                "config": cfg.to_dict(), "model": self.model.config.to_dict(),
                "world_size": self.ctx.world_size, "modalign_version": __version__,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps})
        metric, sign = cfg.validation_metric()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="training",
                   disable=not (cfg.train.progress and self.ctx.is_main
                                        and sys.stderr.isatty()), file=sys.stderr)
        done = self.step >= self.total_steps or self.stopped_early
        while not done and self.epoch < cfg.train.epochs:
            while self.index < self.steps_per_epoch and self.step < self.total_steps:
                t0 = time.perf_counter()
                logged = self.train_step(self.epoch, self.index)
                if not math.isfinite(logged["loss"]):
                    bar.close()
                    raise self._non_finite(logged)
                dt = time.perf_counter() - t0
                self.index += 1
                self.epoch_loss_sum += logged["loss"] * self.batch_size
                self.epoch_samples += self.batch_size
                self.epoch_seconds += dt
                self.train_seconds += dt
                bar.update(1)
                rate = self.epoch_samples / max(self.epoch_seconds, 1e-9)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", samples_s=f"{rate:.0f}")
                every = cfg.train.checkpoint_every
                if every and self.step % every == 0 and self.index < self.steps_per_epoch:
                    self.save_checkpoint()
            finished_epoch = self.index >= self.steps_per_epoch
            row = self._end_of_epoch(metric, sign, finished_epoch)
            if finished_epoch:
                self.epoch += 1
                self.index = 0
                self.epoch_loss_sum, self.epoch_samples, self.epoch_seconds = 0.0, 0, 0.0
            self.save_checkpoint()
            if row is not None and self.ctx.is_main:
                bar.write(_format_row(row))
            if self.stopped_early or self.step >= self.total_steps:
                done = True
        bar.close()
        return self._finish()

    def _non_finite(self, logged: Mapping[str, float]) -> ModalignError:
        parts = ", ".join(f"{k}={v:.4g}" for k, v in logged.items() if k != "loss")
        try:
            last = latest_checkpoint(self.run_dir / CHECKPOINTS)
        except FileNotFoundError:
            last = None
        kept = (f"the last checkpoint ({last.name}) is kept; " if last is not None else "")
        return ModalignError(
            f"training stopped: the loss is {logged['loss']} at step {self.step} (epoch "
            f"{self.epoch + 1}; {parts or 'no parts'}); nothing of this step was saved; {kept}"
            "lower optim.lr, raise train.batch_size (some losses need 2+ rows per batch) or "
            "check the embeddings for NaN rows (modalign data check STORE)")

    def _end_of_epoch(self, metric: str, sign: float, complete: bool) -> dict[str, Any] | None:
        if self.epoch_samples == 0:
            return None
        val = self.validate()
        row: dict[str, Any] = {
            "epoch": self.epoch + (1 if complete else self.index / self.steps_per_epoch),
            "step": self.step, "train_loss": self.epoch_loss_sum / self.epoch_samples,
            "samples_per_s": self.epoch_samples / max(self.epoch_seconds, 1e-9),
            "train_seconds": self.train_seconds,
            "lr": self.scheduler.get_last_lr()[0], "logit_scales": self.logit_scales(), **val}
        if self.harmonize is not None:
            row["harmonize"] = self.harmonize.rates()
        if val:
            value = sign * val[metric]
            if self.best is None or value > self.best:
                self.best, self.best_epoch, self.bad_epochs = value, self.epoch, 0
                row["best"] = True
                self._save_model()
            else:
                self.bad_epochs += 1
                patience = self.config.validate.patience
                if patience and self.bad_epochs >= patience:
                    self.stopped_early = True
                    row["early_stop"] = True
        if self.ctx.is_main:
            append_jsonl(self.run_dir / LOG_NAME, row)
        return row

    def logit_scales(self) -> dict[str, float]:
        """Every objective temperature as a logit scale (``exp`` of its log parameter)."""
        out = {}
        for name, t in self.objective.state_dict().items():
            if not name.endswith("log_logit_scale"):
                continue
            _, index, rest = name.split(".", 2)  # "terms.<i>.<path>.log_logit_scale"
            path = rest.removesuffix("log_logit_scale").rstrip(".")
            label = self.objective.labels[int(index)] + (f"/{path}" if path else "")
            out[label] = float(t.detach().exp())
        return out

    def _save_model(self) -> None:
        if not self.ctx.is_main:
            return
        scales = list(self.logit_scales().values())
        if scales:
            with torch.no_grad():
                self.model.log_logit_scale.fill_(math.log(scales[0]))
        self.model.save_pretrained(self.run_dir / MODEL_DIR, extra={
            "epoch": self.epoch, "step": self.step, "objectives": self.config.objectives,
            "embeddings": self.config.data.embeddings, "keys": self.config.data.keys})
        save_adapters(self.model.towers, self.run_dir / MODEL_DIR / "adapters")

    def _finish(self) -> TrainResult:
        if self.val is None:
            self._save_model()  # no validation: the last weights are the model
        rows = read_jsonl(self.run_dir / LOG_NAME) if (self.run_dir / LOG_NAME).is_file() else []
        pair = self.config.validation_pair()
        rows = [upgrade_training_row(r, pair) for r in rows]  # a resumed older run's rows
        best_rows = [r for r in rows if r.get("best")]
        best_row = best_rows[-1] if best_rows else None
        summary = {"run": str(self.run_dir), "model": str(self.run_dir / MODEL_DIR),
                   "steps": self.step, "epochs": self.epoch, "stopped_early": self.stopped_early,
                   "metric": self.config.validation_metric(warn=False)[0],
                   "best": {k: v for k, v in best_row.items()
                            if k in ("epoch", "step", "gap") or parse_metric_key(k)}
                   if best_row else None,
                   "final_train_loss": rows[-1]["train_loss"] if rows else None,
                   "samples_per_s": rows[-1]["samples_per_s"] if rows else None}
        if self.ctx.is_main:
            write_json_atomic(self.run_dir / SUMMARY_NAME, summary, indent=None)
        D.barrier(self.ctx)
        return TrainResult(self.run_dir, self.run_dir / MODEL_DIR, summary)


def _format_row(row: Mapping[str, Any]) -> str:
    parts = [f"epoch {row['epoch']:g}", f"step {row['step']}", f"loss {row['train_loss']:.4f}"]
    for k, v in row.items():
        if parse_metric_key(k):
            parts.append(f"{describe_metric(k)} {v:.3f}")
    if "gap" in row:
        parts.append(f"gap {row['gap']:.3f}")
    parts.append(f"{row['samples_per_s']:.0f} samples/s")
    if row.get("best"):
        parts.append("*best*")
    return " | ".join(parts)


def _with_dataset_size(spec: Mapping[str, Any], n: int) -> dict[str, Any]:
    """Per-sample objectives (iSogCLR) get ``dataset_size`` = the number of training groups."""
    spec = dict(spec)
    if spec.get("loss") == "isogclr":
        spec.setdefault("dataset_size", n)
    return spec


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _load_tower(spec: str, modality: str) -> Any:
    from modalign.encoders import load_encoder

    return load_encoder(spec, modality=modality)


def train(config: TrainConfig, *, towers: Mapping[str, Any] | None = None,
          run_dir: str | Path | None = None, resume: bool = False) -> TrainResult:
    """Train a model as ``config`` says; the Python twin of ``modalign train``.

    Writes ``<run>/config.resolved.json``, ``log.jsonl`` (one row per epoch), ``checkpoints/``,
    ``model/`` (the best epoch, a :class:`~modalign.model.MultiTowerModel` folder) and
    ``summary.json``.

    Examples:
        >>> from modalign.train.config import load_config
        >>> cfg = load_config("clip", ["run.dir=runs/clip"])
        >>> train(cfg).summary["best"]["image-to-text_recall@1"]  # doctest: +SKIP
        0.27
    """
    trainer = Trainer(config, towers=towers, run_dir=run_dir, resume=resume)
    try:
        return trainer.run()
    finally:
        D.teardown()


def _print_batch_warning(groups: int, batch_size: int, main: bool) -> None:
    from modalign.data.caveats import batch_warning

    line = batch_warning(groups, batch_size)
    if line and main:
        warnings.warn(line, SmallDataWarning, stacklevel=2)


def _has_split(store: EmbeddingStore, keys: list[str], split: str) -> bool:
    """Whether every modality of ``keys`` has rows in ``split`` of ``store``."""
    for key in keys:
        modality, _, view = key.partition(":")
        if modality in store.arrays and len(store.load(modality, view=view or None,
                                                       split=split)) == 0:
            return False
    return True
