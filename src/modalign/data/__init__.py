"""Paired data of any modalities: the built-in emoji set and users' own manifests."""

from __future__ import annotations

import warnings
from pathlib import Path

from modalign.data.dataset import SPLITS, Item, PairedDataset, split_of
from modalign.data.emoji import EmojiOptions, build_emoji
from modalign.data.manifest import ManifestReport, load_manifest

__all__ = ["SPLITS", "EmojiOptions", "Item", "ManifestReport", "PairedDataset", "build_emoji",
           "load_dataset", "load_manifest", "split_of"]


def load_dataset(spec: str | Path, progress: bool = False) -> PairedDataset:
    """Resolve a dataset spec: ``"emoji"`` (built on first use), a manifest, or a built folder.

    ``"emoji:limit=200,speech=1,size=64"`` passes build options.

    Examples:
        >>> load_dataset("emoji:limit=20,styles=openmoji").views("image")  # doctest: +SKIP
        ['openmoji']
    """
    s = str(spec)
    if s == "emoji" or s.startswith("emoji:"):
        return build_emoji(parse_emoji_spec(s), progress=progress)
    path = Path(s)
    if path.is_dir():
        return PairedDataset.load(path)
    if path.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
        ds, report = load_manifest(path)
        if report.skipped:
            warnings.warn(f"{path}: {report.summary()}", stacklevel=2)
        return ds
    raise ValueError(f"data={s!r}: expected 'emoji', a .csv/.jsonl manifest, or a dataset folder")


def parse_emoji_spec(spec: str) -> EmojiOptions:
    """``"emoji:limit=200,speech=1"`` -> :class:`EmojiOptions`."""
    if spec in ("emoji", "emoji:"):
        return EmojiOptions()
    kwargs: dict[str, object] = {}
    for part in spec.split(":", 1)[1].split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"data={spec!r}: option {part!r} should look like key=value")
        k, v = (x.strip() for x in part.split("=", 1))
        if k in ("size", "limit"):
            kwargs[k] = int(v)
        elif k == "max_version":
            kwargs[k] = float(v)
        elif k in ("speech", "skin_tones"):
            kwargs[k] = v.lower() in ("1", "true", "yes", "on")
        elif k in ("styles", "languages", "voices"):
            kwargs[k] = tuple(x for x in v.split("+") if x)
        else:
            raise ValueError(f"data={spec!r}: unknown emoji option {k!r}; expected size, limit, "
                             "speech, skin_tones, styles, languages, voices, max_version")
    return EmojiOptions(**kwargs)  # type: ignore[arg-type]
