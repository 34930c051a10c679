"""``modalign demo``: the whole story on the built-in emoji data, ending with one report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modalign.cli_support import add_command, add_debug_flag
from modalign.demo.pipeline import DemoOptions, DemoResult, run_demo

__all__ = ["DemoOptions", "DemoResult", "register", "run_demo"]


DESCRIPTION = """\
Build the emoji data, embed it with the real pretrained towers, train the built-in models (CLIP;
CLIP + uniformity + alignment; CLIP + an intra-modal term; image-text-speech when espeak-ng is
there), diagnose their geometry, evaluate retrieval and zero-shot natively, with modality inversion
and with the post-hoc bridges, run the gap laboratory's quick sweep, and write one self-contained
HTML report with the JSON records. Every stage is cached: a second run only re-renders the report.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", run=run, description=DESCRIPTION,
                    help="run the whole pipeline on the emoji data and write a report")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--quick", action="store_true",
                   help="300 concepts, short training and inversion (about a minute)")
    p.add_argument("--no-speech", action="store_true", help="skip the speech modality")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    add_debug_flag(p)


def run(args: argparse.Namespace) -> int:
    opts = DemoOptions(out=Path(args.out), quick=args.quick, seed=args.seed,
                       speech=False if args.no_speech else None)
    result = run_demo(opts)
    print(result.summary_table)
    print()
    total = sum(result.stage_seconds.values())
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.stage_seconds.items())
          + f" (total {total:.1f})")
    print(f"report: {result.report}")
    sys.stdout.flush()
    return 0
