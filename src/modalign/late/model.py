"""Late-interaction model: per-modality projection heads to a small token space, trained with a
contrastive loss on MaxSim scores, and its retrieval evaluation.

A *document* is a group (a concept) made of the tokens of every row of the document keys
(``image`` = all image views, ``text:name`` = the name's tokens, ...), each token tagged with the
key it came from; a *query* is one row of the query key (``text:alias``). Token features come
from the store's ragged token arrays (``modalign embed --tokens``).

Examples:
    (Not run as a doctest: it needs a store with token arrays and trains a model.)

    >>> result = train_late(LateSettings(store="runs/emb", run_dir="runs/late"))  # doctest: +SKIP
    >>> evaluate_late("runs/late/model", "runs/emb", split="test")["metrics"]      # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modalign import __version__
from modalign.embed.store import EmbeddingStore
from modalign.embed.tokens import TokenFeatures, load_tokens
from modalign.errors import ModalignError
from modalign.io import read_json, read_safetensors, write_json_atomic, write_model_folder
from modalign.late.maxsim import Ragged, maxsim_scores, modality_wins
from modalign.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from modalign.train.config import LateOptions
from modalign.train.schedule import TokenRunSettings

__all__ = ["LateInteractionModel", "LateSettings", "TokenCorpus", "TokenDocuments", "evaluate_late",
           "is_late_model", "token_rows", "train_late"]

FORMAT = "modalign.LateInteractionModel"


@dataclass(kw_only=True)
class LateSettings(TokenRunSettings, LateOptions):
    """A late-interaction training run, keyword-only: the ``[late]`` keys
    (:class:`~modalign.train.config.LateOptions`), where data and outputs are, the loop and the
    optimiser (:class:`~modalign.train.schedule.TokenRunSettings`; here a batch of 64 and no
    weight decay by default). ``store`` needs token arrays of the query and document
    modalities.

    Examples:
        >>> s = LateSettings(store="emb", dim=8)
        >>> s.dim, s.batch_size, s.weight_decay, s.lr
        (8, 64, 0.0, 0.001)
    """

    batch_size: int = 64
    weight_decay: float = 0.0

    def check(self) -> None:
        if self.scoring not in ("maxsim", "single"):
            raise ModalignError(f"late.scoring must be 'maxsim' or 'single' (cosine of the mean "
                                f"tokens, the single-vector baseline), got {self.scoring!r}")
        if not self.documents:
            raise ModalignError("late.documents: expected at least one key, e.g. ['image']")
        if self.dim < 1 or self.batch_size < 2 or self.epochs < 1:
            raise ModalignError(f"late: dim={self.dim}, batch_size={self.batch_size}, epochs="
                                f"{self.epochs}; expected dim >= 1, batch_size >= 2, epochs >= 1")
        if not self.temperature > 0:
            raise ModalignError(f"late.temperature must be > 0, got {self.temperature}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ModalignError(f"late: checkpoint_every={self.checkpoint_every}, keep_checkpoints"
                                f"={self.keep_checkpoints}; expected >= 0 and >= 1")


def _split_key(key: str) -> tuple[str, str | None]:
    m, _, v = key.partition(":")
    return m, (v or None)


class LateInteractionModel(nn.Module):
    """One linear head per modality to ``dim``-d unit tokens, and a learned logit scale.

    Examples:
        >>> import torch
        >>> m = LateInteractionModel({"text": 8, "image": 6}, dim=4)
        >>> [round(n, 6) for n in m.project("text", torch.ones(3, 8)).norm(dim=-1).tolist()]
        [1.0, 1.0, 1.0]
    """

    def __init__(self, in_dims: Mapping[str, int], dim: int = 64, temperature: float = 0.5
                 ) -> None:
        super().__init__()
        self.in_dims, self.dim = dict(in_dims), int(dim)
        self.heads = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in sorted(in_dims.items())})
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def project(self, modality: str, tokens: torch.Tensor) -> torch.Tensor:
        """``(n, in_dim)`` tower tokens of ``modality`` -> ``(n, dim)`` unit tokens."""
        if modality not in self.heads:
            raise ModalignError(f"modality {modality!r}: this model has heads for "
                                f"{sorted(self.heads)}")
        return F.normalize(self.heads[modality](tokens.float()), dim=-1)

    def save_pretrained(self, directory: str | os.PathLike[str],
                        extra: Mapping[str, Any] | None = None) -> Path:
        return write_model_folder(directory, self.state_dict(), {
            "format": FORMAT, "modalign_version": __version__, "in_dims": self.in_dims,
            "dim": self.dim, "extra": dict(extra or {})})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> LateInteractionModel:
        root = Path(directory)
        cfg_file = root / "config.json"
        meta = read_json(cfg_file) if cfg_file.is_file() else {}
        if meta.get("format") != FORMAT:
            raise ModalignError(f"{root}: not a late-interaction model folder (expected "
                                f"config.json with format {FORMAT!r}, written by a [late] run)")
        model = cls(meta["in_dims"], meta["dim"])
        model.load_state_dict(read_safetensors(root / "model.safetensors"))
        model.extra = meta.get("extra", {})
        return model


def is_late_model(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a late-interaction model (``config.json`` of its format)."""
    cfg = Path(directory) / "config.json"
    try:
        return cfg.is_file() and read_json(cfg).get("format") == FORMAT
    except (OSError, ValueError):
        return False


class TokenDocuments:
    """One document per group: the tokens of every row of the document keys, each token tagged
    with the index of the key it came from.

    Args:
        rows: key (``modality`` or ``modality:view``) -> the token rows of that key.
        documents: the document keys.
    """

    def __init__(self, rows: Callable[[str], TokenFeatures], documents: Sequence[str]) -> None:
        self.document_keys = list(documents)
        by_group: dict[str, list[tuple[int, np.ndarray]]] = {}
        members: dict[str, list[dict[str, Any]]] = {}
        for ki, k in enumerate(self.document_keys):
            tf = rows(k)
            for i, it in enumerate(tf.items):
                by_group.setdefault(it["group"], []).append((ki, np.asarray(tf.tokens(i))))
                members.setdefault(it["group"], []).append(it)
        self.groups = sorted(by_group)
        self.parts = [by_group[g] for g in self.groups]
        self.members = [members[g] for g in self.groups]
        self.modalities = {k: _split_key(k)[0] for k in self.document_keys}

    def __len__(self) -> int:
        return len(self.groups)

    def project(self, model: LateInteractionModel, idx: Sequence[int] | None = None) -> Ragged:
        """The documents ``idx`` (default all) as tagged unit tokens of ``model``."""
        idx = range(len(self.groups)) if idx is None else idx
        parts = [(ki, t) for g in idx for ki, t in self.parts[int(g)]]
        # one head call per modality over every token of the batch, then back in document order
        by_mod: dict[str, list[int]] = {}
        for p, (ki, _) in enumerate(parts):
            by_mod.setdefault(self.modalities[self.document_keys[ki]], []).append(p)
        projected: list[torch.Tensor | None] = [None] * len(parts)
        for m, ps in by_mod.items():
            out = model.project(m, torch.from_numpy(np.concatenate([parts[p][1] for p in ps])))
            for p, chunk in zip(ps, out.split([len(parts[p][1]) for p in ps])):
                projected[p] = chunk
        counts = [sum(len(t) for _, t in self.parts[int(g)]) for g in idx]
        values = torch.cat([x for x in projected if x is not None])
        tags = torch.cat([torch.full((len(t),), ki, dtype=torch.int64) for ki, t in parts])
        offsets = torch.tensor([0, *np.cumsum(counts)], dtype=torch.int64)
        return Ragged(values, offsets, tags)


def token_rows(store: EmbeddingStore | str | Path, split: str | Sequence[str] | None
               ) -> Callable[[str], TokenFeatures]:
    """key (``modality`` or ``modality:view``) -> its token rows of ``split`` (``None``: all);
    each modality's array is read once."""
    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    cache: dict[str, TokenFeatures] = {}

    def rows(key: str) -> TokenFeatures:
        m, view = _split_key(key)
        if m not in cache:
            cache[m] = load_tokens(store, m, split=split)
        return cache[m] if view is None else cache[m].filter(view=view)

    rows.cache = cache  # type: ignore[attr-defined]
    return rows


class TokenCorpus:
    """Queries and documents of one split, built from the store's token arrays.

    ``queries`` holds one row of the query key per query, ``query_group[i]`` the index of its
    group in ``groups``; the gallery is one document per group with document tokens (also the
    groups without a query), its tokens tagged with the index of the document key they came from.
    """

    def __init__(self, store: EmbeddingStore | str | Path, query: str, documents: Sequence[str],
                 split: str | Sequence[str]) -> None:
        self.store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
        self.query_key, self.document_keys = query, list(documents)
        rows = token_rows(self.store, split)
        q = rows(query)
        self.documents = TokenDocuments(rows, self.document_keys)
        self.groups = self.documents.groups  # every group with document tokens is in the gallery
        index = {g: i for i, g in enumerate(self.groups)}
        keep = [i for i, it in enumerate(q.items) if it["group"] in index]
        if len(self.groups) < 2 or not keep:
            raise ModalignError(f"split {split!r}: {len(self.groups)} documents "
                                f"({', '.join(documents)}) and {len(keep)} queries ({query}) of "
                                "those groups; expected at least 2 documents and 1 query")
        self.queries = q.subset(keep)
        self.query_group = torch.tensor([index[it["group"]] for it in self.queries.items])
        self.modalities = self.documents.modalities
        self.query_modality = _split_key(query)[0]
        self.doc_parts = self.documents.parts
        self._dims = {m: tf.dim for m, tf in rows.cache.items()}  # type: ignore[attr-defined]

    def in_dims(self) -> dict[str, int]:
        """Token dim of each modality (the heads' input sizes)."""
        return dict(self._dims)

    def project_queries(self, model: LateInteractionModel, idx: Sequence[int] | None = None
                        ) -> Ragged:
        idx = range(len(self.queries)) if idx is None else idx
        sub = self.queries.subset(list(idx))
        return Ragged(model.project(self.query_modality, torch.from_numpy(sub.values)),
                      torch.from_numpy(sub.offsets))

    def project_documents(self, model: LateInteractionModel, idx: Sequence[int] | None = None
                          ) -> Ragged:
        return self.documents.project(model, idx)


RESUMABLE = frozenset({"epochs", "max_steps", "checkpoint_every", "keep_checkpoints",
                       "run_dir"})
"""Settings a resumed late-interaction run may change (how long it trains, checkpoint cadence)."""

SETTINGS_NAME = "late_settings.json"


def train_late(settings: LateSettings, progress: bool = True, resume: bool = False
               ) -> dict[str, Any]:
    """Train heads with a symmetric InfoNCE loss on in-batch MaxSim scores; writes
    ``<run_dir>/model`` and returns a summary (steps, loss, samples/s).

    Checkpoints (``<run_dir>/checkpoints``, as for the main loop) are written at every epoch end,
    every ``checkpoint_every`` steps and at the end; ``resume=True`` continues from the latest
    one, bitwise identical on CPU to an uninterrupted run.
    """
    settings.check()
    run_dir, ckpt_root, resumed = settings.open_run("late", SETTINGS_NAME, RESUMABLE, resume)
    torch.manual_seed(settings.seed)
    corpus = TokenCorpus(settings.store, settings.query, settings.documents,
                         settings.train_split)
    model = LateInteractionModel(corpus.in_dims(), settings.dim, settings.temperature)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                            weight_decay=settings.weight_decay)
    n = len(corpus.groups)
    gen = torch.Generator().manual_seed(settings.seed)
    group_queries: list[list[int]] = [[] for _ in range(n)]
    for qi, g in enumerate(corpus.query_group.tolist()):
        group_queries[g].append(qi)
    with_query = [g for g in range(n) if group_queries[g]]
    if len(with_query) < 2:
        raise ModalignError(f"split {settings.train_split!r}: {len(with_query)} groups with a "
                            f"query ({settings.query}); contrastive training needs at least 2")
    bs = min(settings.batch_size, len(with_query))
    steps, epoch, pos, order, loss_v = 0, 0, 0, [], float("nan")
    if resumed:
        ckpt = load_checkpoint(ckpt_root)
        model.load_state_dict(ckpt.weights["model"])
        t = ckpt.trainer
        opt.load_state_dict(t["optimizer"])
        set_rng_state(t["rng"])
        gen.set_state(t["generator"])
        steps, epoch, pos = ckpt.step, int(t["epoch"]), int(t["pos"])
        order, loss_v = list(t["order"]), float(t["loss"])
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / SETTINGS_NAME, asdict(settings))

    saved = [steps if resumed else -1]

    def checkpoint() -> None:
        saved[0] = steps
        save_checkpoint(ckpt_root, steps, {"model": model}, {
            "optimizer": opt.state_dict(), "rng": rng_state(), "generator": gen.get_state(),
            "epoch": epoch, "pos": pos, "order": list(order), "loss": loss_v},
            keep=settings.keep_checkpoints)

    def stop() -> bool:
        return bool(settings.max_steps) and steps >= settings.max_steps

    t0, steps0 = time.perf_counter(), steps
    while epoch < settings.epochs and not stop():
        if pos == 0:
            order = torch.randperm(len(with_query), generator=gen).tolist()
        while pos + bs <= len(order) and not stop():
            groups = [with_query[i] for i in order[pos:pos + bs]]
            qs = [group_queries[g][int(torch.randint(len(group_queries[g]), (1,),
                                                     generator=gen))] for g in groups]
            q, d = corpus.project_queries(model, qs), corpus.project_documents(model, groups)
            scores = (maxsim_scores(q, d) if settings.scoring == "maxsim"
                      else q.centroids() @ d.centroids().T) * model.log_scale.exp()
            target = torch.arange(len(groups))
            loss = (F.cross_entropy(scores, target) + F.cross_entropy(scores.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps, pos = steps + 1, pos + bs
            loss_v = float(loss.detach())
            if settings.checkpoint_every and steps % settings.checkpoint_every == 0:
                checkpoint()
        if pos + bs > len(order):  # the epoch is done
            epoch, pos, order = epoch + 1, 0, []
            checkpoint()
    if saved[0] != steps:
        checkpoint()
    seconds = time.perf_counter() - t0
    out = run_dir / "model"
    model.save_pretrained(out, extra={"settings": asdict(settings)})
    done = steps - steps0
    summary = {"model": str(out), "steps": steps, "final_train_loss": loss_v,
               "samples_per_s": round(done * bs / seconds, 1) if seconds > 0 and done else None,
               "logit_scale": float(model.log_scale.detach().exp()),
               **({"resumed_at_step": steps0} if resumed else {})}
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def _ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's relevant document, ties counted against it."""
    return (scores >= scores.gather(1, target[:, None])).sum(1)


@torch.no_grad()
def evaluate_late(model: LateInteractionModel | str | os.PathLike[str],
                  store: EmbeddingStore | str | Path, split: str = "test",
                  query: str | None = None, documents: Sequence[str] | None = None,
                  k_values: Sequence[int] = (1, 5, 10), ablations: bool = True,
                  prefilter: int = 0) -> dict[str, Any]:
    """Text-query -> document retrieval on ``split``: MaxSim against single-vector (mean token)
    scoring with the same heads, per-document-key ablations, modality wins, index size and
    latency.

    Returns a dict with ``metrics`` (``maxsim/recall@K``, ``single/recall@K``, ``mrr``...),
    ``ablations`` (metrics without each document key), ``wins`` (share of query tokens whose max
    came from each key), ``index_mb`` and ``ms_per_1000_queries``; ``prefilter > 0`` adds the
    recall of a centroid prefilter of that many candidates against exact MaxSim.
    """
    from modalign.evaluate.metrics import metrics_from_positions
    from modalign.late.maxsim import maxsim_search, prefilter_search, topk_recall

    if not isinstance(model, LateInteractionModel):
        model = LateInteractionModel.from_pretrained(model)
    s = dict(getattr(model, "extra", {}).get("settings", {}))
    query = query or s.get("query", "text:alias")
    documents = list(documents or s.get("documents", ["image", "text:name"]))
    corpus = TokenCorpus(store, query, documents, split)
    model.eval()
    q = corpus.project_queries(model)
    d = corpus.project_documents(model)
    target = corpus.query_group

    def metrics(scores: torch.Tensor) -> dict[str, float]:
        pos = _ranks(scores, target)[:, None]
        per = metrics_from_positions(pos, torch.ones(len(pos), dtype=torch.int64), k_values)
        return {k: round(float(v.mean()), 4) for k, v in per.items()
                if k.startswith("recall@") or k in ("mrr", "map")}

    t0 = time.perf_counter()
    exact = maxsim_scores(q, d)
    seconds = time.perf_counter() - t0
    single = q.centroids() @ d.centroids().T
    out: dict[str, Any] = {
        "split": split, "query": query, "documents": documents, "queries": len(q),
        "gallery": len(d),
        "metrics": {**{f"maxsim/{k}": v for k, v in metrics(exact).items()},
                    **{f"single/{k}": v for k, v in metrics(single).items()}},
        "index_mb": round(d.values.numel() * 4 / 1e6, 3),
        "single_index_mb": round(len(d) * d.dim * 4 / 1e6, 3),
        "ms_per_1000_queries": round(seconds * 1000 / len(q) * 1000, 1),
    }
    if ablations and len(documents) > 1:
        out["ablations"] = {f"without {k}": metrics(maxsim_scores(q, d.drop_tags([ki])))
                            for ki, k in enumerate(documents)}
    own = d.select(target)
    wins = modality_wins(q, own, len(documents)).sum(0).double()
    out["wins"] = {k: round(float(w / wins.sum()), 4) for k, w in zip(documents, wins)}
    if prefilter:
        k = min(max(k_values), len(d))
        _, ei = maxsim_search(q, d, k=k)
        _, pi = prefilter_search(q, d, k=k, candidates=min(prefilter, len(d)))
        out[f"prefilter{prefilter}_recall@{k}"] = round(topk_recall(ei, pi), 4)
    return out
