"""Paired data of any modalities: the built-in emoji set and users' own manifests."""

from __future__ import annotations

import warnings
from pathlib import Path

from modalign.data.dataset import SPLITS, Item, PairedDataset, split_of
from modalign.data.emoji import EmojiOptions, build_emoji
from modalign.data.manifest import ManifestReport, load_manifest
from modalign.errors import ModalignError
from modalign.naming import dataset_name
from modalign.spec import parse_spec

__all__ = ["SPLITS", "EmojiOptions", "Item", "ManifestReport", "PairedDataset", "build_emoji",
           "load_dataset", "load_manifest", "split_of"]


def load_dataset(spec: str | Path, progress: bool = False) -> PairedDataset:
    """Resolve a dataset spec: ``"emoji"`` (built on first use), a manifest, or a built folder.

    ``"emoji:limit=200,speech=1,size=64"`` passes build options.

    Examples:
        >>> load_dataset("emoji:limit=20,styles=openmoji").views("image")
        ['openmoji']
    """
    s = str(spec)
    if s == "emoji" or s.startswith("emoji:"):
        return build_emoji(parse_emoji_spec(s), progress=progress)
    path = Path(s)
    if path.is_dir():
        return PairedDataset.load(path)
    if path.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        ds, report = load_manifest(path, name=dataset_name(path))
        if report.skipped:
            warnings.warn(f"{path}: {report.summary()}", stacklevel=2)
        return ds
    raise ModalignError(f"data={s!r}: expected 'emoji', a .csv/.jsonl manifest, or a dataset "
                        "folder")


def parse_emoji_spec(spec: str) -> EmojiOptions:
    """``"emoji:limit=200,speech=1"`` -> :class:`EmojiOptions`."""
    if spec in ("emoji", "emoji:"):
        return EmojiOptions()
    parsed = parse_spec(spec, "data")
    if parsed.arg:
        raise ModalignError(f"data={spec!r}: options should look like key=value, e.g. "
                            "emoji:limit=200,speech=1")
    kwargs: dict[str, object] = {}
    for k, v in parsed.options.items():
        text = str(v).strip()
        try:
            if k in ("size", "limit"):
                kwargs[k] = int(text)
            elif k == "max_version":
                kwargs[k] = float(text)
            elif k in ("speech", "skin_tones"):
                kwargs[k] = text.lower() in ("1", "true", "yes", "on")
            elif k in ("styles", "languages", "voices"):
                kwargs[k] = tuple(x for x in text.split("+") if x)
            else:
                raise ModalignError(f"data={spec!r}: unknown emoji option {k!r}; expected size, "
                                    "limit, speech, skin_tones, styles, languages, voices, "
                                    "max_version")
        except ValueError as e:
            if isinstance(e, ModalignError):
                raise
            raise ModalignError(f"data={spec!r}: option {k}={text!r} is not a number") from None
    return EmojiOptions(**kwargs)  # type: ignore[arg-type]
