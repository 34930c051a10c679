"""``modalign export --merge-lora MODEL --out DIR``: a model folder with its LoRA adapters merged.

The adapters of every LoRA-tuned tower are folded into that tower's weights
(``W + (alpha / rank) * B A``, by peft); the result is an ordinary model folder that loads
without peft and gives the same embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from modalign.cli_support import add_command
from modalign.errors import ModalignError

DESCRIPTION = """\
Write a model folder with the LoRA adapters of its towers merged into their weights (loads without
peft, same embeddings).
"""


def merge_lora_model(model_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write ``model_dir`` with its LoRA adapters merged into ``out``; returns ``out``.

    Examples:
        (Not run as a doctest: it needs a model folder trained with LoRA adapters.)

        >>> merge_lora_model("runs/lora/model", "runs/lora/merged")    # doctest: +SKIP
    """
    from modalign.encoders.lora import merge_lora
    from modalign.io import read_json
    from modalign.model import CONFIG_NAME, MultiTowerModel

    src, dst = Path(model_dir), Path(out)
    if dst.resolve() == src.resolve():
        raise ModalignError(f"--out {dst}: expected a folder other than the model's own")
    try:
        model = MultiTowerModel.from_pretrained(src)
    except (FileNotFoundError, ValueError) as e:
        raise ModalignError(f"--merge-lora {src}: {e}") from None
    if not model.config.lora:
        raise ModalignError(f"--merge-lora {src}: the model has no LoRA adapters (its config "
                            "lists none); it is already a plain model folder")
    for m in model.config.lora:
        merge_lora(model.towers[m])
    merged = sorted(model.config.lora)
    model.config.lora = {}
    extra = dict(read_json(src / CONFIG_NAME).get("extra") or {})
    model.save_pretrained(dst, extra={**extra, "merged_lora": merged})
    return dst


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "export", run=run, description=DESCRIPTION,
                    help="write a model folder in another form (LoRA merged)")
    p.add_argument("--merge-lora", required=True, metavar="MODEL",
                   help="a model folder trained with [lora]")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged model folder")


def run(args: argparse.Namespace) -> int:
    out = merge_lora_model(args.merge_lora, args.out)
    print(json.dumps({"model": str(out)}))
    return 0
