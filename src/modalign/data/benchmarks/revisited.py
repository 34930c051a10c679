"""Revisited Oxford5k and Paris6k (Radenović et al., CVPR 2018), with optional R1M distractors.

Layout (as the revisitop download script leaves it): ``<root>/roxford5k/gnd_roxford5k.pkl`` and
``<root>/roxford5k/jpg/<name>.jpg`` (``rparis6k`` alike); distractors, if any, in
``<root>/revisitop1m/revisitop1m.txt`` (one relative name per line) and ``<root>/revisitop1m/jpg/``.
Only the distractors present on disk join the gallery, as in Cross the Gap; their count is kept in
``dataset.info["distractors"]`` because it changes the scores.

The ground truth is ``{"imlist": [...], "qimlist": [...], "gnd": [{"easy", "hard", "junk",
"bbx"}]}`` with indices into ``imlist``. It ships as a pickle. We never unpickle downloads with the
standard loader (a pickle can run code): :func:`read_ground_truth` reads a JSON copy
(``gnd_<name>.json``) when present, and otherwise parses the pickle with
:class:`GroundTruthUnpickler`, which refuses every global except numpy's array reconstruction, so no
user code or callable can run. Queries are used
uncropped (the ``bbx`` boxes are ignored), as in Cross the Gap.

Examples:
    >>> sorted(REVISITED)
    ['roxford5k', 'rparis6k']
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from modalign.data.benchmarks.base import (
    Benchmark,
    RetrievalProtocol,
    RevisitedGroundTruth,
    Side,
    check_files,
    check_name,
    find_dataset_dir,
    require_file,
)
from modalign.data.dataset import Item, PairedDataset
from modalign.io import read_json, write_json_atomic

REVISITED = ("roxford5k", "rparis6k")
DISTRACTOR_DIR = "revisitop1m"
REVISITED_RETRIEVAL = RetrievalProtocol(
    "image-to-image", query=Side("image", "test", ("query",)),
    gallery=Side("image", "test", ("database", "distractor")), relevance="revisited")

# The only globals a ground-truth pickle may name: numpy array and scalar reconstruction.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class GroundTruthUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only containers, strings, numbers and numpy arrays.

    Any other global (a class, ``os.system``, ``builtins.eval``, ...) raises
    ``pickle.UnpicklingError`` before it is looked up.

    Examples:
        >>> import io, pickle
        >>> GroundTruthUnpickler(io.BytesIO(pickle.dumps({"a": [1, 2.5, "x"]}))).load()
        {'a': [1, 2.5, 'x']}
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: a revisited ground-truth file holds only lists, "
                "dicts, numbers, strings and numpy arrays")
        return super().find_class(module, name)


def _plain(obj: Any) -> Any:
    """numpy arrays and scalars -> lists and Python numbers, recursively."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def read_ground_truth(path: str | Path) -> dict[str, Any]:
    """Read a revisited ground-truth file (``.json``, or ``.pkl`` through the safe unpickler).

    Returns ``{"imlist": [str], "qimlist": [str], "gnd": [{"easy": [int], "hard": [int],
    "junk": [int]}]}`` with plain Python values, after checking its structure.
    """
    path = Path(path)
    if path.suffix == ".json":
        raw = read_json(path)
    else:
        raw = GroundTruthUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    gt = _plain(raw)
    if not isinstance(gt, dict) or not {"imlist", "qimlist", "gnd"} <= set(gt):
        raise ValueError(f"{path}: expected a dict with 'imlist', 'qimlist' and 'gnd'")
    if len(gt["gnd"]) != len(gt["qimlist"]):
        raise ValueError(f"{path}: 'gnd' has {len(gt['gnd'])} entries for "
                         f"{len(gt['qimlist'])} queries")
    n = len(gt["imlist"])
    for q, g in enumerate(gt["gnd"]):
        for key in ("easy", "hard", "junk"):
            idx = [int(i) for i in g.get(key, [])]
            if any(i < 0 or i >= n for i in idx):
                raise ValueError(f"{path}: gnd[{q}]['{key}'] has an index outside 0..{n - 1}")
            g[key] = idx
    return {"imlist": [str(s) for s in gt["imlist"]], "qimlist": [str(s) for s in gt["qimlist"]],
            "gnd": [{k: g[k] for k in ("easy", "hard", "junk")} for g in gt["gnd"]]}


def convert_ground_truth(pkl_path: str | Path, json_path: str | Path | None = None) -> Path:
    """Write the JSON copy of a ground-truth pickle next to it (or at ``json_path``).

    Examples:
        >>> # convert_ground_truth("data/roxford5k/gnd_roxford5k.pkl")
        >>> # -> data/roxford5k/gnd_roxford5k.json, read from then on instead of the pickle
    """
    pkl_path = Path(pkl_path)
    out = Path(json_path) if json_path is not None else pkl_path.with_suffix(".json")
    write_json_atomic(out, read_ground_truth(pkl_path), indent=0)
    return out


def load_revisited(name: str, root: str | Path, distractors: bool = True,
                   check_files_exist: bool = True) -> Benchmark:
    """Load ROxford5k or RParis6k from ``root`` (the folder holding ``roxford5k/``, ``rparis6k/``).

    Args:
        name: ``"roxford5k"`` or ``"rparis6k"``.
        root: the data root.
        distractors: add the R1M distractors found under ``<root>/revisitop1m`` to the gallery.
        check_files_exist: check that every query and database image exists.

    Examples:
        >>> oxford = load_revisited("roxford5k", "/data", distractors=False)  # doctest: +SKIP
        >>> len(oxford.revisited.queries)  # doctest: +SKIP
        70
    """
    folder = find_dataset_dir(root, (check_name(name, REVISITED),), name)
    json_path = folder / f"gnd_{name}.json"
    gt_path = json_path if json_path.exists() else require_file(
        folder / f"gnd_{name}.pkl", f"{name} ground truth (gnd_{name}.pkl or gnd_{name}.json)")
    gt = read_ground_truth(gt_path)
    items = [Item(f"{name}:query:{q}", "image", "query", f"jpg/{q}.jpg", f"query:{q}", "test")
             for q in gt["qimlist"]]
    db_ids = [f"{name}:db:{im}" for im in gt["imlist"]]
    items += [Item(i, "image", "database", f"jpg/{im}.jpg", im, "test")
              for i, im in zip(db_ids, gt["imlist"])]
    if check_files_exist:
        check_files(folder, [it.value for it in items], f"{name} images")
    n_distractors = 0
    if distractors:
        distractor_items = _existing_distractors(folder.parent / DISTRACTOR_DIR)
        n_distractors = len(distractor_items)
        items += distractor_items
    truth = RevisitedGroundTruth(
        queries=tuple(it.id for it in items[: len(gt["qimlist"])]),
        easy=tuple(tuple(db_ids[i] for i in g["easy"]) for g in gt["gnd"]),
        hard=tuple(tuple(db_ids[i] for i in g["hard"]) for g in gt["gnd"]),
        junk=tuple(tuple(db_ids[i] for i in g["junk"]) for g in gt["gnd"]))
    ds = PairedDataset(name, items, root=folder,
                       info={"benchmark": name, "distractors": n_distractors,
                             "ground_truth": gt_path.name})
    return Benchmark(name, ds, {"image-to-image": REVISITED_RETRIEVAL}, revisited=truth)


def _existing_distractors(distractor_dir: Path) -> list[Item]:
    """Items for the R1M distractors listed in ``revisitop1m.txt`` that exist on disk."""
    listing = distractor_dir / "revisitop1m.txt"
    if not listing.exists():
        return []
    items = []
    for line in listing.read_text(encoding="utf-8").splitlines():
        rel = line.strip()
        if rel and (distractor_dir / "jpg" / rel).exists():
            # relative to the dataset folder, which is the PairedDataset root
            value = str(Path("..") / DISTRACTOR_DIR / "jpg" / rel)
            items.append(Item(f"r1m:{rel}", "image", "distractor", value, f"r1m:{rel}", "test"))
    return items
