"""The modality-inversion loop: optimise pseudo-tokens so a tower's output matches a target.

OTI (image -> text) and OVI (text -> image) are the same optimisation with a different tower
forward: ``R`` (or ``P``) free token vectors per sample go in at the tower's token layer, the tower
and an optional projection head map them into the joint space, and AdamW minimises
``sum_i (1 - cos(f(tokens_i), target_i))``. The loss is a *sum* over samples, so a sample's
gradient, and with Adam's element-wise update its whole trajectory, does not depend on which other
samples share its batch. Each sample's initial tokens are drawn from its own seeded generator,
keyed by ``(seed, key)``, so a sample inverted alone equals the same sample inverted in any batch.

Precision: the optimisation runs in full precision, or under fp16 autocast with a gradient scaler
(the official code's choice on CUDA; an overflow skips the step for the whole batch, as there), or
under bf16 autocast (no scaler). Whatever the optimisation precision, the returned features are
recomputed from the final tokens in the targets' dtype with autocast off, as the official
evaluation re-encodes its saved tokens in fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.errors import ModalignError

PRECISIONS = ("fp32", "fp16", "bf16")
_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(precision: str) -> None:
    """Raise :class:`~modalign.errors.ModalignError` unless ``precision`` is one of
    :data:`PRECISIONS`.

    Examples:
        >>> check_precision("bf16")
    """
    if precision not in PRECISIONS:
        raise ModalignError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")


@runtime_checkable
class InversionForward(Protocol):
    """A tower run from pseudo-tokens at its token layer.

    Attributes:
        modality: the modality of the features it returns (``"text"`` for OTI).
        num_tokens: pseudo-tokens per sample (``R`` for OTI, ``P`` for OVI).
        token_dim: width of one pseudo-token (the tower's token-embedding width).

    ``__call__(tokens)`` maps ``(batch, num_tokens, token_dim)`` to features ``(batch, dim)``
    (not normalised), differentiably in ``tokens``. ``identity()`` describes the forward for cache
    keys and manifests.
    """

    @property
    def modality(self) -> str: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def token_dim(self) -> int: ...

    def __call__(self, tokens: Tensor) -> Tensor: ...

    def identity(self) -> dict[str, Any]: ...


@dataclass
class ProjectedForward:
    """An :class:`InversionForward` followed by a projection head into the joint space.

    Examples:
        >>> import torch
        >>> class Mean:
        ...     modality, num_tokens, token_dim = "text", 1, 4
        ...     def __call__(self, tokens): return tokens.mean(1)
        ...     def identity(self): return {"kind": "mean"}
        >>> fwd = ProjectedForward(Mean(), torch.nn.Linear(4, 2))
        >>> fwd(torch.zeros(3, 1, 4)).shape
        torch.Size([3, 2])
    """

    base: InversionForward
    head: Callable[[Tensor], Tensor]
    head_name: str = "head"

    @property
    def modality(self) -> str:
        return self.base.modality

    @property
    def num_tokens(self) -> int:
        return self.base.num_tokens

    @property
    def token_dim(self) -> int:
        return self.base.token_dim

    def __call__(self, tokens: Tensor) -> Tensor:
        return self.head(self.base(tokens))

    def identity(self) -> dict[str, Any]:
        return {**self.base.identity(), "head": self.head_name}


class AttentionParts(Protocol):
    """What the inversion forwards read of a transformers CLIP/SigLIP self-attention module.

    The towers are read by attribute (their classes differ across transformers versions), so
    these protocols name the parts used rather than a library class.
    """

    num_heads: int
    head_dim: int
    scale: float
    q_proj: Callable[[Tensor], Tensor]
    k_proj: Callable[[Tensor], Tensor]
    v_proj: Callable[[Tensor], Tensor]
    out_proj: Callable[[Tensor], Tensor]


class PreNormLayer(Protocol):
    """A pre-LN transformers encoder layer (``CLIPEncoderLayer`` or one laid out alike)."""

    self_attn: AttentionParts
    layer_norm1: Callable[[Tensor], Tensor]
    layer_norm2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class InversionSettings:
    """Knobs of the optimisation; the defaults are the official OTI ones (OVI uses 1000 steps).

    Attributes:
        steps: optimisation steps; the last iterate is kept (no early stopping).
        lr: AdamW learning rate (constant, no schedule).
        weight_decay: AdamW decoupled weight decay.
        betas: AdamW betas.
        eps: AdamW epsilon.
        init_std: pseudo-tokens start from ``normal(0, init_std)``.
        seed: base seed; each sample's initial tokens come from ``(seed, key)``.
        batch_size: samples optimised together (independent problems stacked in one tensor).
        precision: ``"fp32"`` (no autocast), ``"fp16"`` (autocast with a gradient scaler, as the
            official code on CUDA) or ``"bf16"`` (autocast, no scaler), on the targets' device.
            The returned features are recomputed in full precision either way.

    Examples:
        >>> InversionSettings(steps=1000).steps
        1000
    """

    steps: int = 150
    lr: float = 2e-2
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    init_std: float = 0.02
    seed: int = 0
    batch_size: int = 64
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data (for manifests and cache keys)."""
        return {"steps": self.steps, "lr": self.lr, "weight_decay": self.weight_decay,
                "betas": list(self.betas), "eps": self.eps, "init_std": self.init_std,
                "seed": self.seed, "precision": self.precision}


@dataclass
class InversionResult:
    """What :func:`invert` returns.

    Attributes:
        features: ``(n, dim)`` L2-normalised features of the final pseudo-tokens.
        tokens: ``(n, num_tokens, token_dim)`` final pseudo-tokens.
        final_cosine: ``(n,)`` cosine between each final feature and its target.
        loss_curve: ``(steps,)`` mean over samples of ``1 - cos`` before each update.
    """

    features: Tensor
    tokens: Tensor
    final_cosine: Tensor
    loss_curve: Tensor = field(default_factory=lambda: torch.zeros(0))


def sample_seed(seed: int, key: str | int) -> int:
    """A 63-bit seed derived from ``(seed, key)``: the same sample always starts the same way.

    Examples:
        >>> sample_seed(0, "a") == sample_seed(0, "a") != sample_seed(1, "a")
        True
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_tokens(keys: Sequence[str | int], num_tokens: int, token_dim: int, *, seed: int,
                   std: float, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> Tensor:
    """Per-sample ``normal(0, std)`` initial pseudo-tokens, each from its own generator.

    The draw is made in float32 on the CPU and then cast, so it is the same for every dtype and
    device.

    Examples:
        >>> a = initial_tokens(["x", "y"], 1, 4, seed=0, std=0.02)
        >>> bool((initial_tokens(["y"], 1, 4, seed=0, std=0.02)[0] == a[1]).all())
        True
    """
    out = torch.empty(len(keys), num_tokens, token_dim)
    for i, key in enumerate(keys):
        gen = torch.Generator().manual_seed(sample_seed(seed, key))
        out[i].normal_(0.0, std, generator=gen)
    return out.to(dtype=dtype, device=device)


def cache_key(module: torch.nn.Module, dtype: torch.dtype,
              device: torch.device | str) -> tuple[Any, ...]:
    """Key for values computed once from ``module``'s weights (template embeddings, a prefix).

    It changes when a weight is replaced or modified in place (tensor versions), and with the
    autocast state of ``device``, so a cache built under autocast or before a weight change is
    never reused.

    Examples:
        >>> lin = torch.nn.Linear(2, 2)
        >>> k = cache_key(lin, torch.float32, "cpu")
        >>> with torch.no_grad():
        ...     _ = lin.weight.mul_(2)
        >>> k == cache_key(lin, torch.float32, "cpu")
        False
    """
    kind = torch.device(device).type
    amp = torch.is_autocast_enabled(kind)
    weights = tuple((id(p), p.data_ptr(), p._version, p.dtype) for p in module.parameters())
    return (dtype, str(device), amp, torch.get_autocast_dtype(kind) if amp else None, weights)


def cosine_loss(features: Tensor, targets: Tensor) -> Tensor:
    """Per-sample ``1 - cos(features_i, targets_i)`` (both sides L2-normalised)."""
    return 1.0 - (F.normalize(features, dim=-1) * F.normalize(targets, dim=-1)).sum(-1)


def invert(
    targets: Tensor,
    forward: InversionForward,
    settings: InversionSettings | None = None,
    *,
    keys: Sequence[str | int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> InversionResult:
    """Invert ``targets`` through ``forward``: find pseudo-tokens whose features match them.

    Args:
        targets: ``(n, dim)`` target features of the other modality (normalised inside).
        forward: a tower run from pseudo-tokens (wrap it in :class:`ProjectedForward` to reach
            a trained joint space). Its parameters are not updated and get no gradients.
        settings: optimisation knobs; ``InversionSettings()`` (the official OTI defaults) if None.
        keys: one key per sample (e.g. item ids) seeding its initial tokens; default ``0..n-1``.
            Equal keys and settings give equal results whatever the batch.
        progress: called with the number of samples finished after each batch.

    Returns:
        :class:`InversionResult` in the dtype and device of ``targets``.

    Examples:
        >>> import torch
        >>> class Linear:
        ...     modality, num_tokens, token_dim = "text", 1, 3
        ...     def __call__(self, tokens): return tokens[:, 0] @ torch.eye(3)
        ...     def identity(self): return {"kind": "linear"}
        >>> res = invert(torch.eye(3), Linear(), InversionSettings(steps=100, lr=0.1))
        >>> bool(res.final_cosine.min() > 0.99)
        True
    """
    settings = settings or InversionSettings()
    if targets.ndim != 2 or targets.shape[0] == 0:
        raise ValueError(f"targets must be a non-empty (n, dim) tensor, got shape "
                         f"{tuple(targets.shape)}")
    if not targets.is_floating_point():
        raise ValueError(f"targets must be a floating-point tensor, got {targets.dtype}")
    n = targets.shape[0]
    keys = list(range(n)) if keys is None else list(keys)
    if len(keys) != n:
        raise ValueError(f"keys must have one entry per target ({n}), got {len(keys)}")
    check_forward(forward)

    with frozen_weights(forward):
        return _invert_all(targets, keys, forward, settings, progress)


def _invert_all(targets: Tensor, keys: list[str | int], forward: InversionForward,
                settings: InversionSettings, progress: Callable[[int], None] | None
                ) -> InversionResult:
    n = targets.shape[0]
    features, tokens, cosines = [], [], []
    curve = torch.zeros(settings.steps, dtype=torch.float64)
    for start in range(0, n, settings.batch_size):
        stop = min(start + settings.batch_size, n)
        batch = _invert_batch(targets[start:stop], keys[start:stop], forward, settings)
        features.append(batch.features)
        tokens.append(batch.tokens)
        cosines.append(batch.final_cosine)
        curve += batch.loss_curve * (stop - start)
        if progress is not None:
            progress(stop - start)
    return InversionResult(torch.cat(features), torch.cat(tokens), torch.cat(cosines),
                           (curve / n).to(targets.dtype))


def tower_parameters(forward: object, depth: int = 4) -> list[torch.nn.Parameter]:
    """The parameters of the modules ``forward`` runs: modules held in its attributes, in
    wrapped forwards and in the closures of its callables (``depth`` levels deep).

    Examples:
        >>> head = torch.nn.Linear(4, 2)
        >>> fwd = ProjectedForward(lambda t: t.mean(1), head)
        >>> [tuple(p.shape) for p in tower_parameters(fwd)]
        [(2, 4), (2,)]
    """
    seen: dict[int, torch.nn.Parameter] = {}
    visited: set[int] = set()

    def visit(obj: object, level: int) -> None:
        if level < 0 or id(obj) in visited:
            return
        visited.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                seen.setdefault(id(p), p)
            return
        if isinstance(obj, (str, bytes, int, float, bool, Tensor)) or obj is None:
            return
        closure = getattr(obj, "__closure__", None)
        for cell in closure or ():
            with contextlib.suppress(ValueError):  # an empty cell
                visit(cell.cell_contents, level - 1)
        bound = getattr(obj, "__self__", None)
        if bound is not None:
            visit(bound, level - 1)
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, level - 1)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item, level - 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for item in vars(obj).values():
                visit(item, level - 1)

    visit(forward, depth)
    return list(seen.values())


@contextlib.contextmanager
def frozen_weights(forward: object) -> Iterator[None]:
    """Turn off ``requires_grad`` of the tower's weights while inverting, then restore it.

    Only the pseudo-tokens need gradients: with the weights frozen, autograd neither computes
    nor keeps anything for them (no weight gradients, no saved inputs for them).
    """
    params = [p for p in tower_parameters(forward) if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def check_forward(forward: object) -> InversionForward:
    """Return ``forward`` if it follows :class:`InversionForward`, else raise ``ValueError``."""
    missing = [a for a in ("modality", "num_tokens", "token_dim", "identity")
               if not hasattr(forward, a)]
    if missing or not callable(forward):
        raise ValueError(f"forward must be an InversionForward (callable with modality, "
                         f"num_tokens, token_dim, identity()); {type(forward).__name__} lacks "
                         f"{', '.join(missing) or '__call__'}")
    return forward  # type: ignore[return-value]


def _adamw_kernel(tokens: Tensor) -> dict[str, bool]:
    """AdamW's fused kernel where torch has one for these tokens, else the foreach one."""
    fused_types = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if tokens.dtype in fused_types and tokens.device.type in ("cpu", "cuda", "mps", "xpu"):
        return {"fused": True}
    return {"foreach": True}


def _invert_batch(targets: Tensor, keys: Sequence[str | int], forward: InversionForward,
                  settings: InversionSettings) -> InversionResult:
    targets = F.normalize(targets.detach(), dim=-1)
    init = initial_tokens(keys, forward.num_tokens, forward.token_dim, seed=settings.seed,
                          std=settings.init_std, dtype=targets.dtype, device=targets.device)
    tokens = torch.nn.Parameter(init)
    optimizer = torch.optim.AdamW([tokens], lr=settings.lr, betas=settings.betas,
                                  eps=settings.eps, weight_decay=settings.weight_decay,
                                  **_adamw_kernel(tokens))
    curve = torch.zeros(settings.steps, dtype=torch.float64)
    kind = targets.device.type
    amp = settings.precision != "fp32"
    scaler = torch.amp.GradScaler(kind) if settings.precision == "fp16" else None
    for step in range(settings.steps):
        with torch.enable_grad(), torch.autocast(kind, dtype=_AMP_DTYPES.get(settings.precision),
                                                 enabled=amp):
            per_sample = cosine_loss(forward(tokens).to(targets.dtype), targets)
            # A sum, not a mean: each sample's gradient is independent of the batch size.
            loss = per_sample.sum()
            (grad,) = torch.autograd.grad(scaler.scale(loss) if scaler else loss, [tokens])
        # The fused AdamW kernel reads the gradient with the tokens' strides: a tower that reads
        # the tokens in another layout hands back a gradient laid out otherwise.
        tokens.grad = grad.contiguous()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        curve[step] = per_sample.detach().double().mean()
    # The stored features: full precision, autocast off (also any autocast of the caller).
    with torch.no_grad(), torch.autocast(kind, enabled=False):
        features = F.normalize(forward(tokens.detach()), dim=-1).to(targets.dtype)
    final = tokens.detach().clone()
    return InversionResult(features, final, (features * targets).sum(-1), curve)
