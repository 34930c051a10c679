"""The N-tower model: one tower and one trainable head per modality into a shared joint space.

A tower (``modalign.encoders``) maps raw inputs of one modality to features; a head (linear or a
small MLP) maps those features to the joint space, where embeddings are L2-normalised. With frozen
towers (the default, LiT-style) only the heads are trained, on features read from an embedding
store; :meth:`MultiTowerModel.encode` loads a tower lazily when raw inputs need encoding.

A trained model is a folder: ``config.json`` (the :class:`ModelConfig`, the tower references and
the package version) and ``model.safetensors`` (the heads, the logit scale and any fine-tuned tower
weights under ``towers.<modality>.``).
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from modalign import __version__
from modalign.checks import check_choice, check_int
from modalign.encoders.base import Encoder, check_encoder
from modalign.errors import ModalignError, ProtocolError
from modalign.io import (
    atomic_path,
    check_format_version,
    read_json,
    read_safetensors,
    write_json_atomic,
)

HeadKind = Literal["linear", "mlp"]
HeadInit = Literal["xavier", "cone"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2
"""The model folder's layout version: 2 names the scale by ``temperature``; folders of version 1
(``logit_scale_init``) and 0 (no version key) are migrated on load by :meth:`ModelConfig.from_dict`,
and an older modalign refuses a version-2 folder asking for an upgrade."""
_HEAD_KINDS = ("linear", "mlp")
_HEAD_INITS = ("xavier", "cone")


def base_modality(key: str) -> str:
    """The modality of an embedding key: ``"image:openmoji"`` -> ``"image"``.

    Keys name a modality and optionally a view; every view of a modality shares its head.

    Examples:
        >>> base_modality("image:openmoji"), base_modality("text")
        ('image', 'text')
    """
    if not isinstance(key, str) or not key or key.startswith(":"):
        raise ValueError(f"modality={key!r} is not a modality key; expected 'NAME' or 'NAME:VIEW'")
    return key.split(":", 1)[0]


@dataclass(kw_only=True)
class HeadSettings:
    """The heads on the towers and the initial temperature: the fields that
    :class:`ModelConfig` and the ``[model]`` section of a training config share (keyword-only;
    see :class:`ModelConfig` for their meaning).

    Examples:
        >>> HeadSettings(head="mlp").hidden_dim
        512
    """

    joint_dim: int = 256
    head: HeadKind = "linear"
    head_depth: int = 2
    hidden_dim: int = 512
    head_init: HeadInit = "xavier"
    cone_offset: float = 1.0
    input_norm: Literal["l2", "none"] = "l2"
    center_features: bool = True
    temperature: float = 0.07


@dataclass
class ModelConfig(HeadSettings):
    """Everything needed to rebuild a :class:`MultiTowerModel` (saved as ``config.json``).

    ``towers`` and ``feature_dims`` may be given by position; the head fields (``joint_dim`` to
    ``temperature``, from :class:`HeadSettings`) by keyword.

    Attributes:
        towers: encoder spec per modality, e.g. ``{"image": "effnet-lite0", "text": "minilm"}``
            (any spec ``modalign.encoders.load_encoder`` accepts).
        feature_dims: the tower output dim per modality (the head's input size).
        joint_dim: size of the shared space.
        head: ``"linear"`` (one affine map) or ``"mlp"`` (``head_depth`` linear layers with GELU).
        head_depth: number of linear layers of an ``"mlp"`` head (at least 2).
        hidden_dim: width of the hidden layers of an ``"mlp"`` head.
        head_init: ``"xavier"`` (Xavier-uniform weights, zero biases: embeddings start spread
            around the origin) or ``"cone"`` (PyTorch's default uniform init, ReLU activations and
            a random final bias of norm ``cone_offset``: each modality starts in its own narrow
            cone, the initial modality gap of randomly initialised networks).
        cone_offset: norm of the random final bias of a ``"cone"`` head.
        input_norm: ``"l2"`` normalises tower features before the head; ``"none"`` keeps them.
        center_features: subtract a per-modality feature mean (a buffer the trainer fills from the
            training split) before the head.
        temperature: initial temperature tau of the model's scale ``log_logit_scale = log(1/tau)``;
            CLIP uses 0.07. (``logit_scale_init = 1/tau``, the older linear-scale key, is read
            with a ``FutureWarning``.)
        learnable_temperature: whether that scale (and the bias) is a trained parameter
            (``learn_logit_scale`` is its older name).
        logit_bias_init: initial logit bias (SigLIP-style), or ``None`` for no bias.
        trainable_towers: modalities whose tower weights are part of the model (partly unfrozen
            towers); their weights are saved with the heads.
        lora: modality -> LoRA settings (``modalign.encoders.lora.LoraSettings`` fields) of
            towers trained with adapters; the adapters are re-applied on load.

    Examples:
        >>> cfg = ModelConfig(towers={"image": "effnet-lite0", "text": "minilm"},
        ...                   feature_dims={"image": 1280, "text": 384}, joint_dim=128)
        >>> ModelConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    towers: dict[str, str]
    feature_dims: dict[str, int]
    learnable_temperature: bool = True
    logit_bias_init: float | None = None
    trainable_towers: list[str] = field(default_factory=list)
    lora: dict[str, dict[str, Any]] = field(default_factory=dict)
    logit_scale_init: InitVar[float | None] = None
    learn_logit_scale: InitVar[bool | None] = None

    def __post_init__(self, logit_scale_init: float | None, learn_logit_scale: bool | None
                      ) -> None:
        if logit_scale_init is not None:
            warnings.warn("ModelConfig: logit_scale_init is deprecated; use temperature "
                          "(= 1 / logit_scale_init)", FutureWarning, stacklevel=3)
            if not (logit_scale_init > 0 and math.isfinite(logit_scale_init)):
                raise ValueError(f"logit_scale_init must be a positive finite number (the "
                                 f"scale, not its log), got {logit_scale_init!r}")
            self.temperature = 1 / logit_scale_init
        if learn_logit_scale is not None:
            warnings.warn("ModelConfig: learn_logit_scale is deprecated; use "
                          "learnable_temperature", FutureWarning, stacklevel=3)
            self.learnable_temperature = bool(learn_logit_scale)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        if not isinstance(self.towers, Mapping) or not self.towers:
            raise ValueError("towers must map each modality to an encoder spec, e.g. "
                             "{'image': 'effnet-lite0', 'text': 'minilm'}")
        for m, spec in self.towers.items():
            if ":" in m or not m:
                raise ValueError(f"towers key {m!r} must be a bare modality name (no ':VIEW')")
            if not isinstance(spec, str) or not spec:
                raise ValueError(f"towers[{m!r}] must be an encoder spec string, got {spec!r}")
        if set(self.feature_dims) != set(self.towers):
            raise ValueError(f"feature_dims must have one entry per tower {sorted(self.towers)}, "
                             f"got {sorted(self.feature_dims)}")
        for m, d in self.feature_dims.items():
            check_int(f"feature_dims[{m!r}]", d)
        check_int("joint_dim", self.joint_dim)
        check_choice("head", self.head, _HEAD_KINDS)
        if self.head == "mlp":
            check_int("head_depth", self.head_depth, minimum=2, context=" for an mlp head")
        check_int("hidden_dim", self.hidden_dim)
        check_choice("head_init", self.head_init, _HEAD_INITS)
        check_choice("input_norm", self.input_norm, ("l2", "none"))
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive finite number, "
                             f"got {self.temperature!r}")
        if not set(self.lora) <= set(self.trainable_towers):
            raise ValueError(f"lora {sorted(self.lora)} must be among trainable_towers "
                             f"{sorted(self.trainable_towers)}")
        unknown = sorted(set(self.trainable_towers) - set(self.towers))
        if unknown:
            raise ValueError(f"trainable_towers {unknown} are not among towers "
                             f"{sorted(self.towers)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys raise ``ValueError`` listing the accepted ones. The
        ``logit_scale_init`` and ``learn_logit_scale`` of earlier model folders are read as
        ``temperature = 1 / logit_scale_init`` and ``learnable_temperature``."""
        d = dict(d)
        if "logit_scale_init" in d and "temperature" not in d:
            scale = float(d.pop("logit_scale_init"))
            d["temperature"] = 1 / scale if scale > 0 else scale  # <= 0: refused by validate
        if "learn_logit_scale" in d and "learnable_temperature" not in d:
            d["learnable_temperature"] = bool(d.pop("learn_logit_scale"))
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"model config has unknown keys {unknown}; expected some of "
                             f"{sorted(names)}")
        d = dict(d)
        if "towers" in d:
            d["towers"] = dict(d["towers"])
        if "feature_dims" in d:
            d["feature_dims"] = {k: int(v) for k, v in dict(d["feature_dims"]).items()}
        if "trainable_towers" in d:
            d["trainable_towers"] = list(d["trainable_towers"])
        return cls(**d)


class ProjectionHead(nn.Module):
    """Tower features -> joint space (not yet normalised): optional L2 + centering, then the layers.

    Examples:
        >>> head = ProjectionHead(8, 4)
        >>> head(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    center: torch.Tensor  # a buffer: the feature mean subtracted before the layers

    def __init__(self, in_dim: int, out_dim: int, *, kind: HeadKind = "linear", depth: int = 2,
                 hidden_dim: int = 512, init: HeadInit = "xavier", cone_offset: float = 1.0,
                 input_norm: str = "l2") -> None:
        super().__init__()
        self.input_norm = input_norm
        self.register_buffer("center", torch.zeros(in_dim))
        if kind == "linear":
            dims = [in_dim, out_dim]
        else:
            dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
        activation = nn.ReLU if init == "cone" else nn.GELU
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            if i > 0:
                layers.append(activation())
            layers.append(nn.Linear(a, b))
        self.layers = nn.Sequential(*layers)
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        if init == "xavier":
            for lin in linears:
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
        else:  # "cone": keep PyTorch's default init and push the output off the origin
            with torch.no_grad():
                direction = torch.randn(out_dim)
                linears[-1].bias.add_(cone_offset * direction / direction.norm())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        if self.input_norm == "l2":
            x = F.normalize(x, dim=-1)
        return self.layers(x - self.center)


class MultiTowerModel(nn.Module):
    """N towers (one per modality) with trainable heads into a shared, L2-normalised space.

    ``project(key, features)`` applies the head of ``base_modality(key)`` to tower features;
    ``encode(key, inputs)`` runs the tower too (loaded on first use). ``log_logit_scale`` is the
    log of the scale used to score the joint space; in training it is the objective's first
    temperature itself (:meth:`use_scale`), so the model always holds the trained value.

    Examples:
        >>> cfg = ModelConfig(towers={"image": "effnet-lite0", "text": "minilm"},
        ...                   feature_dims={"image": 6, "text": 4}, joint_dim=3)
        >>> model = MultiTowerModel(cfg)
        >>> z = model.project("image:noto", torch.randn(2, 6))
        >>> z.shape, torch.allclose(z.norm(dim=-1), torch.ones(2))
        (torch.Size([2, 3]), True)
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.heads = nn.ModuleDict({
            m: ProjectionHead(config.feature_dims[m], config.joint_dim, kind=config.head,
                              depth=config.head_depth, hidden_dim=config.hidden_dim,
                              init=config.head_init, cone_offset=config.cone_offset,
                              input_norm=config.input_norm)
            for m in sorted(config.towers)
        })
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.temperature)),
                                            requires_grad=config.learnable_temperature)
        if config.logit_bias_init is None:
            self.logit_bias: nn.Parameter | None = None
        else:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init)),
                                           requires_grad=config.learnable_temperature)
        # Towers are loaded lazily; trainable ones are registered as submodules so that their
        # weights are trained and saved with the heads.
        self.towers = nn.ModuleDict()
        self._frozen_towers: dict[str, Encoder] = {}

    @property
    def modalities(self) -> list[str]:
        """The modalities this model has heads for (sorted)."""
        return list(self.heads)

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(log_logit_scale)``, the multiplier of cosine similarities."""
        return self.log_logit_scale.exp()

    def head_for(self, key: str) -> ProjectionHead:
        """The head that projects embeddings of ``key`` (``"image"`` or ``"image:VIEW"``)."""
        m = base_modality(key)
        if m not in self.heads:
            raise ValueError(f"modality={key!r} has no head; this model has {self.modalities}")
        return self.heads[m]  # type: ignore[return-value]

    def project(self, key: str, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Map tower features ``(batch, feature_dim)`` of ``key`` to unit joint embeddings.

        Gradients flow (this is what training calls); wrap in ``torch.no_grad()`` for inference,
        or use :meth:`project_array` for large arrays.
        """
        head = self.head_for(key)
        x = torch.as_tensor(np.asarray(features) if isinstance(features, np.ndarray) else features)
        expected = self.config.feature_dims[base_modality(key)]
        if x.ndim != 2 or x.shape[1] != expected:
            raise ValueError(f"features for {key!r} must have shape (batch, {expected}), "
                             f"got {tuple(x.shape)}")
        x = x.to(dtype=head.center.dtype, device=head.center.device)
        return F.normalize(head(x), dim=-1)

    def forward(self, features: Mapping[str, torch.Tensor],
                raw: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Joint embeddings per key: ``features`` are projected; ``raw`` batches (already
        preprocessed) are first encoded by their trainable tower, with gradients.

        Examples:
            >>> cfg = ModelConfig(towers={"text": "minilm"}, feature_dims={"text": 4}, joint_dim=2)
            >>> out = MultiTowerModel(cfg)({"text": torch.randn(3, 4)})
            >>> out["text"].shape
            torch.Size([3, 2])
        """
        out = {k: self.project(k, v) for k, v in features.items()}
        for k, batch in (raw or {}).items():
            m = base_modality(k)
            if m not in self.towers:
                raise ValueError(f"raw inputs for {k!r} need a trainable tower; trainable towers "
                                 f"are {sorted(self.towers)}")
            out[k] = self.project(k, self.tower(m).encode(batch).float())
        return out

    @torch.no_grad()
    def project_array(self, key: str, features: np.ndarray | torch.Tensor,
                      batch_size: int = 4096) -> np.ndarray:
        """:meth:`project` without gradients, in batches; returns float32 numpy ``(n, joint_dim)``.

        Examples:
            >>> cfg = ModelConfig(towers={"text": "minilm"}, feature_dims={"text": 4}, joint_dim=2)
            >>> MultiTowerModel(cfg).project_array("text", np.ones((5, 4), np.float32)).shape
            (5, 2)
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        try:
            out = [self.project(key, _as_batch(features[i:i + batch_size]))
                   .float().cpu().numpy() for i in range(0, len(features), batch_size)]
        finally:
            self.train(was_training)
        if not out:
            return np.zeros((0, self.config.joint_dim), np.float32)
        return np.concatenate(out)

    def tower(self, key: str) -> Encoder:
        """The tower of ``key``'s modality, loaded with ``modalign.encoders.load_encoder`` once.

        The spec comes from ``config.towers``; a tower of one's own loads once its name is
        registered with :func:`modalign.encoders.register_encoder`.
        """
        m = base_modality(key)
        if m not in self.config.towers:
            raise ValueError(f"modality={key!r} has no tower; this model has {self.modalities}")
        if m in self.towers:
            return cast(Encoder, self.towers[m])  # attach_tower checked the protocol
        if m not in self._frozen_towers:
            from modalign.encoders import load_encoder

            self._frozen_towers[m] = load_encoder(self.config.towers[m], modality=m)
        return self._frozen_towers[m]

    def attach_tower(self, modality: str, encoder: Encoder) -> None:
        """Use ``encoder`` as the tower of ``modality`` (instead of loading it by spec).

        If ``modality`` is in ``config.trainable_towers`` the encoder must be an ``nn.Module``;
        it becomes a submodule whose weights train and save with the heads.
        """
        m = base_modality(modality)
        if m not in self.config.towers:
            raise ValueError(f"modality={modality!r} has no tower; this model has "
                             f"{self.modalities}")
        check_encoder(encoder)
        if getattr(encoder, "dim", self.config.feature_dims[m]) != self.config.feature_dims[m]:
            raise ValueError(f"encoder for {m!r} outputs {encoder.dim}-d features; the head "
                             f"expects feature_dims[{m!r}]={self.config.feature_dims[m]}")
        if m in self.config.trainable_towers:
            if not isinstance(encoder, nn.Module):
                raise ProtocolError(f"trainable tower {m!r} must be an nn.Module, got "
                                    f"{type(encoder).__name__}")
            self.towers[m] = encoder
        else:
            self._frozen_towers[m] = encoder

    def encode(self, key: str, inputs: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """Encode raw inputs (paths, PIL images, strings, ...) to unit joint embeddings.

        Runs ``tower.preprocess`` + ``tower.encode`` + the head, in batches, without gradients.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tower = self.tower(key)
        was_training = self.training
        self.eval()
        out: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for i in range(0, len(inputs), batch_size):
                    feats = tower.encode(tower.preprocess(list(inputs[i:i + batch_size])))
                    out.append(self.project(key, feats.float()))
        finally:
            self.train(was_training)
        if not out:
            return torch.zeros(0, self.config.joint_dim)
        return torch.cat(out)

    def use_scale(self, log_logit_scale: torch.Tensor) -> None:
        """Make ``log_logit_scale`` (an objective's learnable parameter) this model's scale: one
        parameter, owned by the objective's term and held here, so the model reports and saves
        the trained temperature with no copy. A fixed temperature (a buffer) is held by value.

        Examples:
            >>> cfg = ModelConfig(towers={"text": "minilm"}, feature_dims={"text": 4}, joint_dim=2)
            >>> model, learnt = MultiTowerModel(cfg), nn.Parameter(torch.tensor(3.0))
            >>> model.use_scale(learnt)
            >>> model.log_logit_scale is learnt
            True
        """
        if not isinstance(log_logit_scale, nn.Parameter):
            log_logit_scale = nn.Parameter(log_logit_scale.detach().clone(), requires_grad=False)
        if log_logit_scale.shape != self.log_logit_scale.shape:
            raise ValueError(f"log_logit_scale must be a scalar, got shape "
                             f"{tuple(log_logit_scale.shape)}")
        self.log_logit_scale = log_logit_scale

    def set_feature_center(self, key: str, mean: torch.Tensor | np.ndarray) -> None:
        """Set the feature mean subtracted before ``key``'s head (in the head's input space)."""
        head = self.head_for(key)
        mean_t = torch.as_tensor(np.asarray(mean) if isinstance(mean, np.ndarray) else mean)
        if mean_t.shape != head.center.shape:
            raise ValueError(f"mean for {key!r} must have shape {tuple(head.center.shape)}, "
                             f"got {tuple(mean_t.shape)}")
        with torch.no_grad():
            head.center.copy_(mean_t.to(head.center))

    def save_pretrained(self, directory: str | os.PathLike[str],
                        extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (each atomically).

        The weights are written first, the config last, so a folder with a config is complete.
        ``extra`` (JSON-serialisable) is stored under ``"extra"`` in the config, e.g. a training
        summary.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(out / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "modalign": __version__})
        towers = {}
        for m, spec in self.config.towers.items():
            loaded = self.tower(m) if m in self.towers or m in self._frozen_towers else None
            ident = loaded.identity() if loaded is not None and hasattr(loaded, "identity") else {}
            towers[m] = {"spec": spec, "identity": ident}
        write_json_atomic(out / CONFIG_NAME, {
            "format": "modalign.MultiTowerModel",
            "format_version": FORMAT_VERSION,
            "modalign_version": __version__,
            "model": self.config.to_dict(),
            "towers": towers,
            "extra": dict(extra or {}),
        })
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str],
                        map_location: str | torch.device = "cpu") -> MultiTowerModel:
        """Load a model folder written by :meth:`save_pretrained`.

        Trainable towers stored in the folder are loaded by spec and their weights restored.

        Examples:
            >>> import tempfile
            >>> cfg = ModelConfig(towers={"text": "minilm"}, feature_dims={"text": 4}, joint_dim=2)
            >>> d = MultiTowerModel(cfg).save_pretrained(tempfile.mkdtemp())
            >>> MultiTowerModel.from_pretrained(d).config == cfg
            True
        """
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"model folder {str(root)!r} does not exist; pass a folder "
                                    "written by 'modalign train' or save_pretrained()")
        if not (root / CONFIG_NAME).is_file() and (root / "model" / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{str(root)!r} is a run folder, not a model folder; pass "
                                    f"{str(root / 'model')!r}")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (root / name).is_file():
                raise FileNotFoundError(f"model folder {str(root)!r} has no {name}; a model folder "
                                        f"holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        meta = read_json(root / CONFIG_NAME)
        if not isinstance(meta, dict) or meta.get("format") != "modalign.MultiTowerModel":
            raise ValueError(f"{root / CONFIG_NAME} is not a modalign model config "
                             "(missing format 'modalign.MultiTowerModel')")
        check_format_version(meta, FORMAT_VERSION, f"model folder {root}")
        model = cls(ModelConfig.from_dict(meta["model"]))
        state = read_safetensors(root / WEIGHTS_NAME, device=str(map_location))
        for m in model.config.trainable_towers:
            if any(k.startswith(f"towers.{m}.") for k in state):
                tower = model.tower(m)
                if m in model.config.lora:
                    from modalign.encoders.lora import LoraSettings, apply_lora

                    apply_lora(tower, LoraSettings(**model.config.lora[m]))
                model.attach_tower(m, tower)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes that differ from the config: a damaged folder
            raise ModalignError(f"{root / WEIGHTS_NAME} does not match its config: "
                                f"{str(e).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ValueError(f"{root / WEIGHTS_NAME} does not match its config: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        return model.to(map_location)


def _as_batch(rows: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor of ``rows``; numpy rows (possibly a read-only memory map) are copied."""
    if isinstance(rows, torch.Tensor):
        return rows
    return torch.from_numpy(np.array(rows, dtype=np.float32))
