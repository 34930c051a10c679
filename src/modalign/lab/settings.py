"""What one gap-lab run varies: the settings of the heads and the objective, and the sweep's knobs.

A :class:`GapSetting` is one point of the sweep (head init, head depth, temperature, training
length); a :class:`LabConfig` lists the settings, the seeds, and how each trained space is
measured (inverted queries, inversion steps, shift amounts, bridges).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from modalign.checks import check_choice, check_int
from modalign.evaluate.zeroshot import DEFAULT_TEMPLATES
from modalign.geometry.gapshift import DEFAULT_SHIFTS

HEAD_INITS = ("xavier", "cone")
TEMPERATURES: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
"""Fixed temperatures of the full sweep (the objectives clamp the logit scale to [1, 100])."""
FAMILIES = ("heads", "finetune", "lora", "scratch")
"""How a space's towers are made: frozen pretrained towers with trained heads; pretrained towers
whose last stages are fine-tuned with the heads; pretrained towers with LoRA adapters trained
with the heads; small towers trained from random weights."""
FAMILY_GROUPS = {"heads": "heads", "finetune": "tuned", "lora": "tuned", "scratch": "scratch"}
"""The groups the trend test runs within: fine-tuned and LoRA-adapted towers are one group
(pretrained towers trained further by the contrastive loss)."""
CONTROLS = ("", "intra", "unifalign")
"""Terms added to the CLIP loss: none; an image-image term between the two image styles;
uniformity of each modality plus image-text alignment (Wang & Isola)."""


@dataclass(frozen=True)
class GapSetting:
    """One trained space of the sweep.

    Attributes:
        head_init: ``"xavier"`` (centred linear map: Xavier weights, zero bias, centred inputs)
            or ``"cone"`` (PyTorch's default init, ReLU and a random output bias: each modality
            starts in its own narrow cone).
        head_depth: linear layers per head; 1 is a linear head, >= 2 an MLP.
        temperature: fixed CLIP temperature ``tau`` (the logit scale is ``1 / tau``), or
            ``None`` for a learned one (initialised at 0.07).
        epochs: training length in passes over the training concepts.
        family: ``"heads"`` (frozen pretrained towers, the default), ``"finetune"`` (the last
            ``unfreeze`` stages of both pretrained towers train too), ``"lora"`` (LoRA adapters
            on both pretrained towers train too, ``[lora]``'s default targets) or ``"scratch"``
            (small towers from random weights, :mod:`modalign.lab.towers`, trained end to end).
        unfreeze: stages of each pretrained tower fine-tuned (``finetune`` only).
        control: a term added to the CLIP loss (:data:`CONTROLS`).

    Examples:
        >>> GapSetting(temperature=0.01).name
        'xavier-d1-tau0.01-e20'
        >>> GapSetting(family="scratch", epochs=30, control="intra").name
        'scratch-learned-e30+intra'
    """

    head_init: str = "xavier"
    head_depth: int = 1
    temperature: float | None = None
    epochs: int = 20
    family: str = "heads"
    unfreeze: int = 0
    control: str = ""

    def __post_init__(self) -> None:
        check_choice("head_init", self.head_init, HEAD_INITS)
        check_int("head_depth", self.head_depth)
        if self.temperature is not None and not (
                isinstance(self.temperature, (int, float)) and 0.01 <= self.temperature <= 1.0):
            raise ValueError(f"temperature must be None (learned) or a number in [0.01, 1.0] "
                             f"(the clamp range of the logit scale), got {self.temperature!r}")
        check_int("epochs", self.epochs)
        check_choice("family", self.family, FAMILIES)
        check_choice("control", self.control, CONTROLS)
        check_int("unfreeze", self.unfreeze, minimum=0)
        if (self.family == "finetune") != (self.unfreeze > 0):
            raise ValueError(f"unfreeze: expected >= 1 stage for family 'finetune' and 0 "
                             f"otherwise, got {self.unfreeze!r} with family {self.family!r}")

    @property
    def name(self) -> str:
        """A short readable name, e.g. ``cone-d3-learned-e20``, ``finetune-k2-learned-e3``."""
        tau = "learned" if self.temperature is None else f"tau{self.temperature:g}"
        if self.family == "scratch":
            base = f"scratch-{tau}-e{self.epochs}"
        elif self.family == "finetune":
            base = f"finetune-k{self.unfreeze}-{tau}-e{self.epochs}"
        elif self.family == "lora":
            base = f"lora-{tau}-e{self.epochs}"
        else:
            base = f"{self.head_init}-d{self.head_depth}-{tau}-e{self.epochs}"
        return base + (f"+{self.control}" if self.control else "")

    @property
    def end_to_end(self) -> bool:
        """Whether towers train (and must encode raw inputs) rather than cached features."""
        return self.family != "heads"

    def keys(self) -> list[str]:
        """The embedding keys a training batch holds."""
        extra = ["image:noto", "image:openmoji"] if self.control == "intra" else []
        return ["image", "text", *extra]

    def train_sections(self) -> dict[str, Any]:
        """The ``model``/``objectives``/``train`` entries of a training config for this setting."""
        model: dict[str, Any] = {"head_init": self.head_init}
        if self.head_depth == 1:
            model["head"] = "linear"
        else:
            model.update(head="mlp", head_depth=self.head_depth)
        clip: dict[str, Any] = {"loss": "clip", "modalities": ["image", "text"], "weight": 1.0}
        if self.temperature is not None:
            clip.update(temperature=self.temperature, learnable_temperature=False)
        objectives: list[dict[str, Any]] = [clip]
        if self.control == "intra":
            objectives.append({"loss": "intra", "modalities": ["image:noto", "image:openmoji"],
                               "weight": 1.0})
        elif self.control == "unifalign":
            objectives += [{"loss": "uniformity", "modalities": ["image", "text"], "weight": 1.0},
                           {"loss": "alignment", "modalities": ["image", "text"], "weight": 1.0}]
        return {"model": model, "objectives": objectives, "train": {"epochs": self.epochs}}

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; the family fields only when set (older cache keys stay valid)."""
        d = asdict(self)
        for k, default in (("family", "heads"), ("unfreeze", 0), ("control", "")):
            if d[k] == default:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GapSetting:
        return cls(**d)


END_TO_END_FIELDS = ("e2e_batch_size", "tower_lr", "scratch_lr", "scratch_batch_size",
                     "scratch_warmup_steps", "scratch_crop_scale", "scratch_color_jitter",
                     "crop_scale", "color_jitter",
                     "scratch_image_size", "scratch_width", "scratch_text_width",
                     "scratch_layers", "scratch_dim", "token_mask", "dataset", "lora_rank",
                     "lora_lr")
LORA_FIELDS = ("lora_rank", "lora_lr")


@dataclass(frozen=True)
class LabConfig:
    """The sweep: its settings and seeds, and how each trained space is measured.

    Attributes:
        settings: the grid (see :func:`full_settings`, :func:`quick_settings`).
        seeds: training seeds per setting (error bars are over seeds).
        batch_size, lr, weight_decay, warmup_steps, joint_dim: training knobs shared by all
            settings (AdamW, cosine schedule, CLIP objective on cached tower features).
        inverted_queries: queries inverted per direction (OTI: Noto images, OVI: names), a fixed
            evenly spread subset of the evaluation split.
        oti_steps, ovi_steps: inversion steps (image -> text, text -> image).
        oti_lr, ovi_lr: AdamW learning rates of the pseudo-tokens (OTI: the official 0.02; OVI
            enters deep in a CNN, where activations are far larger than the 0.02-std start).
        ovi_stage, ovi_tokens: the image tower block whose input the OVI pseudo-patches replace,
            and how many pseudo-patches tile its grid.
        shifts: gap-shift amounts (multiples of the gap vector).
        bridges: post-hoc bridges measured on cross-modal retrieval and zero-shot.
        label: the label zero-shot classification predicts.
        templates: zero-shot prompt templates.
        split, bank_split: evaluated split; split the bridges and the gap vector are fitted on.
        image_views, text_views: ``(query view, gallery view)`` of the intra-modal tasks; the text
            gallery is every text of the split.
        permutations, bootstrap: resamples of the trend test.
        converge_queries, converge_steps: the first queries of each inverted subset are inverted
            again with up to ``converge_steps`` steps (the converged result beside the
            fixed-budget one); 0 queries skips it.
        converge_families: the families whose spaces get the converged inversions (the quick
            sweep: only the scratch towers, whose inversions are cheap).
        learned_bridge: the kind of :class:`~modalign.bridge.learned.LearnedBridge` fitted on
            the bank's joint embeddings to carry the inverted queries across the gap instead of
            OTI/OVI (``""``: not measured).
        train_subset: training-split groups drawn (a fixed set, as many as the evaluated split
            has when 0) to report retrieval on training data beside the evaluated split.
        e2e_batch_size: batch of end-to-end settings (more steps per epoch than the heads').
        lora_rank, lora_lr: rank of the LoRA adapters of ``lora`` settings and their learning
            rate (alpha is twice the rank).
        tower_lr: learning rate of the tower weights of end-to-end settings (fine-tuned and
            scratch towers; heads keep ``lr``).
        scratch_lr: the learning rate of scratch settings, towers and heads alike (they start
            from random weights).
        scratch_batch_size, scratch_warmup_steps: batch and linear warm-up steps of scratch
            settings (a small batch gives the towers enough steps per epoch).
        scratch_crop_scale, scratch_color_jitter: the image augmentation of scratch settings
            (milder than the fine-tuned towers': a crop of half a 32-pixel image leaves little).
        crop_scale, color_jitter: image augmentation of end-to-end settings (random resized crop
            area range, brightness/contrast/saturation jitter; no flips: emoji are not
            mirror-symmetric).
        scratch_image_size, scratch_width, scratch_text_width, scratch_layers, scratch_dim,
            token_mask: the scratch towers (:mod:`modalign.lab.towers`; ``scratch_layers = 0``:
            the text tower is a bag of word pieces).
        dataset: the raw dataset end-to-end settings read (default: the folder the store was
            encoded from).
    """

    settings: tuple[GapSetting, ...]
    seeds: tuple[int, ...] = (0, 1)
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 10
    joint_dim: int = 256
    inverted_queries: int = 48
    oti_steps: int = 100
    ovi_steps: int = 100
    oti_lr: float = 2e-2
    ovi_lr: float = 1.0
    ovi_stage: int = 15
    ovi_tokens: int = 9
    shifts: tuple[float, ...] = DEFAULT_SHIFTS
    bridges: tuple[str, ...] = ("centering", "invgc")
    label: str = "subgroup"
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    split: str = "test"
    bank_split: str = "train"
    image_views: tuple[str, str] = ("noto", "openmoji")
    text_views: tuple[str, str] = ("name", "alias")
    permutations: int = 10000
    bootstrap: int = 2000
    converge_queries: int = 16
    converge_steps: int = 400
    converge_families: tuple[str, ...] = FAMILIES
    train_subset: int = 0
    learned_bridge: str = "lstsq"
    e2e_batch_size: int = 128
    lora_rank: int = 8
    lora_lr: float = 1e-3
    tower_lr: float = 1e-4
    scratch_lr: float = 3e-3
    scratch_batch_size: int = 64
    scratch_warmup_steps: int = 100
    scratch_crop_scale: tuple[float, float] = (0.7, 1.0)
    scratch_color_jitter: float = 0.1
    crop_scale: tuple[float, float] = (0.5, 1.0)
    color_jitter: float = 0.2
    scratch_image_size: int = 32
    scratch_width: int = 16
    scratch_text_width: int = 64
    scratch_layers: int = 0
    scratch_dim: int = 128
    token_mask: float = 0.15
    dataset: str = ""

    def __post_init__(self) -> None:
        if not self.settings:
            raise ValueError("settings: expected at least one GapSetting")
        if len({s.name for s in self.settings}) != len(self.settings):
            raise ValueError("settings: expected distinct settings, found duplicates")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {self.seeds!r}")
        for name in ("batch_size", "e2e_batch_size", "scratch_batch_size", "lora_rank",
                     "joint_dim",
                     "inverted_queries", "ovi_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("oti_steps", "ovi_steps", "ovi_stage", "converge_queries",
                     "converge_steps", "train_subset", "scratch_warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("lr", "oti_lr", "ovi_lr", "tower_lr", "scratch_lr", "lora_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.shifts:
            raise ValueError("shifts: expected at least one shift amount")
        unknown = [f for f in self.converge_families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"converge_families: expected names among {FAMILIES}, got "
                             f"{unknown}")
        from modalign.bridge.learned import KINDS

        if self.learned_bridge not in ("", *KINDS):
            raise ValueError(f"learned_bridge: expected '' or one of {KINDS}, got "
                             f"{self.learned_bridge!r}")

    def training_dict(self) -> dict[str, Any]:
        """The fields that change a trained model (part of each run's cache key)."""
        return {k: getattr(self, k) for k in ("batch_size", "lr", "weight_decay",
                                              "warmup_steps", "joint_dim")}

    def end_to_end_dict(self, family: str = "lora") -> dict[str, Any]:
        """The fields that change a model whose towers train (part of those runs' keys); the
        LoRA fields only for the ``lora`` family."""
        return {k: getattr(self, k) for k in END_TO_END_FIELDS
                if family == "lora" or k not in LORA_FIELDS}

    def measuring_dict(self) -> dict[str, Any]:
        """The fields that change what is measured on a trained model (part of the record key)."""
        skip = {"settings", "seeds", "permutations", "bootstrap", *self.training_dict(),
                *END_TO_END_FIELDS}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def with_seeds(self, n: int) -> LabConfig:
        """The same sweep with seeds ``0..n-1``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"seeds: expected a positive number of seeds, got {n!r}")
        return replace(self, seeds=tuple(range(n)))


def heads_settings() -> tuple[GapSetting, ...]:
    """The frozen-tower grid: every factor varied around a linear Xavier head with a learned
    temperature trained for 20 epochs.

    - temperature: learned, and each of :data:`TEMPERATURES` fixed (linear Xavier head, 20 epochs);
    - head init and depth: cone vs Xavier, 1 vs 3 layers (learned temperature, 20 epochs), and the
      cone MLP with the sharpest fixed temperature;
    - training length: the cone MLP after 1, 5 and 60 epochs, the sharpest fixed temperature after
      5 and 60 epochs.
    """
    base = [GapSetting()] + [GapSetting(temperature=t) for t in TEMPERATURES]
    heads = [GapSetting("cone", 1), GapSetting("xavier", 3), GapSetting("cone", 3),
             GapSetting("cone", 3, 0.01)]
    length = [GapSetting("cone", 3, epochs=e) for e in (1, 5, 60)]
    length += [GapSetting(temperature=0.01, epochs=e) for e in (5, 60)]
    return tuple(base + heads + length)


def full_settings() -> tuple[GapSetting, ...]:
    """The full grid: :func:`heads_settings`, plus towers that train and the controls.

    - fine-tuned: the last 2 stages of both pretrained towers, 1, 3 and 6 epochs; LoRA adapters
      on both, 1 and 3 epochs;
    - from scratch: 10 and 30 epochs (learned temperature), 30 epochs at tau = 0.01;
    - controls: the intra-modal image term and uniformity + alignment added, on the scratch
      towers after 30 epochs and on the base linear head.
    """
    finetune = [GapSetting(family="finetune", unfreeze=2, epochs=e) for e in (1, 3, 6)]
    finetune += [GapSetting(family="lora", epochs=e) for e in (1, 3)]
    scratch = [GapSetting(family="scratch", epochs=e) for e in (10, 30)]
    scratch.append(GapSetting(family="scratch", epochs=30, temperature=0.01))
    controls = [GapSetting(family="scratch", epochs=30, control=c) for c in ("intra", "unifalign")]
    controls += [GapSetting(control=c) for c in ("intra", "unifalign")]
    return heads_settings() + tuple(finetune + scratch + controls)


QUICK_SCRATCH_EPOCHS = 40
"""Training length of the quick sweep's scratch towers (920 steps of batch 64 on the emoji set)."""


def quick_settings() -> tuple[GapSetting, ...]:
    """Five frozen-tower settings spanning the gaps the levers reach (learned vs fixed
    temperature, cone MLP after 20 epochs and after 2) and one pair of towers trained from
    scratch by the CLIP loss alone (40 epochs)."""
    return (GapSetting(), GapSetting(temperature=0.01), GapSetting(temperature=0.1),
            GapSetting("cone", 3), GapSetting("cone", 3, epochs=2),
            GapSetting(family="scratch", epochs=QUICK_SCRATCH_EPOCHS))


def medium_settings() -> tuple[GapSetting, ...]:
    """Between the two, with at least 3 settings per family group spread over the gap: the quick
    settings (5 frozen-tower ones, scratch towers after 40 epochs); scratch towers after 10
    epochs (larger gap, less trained) and after 40 at tau = 0.01; each control on the 40-epoch
    scratch towers; the pretrained towers' last 2 stages fine-tuned for 1 and 3 epochs and LoRA
    adapters trained for 3."""
    e = QUICK_SCRATCH_EPOCHS
    return (*quick_settings(),
            GapSetting(family="scratch", epochs=10),
            GapSetting(family="scratch", epochs=e, temperature=0.01),
            GapSetting(family="scratch", epochs=e, control="intra"),
            GapSetting(family="scratch", epochs=e, control="unifalign"),
            GapSetting(family="finetune", unfreeze=2, epochs=1),
            GapSetting(family="finetune", unfreeze=2, epochs=3),
            GapSetting(family="lora", epochs=3))


def select_families(config: LabConfig, families: str | Sequence[str]) -> LabConfig:
    """``config`` with only the settings of the named families or groups (controls go with
    their family), so that two processes can share one grid's output folder.

    Examples:
        >>> [s.name for s in select_families(medium_config(), "tuned").settings]
        ['finetune-k2-learned-e1', 'finetune-k2-learned-e3', 'lora-learned-e3']
    """
    from modalign.errors import ModalignError

    names = [f.strip() for f in (families.split(",") if isinstance(families, str)
                                 else families) if f.strip()]
    known = (*FAMILIES, *dict.fromkeys(FAMILY_GROUPS.values()))
    bad = [f for f in names if f not in known]
    if bad or not names:
        raise ModalignError(f"families: expected names among {', '.join(dict.fromkeys(known))}, "
                            f"got {families!r}")
    chosen = tuple(s for s in config.settings
                   if s.family in names or FAMILY_GROUPS[s.family] in names)
    if not chosen:
        raise ModalignError(f"families {families!r}: no setting of this grid belongs to them")
    return replace(config, settings=chosen)


def full_config() -> LabConfig:
    """The full sweep: :func:`full_settings`, 2 seeds, 48 inverted queries per direction."""
    return LabConfig(settings=full_settings(), seeds=(0, 1))


def quick_config() -> LabConfig:
    """A short sweep: :func:`quick_settings`, 1 seed, 24 queries, 40 OTI / 60 OVI steps; in the
    scratch setting 8 queries per direction also run to a cap of 200 steps (through the
    pretrained towers those converged runs were two thirds of the sweep's inversion time)."""
    return LabConfig(settings=quick_settings(), seeds=(0,), inverted_queries=24, oti_steps=40,
                     ovi_steps=60, shifts=(-0.5, 0.0, 0.5, 1.0), permutations=5000,
                     bootstrap=1000, converge_queries=8, converge_steps=200,
                     converge_families=("scratch",))


def medium_config() -> LabConfig:
    """:func:`medium_settings` measured as the quick sweep, 2 seeds, converged inversions in
    every family (the fine-tuned towers' too)."""
    return replace(quick_config(), settings=medium_settings(), seeds=(0, 1),
                   converge_families=FAMILIES)
