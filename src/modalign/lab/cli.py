"""``modalign lab gap``: the controlled modality-gap sweep from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from modalign.cli_support import add_command, add_command_group

DESCRIPTION = """\
Train a grid of small heads on cached tower features and show how the modality gap forms,
how large it must be before modality inversion pays, and what each fix does.

Three families of spaces: heads on frozen pretrained towers (head init 'xavier' or 'cone',
head depth, fixed temperature 0.01..1.0 or learned, training length), the pretrained towers'
last stages fine-tuned, and small towers trained from scratch by the CLIP loss alone; controls
add an intra-modal image term or uniformity + alignment. Each setting is trained per seed, then
measured on the test split: geometry (gap, separability, cone, uniformity), cross-modal
retrieval (native, centering, InvGC; train vs test), Noto->OpenMoji image retrieval and
name->text retrieval natively, through the other modality's paired items (the intra-modal
misalignment) and with inverted queries (OTI / OVI, at a fixed budget and run to a step cap),
zero-shot classification, and the gap-shift curve. The report opens with the answer to: where
towers are trained by the contrastive loss alone, is there intra-modal misalignment, and does
crossing the gap repair it? Whether the benefit of inversion grows with the gap is tested over
all settings and within each family (Spearman rho, permutation p-value, bootstrap CI), and
against the measured misalignment.

Everything is cached under --out: a killed sweep started again continues with the settings
not done."""

EPILOG = """\
outputs (in --out):
  settings/<setting>-s<seed>-<hash>.json   one record per trained space
  runs/<hash>/                            the training runs (checkpoints, log.jsonl)
  lab.json                                per-setting means/stds, the trend test, the verdict
  lab.html                                the plots and the verdict

examples:
  modalign lab gap --quick                       # six settings, one seed
  modalign lab gap --grid medium --out lab-med   # 13 settings, two seeds
  modalign lab gap --out lab-full --seeds 3      # the full grid
  modalign lab gap --embeddings STORE --quick    # a user's store of image/text features"""


def register(subparsers: Any) -> None:
    """Add ``lab`` (with its ``gap`` subcommand) to the ``modalign`` command."""
    sub = add_command_group(subparsers, "lab", help="controlled experiments on the modality gap",
                            description="Controlled experiments on the modality gap.",
                            dest="lab_command", metavar="EXPERIMENT")
    p = add_command(sub, "gap", run=run, description=DESCRIPTION, epilog=EPILOG,
                    help="sweep the factors that make the gap; test when inversion pays")
    p.add_argument("--quick", action="store_true",
                   help="six settings (one with towers trained from scratch), one seed, 24 "
                        "inverted queries per direction (OTI 40 steps, OVI 60) instead of the "
                        "full grid's 27 settings, 48 queries, 100 steps (same as --grid quick)")
    p.add_argument("--grid", choices=("quick", "medium", "full"), default=None,
                   help="which grid: quick, medium (quick + scratch towers for longer and at tau "
                        "0.01, the two controls, fine-tuned towers after 1 and 3 epochs, LoRA "
                        "after 3; 2 seeds) or full [full]")
    p.add_argument("--data", default="emoji",
                   help="dataset whose tower features are used (built-in 'emoji', a manifest "
                        "or a dataset folder; encoded once and cached) [emoji]")
    p.add_argument("--embeddings", default=None,
                   help="an embedding store of image and text tower features (instead of --data)")
    p.add_argument("--out", default="lab-gap", help="output folder [lab-gap]")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per setting (default: 1 with --quick, 2 otherwise)")
    p.add_argument("--queries", type=int, default=None,
                   help="inverted queries per direction (default 24 quick / 48 full)")
    p.add_argument("--families", default=None,
                   help="run only these families or groups, comma-separated (heads, finetune, "
                        "lora, scratch; tuned = finetune + lora); two processes with different "
                        "families can share one --out, a last run without it summarises all")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads [2]; use 1 on a machine shared with other jobs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from modalign.embed.store import EmbeddingStore
    from modalign.lab.settings import full_config, medium_config, quick_config, select_families
    from modalign.lab.sweep import data_store, run_gap_lab

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    grid = "quick" if args.quick else (args.grid or "full")
    if args.quick and args.grid not in (None, "quick"):
        raise ValueError(f"--quick and --grid {args.grid}: choose one grid")
    config = {"quick": quick_config, "medium": medium_config, "full": full_config}[grid]()
    if args.families:
        config = select_families(config, args.families)
    if args.seeds is not None:
        config = config.with_seeds(args.seeds)
    if args.queries is not None:
        if args.queries < 1:
            raise ValueError(f"--queries must be >= 1, got {args.queries}")
        config = dataclasses.replace(config, inverted_queries=args.queries)
    if args.embeddings:
        if not (Path(args.embeddings) / "manifest.json").is_file():
            raise FileNotFoundError(f"--embeddings {args.embeddings!r} is not an embedding store "
                                    "(no manifest.json); build one with 'modalign embed'")
        store = EmbeddingStore(args.embeddings)
    else:
        store = data_store(args.data)
    result = run_gap_lab(config, store, args.out, progress=not args.no_progress)
    print(result.verdict)
    print(f"wrote {Path(args.out) / 'lab.json'} and {Path(args.out) / 'lab.html'}")
    print(json.dumps({"settings": len(result.summary["settings"]),
                      "runs": len(result.records), "seconds": round(result.summary["seconds"], 1),
                      "claim_held": result.summary["claim_held"]}))
    return 0

