"""``modalign report``: one self-contained HTML page for any run, records and diagnoses."""

from __future__ import annotations

import argparse

from modalign.cli_support import add_command, add_debug_flag

DESCRIPTION = """\
Write one self-contained HTML page: training curves from each run's log.jsonl (loss terms, R@1,
gap, the objectives' temperatures tau per epoch), a table of eval records with their 95%
intervals, diagnosis figures, and with --data a top-k search gallery per sampled query and (with
--label) a zero-shot confusion matrix.
"""

_EPILOG = """\
examples:
  modalign report runs/shop --out report.html
  modalign report runs/shop eval-records/ diag/shop --data shop/manifest.csv --label label \\
      --out report.html
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "report", run=run, description=DESCRIPTION, epilog=_EPILOG,
                    help="an HTML report of runs, eval records and diagnoses")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_RECORDS",
                   help="run folders, eval record files or folders, diagnosis folders")
    p.add_argument("--out", default="report.html", metavar="FILE.html",
                   help="page to write (default report.html)")
    p.add_argument("--data", default=None, metavar="DATA",
                   help="dataset for the search gallery and the confusion matrix of each run")
    p.add_argument("--label", default=None,
                   help="label of --data for the zero-shot confusion matrix")
    p.add_argument("--queries", type=int, default=6, help="gallery queries (default 6)")
    p.add_argument("--k", type=int, default=5, help="hits per gallery query (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the query sample (default 0)")
    add_debug_flag(p)


def run(args: argparse.Namespace) -> int:
    from modalign.errors import ModalignError
    from modalign.report.run_report import run_report

    if args.queries < 1 or args.k < 1:
        raise ModalignError(f"--queries {args.queries} / --k {args.k}: expected positive "
                            "integers")
    if not str(args.out).endswith(".html"):
        raise ModalignError(f"--out {args.out}: expected a .html file")
    page = run_report(args.inputs, data=args.data, label=args.label, queries=args.queries,
                      k=args.k, seed=args.seed)
    path = page.write(args.out)
    print(f"report: {path} ({len(page.sections)} sections)")
    return 0
