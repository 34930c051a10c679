"""``modalign train``: train an N-tower model from a TOML/YAML config, resumable, torchrun-ready."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from modalign.cli_support import add_command, add_debug_flag
from modalign.io import dumps
from modalign.train.config import BUILTIN_CONFIGS, SECTIONS, flag_specs, load_config

_DESCRIPTION = """\
Train the heads of an N-tower model (one tower per modality, frozen by default, features read
from an embedding store) with any combination of contrastive objectives. Validation runs after
every epoch (retrieval R@1/R@5 both ways and the modality-gap centroid distance) and is appended
to <run>/log.jsonl; the best epoch is saved as <run>/model, a folder that every other command
accepts as --model DIR.

Every config key can be set from the command line, either as --set section.key=value or as
--section.key value (values are TOML literals: 1e-3, true, ["image", "text"], {text = 0.1}).
Distributed: torchrun --nproc_per_node N -m modalign train ... (gloo on CPU, NCCL on GPUs).
"""

_EPILOG = f"""\
built-in configs (for the emoji data): {', '.join(BUILTIN_CONFIGS)}

examples:
  modalign train --config clip --set data.embeddings=STORE --set run.dir=runs/clip
  modalign train --config my.toml --optim.lr 3e-4 --train.epochs 20
  modalign train --config my.toml --run.dir runs/a --resume
  torchrun --nproc_per_node 2 -m modalign train --config clip --train.device cpu
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    p = add_command(
        subparsers, "train", run=run, description=_DESCRIPTION, epilog=_EPILOG,
        help="train an N-tower model (heads on cached features), resumable")
    p.add_argument("--config", metavar="FILE",
                   help=f"a .toml/.yaml config or a built-in name ({', '.join(BUILTIN_CONFIGS)}); "
                        "default: every key at its default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in run.dir from its latest checkpoint (bitwise on CPU)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit")
    add_debug_flag(p)
    p.add_argument("--name", dest="key:run.name", metavar="NAME", default=argparse.SUPPRESS,
                   help="name of the run (same as --run.name); without run.dir the run goes to "
                        "<modalign home>/runs/NAME")
    groups = {name: p.add_argument_group(f"[{name}] keys", cls.__doc__)
              for name, cls in SECTIONS.items()}
    groups["objectives"] = p.add_argument_group(
        "[[objectives]]", "a list of {loss = NAME, modalities = [...], weight = W, ...params}")
    for key, help_text in flag_specs():
        section = key.split(".", 1)[0]
        groups[section].add_argument(f"--{key}", dest=f"key:{key}", metavar="VALUE",
                                     default=argparse.SUPPRESS, help=help_text)


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides followed by the ``--section.key VALUE`` flags, as ``key=value``."""
    out = list(args.overrides)
    for name, value in vars(args).items():
        if name.startswith("key:"):
            out.append(f"{name[4:]}={value}")
    return out


def run(args: argparse.Namespace) -> int:
    """Resolve the config and train; prints the one-line summary."""
    from modalign.train.loop import train

    cfg = load_config(args.config, overrides_from_args(args))
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if cfg.late.enabled:
        return _run_late(cfg, args)
    if cfg.fdt.enabled:
        return _run_fdt(cfg, args)
    if cfg.mcl.enabled:
        return _run_mcl(cfg, args)
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(dumps(_short(result.summary)))
    return 0


def _short(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if v is not None}


def _run_late(cfg: Any, args: argparse.Namespace) -> int:
    """``[late] enabled = true``: train late-interaction heads (see ``modalign.late``)."""
    from modalign.late.model import train_late

    settings = cfg.late_settings()
    if not settings.run_dir:
        from modalign.train.loop import default_run_dir

        settings.run_dir = str(default_run_dir(cfg))
    print(dumps(train_late(settings, progress=cfg.train.progress, resume=args.resume)))
    return 0


def _run_fdt(cfg: Any, args: argparse.Namespace) -> int:
    """``[fdt] enabled = true``: train a finite-discrete-tokens model (see
    ``modalign.train.recipes.fdt``)."""
    from modalign.train.recipes.fdt import train_fdt

    settings = cfg.fdt_settings()
    if not settings.run_dir:
        from modalign.train.loop import default_run_dir

        settings.run_dir = str(default_run_dir(cfg))
    print(dumps(train_fdt(settings, resume=args.resume)))
    return 0


def _run_mcl(cfg: Any, args: argparse.Namespace) -> int:
    """``[mcl] stages > 1``: multistage contrastive learning (see
    ``modalign.train.recipes.mcl``)."""
    from modalign.distributed import runtime as D
    from modalign.train.recipes.mcl import train_mcl

    try:
        summary = train_mcl(cfg, resume=args.resume)
    finally:
        D.teardown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(dumps(summary))
    return 0
