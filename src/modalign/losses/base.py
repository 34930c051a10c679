"""What loss modules share: the declarations the trainer reads, and one way to hold a temperature.

Every built-in loss is a :class:`LossModule`. Its class declares what it needs and supports
(:attr:`~LossModule.supports_groups`, :attr:`~LossModule.needs_indices`,
:attr:`~LossModule.needs_dataset_size`, how many modalities it reads, whether it is exact across
processes), so that an :class:`~modalign.losses.objective.Objective` and the trainer ask the loss
instead of knowing loss names.

A temperature is given as tau (``temperature``, with ``learnable_temperature`` and
``temperature_bounds``: the :class:`ScaleOptions` keywords every scaled loss accepts). Inside,
a :class:`ScaledLoss` holds ``log_logit_scale = log(1 / tau)`` (an ``nn.Parameter`` when
learnable, a buffer otherwise), passes ``exp(log_logit_scale)`` to its pure function, and
:meth:`ScaledLoss.clamp_` keeps a learnable one within the bounds after each optimiser step (in
log space, as in CLIP).

Examples:
    >>> import torch
    >>> class MyLoss(ScaledLoss):
    ...     scale_defaults = ScaleOptions(temperature=0.07)
    ...     def compute(self, embeddings, groups, indices):
    ...         x, y = self.select(embeddings)
    ...         return LossOutput(self.logit_scale() * (x * y).sum(1).mean())
    >>> m = MyLoss(["image", "text"], temperature=0.05)
    >>> round(float(m.logit_scale().detach()), 3)
    20.0
    >>> with torch.no_grad():
    ...     _ = m.log_logit_scale.fill_(10.0)
    >>> m.clamp_()  # tau is kept within temperature_bounds = (0.01, 1)
    >>> round(float(m.logit_scale().detach()), 3)
    100.0
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from modalign.distributed.gather import GatherGrad, parse_gather
from modalign.errors import ModalignError
from modalign.losses.output import LossOutput
from modalign.losses.validation import check_modalities

DEFAULT_TEMPERATURE_BOUNDS: tuple[float, float] = (0.01, 1.0)
"""Default range of a learnable temperature: the logit scale stays in [1, 100]."""

DEFAULT_SCALE_BOUNDS: tuple[float, float] = (0.0, math.log(100.0))
""":data:`DEFAULT_TEMPERATURE_BOUNDS` as bounds of ``log_logit_scale``."""

DEPRECATED_SCALE_KEYWORDS: dict[str, str] = {
    "init_logit_scale": "temperature",
    "learnable_scale": "learnable_temperature",
    "scale_bounds": "temperature_bounds",
}
"""Older keyword (log-scale convention) -> today's keyword (temperature convention)."""


def caller_stacklevel() -> int:
    """The ``stacklevel`` of ``warnings.warn`` that points at the first caller outside this
    package's losses and ``torch.nn`` (the user's line), however deep the calls nest."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
            ("modalign.losses", "torch.nn")):
        frame, level = frame.f_back, level + 1
    return level


def log_scale_bounds(temperature_bounds: tuple[float, float]) -> tuple[float, float]:
    """``(log(1/tau_max), log(1/tau_min))``; ``tau_max = inf`` and ``tau_min = 0`` are unbounded.

    Examples:
        >>> log_scale_bounds((0.01, 1.0)) == DEFAULT_SCALE_BOUNDS
        True
        >>> log_scale_bounds((0.0, math.inf))
        (-inf, inf)
    """
    lo, hi = temperature_bounds
    return (math.log(1 / hi) if hi < math.inf else -math.inf,
            math.log(1 / lo) if lo > 0 else math.inf)


@dataclass(frozen=True)
class ScaleOptions:
    """How a loss holds its temperature tau (and an optional logit bias).

    Args:
        temperature: the initial tau > 0; the logits are ``cos / tau``.
        learnable_temperature: learn tau (as ``log(1/tau)``) or keep it fixed.
        temperature_bounds: ``(tau_min, tau_max)`` a learnable tau is clamped to after each step
            (``0`` and ``inf`` leave that side open).
        init_logit_bias: initial additive bias of the logits, or None for no bias.
        learnable_bias: learn the bias or keep it fixed.

    Examples:
        >>> opts = ScaleOptions().updated({"temperature": 0.1, "learnable_temperature": False})
        >>> opts.temperature, opts.learnable_temperature
        (0.1, False)
    """

    temperature: float = 0.07
    learnable_temperature: bool = True
    temperature_bounds: tuple[float, float] = DEFAULT_TEMPERATURE_BOUNDS
    init_logit_bias: float | None = None
    learnable_bias: bool = True

    def __post_init__(self) -> None:
        tau = float(self.temperature)
        if not (math.isfinite(tau) and tau > 0):
            raise ModalignError(f"temperature must be a finite number > 0, got {self.temperature}")
        bounds = self.temperature_bounds
        if (isinstance(bounds, (str, bytes)) or not isinstance(bounds, Sequence)
                or len(bounds) != 2):
            raise ModalignError(f"temperature_bounds must be (tau_min, tau_max), got {bounds!r}")
        lo, hi = float(bounds[0]), float(bounds[1])
        if not (0 <= lo <= hi) or math.isnan(hi):
            raise ModalignError(
                f"temperature_bounds must be (tau_min, tau_max) with 0 <= tau_min <= tau_max, "
                f"got {bounds!r}")
        bias = self.init_logit_bias
        if bias is not None and not math.isfinite(float(bias)):
            raise ModalignError(f"init_logit_bias must be finite, got {bias}")
        object.__setattr__(self, "temperature", tau)
        object.__setattr__(self, "temperature_bounds", (lo, hi))

    def log_scale(self) -> float:
        """``log(1 / temperature)``: the initial value of ``log_logit_scale``."""
        return math.log(1 / self.temperature)

    def updated(self, params: Mapping[str, Any]) -> ScaleOptions:
        """These options with ``params`` applied; the older log-scale keywords are read with a
        ``FutureWarning`` naming today's keyword. Unknown keys raise ``ModalignError``."""
        changes = dict(params)
        for old, new in DEPRECATED_SCALE_KEYWORDS.items():
            if old not in changes:
                continue
            if new in changes:
                raise ModalignError(f"give {new!r} only ({old!r} is its older spelling)")
            warnings.warn(f"{old!r} is deprecated; use {new!r} ({_HOW[old]})", FutureWarning,
                          stacklevel=caller_stacklevel())
            changes[new] = _FROM_OLD[old](changes.pop(old))
        unknown = sorted(set(changes) - set(SCALE_KEYWORDS))
        if unknown:
            raise ModalignError(f"unknown scale parameters {unknown}; expected {SCALE_KEYWORDS}")
        return dataclasses.replace(self, **changes)


SCALE_KEYWORDS: list[str] = [f.name for f in dataclasses.fields(ScaleOptions)]
"""The keywords of :class:`ScaleOptions`, accepted by every scaled loss."""

_HOW = {
    "init_logit_scale": "temperature = exp(-init_logit_scale)",
    "learnable_scale": "the same boolean",
    "scale_bounds": "temperature_bounds = (exp(-max), exp(-min))",
}
_FROM_OLD: dict[str, Any] = {
    "init_logit_scale": lambda v: math.exp(-float(v)),
    "learnable_scale": bool,
    "scale_bounds": lambda b: (math.exp(-float(b[1])), math.exp(-float(b[0]))),
}


def as_modalities(
    modalities: Sequence[str], n: int | None = None, *, name: str = "modalities"
) -> tuple[str, ...]:
    """Validate modality names: distinct non-empty strings, exactly ``n`` of them if given."""
    if isinstance(modalities, str) or not isinstance(modalities, Sequence):
        raise ValueError(f"{name} must be a sequence of modality names, got {modalities!r}")
    mods = tuple(modalities)
    if not all(isinstance(m, str) and m for m in mods):
        raise ValueError(f"{name} must hold non-empty strings, got {mods!r}")
    if len(set(mods)) != len(mods):
        raise ValueError(f"{name} must be distinct, got {mods!r}")
    if n is not None and len(mods) != n:
        raise ValueError(f"{name} must name exactly {n} modalities, got {mods!r}")
    return mods


def select_modalities(embeddings: Mapping[str, Tensor], modalities: Sequence[str]) -> list[Tensor]:
    """The tensors of ``modalities`` in order (ValueError naming the missing keys otherwise)."""
    check_modalities("embeddings", embeddings, modalities)
    return [embeddings[m] for m in modalities]


class LossModule(nn.Module):
    """Base class of the loss modules: declared modalities, declared needs, one ``forward``.

    ``forward(embeddings, *, groups=None, indices=None)`` checks the call against the class's
    declarations and returns :meth:`compute`'s :class:`LossOutput`. Constructor keywords beyond a
    subclass's own: ``gather`` (for a :attr:`distributed` loss) and the :class:`ScaleOptions`
    keywords (when :attr:`scale_defaults` is set).

    Declarations (class attributes; an instance may narrow them, as ``pairwise`` does):
        supports_groups: uses ``groups`` (rows sharing an id are positives); a loss that does not
            refuses them rather than ignoring them.
        needs_indices: needs the dataset index of every row (per-sample state).
        needs_dataset_size: its constructor needs ``dataset_size`` (the trainer passes it).
        min_modalities, max_modalities: how many embedding keys it reads (None: no maximum).
        distributed: with a multi-rank process group, the mean over ranks of its loss equals the
            single-process loss on the concatenated batch (and its gradients match).

    Also: :attr:`scale_defaults` (the loss holds a temperature), :attr:`older_keywords`
    (deprecated constructor keywords it still reads), :attr:`open_parameters` (its ``**params``
    go to another loss, checked when that one is built).
    """

    supports_groups: bool = False
    needs_indices: bool = False
    needs_dataset_size: bool = False
    min_modalities: int = 2
    max_modalities: int | None = 2
    distributed: bool = False
    scale_defaults: ClassVar[ScaleOptions | None] = None
    older_keywords: ClassVar[tuple[str, ...]] = ()
    open_parameters: ClassVar[bool] = False

    gather: GatherGrad | None
    scale_options: ScaleOptions

    def __init__(self, modalities: Sequence[str], **options: Any) -> None:
        super().__init__()
        mods = as_modalities(modalities)
        lo, hi = self.min_modalities, self.max_modalities
        if len(mods) < lo or (hi is not None and len(mods) > hi):
            count = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else \
                f"{lo} to {hi}"
            raise ValueError(f"modalities must name {count} embedding keys, got {list(mods)}")
        self.modalities = mods
        if self.distributed:
            self.gather = parse_gather(options.pop("gather", GatherGrad.GLOBAL))
        if self.scale_defaults is not None:
            scale = {k: options.pop(k) for k in [*SCALE_KEYWORDS, *DEPRECATED_SCALE_KEYWORDS]
                     if k in options}
            self.scale_options = self.scale_defaults.updated(scale)
        if options:
            raise ModalignError(f"{type(self).__name__}: unknown parameters {sorted(options)}; "
                                f"expected {self.parameter_names()}")

    @classmethod
    def parameter_names(cls, older: bool = False) -> list[str]:
        """Every constructor keyword besides ``modalities`` (for config checks and messages);
        ``older`` adds the deprecated ones still read."""
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is nn.Module or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self":
                    names.add(p.name)
        names.discard("modalities")
        if cls.distributed:
            names.add("gather")
        if cls.scale_defaults is not None:
            names.update(SCALE_KEYWORDS)
            if older:
                names.update(DEPRECATED_SCALE_KEYWORDS)
        if older:
            names.update(cls.older_keywords)
        return sorted(names)

    def check_call(self, groups: Tensor | None, indices: Tensor | None) -> None:
        """Refuse ``groups`` this loss would ignore (ModalignError naming the loss)."""
        if groups is not None and not self.supports_groups:
            raise ModalignError(
                f"{type(self).__name__}{list(self.modalities)} does not use groups (shared "
                "positives); call it without groups, or use a loss that supports them")

    def forward(
        self,
        embeddings: Mapping[str, Tensor],
        *,
        groups: Tensor | None = None,
        indices: Tensor | None = None,
    ) -> LossOutput:
        self.check_call(groups, indices)
        return self.compute(embeddings, groups, indices)

    def compute(
        self, embeddings: Mapping[str, Tensor], groups: Tensor | None, indices: Tensor | None
    ) -> LossOutput:
        """The loss of one batch (``forward`` has checked the call against the declarations)."""
        raise NotImplementedError

    def select(self, embeddings: Mapping[str, Tensor]) -> list[Tensor]:
        """This loss's tensors in declared order (ValueError if a modality is missing)."""
        return select_modalities(embeddings, self.modalities)

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}"


class ScaledLoss(LossModule):
    """A :class:`LossModule` that owns a temperature as ``log_logit_scale`` (and maybe a bias).

    Subclasses set :attr:`scale_defaults`; users override it with the :class:`ScaleOptions`
    keywords. A fixed temperature is a buffer that :meth:`clamp_` leaves alone. State dicts
    written before a fixed temperature was stored (Mod-X) still load: the missing buffer keeps
    the configured value.
    """

    scale_defaults: ClassVar[ScaleOptions | None] = ScaleOptions()

    log_logit_scale: Tensor
    logit_bias: Tensor | None

    def __init__(self, modalities: Sequence[str], **options: Any) -> None:
        super().__init__(modalities, **options)
        opts = self.scale_options
        self.scale_bounds = log_scale_bounds(opts.temperature_bounds)
        scale = torch.tensor(opts.log_scale(), dtype=torch.float32)
        if opts.learnable_temperature:
            self.log_logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_logit_scale", scale)
        if opts.init_logit_bias is None:
            self.logit_bias = None
        else:
            bias = torch.tensor(float(opts.init_logit_bias), dtype=torch.float32)
            if opts.learnable_bias:
                self.logit_bias = nn.Parameter(bias)
            else:
                self.register_buffer("logit_bias", bias)

    def logit_scale(self) -> Tensor:
        """The logit scale ``exp(log_logit_scale)`` (1 / temperature)."""
        return self.log_logit_scale.exp()

    def temperature(self) -> float:
        """The current temperature tau = ``exp(-log_logit_scale)``."""
        return float(torch.exp(-self.log_logit_scale.detach()))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp a learnable ``log_logit_scale`` in place to the temperature bounds."""
        if isinstance(self.log_logit_scale, nn.Parameter):
            self.log_logit_scale.clamp_(*self.scale_bounds)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "log_logit_scale"
        if key not in state_dict and not isinstance(self.log_logit_scale, nn.Parameter):
            state_dict[key] = self.log_logit_scale.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args)
