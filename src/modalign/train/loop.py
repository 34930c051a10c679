"""The training loop: heads (and optionally tower tails) trained with any objective, resumable.

One step: draw the global batch of groups, take this process's shard, compute joint embeddings
(projected cached features; raw inputs through unfrozen towers), apply the objective and the
enabled recipes (``[momentum]``, ``[distill]``, ``[negatives]``, ``[harmonize]``), step AdamW,
clamp the temperatures. ``train.accumulate = k > 1`` runs the step GradCache-style
(:mod:`modalign.train.gradcache`) so the contrastive batch stays global.

Host-side checks (the losses' input checks, a finite loss) run on the first step of a run, every
:data:`CHECK_EVERY` steps, before each checkpoint and at the end of each epoch, not on every step:
each one waits for the accelerator. A non-finite loss stops the run naming its first step.

After every epoch the validation split is evaluated (:mod:`modalign.train.validate`) and the row
is appended to ``log.jsonl``; the best epoch by ``validate.metric`` is saved as the run's model
folder; ``validate.patience`` stops early. What the run trains is built by
:mod:`modalign.train.build`.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from modalign import __version__
from modalign.bridge.posthoc import close_noise
from modalign.distributed import runtime as D
from modalign.embed.store import EmbeddingStore
from modalign.encoders.lora import adapter_dropout_on, save_adapters
from modalign.errors import ModalignError, SmallDataWarning
from modalign.io import (
    append_jsonl,
    check_format_version,
    read_json,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)
from modalign.losses.objective import Objective
from modalign.losses.output import LossOutput
from modalign.losses.validation import validation, validation_enabled
from modalign.paths import home
from modalign.train import build
from modalign.train import validate as V
from modalign.train.build import resolve_store, tower_specs
from modalign.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from modalign.train.config import RESUMABLE_KEYS, TrainConfig, config_changes, upgrade_config
from modalign.train.data import KeyTable, PairedFeatures, RawInputs, draw_batch, to_device
from modalign.train.gradcache import gradcache_backward
from modalign.train.recipes.harmonize import GradientHarmonization
from modalign.train.recipes.momentum import MomentumDistillation, alpha_at
from modalign.train.validate import format_row as _format_row
from modalign.vocabulary import parse_metric_key, upgrade_training_row

__all__ = ["CHECK_EVERY", "TrainResult", "Trainer", "check_resume", "default_run_dir",
           "resolve_store", "tower_specs", "train"]

LOG_NAME = "log.jsonl"
SUMMARY_NAME = "summary.json"
CONFIG_NAME = "config.resolved.json"
CONFIG_FORMAT_VERSION = 1  # of config.resolved.json; absent: written before versions (same layout)
MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"
CHECK_EVERY = 50
"""Steps between the host-side checks of a run (besides its first step, checkpoints, epoch ends)."""


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
    saved = read_json(path)
    check_format_version(saved, CONFIG_FORMAT_VERSION, str(path))
    old = {**TrainConfig().to_dict(), **upgrade_config(saved.get("config", {}))}
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
        towers = towers or {}
        self.ctx = D.setup(config.train.device, argument="train.device")
        if config.train.num_threads > 0:
            torch.set_num_threads(config.train.num_threads)
        if config.train.precision == "bf16" and self.ctx.device.type != "cuda":
            raise ModalignError("train.precision='bf16' needs a CUDA device; use 'fp32' on CPU")
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
        self.resume = resume
        if resume:
            check_resume(self.run_dir, config)
        self.store: EmbeddingStore = resolve_store(config, self.ctx)
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

        # The order below fixes the run's random draws: keep it.
        torch.manual_seed(config.train.seed)
        specs = tower_specs(config, self.store)
        for m, t in towers.items():
            if m not in config.model.towers:  # the tower used is the one recorded
                specs[m] = str(getattr(t, "name", m))
        dims = build.feature_dims(config, self.data)
        self.model = build.build_model(config, self.data, specs, dims)
        self.raw_keys, tower_params = build.attach_towers(self.model, config, specs, towers)
        self.raw = RawInputs(config.data.dataset) if self.raw_keys else None
        # a tower that augments its own inputs (cached pixels) gets them unaugmented
        self.augment_keys = [k for k in self.raw_keys
                             if not getattr(self.model.tower(k), "augments_inputs", False)]
        build.attach_inference_towers(self.model, towers)
        device = self.ctx.device
        self.objective: Objective = build.training_objective(config, len(self.data)).to(device)
        local = [label for label, m in zip(self.objective.labels, self.objective.terms,
                                           strict=True) if not getattr(m, "distributed", False)]
        if self.ctx.world_size > 1 and local and self.ctx.is_main:
            warnings.warn(f"objective terms {local} declare no cross-process computation: each "
                          f"of the {self.ctx.world_size} processes scores its own rows only, "
                          "which is not the single-process loss on the global batch",
                          stacklevel=2)
        # the heads' outputs are unit rows: the pair losses need not normalise them again
        build.skip_second_normalisation(self.objective)
        # recipes: hooks around the objective (see _loss and compute_gradients)
        self.momentum = (MomentumDistillation(self.model, config.data.keys, config.model.joint_dim,
                                              config.momentum).to(device)
                         if config.momentum.enabled else None)
        distill = build.build_distillation(config, dims, self.raw_keys)
        self.distill = distill.to(device) if distill is not None else None
        negatives = build.build_negatives(config, self.data, specs, towers, self.model)
        self.negatives = negatives.to(device) if negatives is not None else None
        self.harmonize = (GradientHarmonization(config.objectives, self.objective.labels,
                                                config.harmonize)
                          if config.harmonize.enabled else None)
        self.module = D.wrap(self.model, self.ctx)
        # The objective owns the temperatures: its own DDP wrapper averages their gradients over
        # ranks, and the model holds the first one itself (given after wrapping the model, so
        # the model's wrapper leaves that parameter to the objective's).
        # (A pair that pairwise's skip_missing leaves out gets no gradient in a step, which DDP
        # does not allow: such an objective's temperatures are averaged by hand.)
        trained = any(p.requires_grad for p in self.objective.parameters())
        skips = any(getattr(m, "skip_missing", False) for m in self.objective.modules())
        self.loss_module = (D.wrap(self.objective, self.ctx) if trained and not skips
                            else self.objective)
        scales = self.objective.log_scales()
        if scales:
            self.model.use_scale(next(iter(scales.values())))
        self.optimizer = build.build_optimizer(self.model, self.objective, self._recipe_params(),
                                               tower_params, config.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.val = V.validation_tables(config, self.store)
        self.autocast = D.autocast(self.ctx.device, torch.bfloat16
                                   if config.train.precision == "bf16" else None)
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
        # steps run since the last host-side check: (step, epoch, detached loss)
        self._unchecked: list[tuple[int, int, LossOutput]] = []
        self._checked_step = 0
        self._first_step = 0  # the first step of this run (checked like a check step)

    def _lr_factor(self, step: int) -> float:
        return build.lr_factor(step, self.config.optim, self.total_steps)

    # -- one step ----------------------------------------------------------------------------
    def _batch(self, epoch: int, index: int) -> tuple[dict[str, torch.Tensor], dict[str, list],
                                                      torch.Tensor]:
        """This rank's features (cached keys), raw inputs (unfrozen keys) and sample indices."""
        cfg = self.config
        batch = draw_batch(self.data, seed=cfg.train.seed, epoch=epoch, index=index,
                           batch_size=self.batch_size, rank=self.ctx.rank,
                           world_size=self.ctx.world_size, sample=cfg.augment.sample_items,
                           raw=self.raw, raw_keys=self.raw_keys,
                           crop_scale=cfg.augment.crop_scale,
                           color_jitter=cfg.augment.color_jitter, device=self.ctx.device,
                           augment_keys=self.augment_keys)
        self._rows = batch.rows  # this rank's table rows per key (hard negatives look theirs up)
        return batch.features, batch.raw, batch.indices

    def _embed(self, module: nn.Module, feats: Mapping[str, torch.Tensor],
               raw: Mapping[str, list], sl: slice) -> dict[str, torch.Tensor]:
        batches = {k: _to_device(self.model.tower(k).preprocess(v[sl]), self.ctx.device)
                   for k, v in raw.items()}
        with self.autocast:
            out = module({k: v[sl] for k, v in feats.items()}, batches)
        return {k: v.float() for k, v in out.items()}

    def _noisy(self, emb: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """``augment.embedding_noise``: CLOSE noise (:func:`~modalign.bridge.posthoc.
        close_noise`) on the configured keys, seeded by (seed, step, rank)."""
        noise = self.config.augment.embedding_noise
        if not noise:
            return emb
        g = torch.Generator(device="cpu").manual_seed(
            int(self.config.train.seed) * 1_000_003 + step * 7919 + self.ctx.rank)
        out = dict(emb)
        for k in sorted(noise):
            if k in out and noise[k] > 0:
                out[k] = close_noise(out[k], noise[k], generator=g)
        return out

    def _loss(self, emb: dict[str, torch.Tensor], indices: torch.Tensor) -> LossOutput:
        """The objective on ``emb`` plus the loss-adding recipes (momentum, distill, negatives)."""
        # Every group appears once per batch, so positives match by row (groups=None).
        with self.autocast:
            out = self.loss_module(self._noisy(emb, self.step),
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
            rows = torch.from_numpy(np.asarray(self._rows[self.config.negatives.text_key]))
            for name, term in self.negatives.teacher_terms(emb, rows.to(self.ctx.device),
                                                           self.model).items():
                weight = getattr(self.config.negatives, f"{name}_weight")
                loss, parts[f"negatives_{name}"] = loss + weight * term, term.detach()
        return out if loss is out.loss else LossOutput(loss, parts)

    def _negatives_loss(self, emb: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Image-grounded contrast of every other key against the text key's hard negatives."""
        assert self.negatives is not None
        t = self.config.negatives.text_key
        rows = to_device(torch.from_numpy(np.asarray(self._rows[t])), self.ctx.device)
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
        if self.negatives is not None:  # DeGLA's EMA teacher (TGC, self-distillation)
            self.negatives.begin_step(self.model,
                                      lambda m: self._embed(m, feats, raw, slice(None)))
        k = self.config.train.accumulate
        if self.harmonize is not None:
            out = self._harmonized_backward(feats, raw, indices)
        elif k == 1:
            out = self._loss(self._embed(self.module, feats, raw, slice(None)), indices)
            out.loss.backward()
        else:
            out = gradcache_backward(
                self.module, lambda module, sl: self._embed(module, feats, raw, sl),
                lambda emb: self._loss(emb, indices), batch=self.local_batch, k=k)
        if self.momentum is not None:
            self.momentum.enqueue()
        D.average_gradients(self._hand_averaged(), self.ctx)
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

        adjusted = self.harmonize.adjust({lab: grad_of(v) for lab, v in pair.items()}, self.step)
        total = grad_of(rest)
        for grads in adjusted.values():
            for k in keys:
                total[k] = total[k] + grads[k]
        params = [p for p in self._loss_params() if p.requires_grad]
        if params:  # temperatures: the plain gradient of the whole loss
            out.loss.backward(inputs=params)
        torch.autograd.backward([emb[k] for k in keys], [total[k] for k in keys])
        return out

    def _loss_params(self) -> list[nn.Parameter]:
        """Trained parameters of the losses: the objective's temperatures and the recipes'."""
        return list(self.objective.parameters()) + self._recipe_params()

    def _hand_averaged(self) -> list[nn.Parameter]:
        """Trained parameters outside any DDP wrapper: the recipes', and the objective's when it
        is not wrapped (see ``__init__``)."""
        own = [] if self.loss_module is not self.objective else list(self.objective.parameters())
        return own + self._recipe_params()

    def _recipe_params(self) -> list[nn.Parameter]:
        """The recipes' trained parameters (outside any DDP module: averaged by hand)."""
        return [p for r in self._recipes() for p in r.trainable()]

    def _recipes(self) -> list[Any]:
        return [r for r in (self.momentum, self.distill, self.negatives, self.harmonize)
                if r is not None]

    def _optimizer_step(self, epoch: int, index: int) -> LossOutput:
        """One optimizer step on global batch ``index`` of ``epoch``; the loss, detached (still
        on the device: reading it waits for the step)."""
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
        return LossOutput(out.loss.detach(), {k: v.detach() for k, v in out.parts.items()})

    def train_step(self, epoch: int, index: int) -> dict[str, float]:
        """One optimizer step on global batch ``index`` of ``epoch``; returns logged values."""
        logged = self._optimizer_step(epoch, index).detached()
        if self.ctx.world_size > 1:
            logged["loss"] = D.mean_over_ranks(logged["loss"], self.ctx)
        return logged

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Retrieval R@1/R@5 both ways and the centroid gap between the validation keys."""
        return {} if self.val is None else self.evaluate(self.val)

    def split_tables(self, split: str) -> dict[str, KeyTable]:
        """The two validation keys' rows of ``split`` (to evaluate another split the same way)."""
        return V.split_tables(self.config, self.store, split)

    def evaluate(self, tables: Mapping[str, KeyTable]) -> dict[str, float]:
        """R@1/R@5 both ways and the centroid gap of two keys' rows
        (:func:`modalign.train.validate.evaluate`)."""
        return V.evaluate(self.model, tables, self._raw_inputs())

    def _embed_table(self, key: str, table: KeyTable, batch_size: int = 1024) -> torch.Tensor:
        return V.embed_table(self.model, key, table, self._raw_inputs().get(key), batch_size)

    def _raw_inputs(self) -> dict[str, RawInputs]:
        return {k: self.raw for k in self.raw_keys if self.raw is not None}

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
        """The modules whose weights a checkpoint holds, by name (the recipes when enabled)."""
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
        for name, module in self._checkpoint_modules().items():
            module.load_state_dict(ckpt.weights[name])
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
                **old, "format_version": CONFIG_FORMAT_VERSION, "config": cfg.to_dict(),
                "total_steps": self.total_steps, "resumed": history})
        if not resumed and self.ctx.is_main:
            if (self.run_dir / CHECKPOINTS / "latest.json").exists():
                raise ModalignError(f"run folder {self.run_dir} already holds checkpoints; pass "
                                    "--resume to continue it or choose another run.dir")
            (self.run_dir / LOG_NAME).unlink(missing_ok=True)
            write_json_atomic(self.run_dir / CONFIG_NAME, {
                "format_version": CONFIG_FORMAT_VERSION, "config": cfg.to_dict(),
                "model": self.model.config.to_dict(), "world_size": self.ctx.world_size,
                "modalign_version": __version__,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps})
        metric, sign = cfg.validation_metric()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="training",
                   disable=not (cfg.train.progress and self.ctx.is_main
                                and sys.stderr.isatty()), file=sys.stderr)
        self._unchecked, self._checked_step = [], self.step
        self._first_step = self.step
        done = self.step >= self.total_steps or self.stopped_early
        try:
            while not done and self.epoch < cfg.train.epochs:
                self.train_epoch(bar)
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
        finally:
            bar.close()
        return self._finish()

    def train_epoch(self, bar: tqdm | None = None) -> None:
        """Run the steps left in the current epoch (up to ``total_steps``): the hot loop of
        :meth:`run`, with the host-side checks every :data:`CHECK_EVERY` steps and at the
        epoch's end and checkpoints every ``train.checkpoint_every`` steps; validation, the log
        row and the epoch's checkpoint are :meth:`run`'s."""
        every = self.config.train.checkpoint_every
        while self.index < self.steps_per_epoch and self.step < self.total_steps:
            t0 = time.perf_counter()
            check = self._check_due(self._first_step)
            # the losses' own input checks run with the host-side checks only
            with validation(check and validation_enabled()):
                out = self._optimizer_step(self.epoch, self.index)
            self._unchecked.append((self.step, self.epoch, out))
            self.index += 1
            dt = time.perf_counter() - t0
            self.epoch_seconds += dt
            self.train_seconds += dt
            if bar is not None:
                bar.update(1)
            if check:
                self._check_losses(bar)
            if every and self.step % every == 0 and self.index < self.steps_per_epoch:
                self.save_checkpoint()

    def _check_due(self, first: int) -> bool:
        """Whether the step about to run is followed by the host-side checks: the run's first
        step, every :data:`CHECK_EVERY` steps, a checkpoint's step, an epoch's or the run's last."""
        after = self.step + 1
        every = self.config.train.checkpoint_every
        return (self.step == first or after % CHECK_EVERY == 0
                or self.index + 1 >= self.steps_per_epoch or after >= self.total_steps
                or bool(every and after % every == 0))

    def _check_losses(self, bar: tqdm | None = None) -> None:
        """Read the losses of the steps since the last check (one wait for the device), stop
        the run at the first non-finite one, else add them to the epoch's running loss."""
        if not self._unchecked:
            return
        t0 = time.perf_counter()
        losses = torch.stack([out.loss.to(torch.float64) for _, _, out in self._unchecked])
        if self.ctx.world_size > 1:  # the mean over ranks of each step's loss
            dist.all_reduce(losses, op=dist.ReduceOp.SUM)
            values = [v / self.ctx.world_size for v in losses.tolist()]
        else:
            values = losses.tolist()
        for (step, epoch, out), value in zip(self._unchecked, values, strict=True):
            if not math.isfinite(value):
                raise self._non_finite(step, epoch, value, out.detached())
            self.epoch_loss_sum += value * self.batch_size
            self.epoch_samples += self.batch_size
        self._checked_step = self._unchecked[-1][0]
        self._unchecked = []
        dt = time.perf_counter() - t0
        self.epoch_seconds += dt
        self.train_seconds += dt
        if bar is None:
            return
        rate = self.epoch_samples / max(self.epoch_seconds, 1e-9)
        bar.set_postfix(loss=f"{values[-1]:.4f}", samples_s=f"{rate:.0f}")

    def _non_finite(self, step: int, epoch: int, loss: float,
                    logged: Mapping[str, float]) -> ModalignError:
        parts = ", ".join(f"{k}={v:.4g}" for k, v in logged.items() if k != "loss")
        try:
            last = latest_checkpoint(self.run_dir / CHECKPOINTS)
        except FileNotFoundError:
            last = None
        kept = (f"the last checkpoint ({last.name}) is kept; " if last is not None else "")
        ran = (f"the run was checked after step {self.step} (steps "
               f"{self._checked_step + 1}-{self.step} since the last check); "
               if self.step > step else "")
        return ModalignError(
            f"training stopped: the loss is {loss} at step {step} (epoch {epoch + 1}; "
            f"{parts or 'no parts'}); {ran}nothing after step {self._checked_step} was saved; "
            f"{kept}lower optim.lr, raise train.batch_size (some losses need 2+ rows per batch) "
            "or check the embeddings for NaN rows (modalign data check STORE)")

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
        """Every objective temperature as a logit scale, by term label."""
        return {k: float(v.detach().exp()) for k, v in self.objective.log_scales().items()}

    def _save_model(self) -> None:
        if not self.ctx.is_main:
            return
        self.model.save_pretrained(self.run_dir / MODEL_DIR, extra={
            "epoch": self.epoch, "step": self.step, "objectives": self.config.objectives,
            "embeddings": self.config.data.embeddings, "keys": self.config.data.keys})
        save_adapters(dict(self.model.towers.items()), self.run_dir / MODEL_DIR / "adapters")

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


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def train(config: TrainConfig, *, towers: Mapping[str, Any] | None = None,
          run_dir: str | Path | None = None, resume: bool = False) -> TrainResult:
    """Train a model as ``config`` says; the Python twin of ``modalign train``.

    Writes ``<run>/config.resolved.json``, ``log.jsonl`` (one row per epoch), ``checkpoints/``,
    ``model/`` (the best epoch, a :class:`~modalign.model.MultiTowerModel` folder) and
    ``summary.json``.

    Examples:
        (Not run as a doctest: it trains a model; tests/test_train_loop.py trains small ones.)

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
