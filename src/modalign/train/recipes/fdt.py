"""Finite discrete tokens (FDT, "Revisiting Multimodal Representation in Contrastive Learning:
From Patch and Token Embeddings to Finite Discrete Tokens", Chen et al. 2023).

A learnable codebook ``C`` (``codes`` rows of ``dim``) is shared by every modality. A token or
patch feature ``x_t`` of a row (from the store's token arrays, ``modalign embed --tokens``) is
mapped by its modality's query network ``q_t = MLP(x_t)`` (LayerNorm, Linear, GELU, LayerNorm,
Linear), and the row's embedding is a sparse mixture of code vectors::

    s_k = max_t  q_t . c_k / (sqrt(dim) T)        (padding tokens are left out of the max)
    w   = sparsemax(s)   (or softmax(s))          f = normalize(sum_k w_k c_k)

trained with the symmetric CLIP loss between the keys' embeddings (every pair of keys, a learnable
logit scale). Sparsemax (Martins & Astudillo 2016) is the Euclidean projection of ``s`` onto the
probability simplex, ``w_k = max(s_k - tau, 0)`` with ``tau`` such that ``sum_k w_k = 1``; its
gradient is ``dL/ds = m * (g - sum(m g) / sum(m))`` with ``m`` the support (``w > 0``).

A ``[fdt] enabled = true`` run is its own model (codebook and query networks, not the heads of
:class:`~modalign.model.MultiTowerModel`): :func:`train_fdt` writes ``<run>/model`` (an
:class:`FDTModel` folder), ``log.jsonl`` (validation R@1 and gap per epoch) and checkpoints that
resume bitwise. Differences from the paper's code: padding tokens are masked with ``-inf``
before the max (the official code gives them logit 0, so a pad can win the max), and the towers
are frozen (the features are read from the store).

Examples:
    >>> import torch
    >>> sparsemax(torch.tensor([[2.0, 1.0, -1.0]])).tolist()
    [[1.0, 0.0, 0.0]]
    >>> m = FDTModel({"image": 6, "text": 4}, codes=16, dim=8)
    >>> z, w = m.embed("text", torch.randn(3, 5, 4), torch.ones(3, 5, dtype=torch.bool))
    >>> tuple(z.shape), bool(torch.allclose(w.sum(1), torch.ones(3)))
    ((3, 8), True)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modalign import __version__
from modalign.errors import ModalignError
from modalign.io import (
    append_jsonl,
    read_json,
    read_jsonl,
    read_safetensors,
    write_json_atomic,
    write_jsonl_atomic,
    write_model_folder,
)
from modalign.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from modalign.train.schedule import TokenRunSettings

if TYPE_CHECKING:
    from modalign.embed.tokens import TokenFeatures

FORMAT = "modalign.FDTModel"
MIN_LOG_SCALE, MAX_LOG_SCALE = 0.0, math.log(100.0)


class _Sparsemax(torch.autograd.Function):
    """Sparsemax over the last dimension with its closed-form Jacobian-vector product."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        zs, _ = torch.sort(z, dim=-1, descending=True)
        cums = zs.cumsum(-1)
        k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
        support = (1 + k * zs > cums).sum(-1, keepdim=True)  # size of the support
        tau = (cums.gather(-1, support - 1) - 1) / support.to(z.dtype)
        p = torch.clamp(z - tau, min=0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        m = (p > 0).to(g.dtype)
        v = (g * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
        return m * (g - v)


def sparsemax(z: torch.Tensor) -> torch.Tensor:
    """Sparsemax over the last dimension: the Euclidean projection onto the simplex.

    Examples:
        >>> sparsemax(torch.tensor([1.0, 0.5, -1.0])).tolist()
        [0.75, 0.25, 0.0]
    """
    if not torch.isfinite(z).all():
        raise ModalignError("sparsemax: the scores must be finite")
    return _Sparsemax.apply(z)


def code_weights(scores: torch.Tensor, mask: torch.Tensor, weighting: str = "sparsemax"
                 ) -> torch.Tensor:
    """``(n, T, K)`` token-code scores and ``(n, T)`` token mask -> ``(n, K)`` code weights:
    max over the row's real tokens, then sparsemax or softmax over the codes."""
    if not bool(mask.any(1).all()):
        raise ModalignError("FDT: a row has no tokens (every row needs at least one)")
    pooled = scores.masked_fill(~mask[..., None], -math.inf).amax(1)
    return sparsemax(pooled) if weighting == "sparsemax" else torch.softmax(pooled, dim=-1)


class FDTModel(nn.Module):
    """A shared codebook, one query network per modality and a learnable logit scale.

    Args:
        in_dims: token feature size per modality.
        codes: codebook rows (the paper: 16384).
        dim: code (and embedding) size.
        hidden_dim: width of the query networks.
        weighting: ``"sparsemax"`` (the paper's) or ``"softmax"``.
        temperature: ``T`` dividing the token-code scores.
        logit_temperature: initial temperature of the CLIP loss (scale clamped to [1, 100]).
    """

    def __init__(self, in_dims: Mapping[str, int], codes: int = 1024, dim: int = 256,
                 hidden_dim: int = 512, weighting: str = "sparsemax", temperature: float = 10.0,
                 logit_temperature: float = 0.07) -> None:
        super().__init__()
        if weighting not in ("sparsemax", "softmax"):
            raise ModalignError(f"fdt.weighting must be 'sparsemax' or 'softmax', got "
                                f"{weighting!r}")
        self.in_dims, self.codes, self.dim = dict(in_dims), int(codes), int(dim)
        self.hidden_dim, self.weighting, self.temperature = int(hidden_dim), weighting, temperature
        self.codebook = nn.Parameter(torch.randn(self.codes, self.dim))
        self.queries = nn.ModuleDict({m: nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, hidden_dim), nn.GELU(), nn.LayerNorm(hidden_dim),
            nn.Linear(hidden_dim, dim)) for m, d in sorted(self.in_dims.items())})
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / logit_temperature)))

    def settings(self) -> dict[str, Any]:
        return {"in_dims": self.in_dims, "codes": self.codes, "dim": self.dim,
                "hidden_dim": self.hidden_dim, "weighting": self.weighting,
                "temperature": self.temperature}

    def embed(self, modality: str, tokens: torch.Tensor, mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, T, in_dim)`` padded tokens and their ``(n, T)`` mask -> unit embeddings
        ``(n, dim)`` and code weights ``(n, codes)``."""
        if modality not in self.queries:
            raise ModalignError(f"modality {modality!r}: this FDT model has query networks for "
                                f"{sorted(self.queries)}")
        q = self.queries[modality](tokens.to(self.codebook.dtype))
        scores = q @ self.codebook.T / (math.sqrt(self.dim) * self.temperature)
        w = code_weights(scores, mask, self.weighting)
        return F.normalize(w @ self.codebook, dim=-1), w

    @torch.no_grad()
    def embed_rows(self, modality: str, tf: TokenFeatures, batch_size: int = 256) -> torch.Tensor:
        """Every row of ``tf`` embedded (eval mode, no gradient)."""
        was = self.training
        self.eval()
        try:
            out = [self.embed(modality, *tf.padded(np.arange(i, min(i + batch_size, len(tf)))))[0]
                   for i in range(0, len(tf), batch_size)]
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_logit_scale.clamp_(MIN_LOG_SCALE, MAX_LOG_SCALE)

    def save_pretrained(self, directory: str | os.PathLike[str],
                        extra: Mapping[str, Any] | None = None) -> Path:
        return write_model_folder(directory, self.state_dict(), {
            "format": FORMAT, "modalign_version": __version__, **self.settings(),
            "extra": dict(extra or {})})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> FDTModel:
        root = Path(directory)
        meta = read_json(root / "config.json") if (root / "config.json").is_file() else {}
        if meta.get("format") != FORMAT:
            raise ModalignError(f"{root}: not an FDT model folder (expected config.json with "
                                f"format {FORMAT!r}, written by an [fdt] run)")
        model = cls(meta["in_dims"], meta["codes"], meta["dim"], meta["hidden_dim"],
                    meta["weighting"], meta["temperature"])
        model.load_state_dict(read_safetensors(root / "model.safetensors"))
        model.extra = meta.get("extra", {})
        return model


@dataclass(kw_only=True)
class FDTOptions:
    """The model keys of an FDT run (the ``[fdt]`` section and :class:`FDTSettings` share them;
    meanings as in :class:`FDTModel`).

    Examples:
        >>> FDTOptions(codes=16).weighting
        'sparsemax'
    """

    codes: int = 1024
    dim: int = 256
    hidden_dim: int = 512
    weighting: str = "sparsemax"
    temperature: float = 10.0


@dataclass
class FDTSection(FDTOptions):
    """The ``[fdt]`` section: train an FDT model from the store's token arrays."""

    enabled: bool = False


HELP: dict[str, str] = {
    "fdt.enabled": "train a finite-discrete-tokens model (shared codebook, CLIP loss) from the "
                   "store's token arrays instead of the heads (modalign embed --tokens)",
    "fdt.codes": "rows of the shared codebook",
    "fdt.dim": "size of the code vectors (the joint space)",
    "fdt.hidden_dim": "width of each modality's query network",
    "fdt.weighting": "'sparsemax' (the paper's) or 'softmax' code weights",
    "fdt.temperature": "T dividing the token-code scores (larger: more codes per row under "
                       "sparsemax)",
}


@dataclass
class FDTSettings(TokenRunSettings, FDTOptions):
    """An FDT training run: the ``[fdt]`` keys (:class:`FDTOptions`) plus data, optimisation and
    output settings (those of every token run, :class:`~modalign.train.schedule.TokenRunSettings`);
    the inherited fields are keyword-only.

    Examples:
        >>> FDTSettings(["image", "text:name"], codes=64).codes
        64
    """

    keys: list[str] = field(default_factory=lambda: ["image", "text"])
    logit_temperature: float = 0.07
    warmup_steps: int = 0
    val_split: str = "val"
    num_threads: int = 0

    def check(self) -> None:
        """Raise :class:`ModalignError` naming the first bad setting."""
        if len(self.keys) < 2:
            raise ModalignError(f"fdt: data.keys must name two or more keys, got {self.keys}")
        if self.weighting not in ("sparsemax", "softmax"):
            raise ModalignError(f"fdt.weighting must be 'sparsemax' or 'softmax', got "
                                f"{self.weighting!r}")
        if min(self.codes, self.dim, self.hidden_dim) < 1:
            raise ModalignError(f"fdt: codes={self.codes}, dim={self.dim}, hidden_dim="
                                f"{self.hidden_dim}; expected each >= 1")
        if not (self.temperature > 0 and self.logit_temperature > 0):
            raise ModalignError(f"fdt.temperature must be > 0, got {self.temperature}")
        if self.batch_size < 2 or self.epochs < 1:
            raise ModalignError(f"fdt: train.batch_size={self.batch_size}, train.epochs="
                                f"{self.epochs}; expected >= 2 and >= 1")


class TokenPairs:
    """The token rows of every key, grouped: a step draws groups and one row per key each."""

    def __init__(self, store: Any, keys: Sequence[str], split: str) -> None:
        from modalign.late.model import token_rows

        rows = token_rows(store, split)
        self.keys = list(keys)
        self.tables = {k: rows(k) for k in self.keys}
        self.modality = {k: k.partition(":")[0] for k in self.keys}
        members: dict[str, dict[str, list[int]]] = {}
        for k, tf in self.tables.items():
            by: dict[str, list[int]] = {}
            for i, it in enumerate(tf.items):
                by.setdefault(it["group"], []).append(i)
            members[k] = by
        self.groups = sorted(set.intersection(*(set(m) for m in members.values())))
        self.members = {k: [members[k][g] for g in self.groups] for k in self.keys}

    def __len__(self) -> int:
        return len(self.groups)

    def in_dims(self) -> dict[str, int]:
        return {self.modality[k]: tf.dim for k, tf in self.tables.items()}

    def batch(self, seed: int, epoch: int, index: int, batch_size: int
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Padded tokens and masks per key of global batch ``index`` (seeded per epoch)."""
        perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(self.groups))
        groups = perm[index * batch_size:(index + 1) * batch_size]
        out = {}
        for ki, k in enumerate(self.keys):
            rng = np.random.default_rng([seed, epoch, index, ki])
            rows = [m[int(rng.integers(len(m)))] for m in (self.members[k][g] for g in groups)]
            out[k] = self.tables[k].padded(rows)
        return out


def fdt_loss(model: FDTModel, batch: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
             modality: Mapping[str, str]) -> torch.Tensor:
    """The mean CLIP loss over the pairs of keys of the batch's FDT embeddings."""
    from modalign.losses.clip import clip_loss

    emb = {k: model.embed(modality[k], *v)[0] for k, v in batch.items()}
    keys = list(emb)
    terms = [clip_loss(emb[a], emb[b], model.log_logit_scale.exp()).loss
             for i, a in enumerate(keys) for b in keys[i + 1:]]
    return torch.stack(terms).mean()


@torch.no_grad()
def evaluate_fdt(model: FDTModel | str | os.PathLike[str], store: Any, keys: Sequence[str],
                 split: str = "test", rows: Any = None) -> dict[str, float]:
    """R@1/R@5 both ways between the first two keys (positives: same group), their mean R@1 and
    centroid gap, over every row of ``split`` with tokens (``rows``: the split's
    ``token_rows``, read once by the caller)."""
    from modalign.late.model import token_rows
    from modalign.train.validate import pair_metrics

    if not isinstance(model, FDTModel):
        model = FDTModel.from_pretrained(model)
    rows = rows or token_rows(store, split)
    (ka, ta), (kb, tb) = ((k, rows(k)) for k in keys[:2])
    if not len(ta) or not len(tb):
        raise ModalignError(f"split {split!r} has no token rows of {ka!r} or {kb!r}; set "
                            "data.val_split to a split of the store")
    za, zb = (model.embed_rows(k.partition(":")[0], t) for k, t in ((ka, ta), (kb, tb)))
    return pair_metrics((ka, za, torch.from_numpy(ta.group_ids())),
                        (kb, zb, torch.from_numpy(tb.group_ids())))


SETTINGS_NAME = "fdt_settings.json"
RESUMABLE = frozenset({"epochs", "max_steps", "checkpoint_every", "keep_checkpoints", "run_dir",
                       "num_threads"})


def train_fdt(settings: FDTSettings, resume: bool = False) -> dict[str, Any]:
    """Train an FDT model; writes ``<run_dir>/model`` (the best validation epoch by the first
    key retrieving the second, R@1), ``log.jsonl``, checkpoints and ``summary.json``.

    Checkpoints are written at every epoch end and every ``checkpoint_every`` steps;
    ``resume=True`` continues from the latest one, bitwise identical on CPU to an uninterrupted
    run.
    """
    from modalign.vocabulary import metric_key

    settings.check()
    run_dir, root, resumed = settings.open_run("fdt", SETTINGS_NAME, RESUMABLE, resume)
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    torch.manual_seed(settings.seed)
    data = TokenPairs(settings.store, settings.keys, settings.train_split)
    from modalign.late.model import token_rows

    val_rows = token_rows(settings.store, settings.val_split)
    if len(data) < settings.batch_size:
        raise ModalignError(f"train.batch_size={settings.batch_size} exceeds the {len(data)} "
                            f"groups of split {settings.train_split!r} with tokens of every key "
                            f"{settings.keys}")
    model = FDTModel(data.in_dims(), settings.codes, settings.dim, settings.hidden_dim,
                     settings.weighting, settings.temperature, settings.logit_temperature)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=settings.lr)
    per_epoch = len(data) // settings.batch_size
    total = per_epoch * settings.epochs  # the schedule spans the epochs; max_steps only stops
    stop = min(total, settings.max_steps) if settings.max_steps else total
    warm = settings.warmup_steps

    def factor(step: int) -> float:  # linear warm-up, then cosine to 0 at the last step
        if warm and step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    metric = metric_key(settings.keys[0], settings.keys[1], "recall@1")
    step, epoch, index, best, loss_sum = 0, 0, 0, -math.inf, 0.0
    if resumed:
        ckpt = load_checkpoint(root)
        model.load_state_dict(ckpt.weights["model"])
        t = ckpt.trainer
        opt.load_state_dict(t["optimizer"])
        sched.load_state_dict(t["scheduler"])
        set_rng_state(t["rng"])
        step, epoch, index = ckpt.step, int(t["epoch"]), int(t["index"])
        best, loss_sum = float(t["best"]), float(t["loss_sum"])
        log = run_dir / "log.jsonl"
        if log.is_file():  # rows logged after the checkpoint are written again
            write_jsonl_atomic(log, [r for r in read_jsonl(log) if r.get("step", 0) <= step])
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "log.jsonl").unlink(missing_ok=True)
        write_json_atomic(run_dir / SETTINGS_NAME, asdict(settings))

    def checkpoint() -> None:
        save_checkpoint(root, step, {"model": model}, {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
            "epoch": epoch, "index": index, "best": best, "loss_sum": loss_sum},
            keep=settings.keep_checkpoints)

    t0, steps0 = time.perf_counter(), step
    while epoch < settings.epochs and step < stop:
        while index < per_epoch and step < stop:
            loss = fdt_loss(model, data.batch(settings.seed, epoch, index, settings.batch_size),
                            data.modality)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            model.clamp_()
            value = float(loss.detach())
            step, index, loss_sum = step + 1, index + 1, loss_sum + value
            if not math.isfinite(value):
                raise ModalignError(f"fdt: the loss is {value} at step {step}; lower optim.lr "
                                    "or raise fdt.temperature")
            if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                checkpoint()
        if index < per_epoch:  # stopped inside the epoch (max_steps)
            checkpoint()
            break
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step,
                               "train_loss": loss_sum / max(index, 1)}
        val = evaluate_fdt(model, settings.store, settings.keys, settings.val_split, val_rows)
        row.update(val)
        if val[metric] > best:
            best, row["best"] = val[metric], True
            model.save_pretrained(run_dir / "model", extra={"settings": asdict(settings),
                                                            "epoch": epoch + 1, "step": step})
        append_jsonl(run_dir / "log.jsonl", row)
        epoch, index, loss_sum = epoch + 1, 0, 0.0
        checkpoint()
    seconds = time.perf_counter() - t0
    summary = {"run": str(run_dir), "model": str(run_dir / "model"), "steps": step,
               "epochs": epoch, "metric": metric, "best": best,
               "samples_per_s": round((step - steps0) * settings.batch_size / seconds, 1)
               if seconds > 0 and step > steps0 else None}
    write_json_atomic(run_dir / "summary.json", summary)
    return summary
