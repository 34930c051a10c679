"""Learned gap bridges: maps fitted on paired embeddings from a source modality to a target one.

Fitted on ``n`` matched rows ``X -> Y`` (unit embeddings of the training split); every output is
renormalised. With ``center=True`` the map acts on centred inputs and adds the target mean:
``f(x) = normalise(g(x - mu_X) + mu_Y)``.

* ``procrustes``: ``g(x) = x W``, ``W = U V^T`` from ``svd(X^T Y) = U S V^T``, the orthogonal matrix
  minimising ``|X W - Y|_F`` (``rotation=True`` flips ``U``'s last column when ``det < 0``). The
  uncentred map keeps every inner product among the source rows, so intra-modal rankings survive.
* ``lstsq``: ``W = (X^T X + ridge I)^-1 X^T Y``, the (ridge) least-squares linear map.
* ``mlp``: ``g(x) = x + MLP(x)`` (one hidden layer, GELU), trained full-batch with AdamW on
  ``1 - cos(f(x), y)``.
* ``diffusion-link``: a denoising diffusion model over the target embeddings, trained with the
  cross-sample and topology losses; sources are noised and denoised into the target
  distribution (:mod:`modalign.bridge.diffusion_link`). Stochastic: ``seed`` fixes the noise.

A fitted bridge is saved as ``ID.safetensors`` + ``ID.json`` (``ID`` = kind + a hash of its
weights; the format of :func:`modalign.bridge.base.save_bridge`) and used in ``modalign eval
--bridge learned:path=DIR/ID``, alone or chained with the post-hoc bridges of
:mod:`modalign.bridge.posthoc`. Files written before format versions still load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalign.bridge.base import (
    BaseBridge,
    NotFittedError,
    read_bridge_files,
    save_bridge,
    stem_of,
)
from modalign.errors import ModalignError

KINDS: tuple[str, ...] = ("procrustes", "lstsq", "mlp", "diffusion-link")


def procrustes(x: Tensor, y: Tensor, *, rotation: bool = False) -> Tensor:
    """The orthogonal ``W`` minimising ``|x W - y|_F`` (``det W = +1`` with ``rotation``).

    Examples:
        >>> q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
        >>> x = torch.randn(20, 4, dtype=torch.float64)
        >>> torch.allclose(procrustes(x, x @ q), q)
        True
    """
    _check_pair(x, y, same_dim=False)
    u, _, vh = torch.linalg.svd(x.T @ y, full_matrices=False)
    if rotation and float(torch.linalg.det(u @ vh)) < 0:
        u = u.clone()
        u[:, -1] = -u[:, -1]
    return u @ vh


def least_squares(x: Tensor, y: Tensor, *, ridge: float = 0.0) -> Tensor:
    """``W = (x^T x + ridge I)^-1 x^T y`` (``ridge > 0`` needed when ``n < d``).

    Examples:
        >>> x = torch.randn(30, 3, dtype=torch.float64)
        >>> w = torch.randn(3, 3, dtype=torch.float64)
        >>> torch.allclose(least_squares(x, x @ w), w)
        True
    """
    _check_pair(x, y, same_dim=False)
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ModalignError(f"ridge={ridge!r}: expected a finite number >= 0")
    gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(gram, x.T @ y)


class _ResidualMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class LearnedBridge(BaseBridge):
    """A fitted map from ``source`` embeddings toward ``target`` ones (see the module docstring).

    A :class:`~modalign.bridge.base.BaseBridge`: :meth:`fit_pairs` fits on matched rows;
    ``fit(bank)`` fits on ``bank[source]`` and ``bank[target]`` when they are matched rows (the
    same length); ``transform`` maps every key of the source modality (``"text"``,
    ``"text:name"``) and passes the rest through. Fitted: ``tensors_`` (name -> tensor).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = F.normalize(torch.randn(50, 4, generator=g), dim=1)
        >>> b = LearnedBridge("procrustes", "text", "image").fit_pairs(x, x)
        >>> torch.allclose(b.transform({"text": x})["text"], x, atol=1e-5)
        True
    """

    name = "learned"
    fitted_attributes = ("tensors_",)
    tensors_: dict[str, Tensor]

    def __init__(self, kind: str = "procrustes", source: str = "text", target: str = "image", *,
                 center: bool = True, rotation: bool = False, ridge: float = 1e-3,
                 hidden: int | None = None, steps: int | None = None, lr: float = 1e-3,
                 seed: int = 0, batch_size: int = 256, t_start: int = 600, ddim_steps: int = 5,
                 rho: float = 5.0, lambda_topo: float = 1.0, noise_source: bool = True) -> None:
        if kind not in KINDS:
            raise ModalignError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
        if not source or not target or source == target:
            raise ModalignError(f"source={source!r}, target={target!r}: expected two different "
                                "modalities")
        self.kind, self.source, self.target = kind, source, target
        self.center, self.rotation, self.ridge = bool(center), bool(rotation), float(ridge)
        self.hidden, self.steps, self.lr, self.seed = hidden, steps, float(lr), int(seed)
        self.batch_size, self.t_start, self.ddim_steps = int(batch_size), int(t_start), ddim_steps
        self.rho, self.lambda_topo = float(rho), float(lambda_topo)
        self.noise_source = bool(noise_source)
        s = self.settings
        if s["hidden"] < 2 or s["steps"] < 1 or not 0 < t_start <= 1000 or ddim_steps < 1 \
                or rho <= 0:
            raise ModalignError(f"hidden={s['hidden']}, steps={s['steps']}, t_start={t_start}, "
                                f"ddim_steps={ddim_steps}, rho={rho}: expected hidden >= 2, "
                                "steps >= 1, 0 < t_start <= 1000, ddim_steps >= 1, rho > 0")
        self.path: str | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """The settings that shape the map (``hidden``/``steps`` resolved per kind); the id hashes
        them, and a saved bridge's JSON lists them."""
        diffusion = self.kind == "diffusion-link"
        hidden = self.hidden if self.hidden is not None else (1024 if diffusion else 512)
        steps = self.steps if self.steps is not None else (2000 if diffusion else 500)
        out: dict[str, Any] = {"center": self.center, "rotation": self.rotation,
                               "ridge": self.ridge, "hidden": int(hidden), "steps": int(steps),
                               "lr": self.lr, "seed": self.seed}
        if diffusion:
            out.update({"batch_size": self.batch_size, "t_start": self.t_start,
                        "ddim_steps": int(self.ddim_steps), "rho": self.rho,
                        "lambda_topo": self.lambda_topo, "noise_source": self.noise_source})
        return out

    # -- fitting ------------------------------------------------------------------------------

    def fit_pairs(self, x: Tensor, y: Tensor) -> LearnedBridge:
        """Fit on matched rows: ``x[i]`` (source) should map to ``y[i]`` (target)."""
        _check_pair(x, y)
        x64, y64 = F.normalize(x.double(), dim=1), F.normalize(y.double(), dim=1)
        zero = torch.zeros(x.shape[1], dtype=torch.float64)
        mu_x = x64.mean(0) if self.center else zero
        mu_y = y64.mean(0) if self.center else zero
        xc, yc = x64 - mu_x, y64 - mu_y
        tensors = {"mu_x": mu_x.float(), "mu_y": mu_y.float()}
        if self.kind == "procrustes":
            tensors["w"] = procrustes(xc, yc, rotation=self.rotation).float()
        elif self.kind == "lstsq":
            tensors["w"] = least_squares(xc, yc, ridge=self.ridge).float()
        elif self.kind == "diffusion-link":
            tensors.update(self._fit_diffusion(x64.float(), y64.float()))
        else:
            tensors.update(self._fit_mlp(xc.float(), y64.float(), tensors["mu_y"]))
        self.tensors_ = tensors
        return self

    def _fit_mlp(self, xc: Tensor, y: Tensor, mu_y: Tensor) -> dict[str, Tensor]:
        s = self.settings
        gen = torch.Generator().manual_seed(s["seed"])
        net = _ResidualMLP(xc.shape[1], s["hidden"])
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        opt = torch.optim.AdamW(net.parameters(), lr=s["lr"], weight_decay=0.0)
        for _ in range(s["steps"]):
            loss = 1 - F.cosine_similarity(net(xc) + mu_y, y, dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return {f"mlp.{k}": v.detach().clone() for k, v in net.state_dict().items()}

    def _fit_diffusion(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        from modalign.bridge import diffusion_link as dl

        mu_x, mu_y = x.mean(0), y.mean(0)  # always centred: the preprocessing needs the means
        rho = self.settings["rho"]
        net = dl.fit_denoiser(dl.preprocess(x, mu_x, rho), dl.preprocess(y, mu_y, rho),
                              self.settings)
        return {"mu_x": mu_x, "mu_y": mu_y, "scale_y": (y - mu_y).norm(dim=1).mean().view(1),
                **{f"dl.{k}": v.detach().clone() for k, v in net.state_dict().items()}}

    def fit(self, bank: Mapping[str, Tensor]) -> LearnedBridge:
        """Fit on ``bank[source]`` and ``bank[target]`` as matched rows (row ``i`` pairs row ``i``).

        Banks whose rows are not matched (a split's images and captions) go through
        :func:`group_pairs` and :meth:`fit_pairs` instead.
        """
        from modalign.bridge.posthoc import lookup_key

        x, y = lookup_key(bank, self.source, self.name), lookup_key(bank, self.target, self.name)
        if len(x) != len(y):
            raise ModalignError(f"learned bridge: bank[{self.source!r}] has {len(x)} rows and "
                                f"bank[{self.target!r}] {len(y)}; expected matched rows (pair "
                                "them with group_pairs, then call fit_pairs)")
        return self.fit_pairs(x, y)

    # -- applying -----------------------------------------------------------------------------

    def map(self, x: Tensor) -> Tensor:
        """Apply the map to ``(n, d)`` source embeddings; unit rows out."""
        self.check_fitted()
        mu_x, mu_y = self.tensors_["mu_x"], self.tensors_["mu_y"]
        if x.ndim != 2 or x.shape[1] != mu_x.shape[0]:
            raise ModalignError(f"embeddings: expected (n, {mu_x.shape[0]}), got "
                                f"{tuple(x.shape)}")
        if self.kind == "diffusion-link":
            return self._map_diffusion(x)
        xc = F.normalize(x.float(), dim=1) - mu_x
        if self.kind == "mlp":
            net = _ResidualMLP(len(mu_x), self.settings["hidden"])
            net.load_state_dict({k[4:]: v for k, v in self.tensors_.items()
                                 if k.startswith("mlp.")})
            with torch.no_grad():
                out = net(xc)
        else:
            out = xc @ self.tensors_["w"]
        return F.normalize(out + mu_y, dim=1)

    def _map_diffusion(self, x: Tensor) -> Tensor:
        from modalign.bridge import diffusion_link as dl

        s = self.settings
        t = self.tensors_
        net = dl.Denoiser(len(t["mu_x"]), hidden=s["hidden"])
        net.load_state_dict({k[3:]: v for k, v in t.items() if k.startswith("dl.")})
        gen = torch.Generator().manual_seed(s["seed"])
        x0 = dl.ddim_sample(net.eval(), dl.preprocess(x, t["mu_x"], s["rho"]), s, generator=gen)
        y = x0 / s["rho"] * t["scale_y"] + t["mu_y"]
        return F.normalize(y, dim=1)

    def transform(self, embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.check_fitted()
        out = dict(embeddings)
        for key, x in embeddings.items():
            if key == self.source or key.split(":", 1)[0] == self.source:
                out[key] = self.map(x)
        return out

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "source": self.source,
                "target": self.target, **self.settings, "path": self.path}

    # -- files --------------------------------------------------------------------------------

    def bridge_id(self) -> str:
        """``kind-<hash>``: the hash covers the settings and the fitted weights."""
        self.check_fitted()
        h = hashlib.sha256(json.dumps([self.kind, self.source, self.target, self.settings],
                                      sort_keys=True).encode())
        for key in sorted(self.tensors_):
            h.update(key.encode())
            h.update(self.tensors_[key].contiguous().numpy().tobytes())
        return f"{self.kind}-{h.hexdigest()[:12]}"

    def save(self, folder: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``ID.safetensors`` then ``ID.json`` into ``folder``; returns the JSON path."""
        if not self.is_fitted():
            raise NotFittedError("learned bridge: fit it before saving")
        return save_bridge(self, Path(folder) / self.bridge_id(), extra=extra)

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        description, tensors = super().state()
        return {**description, "id": self.bridge_id(), "settings": self.settings}, tensors

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LearnedBridge:
        """Load ``DIR/ID`` (or ``DIR/ID.json``) written by :meth:`save` (any format version)."""
        from modalign.bridge.base import load_bridge

        meta, tensors = read_bridge_files(path)
        if meta.get("format") == "modalign.LearnedBridge":  # before format versions
            bridge = LearnedBridge(meta["kind"], meta["source"], meta["target"],
                                   **meta["settings"])
            bridge.tensors_ = tensors
        else:
            loaded = load_bridge(path)
            if not isinstance(loaded, LearnedBridge):
                raise ModalignError(f"{path}: a saved {type(loaded).__name__}, not a learned "
                                    "bridge")
            bridge = loaded
        bridge.path = str(stem_of(path))
        return bridge


class SavedBridge(LearnedBridge):
    """``--bridge learned:path=DIR/ID``: a bridge saved by :meth:`LearnedBridge.save`.

    Examples:
        >>> SavedBridge("no/such/bridge")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        modalign.errors.ModalignError: learned bridge 'no/such/bridge': expected ...
    """

    def __init__(self, path: str = "") -> None:
        if not path:
            raise ModalignError("bridge 'learned': expected path=DIR/ID of a fitted bridge")
        self.__dict__.update(LearnedBridge.load(path).__dict__)

    saved_as = LearnedBridge

    def fit(self, bank: Mapping[str, Tensor]) -> SavedBridge:
        """No-op: a saved bridge arrives fitted (a chain fits its other members around it)."""
        return self


def _check_pair(x: Tensor, y: Tensor, *, same_dim: bool = True) -> None:
    ok = isinstance(x, Tensor) and isinstance(y, Tensor) and x.ndim == 2 and y.ndim == 2
    if not ok or len(x) != len(y) or (same_dim and x.shape != y.shape):
        raise ModalignError(f"x and y: expected matched (n, d) tensors, got "
                            f"{getattr(x, 'shape', None)} and {getattr(y, 'shape', None)}")
    if len(x) < 2:
        raise ModalignError(f"x and y: expected at least 2 pairs, got {len(x)}")


def group_pairs(source: Any, target: Any) -> tuple[Tensor, Tensor]:
    """Matched rows from two :class:`~modalign.embed.store.Embeddings`: each source row with the
    normalised mean of its group's target rows (rows of groups absent from the target dropped).

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> emb = toy_embeddings()
        >>> x, y = group_pairs(emb["text"], emb["image"])
        >>> x.shape == y.shape == (len(emb["text"]), emb["text"].dim)
        True
    """
    import numpy as np

    sg, tg = source.group_ids(), target.group_ids()
    t = F.normalize(torch.from_numpy(np.asarray(target.vectors, dtype=np.float32)), dim=1)
    uniq, inverse = np.unique(tg, return_inverse=True)
    sums = torch.zeros(len(uniq), t.shape[1]).index_add_(0, torch.from_numpy(inverse), t)
    where = np.searchsorted(uniq, sg).clip(max=max(len(uniq) - 1, 0))
    keep = (uniq[where] == sg) if len(uniq) else np.zeros(len(sg), dtype=bool)
    if keep.sum() < 2:
        raise ModalignError("group_pairs: fewer than 2 source rows share a group with the target")
    x = torch.from_numpy(np.asarray(source.vectors, dtype=np.float32)[keep])
    return F.normalize(x, dim=1), F.normalize(sums[torch.from_numpy(where[keep])], dim=1)


def bridge_report(bridge: Any, test: Mapping[str, Any], *, k_values: tuple[int, ...] = (1, 5, 10),
                  repeats: int = 3) -> dict[str, Any]:
    """Gap, cross-modal and intra-modal retrieval of the mapped source queries, before/after.

    ``test`` maps modality -> :class:`~modalign.embed.store.Embeddings` of a held-out split.
    Cross-modal: source queries against the target gallery (same group = relevant). Intra-modal:
    mapped source queries against the *original* source gallery, each query's own row removed
    (do neighbourhoods survive the map?). ``seconds_per_1000`` is the best of ``repeats`` timings
    of mapping all queries, scaled to 1,000.

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> emb = toy_embeddings()
        >>> x, y = group_pairs(emb["text"], emb["image"])
        >>> b = LearnedBridge("procrustes", "text", "image").fit_pairs(x, y)
        >>> r = bridge_report(b, emb)
        >>> r["after"]["gap"] < r["before"]["gap"]
        True
    """
    import numpy as np

    from modalign.evaluate.metrics import retrieval_metrics, self_exclusion
    from modalign.geometry.gap import modality_gap

    src, tgt = test[bridge.source], test[bridge.target]
    q = F.normalize(torch.from_numpy(np.asarray(src.vectors, dtype=np.float32)), dim=1)
    g = F.normalize(torch.from_numpy(np.asarray(tgt.vectors, dtype=np.float32)), dim=1)
    qg, gg = torch.from_numpy(src.group_ids()), torch.from_numpy(tgt.group_ids())
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        mapped = bridge.transform({bridge.source: q})[bridge.source]
        times.append(time.perf_counter() - start)
    exclude = self_exclusion([it["id"] for it in src.items], [it["id"] for it in src.items])

    def measure(queries: Tensor) -> dict[str, float]:
        cross = retrieval_metrics(queries, g, qg, gg, k_values=k_values).metrics
        intra = retrieval_metrics(queries, q, qg, qg, k_values=k_values, exclude=exclude).metrics
        gap = modality_gap(queries.numpy(), g.numpy()).centroid_distance
        out = {"gap": gap, "mean_paired_cosine": _paired_cosine(queries, qg, g, gg)}
        out.update({f"cross_{k}": v for k, v in cross.items()
                    if k.startswith("recall@") or k == "map"})
        out.update({f"intra_{k}": v for k, v in intra.items()
                    if k.startswith("recall@") or k == "map"})
        return out

    return {"before": measure(q), "after": measure(mapped), "num_queries": len(q),
            "seconds_per_1000": min(times) / len(q) * 1000.0, "bridge": bridge.identity()}


def _paired_cosine(q: Tensor, qg: Tensor, g: Tensor, gg: Tensor) -> float:
    """Mean cosine of each query to the normalised mean of its group's gallery rows."""
    uniq, inverse = torch.unique(gg, return_inverse=True)
    means = F.normalize(torch.zeros(len(uniq), g.shape[1]).index_add_(0, inverse, g), dim=1)
    where = torch.searchsorted(uniq, qg).clamp(max=len(uniq) - 1)
    ok = uniq[where] == qg
    return float((q[ok] * means[where[ok]]).sum(1).mean())


def fit_bridge(joint: Mapping[str, Any], source: str = "text", target: str = "image", *,
               split: str = "train", eval_split: str = "test", kind: str = "procrustes",
               **params: Any) -> tuple[LearnedBridge, dict[str, Any]]:
    """Fit a :class:`LearnedBridge` on the ``split`` rows of ``joint`` and measure it on
    ``eval_split`` (what ``modalign fit-bridge`` does before saving).

    ``joint`` maps modality -> :class:`~modalign.embed.store.Embeddings` (as ``load_joint``
    returns them); each source row is paired with the mean of its group's target rows
    (:func:`group_pairs`). ``params`` are :class:`LearnedBridge`'s. Returns the fitted bridge
    and the :func:`bridge_report` with ``fit_seconds`` and ``fit_pairs`` added.

    Examples:
        >>> from modalign.evaluate.retrieval import toy_embeddings
        >>> bridge, report = fit_bridge(toy_embeddings(), "text", "image", split="test")
        >>> closer = report["after"]["gap"] < report["before"]["gap"]
        >>> bridge.is_fitted(), report["fit_pairs"], closer
        (True, 24, True)
    """
    for m in (source, target):
        if m not in joint:
            raise ModalignError(f"--source/--target: no {m!r} embeddings (have {sorted(joint)})")
    bridge = LearnedBridge(kind, source, target, **params)
    train = {m: joint[m].filter(split=split) for m in (source, target)}
    x, y = group_pairs(train[source], train[target])
    start = time.perf_counter()
    bridge.fit_pairs(x, y)
    fit_seconds = time.perf_counter() - start
    report = bridge_report(bridge, {m: e.filter(split=eval_split) for m, e in joint.items()})
    report.update({"fit_seconds": round(fit_seconds, 4), "fit_pairs": len(x)})
    return bridge, report
