"""``modalign diagnose``: geometry metrics of a joint embedding space, as JSON and HTML."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from modalign.cli_support import add_command, add_debug_flag
from modalign.errors import SmallDataWarning

DESCRIPTION = """\
Measure the geometry of a joint embedding space: the modality gap (centroid distance, raw and
renormalised), linear separability of the modalities, alignment and uniformity (within and across
modalities), the cone effect, the spectrum and effective rank, hubness both ways, the agreement of
intra- and inter-modal neighbours, the Modality Integration Rate, and the temperature health of a
trained model. Writes OUT/diagnosis.json and a self-contained OUT/diagnosis.html (metrics table
with explanations, 2-D projection with positive pairs joined, similarity histograms, spectra);
--compare puts earlier runs side by side. Large stores are streamed; metrics defined on samples use
seeded samples whose size and seed are recorded in the JSON.
"""

EPILOG = """\
examples:
  modalign diagnose --embeddings runs/clip-store --out diag/clip
  modalign diagnose --model runs/emoji-clip/model --data emoji --split test --out diag/emoji
  modalign diagnose --model runs/emoji-cua/model --data emoji --out diag/cua --compare diag/emoji
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "diagnose", run=run, description=DESCRIPTION, epilog=EPILOG,
                    help="measure the modality gap and the geometry of a joint space")
    src = p.add_argument_group("input (one of)")
    src.add_argument("--embeddings", metavar="DIR",
                     help="an embedding store whose arrays are joint-space vectors (or, with "
                          "--model, the tower features to project)")
    src.add_argument("--model", metavar="DIR", help="a trained model folder (modalign train)")
    p.add_argument("--data", metavar="DATA",
                   help="with --model: emoji, a manifest or a dataset folder")
    p.add_argument("--split", default=None, help="only rows of this split, e.g. test "
                                                 "(default: all rows)")
    p.add_argument("--modalities", default=None, metavar="A,B",
                   help="comma-separated modalities (default: all)")
    p.add_argument("--out", default="diagnosis", metavar="DIR",
                   help="output folder for diagnosis.json and diagnosis.html (default ./diagnosis)")
    p.add_argument("--name", default=None, help="run name in the report (default: the --out name)")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN",
                   help="earlier diagnose outputs (folders or diagnosis.json files) to show side "
                        "by side")
    p.add_argument("--log", default=None, metavar="LOG_JSONL",
                   help="training log with logit scales (default: log.jsonl next to --model)")
    p.add_argument("--k", type=int, default=None,
                   help="neighbours for hubness and agreement (default 10, lowered to a tenth "
                        "of the rows when there are fewer than 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of every sample and split (default 0)")
    p.add_argument("--sample-rows", type=int, default=10000, metavar="N",
                   help="rows sampled for k-NN metrics above N (default 10000)")
    p.add_argument("--no-mir", action="store_true", help="skip the Modality Integration Rate")
    add_debug_flag(p)


def _load_run(path: str) -> tuple[str, dict[str, Any]]:
    from modalign.io import read_json

    p = Path(path)
    file = p / "diagnosis.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"--compare {path}: no diagnosis.json there")
    return (file.parent.name if file.name == "diagnosis.json" else file.stem), read_json(file)


def run(args: argparse.Namespace) -> int:
    from modalign.embed.joint import load_joint
    from modalign.geometry.diagnose import DiagnoseOptions, diagnose
    from modalign.geometry.report import diagnosis_page
    from modalign.geometry.temperature import logit_scale_history
    from modalign.io import dumps, write_json_atomic

    if args.embeddings is None and args.model is None:
        raise ValueError("pass --embeddings DIR, or --model DIR with --data DATA")
    compared = [_load_run(c) for c in args.compare]  # fail early, before the long part
    modalities = ([m.strip() for m in args.modalities.split(",") if m.strip()]
                  if args.modalities else None)
    joint = load_joint(model_dir=args.model, embeddings_dir=args.embeddings, data=args.data,
                       split=args.split, modalities=modalities)
    if len(joint) < 2:
        raise ValueError(f"need at least two modalities, found {sorted(joint)}")
    dims = {m: e.dim for m, e in joint.items()}
    if len(set(dims.values())) != 1:
        raise ValueError(f"the arrays have different dimensions {dims}: they are tower features, "
                         "not one joint space; pass --model DIR to project them")
    logit_scale = history = None
    if args.model is not None:
        from modalign.model import MultiTowerModel

        logit_scale = float(MultiTowerModel.from_pretrained(args.model).logit_scale.detach())
        log = Path(args.log) if args.log else Path(args.model).parent / "log.jsonl"
        if log.is_file():
            history = logit_scale_history(log) or None
    elif args.log:
        history = logit_scale_history(args.log) or None
    k = _neighbours(args.k, min(len(e) for e in joint.values()))
    opts = DiagnoseOptions(seed=args.seed, k=k, knn_rows=args.sample_rows,
                           compute_mir=not args.no_mir)
    record = diagnose({m: e.vectors for m, e in joint.items()},
                      groups={m: e.group_ids() for m, e in joint.items()},
                      logit_scale=logit_scale, logit_scale_history=history, options=opts,
                      progress=True)
    record["source"] = {"embeddings": args.embeddings, "model": args.model, "data": args.data,
                        "split": args.split}
    out = Path(args.out)
    name = args.name or out.resolve().name
    write_json_atomic(out / "diagnosis.json", record)
    diagnosis_page([(name, record), *compared]).write(out / "diagnosis.html")
    summary: dict[str, Any] = {"json": str(out / "diagnosis.json"),
                               "html": str(out / "diagnosis.html")}
    for key, pair in record["pairs"].items():
        summary[key] = {"centroid_distance": pair["gap"]["centroid_distance"],
                        "separability": pair["separability"]["accuracy"]}
    print(dumps(summary))
    return 0


def _neighbours(k: int | None, rows: int, default: int = 10, few: int = 100) -> int:
    """The k of the neighbour metrics; on few rows, a warning (and a smaller default k)."""
    if rows >= few:
        return default if k is None else k
    chosen = k if k is not None else max(1, min(default, rows // 10))
    warnings.warn(f"diagnosing {rows} rows per modality: separability is tested on about "
                  f"{max(1, rows // 5)} held-out rows and the neighbour metrics use k={chosen}"
                  + ("" if k is not None else f" (lowered from {default})")
                  + "; read them as rough", SmallDataWarning, stacklevel=2)
    return chosen
