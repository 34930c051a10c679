"""Post-hoc bridges: transforms of joint-space embeddings, fitted on a bank, applied to test data.

Every bridge has ``fit(bank)`` (a mapping key -> ``(n, d)`` embeddings of a training split) and
``transform(embeddings)`` (key -> ``(n, d)``, returns a new dict), plus ``identity()`` (its name and
hyperparameters, for result records). Keys are modalities, optionally with a view
(``"image:openmoji"``); a statistic fitted for ``"image"`` also serves ``"image:openmoji"``.
Bridges compose with :class:`BridgeChain`; :func:`build_bridge` parses ``"name:key=value,..."``.
They follow scikit-learn's conventions (:mod:`modalign.bridge.base`): ``get_params`` /
``set_params`` from the constructor, fitted attributes ending in ``_``, :class:`NotFittedError`,
``fit_transform``, and :func:`save_bridge` / :func:`load_bridge` (safetensors + JSON).

* :class:`Centering` -- subtract each modality's mean, renormalise.
* :class:`MeanShift` -- move one modality by the gap vector ``mean(target) - mean(source)``.
* :class:`InvGC` -- inverse graph convolution (Jian & Wang, 2023): push test *gallery* items away
  from their neighbourhood in the training banks; ``local_adj=True`` is the LocalAdj variant.
* :class:`CloseNoise` -- CLOSE-style Gaussian noise (Gu et al., 2023) for text-only training;
  identity in evaluation mode.
* ``learned`` -- a map fitted on paired embeddings and saved (:mod:`modalign.bridge.learned`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.bridge.base import (
    BaseBridge,
    NotFittedError,
    bridge_from_state,
    class_key,
    load_bridge,
    save_bridge,
)
from modalign.bridge.learned import SavedBridge
from modalign.errors import ModalignError
from modalign.spec import parse_value

__all__ = ["BRIDGES", "BaseBridge", "Bridge", "BridgeChain", "Centering", "CloseNoise", "InvGC",
           "MeanShift", "NotFittedError", "build_bridge", "build_chain", "close_noise",
           "inverse_graph_convolution", "load_bridge", "local_inverse_graph_convolution",
           "lookup_key", "save_bridge"]

DEFAULT_CHUNK_SIZE = 1 << 22


@runtime_checkable
class Bridge(Protocol):
    """A transform of embeddings keyed by modality, fitted on a bank."""

    @property
    def name(self) -> str:
        """The bridge's spec name (``"centering"``)."""
        ...

    def fit(self, bank: Mapping[str, Tensor]) -> Bridge:
        """Learn whatever statistics the bridge needs from ``bank``; returns ``self``."""
        ...

    def transform(self, embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return transformed copies; keys the bridge does not touch pass through."""
        ...

    def identity(self) -> dict[str, Any]:
        """Name and hyperparameters, JSON-serialisable."""
        ...


# --------------------------------------------------------------------------------------------
# functional forms


def inverse_graph_convolution(
    gallery: Tensor, bank: Tensor, rate: float, *, normalize: bool = True
) -> Tensor:
    """InvGC with the full adjacency: ``g - rate/n * (S - mean(S)) @ bank``, ``S = g @ bank.T``.

    ``mean(S)`` is the mean over the whole ``len(gallery) x len(bank)`` similarity matrix, which
    equals ``mean(gallery) . mean(bank)``; and ``S @ bank = gallery @ (bank.T @ bank)``, so the
    cost is ``O((len(gallery) + n) d^2)`` and the similarity matrix is never built.

    Args:
        gallery: ``(m, d)`` L2-normalised test gallery embeddings.
        bank: ``(n, d)`` L2-normalised training embeddings.
        rate: propagation rate ``r``; ``0`` leaves the gallery unchanged (up to renormalising).
        normalize: L2-normalise the result.

    Examples:
        >>> g = F.normalize(torch.randn(5, 4), dim=1); bank = F.normalize(torch.randn(20, 4), dim=1)
        >>> torch.allclose(inverse_graph_convolution(g, bank, 0.0), g, atol=1e-6)
        True
    """
    _check_pair(gallery, bank)
    n = len(bank)
    mean_similarity = gallery.mean(0) @ bank.mean(0)
    message = gallery @ (bank.T @ bank) - mean_similarity * bank.sum(0)
    out = gallery - (rate / n) * message
    return F.normalize(out, dim=1) if normalize else out


def local_inverse_graph_convolution(
    gallery: Tensor,
    bank: Tensor,
    rate: float,
    k: int,
    *,
    normalize: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """InvGC with LocalAdj: ``g - rate/k * S_k @ bank``, ``S_k`` = the top-``k`` similarities.

    Only each gallery item's ``k`` most similar bank items (with their similarity values) take
    part; there is no mean-centring. Rows are processed in blocks so at most ``chunk_size``
    similarities are held; ``S_k`` is a sparse (CSR) matrix built from the top-k of each block,
    so the aggregation costs ``k d`` per row instead of ``n d``.

    Examples:
        >>> g = F.normalize(torch.randn(5, 4), dim=1); bank = F.normalize(torch.randn(20, 4), dim=1)
        >>> local_inverse_graph_convolution(g, bank, 0.5, k=3).shape
        torch.Size([5, 4])
    """
    _check_pair(gallery, bank)
    if not isinstance(k, int) or not 1 <= k <= len(bank):
        raise ModalignError(f"k={k!r}: expected an int in [1, {len(bank)}] (the bank size)")
    block = max(1, chunk_size // len(bank))
    parts = []
    for start in range(0, len(gallery), block):
        g = gallery[start : start + block]
        top = torch.topk(g @ bank.T, k, dim=1)
        parts.append(g - (rate / k) * _sparse_rows_times(top.indices, top.values, bank))
    out = torch.cat(parts) if parts else gallery.clone()
    return F.normalize(out, dim=1) if normalize else out


def _sparse_rows_times(indices: Tensor, values: Tensor, bank: Tensor) -> Tensor:
    """``A @ bank`` for ``A[i, indices[i, j]] = values[i, j]`` (a row-sparse matrix)."""
    rows, k = indices.shape
    crow = torch.arange(0, rows * k + 1, k, device=indices.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support.*")
        A = torch.sparse_csr_tensor(crow, indices.reshape(-1), values.reshape(-1),
                                    size=(rows, len(bank)), check_invariants=False)
        return A @ bank


def close_noise(x: Tensor, std: float, *, generator: torch.Generator | None = None) -> Tensor:
    """CLOSE noise: ``normalize(x + std * eps)``, ``eps ~ N(0, I)``; differentiable in ``x``.

    For unit ``x`` in ``d`` dimensions the expected cosine to the clean vector is about
    ``1 / sqrt(1 + d std^2)``, so pick ``std`` with the dimension in mind.

    Examples:
        >>> y = close_noise(F.normalize(torch.randn(3, 8), dim=1), 0.1)
        >>> torch.allclose(y.norm(dim=1), torch.ones(3))
        True
    """
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a 2-D float tensor (n, d), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"std={std!r}: expected a finite number >= 0")
    # a generator draws on its own device (a CPU generator gives the same noise on any device)
    device = x.device if generator is None else generator.device
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    return F.normalize(x + std * eps, dim=1)


# --------------------------------------------------------------------------------------------
# bridges


class Centering(BaseBridge):
    """Subtract each modality's mean (fitted on the bank), then renormalise.

    Removing every modality's centroid removes the gap vector between them. Fitted:
    ``means_`` (key -> ``(d,)`` mean).

    Examples:
        >>> bank = {"image": F.normalize(torch.randn(50, 4) + 2, dim=1)}
        >>> out = Centering().fit(bank).transform(bank)
        >>> bool(out["image"].mean(0).norm() < bank["image"].mean(0).norm())
        True
    """

    name = "centering"
    fitted_attributes = ("means_",)
    means_: dict[str, Tensor]

    def __init__(self, renormalize: bool = True) -> None:
        self.renormalize = renormalize

    def fit(self, bank: Mapping[str, Tensor]) -> Centering:
        self.means_ = {key: _check_matrix(f"bank[{key!r}]", x).mean(0)
                       for key, x in _check_bank(bank).items()}
        return self

    def transform(self, embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.check_fitted()
        out = {}
        for key, x in embeddings.items():
            y = _check_matrix(f"embeddings[{key!r}]", x) - lookup_key(self.means_, key, self.name)
            out[key] = F.normalize(y, dim=1) if self.renormalize else y
        return out


class MeanShift(BaseBridge):
    """Move ``source`` embeddings by ``scale * (mean(target) - mean(source))``, renormalise.

    Fitted: ``gap_`` (the ``(d,)`` vector ``mean(target) - mean(source)`` of the bank).

    Examples:
        >>> bank = {"text": F.normalize(torch.randn(40, 4) - 1, dim=1),
        ...         "image": F.normalize(torch.randn(40, 4) + 1, dim=1)}
        >>> shift = MeanShift("text", "image", renormalize=False).fit(bank)
        >>> moved = shift.transform(bank)["text"]
        >>> torch.allclose(moved.mean(0), bank["image"].mean(0), atol=1e-6)
        True
    """

    name = "meanshift"
    fitted_attributes = ("gap_",)
    gap_: Tensor

    def __init__(self, source: str = "text", target: str = "image", scale: float = 1.0,
                 renormalize: bool = True) -> None:
        self.source, self.target = source, target
        self.scale, self.renormalize = float(scale), renormalize

    def fit(self, bank: Mapping[str, Tensor]) -> MeanShift:
        bank = _check_bank(bank)
        source = _check_matrix("bank source", lookup_key(bank, self.source, self.name))
        target = _check_matrix("bank target", lookup_key(bank, self.target, self.name))
        self.gap_ = target.mean(0) - source.mean(0)
        return self

    def transform(self, embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.check_fitted()
        out = dict(embeddings)
        for key, x in embeddings.items():
            if _matches(key, self.source):
                y = _check_matrix(f"embeddings[{key!r}]", x) + self.scale * self.gap_
                out[key] = F.normalize(y, dim=1) if self.renormalize else y
        return out


class InvGC(BaseBridge):
    """Inverse graph convolution on the test gallery, with the training banks as the graph.

    Two messages are computed for each gallery item, one against the training bank of the
    gallery modality (rate ``r_gallery``) and one against the bank of the query modality (rate
    ``r_query``); the new gallery is ``normalize((m_gallery + m_query) / 2)``. Only the entry
    whose key equals ``gallery`` is changed (or, when no key equals it, the entries of that
    modality, e.g. ``"image:noto"`` for ``gallery="image"``); queries are left unchanged.
    ``local_adj=True`` keeps only the top ``k = int(pool_rate * n)`` neighbours.

    Args:
        gallery: key of the gallery modality (the one modified).
        query: key of the query modality.
        r_gallery: rate against the gallery bank (``r_g``; the reference code has no default).
        r_query: rate against the query bank (``r_q``).
        local_adj: use LocalAdj instead of the full adjacency.
        pool_rate: fraction of the bank kept as neighbours by LocalAdj (reference default 0.01).
        chunk_size: similarities held at once by LocalAdj.

    Fitted: ``banks_`` (``"gallery"`` and ``"query"`` -> the bank rows of those modalities).

    Examples:
        >>> bank = {k: F.normalize(torch.randn(200, 8), dim=1) for k in ("image", "text")}
        >>> test = {k: F.normalize(torch.randn(10, 8), dim=1) for k in ("image", "text")}
        >>> out = InvGC("image", "text", local_adj=True).fit(bank).transform(test)
        >>> torch.equal(out["text"], test["text"]), out["image"].shape
        (True, torch.Size([10, 8]))
    """

    name = "invgc"
    fitted_attributes = ("banks_",)
    banks_: dict[str, Tensor]

    def __init__(self, gallery: str = "image", query: str = "text", r_gallery: float = 0.1,
                 r_query: float = 0.1, local_adj: bool = False, pool_rate: float = 0.01,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not 0 < pool_rate <= 1:
            raise ModalignError(f"pool_rate={pool_rate!r}: expected a fraction in (0, 1]")
        self.gallery, self.query = gallery, query
        self.r_gallery, self.r_query = float(r_gallery), float(r_query)
        self.local_adj, self.pool_rate, self.chunk_size = local_adj, float(pool_rate), chunk_size

    def fit(self, bank: Mapping[str, Tensor]) -> InvGC:
        bank = _check_bank(bank)
        self.banks_ = {
            "gallery": _check_matrix("bank gallery", lookup_key(bank, self.gallery, self.name)),
            "query": _check_matrix("bank query", lookup_key(bank, self.query, self.name)),
        }
        return self

    def transform(self, embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.check_fitted()
        out = dict(embeddings)
        exact = self.gallery in embeddings
        for key, x in embeddings.items():
            if key == self.gallery or (not exact and _matches(key, self.gallery)):
                x = _check_matrix(f"embeddings[{key!r}]", x)
                m_g = self._message(x, self.banks_["gallery"], self.r_gallery)
                m_q = self._message(x, self.banks_["query"], self.r_query)
                out[key] = F.normalize(0.5 * m_g + 0.5 * m_q, dim=1)
        return out

    def identity(self) -> dict[str, Any]:
        return {"name": "localadj" if self.local_adj else self.name, "gallery": self.gallery,
                "query": self.query, "r_gallery": self.r_gallery, "r_query": self.r_query,
                "local_adj": self.local_adj, "pool_rate": self.pool_rate}

    def _message(self, x: Tensor, bank: Tensor, rate: float) -> Tensor:
        bank = bank.to(x.dtype)
        if not self.local_adj:
            return inverse_graph_convolution(x, bank, rate)
        k = max(1, int(self.pool_rate * len(bank)))
        return local_inverse_graph_convolution(x, bank, rate, k, chunk_size=self.chunk_size)


class CloseNoise(BaseBridge):
    """CLOSE-style adapter: Gaussian noise plus renormalisation on some modalities, train only.

    In training mode (``train()``), each embedding of the chosen modalities is optionally moved by
    the fitted gap vector (``shift_scale * (mean(shift_target) - mean(x's modality))``), then
    ``normalize(x + std * eps)``. In evaluation mode (``eval()``, the default) it is the identity.
    Fitted: ``gaps_`` (modality -> gap vector; empty without ``shift_target``, when the bridge
    needs no fit).

    Examples:
        >>> noise = CloseNoise(std=0.1, modalities=("text",), seed=0).train()
        >>> x = {"text": F.normalize(torch.randn(4, 8), dim=1)}
        >>> bool((noise.transform(x)["text"] != x["text"]).all()), noise.eval().transform(x) == x
        (True, True)
    """

    name = "close"
    fitted_attributes = ("gaps_",)
    gaps_: dict[str, Tensor]

    def __init__(self, std: float = 0.04, modalities: Sequence[str] = ("text",),
                 shift_target: str | None = None, shift_scale: float = 1.0,
                 seed: int | None = None) -> None:
        if not math.isfinite(std) or std < 0:
            raise ModalignError(f"std={std!r}: expected a finite number >= 0")
        if isinstance(modalities, str):
            modalities = (modalities,)
        self.std, self.modalities = float(std), tuple(modalities)
        self.shift_target, self.shift_scale = shift_target, float(shift_scale)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.training = False

    def train(self, mode: bool = True) -> CloseNoise:
        self.training = mode
        return self

    def eval(self) -> CloseNoise:
        return self.train(False)

    def fit(self, bank: Mapping[str, Tensor]) -> CloseNoise:
        if self.shift_target is None:
            self.gaps_ = {}
            return self
        bank = _check_bank(bank)
        target = lookup_key(bank, self.shift_target, self.name).mean(0)
        self.gaps_ = {m: target - lookup_key(bank, m, self.name).mean(0) for m in self.modalities}
        return self

    def is_fitted(self) -> bool:
        """Without ``shift_target`` there is nothing to fit."""
        return self.shift_target is None or "gaps_" in self.__dict__

    def transform(self, embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not self.training:
            return dict(embeddings)
        self.check_fitted()
        gaps = self.__dict__.get("gaps_", {})
        out = dict(embeddings)
        for key, x in embeddings.items():
            modality = next((m for m in self.modalities if _matches(key, m)), None)
            if modality is None:
                continue
            if gaps:
                x = x + self.shift_scale * gaps[modality].to(x)
            generator = self._generator if x.device.type == "cpu" else None
            out[key] = close_noise(x, self.std, generator=generator)
        return out

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        if "gaps_" not in self.__dict__ and self.shift_target is None:
            self.gaps_ = {}
        return super().state()


class BridgeChain(BaseBridge):
    """Several bridges applied in order; each is fitted on the bank as transformed so far.

    A chain is a bridge: ``fit``, ``transform``, ``fit_transform``, ``get_params`` (with
    ``deep=True`` also ``"<i>__<param>"`` of the ``i``-th bridge), ``set_params`` and
    :func:`save_bridge` / :func:`load_bridge` (when every member is a :class:`BaseBridge`).
    ``identity()`` lists the members' identities (what result records store).

    Examples:
        >>> bank = {k: F.normalize(torch.randn(100, 8), dim=1) for k in ("image", "text")}
        >>> chain = BridgeChain([Centering(), InvGC("image", "text")]).fit(bank)
        >>> [b["name"] for b in chain.identity()], sorted(chain.transform(bank))
        (['centering', 'invgc'], ['image', 'text'])
        >>> chain.set_params(**{"1__r_gallery": 0.3}).get_params()["1__r_gallery"]
        0.3
    """

    name = "chain"

    def __init__(self, bridges: Iterable[Bridge] = ()) -> None:
        self.bridges = list(bridges)
        for i, b in enumerate(self.bridges):
            if not (callable(getattr(b, "fit", None)) and callable(getattr(b, "transform", None))):
                raise ModalignError(f"bridges[{i}]: expected a bridge (fit, transform, "
                                    f"identity), got {type(b).__name__}")

    def fit(self, bank: Mapping[str, Tensor]) -> BridgeChain:
        current = dict(bank)
        for i, bridge in enumerate(self.bridges):
            bridge.fit(current)
            if i + 1 < len(self.bridges):
                current = bridge.transform(current)
        return self

    def fit_transform(self, bank: Mapping[str, Tensor]) -> dict[str, Tensor]:
        current = dict(bank)
        for bridge in self.bridges:
            current = bridge.fit(current).transform(current)
        return current

    def transform(self, embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]:
        current = dict(embeddings)
        for bridge in self.bridges:
            current = bridge.transform(current)
        return current

    def is_fitted(self) -> bool:
        return all(b.is_fitted() for b in self.bridges if isinstance(b, BaseBridge))

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"bridges": list(self.bridges)}
        if deep:
            for i, b in enumerate(self.bridges):
                if isinstance(b, BaseBridge):
                    out.update({f"{i}__{k}": v for k, v in b.get_params().items()})
        return out

    def set_params(self, **params: Any) -> BridgeChain:
        if "bridges" in params:
            # the constructor again, for its checks of the new list
            self.__init__(params.pop("bridges"))  # type: ignore[misc]
        nested: dict[int, dict[str, Any]] = {}
        for key, value in params.items():
            index, sep, name = key.partition("__")
            if not sep or not index.isdigit() or int(index) >= len(self.bridges):
                raise ModalignError(f"chain: unknown parameter {key!r}; expected 'bridges' or "
                                    f"'<i>__<param>' with i < {len(self.bridges)}")
            nested.setdefault(int(index), {})[name] = value
        for i, values in nested.items():
            # set_params is BaseBridge's, not the Bridge protocol's (AttributeError without it)
            self.bridges[i].set_params(**values)  # type: ignore[attr-defined]
        return self

    # a chain's identity is its members' (a list), where a single bridge has one dict
    def identity(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The members' identities, in order (what result records store)."""
        return [b.identity() for b in self.bridges]

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        members, tensors = [], {}
        for i, b in enumerate(self.bridges):
            if not isinstance(b, BaseBridge):
                raise ModalignError(f"chain: bridges[{i}] ({type(b).__name__}) cannot be saved; "
                                    "expected a BaseBridge")
            description, own = b.state()
            members.append(description)
            tensors.update({f"{i}.{k}": v for k, v in own.items()})
        return {"class": class_key(type(self)), "bridges": members}, tensors

    @classmethod
    def from_state(cls, description: Mapping[str, Any],
                   tensors: Mapping[str, Tensor]) -> BridgeChain:
        members = []
        for i, d in enumerate(description["bridges"]):
            prefix = f"{i}."
            members.append(bridge_from_state(d, {k[len(prefix):]: v for k, v in tensors.items()
                                                 if k.startswith(prefix)}))
        return cls(members)


BRIDGES: dict[str, tuple[type[BaseBridge], dict[str, Any]]] = {
    "centering": (Centering, {}),
    "meanshift": (MeanShift, {}),
    "invgc": (InvGC, {"local_adj": False}),
    "localadj": (InvGC, {"local_adj": True}),
    "close": (CloseNoise, {}),
    "learned": (SavedBridge, {}),
}
"""Bridge names accepted by :func:`build_bridge`, with the class and fixed arguments."""


def build_bridge(spec: str, **context: Any) -> Bridge:
    """Build a bridge from ``"name"`` or ``"name:key=value,key=value"``.

    ``context`` fills arguments the spec leaves out and the bridge accepts (a retrieval task passes
    ``gallery=`` and ``query=``); values in the spec win. Numbers and ``true``/``false`` parse.

    Examples:
        >>> build_bridge("localadj:r_gallery=0.3", gallery="image", query="text").identity()["name"]
        'localadj'
        >>> build_bridge("centering").identity()
        {'name': 'centering', 'renormalize': True}
    """
    name, _, params = spec.partition(":")
    name = name.strip().lower()
    if name not in BRIDGES:
        raise ModalignError(f"bridge {spec!r}: expected one of {', '.join(BRIDGES)}, optionally "
                            "followed by ':key=value,...'")
    cls, fixed = BRIDGES[name]
    accepted = set(cls.param_names())
    kwargs = {k: v for k, v in context.items() if k in accepted}
    for part in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in accepted or key in fixed:
            allowed = ", ".join(sorted(accepted - set(fixed)))
            raise ModalignError(f"bridge {spec!r}: unknown or malformed parameter {part!r}; "
                                f"expected key=value with key in: {allowed}")
        kwargs[key] = parse_value(value)
    return cls(**kwargs, **fixed)


def build_chain(specs: Sequence[str], **context: Any) -> BridgeChain:
    """A :class:`BridgeChain` from several specs (see :func:`build_bridge`).

    Examples:
        >>> [b["name"] for b in build_chain(["centering", "invgc"]).identity()]
        ['centering', 'invgc']
    """
    return BridgeChain(build_bridge(s, **context) for s in specs)


# --------------------------------------------------------------------------------------------
# helpers


def _matches(key: str, modality: str) -> bool:
    return key == modality or key.split(":", 1)[0] == modality


def lookup_key(stats: Mapping[str, Any], key: str, owner: str) -> Any:
    """``stats[key]``, else ``stats[modality of key]``; else a ``ModalignError`` naming ``owner``.

    Examples:
        >>> lookup_key({"image": 1}, "image:noto", "centering")
        1
    """
    if key in stats:
        return stats[key]
    base = key.split(":", 1)[0]
    if base in stats:
        return stats[base]
    raise ModalignError(f"{owner}: nothing for {key!r}; it has {sorted(stats)} "
                        f"(expected {key!r} or {base!r})")


def _check_bank(bank: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if not isinstance(bank, Mapping) or not bank:
        raise ModalignError("bank: expected a non-empty mapping of key -> (n, d) tensor")
    return bank


def _check_matrix(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point() or len(x) == 0:
        raise ModalignError(f"{name}: expected a non-empty 2-D float tensor (n, d), got "
                            f"{getattr(x, 'shape', type(x).__name__)}")
    return x


def _check_pair(gallery: Tensor, bank: Tensor) -> None:
    _check_matrix("gallery", gallery)
    _check_matrix("bank", bank)
    if gallery.shape[1] != bank.shape[1]:
        raise ModalignError(f"gallery dim {gallery.shape[1]} != bank dim {bank.shape[1]}: "
                            "expected embeddings of one joint space")
