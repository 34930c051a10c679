"""Turn ``--model NAME_OR_DIR`` into an encoder spec: a local folder, a hub name, or a spec.

Accepted forms:

- an encoder spec: ``hf-clip:PATH_OR_NAME``, ``hf-siglip:PATH_OR_NAME``,
  ``open_clip:ARCH/PRETRAINED``, ``open_clip:local-dir:PATH``, ``slip:CHECKPOINT.pt`` (a SLIP
  release file, :mod:`modalign.reproduce.slip`);
- a local folder: a transformers ``save_pretrained`` folder (``config.json`` with ``model_type``
  ``clip`` or ``siglip``) or an open_clip folder (``open_clip_config.json``);
- a hub name such as ``openai/clip-vit-base-patch32`` (a SigLIP when the name says ``siglip``),
  taken from the hub cache; without a network it fails at once, naming the local-folder route.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modalign.encoders.base import Encoder
from modalign.encoders.hub import is_hub_name, resolve_model_dir
from modalign.errors import ModalignError
from modalign.io import read_json
from modalign.spec import parse_spec

SPEC_PREFIXES = ("hf-clip:", "hf-siglip:", "open_clip:", "slip:")
HF_MODEL_TYPES = {"clip": "hf-clip", "siglip": "hf-siglip"}


@dataclass(frozen=True)
class ResolvedModel:
    """A model the protocols can embed with.

    Attributes:
        given: what the user typed.
        spec: the encoder spec (``hf-clip:/models/clip-b32``).
        family: ``"hf-clip"``, ``"hf-siglip"``, ``"open_clip"`` or ``"slip"``.
    """

    given: str
    spec: str
    family: str

    @property
    def label(self) -> str:
        """A short, file-name-safe label for output folders."""
        tail = self.spec.split(":", 1)[1].rstrip("/")
        name = Path(tail).name if Path(tail).is_dir() or self.family == "slip" else tail
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or self.family


def resolve_model(name_or_dir: str) -> ResolvedModel:
    """Resolve ``--model`` to an encoder spec, failing fast when it cannot be loaded offline.

    Examples:
        >>> resolve_model("open_clip:ViT-B-32/laion2b_s34b_b79k").family
        'open_clip'
        >>> resolve_model("./no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --model: './no/such/folder' is neither a model folder nor a hub name...
    """
    if not isinstance(name_or_dir, str) or not name_or_dir.strip():
        raise ValueError(f"--model must be a folder, a hub name or an encoder spec, "
                         f"got {name_or_dir!r}")
    given = name_or_dir.strip()
    for prefix in SPEC_PREFIXES:
        if given.startswith(prefix):
            return ResolvedModel(given, given, prefix.rstrip(":"))
    path = Path(given).expanduser()
    if path.is_dir():
        return ResolvedModel(given, _folder_spec(path), _folder_spec(path).split(":", 1)[0])
    if not is_hub_name(given) or given.startswith((".", "/", "~")):
        raise ValueError(
            f"--model: {given!r} is neither a model folder nor a hub name; expected a "
            "save_pretrained folder, a hub name (org/model) or an encoder spec "
            "(hf-clip:..., hf-siglip:..., open_clip:ARCH/PRETRAINED)")
    family = "hf-siglip" if "siglip" in given.lower() else "hf-clip"
    kind = "a transformers SiglipModel" if family == "hf-siglip" else "a transformers CLIPModel"
    folder = resolve_model_dir(given, argument=f"--model {family}:PATH_OR_NAME", kind=kind)
    return ResolvedModel(given, f"{family}:{folder}", family)


def _folder_spec(path: Path) -> str:
    if (path / "open_clip_config.json").exists():
        return f"open_clip:local-dir:{path}"
    config = path / "config.json"
    if not config.exists():
        raise ValueError(f"--model: folder {str(path)!r} has neither config.json (transformers) "
                         "nor open_clip_config.json (open_clip)")
    model_type = str(read_json(config).get("model_type", ""))
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"--model: {config} has model_type={model_type!r}; expected one of "
                         f"{', '.join(HF_MODEL_TYPES)} (a CLIPModel or SiglipModel folder)")
    return f"{HF_MODEL_TYPES[model_type]}:{path}"


def load_towers(model: ResolvedModel) -> dict[str, Encoder]:
    """The image and text towers of ``model``, sharing one set of weights where possible."""
    spec = parse_spec(model.spec, "--model")
    if spec.name == "slip":
        from modalign.reproduce.slip import load_slip_towers

        if spec.options:
            raise ModalignError(f"--model {model.spec!r}: slip takes no options")
        return dict(load_slip_towers(spec.arg))
    if spec.name in ("hf-clip", "hf-siglip") and not spec.options:
        from modalign.encoders.hf import load_hf_towers

        return dict(load_hf_towers(spec.arg, family=spec.name.removeprefix("hf-")))
    from modalign.encoders import load_encoder

    return {m: load_encoder(model.spec, modality=m) for m in ("image", "text")}
