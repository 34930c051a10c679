"""What every benchmark loader returns: a :class:`PairedDataset` plus its evaluation protocol."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modalign.data.dataset import Item, PairedDataset
from modalign.errors import ModalignError
from modalign.io import read_user_text

LAYOUT_DOC = "docs/reproduce.md"


@dataclass(frozen=True)
class Side:
    """The items on one side of a retrieval protocol (the queries, or the gallery).

    Attributes:
        modality: the modality of the items.
        split: one split, or ``None`` for every split.
        views: the views taken, or ``None`` for all of them.

    Examples:
        >>> Side("text", "test", ("first-caption",)).describe()
        'text[test; first-caption]'
    """

    modality: str
    split: str | None = None
    views: tuple[str, ...] | None = None

    def select(self, dataset: PairedDataset) -> list[Item]:
        """The dataset items on this side, in dataset order."""
        return dataset.select(modality=self.modality, view=self.views, split=self.split)

    def describe(self) -> str:
        parts = [self.split or "all splits", *(self.views or ())]
        return f"{self.modality}[{'; '.join(parts)}]"


@dataclass(frozen=True)
class RetrievalProtocol:
    """Which items query which gallery, and how relevance is decided.

    Attributes:
        name: ``"image-to-image"``, ``"text-to-text"``, ``"image-to-text"``, ...
        query: the query side.
        gallery: the gallery side.
        exclude_self: drop the query item from its own ranking (query split == gallery split).
        relevance: ``"group"`` (same ``Item.group`` is relevant), ``"revisited"`` (the
            ROxford/RParis easy/hard/junk lists of :class:`RevisitedGroundTruth`) or ``"qrels"``
            (per-query lists of relevant gallery ids, :attr:`Benchmark.qrels`).

    Examples:
        >>> p = RetrievalProtocol("image-to-image", Side("image"), Side("image"), exclude_self=True)
        >>> p.relevance
        'group'
    """

    name: str
    query: Side
    gallery: Side
    exclude_self: bool = False
    relevance: str = "group"

    def __post_init__(self) -> None:
        if self.relevance not in ("group", "revisited", "qrels"):
            raise ValueError(f"relevance={self.relevance!r}: expected 'group', 'revisited' or "
                             "'qrels'")


@dataclass(frozen=True)
class RevisitedGroundTruth:
    """Per-query relevance of the revisited Oxford/Paris protocol, by gallery item id.

    ``easy[q]``, ``hard[q]`` and ``junk[q]`` are the gallery ids of query ``queries[q]``. The three
    protocols (Radenović et al. 2018): Easy counts ``easy`` as relevant and ignores ``hard + junk``;
    Medium counts ``easy + hard`` and ignores ``junk``; Hard counts ``hard`` and ignores
    ``easy + junk``. Ignored items are removed from the ranking before scoring.
    """

    queries: tuple[str, ...]
    easy: tuple[tuple[str, ...], ...]
    hard: tuple[tuple[str, ...], ...]
    junk: tuple[tuple[str, ...], ...]

    def relevant_and_ignored(self, level: str) -> list[tuple[set[str], set[str]]]:
        """(relevant ids, ignored ids) per query for ``level`` in easy/medium/hard.

        Examples:
            >>> gt = RevisitedGroundTruth(("q",), (("a",),), (("b",),), (("c",),))
            >>> [(sorted(r), sorted(i)) for r, i in gt.relevant_and_ignored("medium")]
            [(['a', 'b'], ['c'])]
        """
        out = []
        for e, h, j in zip(self.easy, self.hard, self.junk, strict=True):
            if level == "easy":
                out.append((set(e), set(h) | set(j)))
            elif level == "medium":
                out.append((set(e) | set(h), set(j)))
            elif level == "hard":
                out.append((set(h), set(e) | set(j)))
            else:
                raise ValueError(f"level={level!r}: expected 'easy', 'medium' or 'hard'")
        return out


@dataclass
class Benchmark:
    """A standard dataset read from its published layout, with the protocol that goes with it.

    Attributes:
        name: the benchmark key (``"coco"``, ``"cub2011"``, ``"oxford_pets"``, ...).
        dataset: the items (``group`` = the image for captions, the class for labelled images).
        protocols: retrieval protocols by name.
        classnames: class names in label order (classification datasets), else empty.
        templates: prompt templates with one ``{}`` for the class name, else empty.
        classification_split: the split zero-shot classification is scored on, if any.
        revisited: the ROxford/RParis ground truth, if any.
        qrels: query item id -> relevant gallery item ids (BEIR-style sets), if any.
    """

    name: str
    dataset: PairedDataset
    protocols: dict[str, RetrievalProtocol]
    classnames: list[str] = field(default_factory=list)
    templates: tuple[str, ...] = ()
    classification_split: str | None = None
    revisited: RevisitedGroundTruth | None = None
    qrels: dict[str, tuple[str, ...]] | None = None

    def prompts(self, template: str | None = None) -> list[list[str]]:
        """Class prompts: for each class, the filled templates (or the one ``template``).

        Examples:
            >>> from modalign.data.dataset import PairedDataset
            >>> b = Benchmark("toy", PairedDataset("toy", []), {}, ["sea_lion"], ("a {}.",))
            >>> b.prompts()
            [['a sea lion.']]
        """
        templates = (template,) if template is not None else self.templates
        if not self.classnames or not templates:
            raise ValueError(f"benchmark {self.name!r} has no class names or prompt templates")
        return [[t.format(c.replace("_", " ")) for t in templates] for c in self.classnames]


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it exists, else raise ``FileNotFoundError`` saying what and where.

    Examples:
        >>> require_file(Path("/nonexistent/x.json"), "the split file")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: the split file: expected /nonexistent/x.json (see docs/reproduce.md ...
    """
    if not path.exists():
        raise FileNotFoundError(
            f"{what}: expected {path} (see {LAYOUT_DOC} for the folder layout of each dataset)")
    return path


def check_name(name: str, choices: Iterable[str]) -> str:
    """``name`` if it is one of ``choices`` (a loader's datasets), else an error listing them.

    Examples:
        >>> check_name("coco", ("coco", "flickr30k"))
        'coco'
        >>> check_name("mscoco", ("coco", "flickr30k"))
        Traceback (most recent call last):
        ...
        modalign.errors.ModalignError: name='mscoco': expected one of coco, flickr30k
    """
    choices = list(choices)
    if name not in choices:
        raise ModalignError(f"name={name!r}: expected one of {', '.join(choices)}")
    return name


def find_dataset_dir(root: str | Path, names: Sequence[str], what: str) -> Path:
    """The first of ``root/NAME`` and ``root/CoOp/NAME`` that exists, for NAME in ``names``.

    ``root`` itself is accepted when its folder name is one of ``names``. Every loader finds its
    folder here, so a missing one fails the same way for each.

    Examples:
        >>> find_dataset_dir("/nonexistent", ("CUB_200_2011",), "cub2011")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: cub2011: no dataset folder under /nonexistent; expected one of ...
    """
    root = Path(root).expanduser()
    if root.name in names and root.is_dir():
        return root
    candidates = [root / n for n in names] + [root / "CoOp" / n for n in names]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        f"{what}: no dataset folder under {root}; expected one of "
        + ", ".join(str(c) for c in candidates) + f" (see {LAYOUT_DOC})")


def read_text_lines(path: Path, what: str) -> list[str]:
    """Non-empty, stripped lines of a required text file."""
    require_file(path, what)
    return [ln.strip() for ln in read_user_text(path, what).splitlines() if ln.strip()]


def check_files(dataset_dir: Path, relpaths: Sequence[str], what: str, limit: int = 3) -> None:
    """Raise ``FileNotFoundError`` naming the first missing files of ``relpaths`` (if any)."""
    missing = [p for p in relpaths if not (dataset_dir / p).exists()]
    if missing:
        shown = ", ".join(str(dataset_dir / p) for p in missing[:limit])
        raise FileNotFoundError(
            f"{what}: {len(missing)} of {len(relpaths)} files listed are missing, e.g. {shown} "
            f"(see {LAYOUT_DOC})")


def label_items(name: str, modality: str, rows: Sequence[tuple[str, int, str, str]],
                classnames: Sequence[str]) -> list[Item]:
    """Items of a class-labelled image set: rows of (relative path, label, split, view)."""
    return [Item(id=f"{name}:{split}:{rel}", modality=modality, view=view, value=rel,
                 group=classnames[label], split=split,
                 labels={"class": classnames[label], "label": str(label)})
            for rel, label, split, view in rows]


def labelled_benchmark(name: str, dataset_dir: Path, rows: Sequence[tuple[str, int, str, str]],
                       classnames: Sequence[str], protocols: Mapping[str, RetrievalProtocol],
                       templates: Sequence[str] = (), classification_split: str | None = None,
                       check: bool = True) -> Benchmark:
    """Build a class-labelled image :class:`Benchmark` from (path, label, split, view) rows."""
    if check:
        check_files(dataset_dir, [r[0] for r in rows], f"{name} images")
    items = label_items(name, "image", rows, classnames)
    ds = PairedDataset(name, items, root=dataset_dir, info={"benchmark": name})
    return Benchmark(name, ds, dict(protocols), list(classnames), tuple(templates),
                     classification_split)
