"""``modalign refine``: a short post-training refinement of a model's heads (CLIP-Refine, CMA)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from modalign.cli_support import add_command, add_debug_flag

if TYPE_CHECKING:
    from modalign.data.dataset import PairedDataset
    from modalign.embed.store import EmbeddingStore
    from modalign.model import MultiTowerModel

EPILOG = """\
examples:
  # CLIP-Refine, official settings (raw features, T=1, lr 1e-6, one epoch)
  modalign refine --model runs/clip/model --data emoji --out runs/clip-refined
  # normalised features with a temperature, a larger step, zero-shot measured on subgroups
  modalign refine --model runs/clip/model --data emoji --out runs/refined-norm \\
      --normalize --temperature 0.01 --lr 1e-4 --label subgroup
  # the CMA objective on class prompts of the subgroups
  modalign refine --model runs/clip/model --data emoji --out runs/cma \\
      --method cma --label subgroup --lr 1e-4

A model with fine-tuned towers (trained with train.unfreeze or LoRA) needs --data: those
modalities are encoded from their raw inputs, and the last --tower-stages stages of each such
tower (or its LoRA adapters) are refined with the heads.

The refined model is a normal model folder (config.json + model.safetensors); refine.json in it
is the record: gap, retrieval and (with --label) zero-shot accuracy before and after, on
--eval-split.
"""


DESCRIPTION = """\
Post-training refinement of a model's heads (and of its fine-tuned tower stages, if any):
CLIP-Refine (random feature alignment + hybrid contrastive distillation to the starting model) or
the cross-modal alignment (CMA) objective on class prompts. Writes a normal model folder and a
record with the gap, cross-modal retrieval and zero-shot accuracy before and after.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "refine", run=run, description=DESCRIPTION, epilog=EPILOG,
                    help="refine a trained model (CLIP-Refine RaFA+HyCD, or CMA)")
    p.add_argument("--model", required=True, metavar="DIR", help="the trained model folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DATA",
                     help="emoji[:options], a .csv/.jsonl manifest or a dataset folder")
    src.add_argument("--embeddings", metavar="DIR",
                     help="an embedding store of the model's tower features")
    p.add_argument("--out", required=True, metavar="DIR", help="folder of the refined model")
    p.add_argument("--method", choices=("clip-refine", "cma"), default="clip-refine",
                   help="clip-refine (default) or cma")
    p.add_argument("--modalities", default="image,text", metavar="A,B",
                   help="the two modalities (default image,text)")
    p.add_argument("--split", default="train", help="split trained on (default train)")
    p.add_argument("--eval-split", default="test", help="split measured (default test)")
    p.add_argument("--label", default=None,
                   help="label of the classes (zero-shot before/after; the texts of --method "
                        "cma), e.g. subgroup")
    p.add_argument("--template", action="append", default=None, metavar="TEXT",
                   help="class prompt template with {} (repeatable; default 'a photo of a {}.')")
    opt = p.add_argument_group("optimisation (defaults: CLIP-Refine's official config)")
    opt.add_argument("--epochs", type=int, default=1, help="passes over the pairs (1)")
    opt.add_argument("--batch-size", type=int, default=512, help="pairs per step (512)")
    opt.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (1e-6)")
    opt.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (0.1)")
    opt.add_argument("--lambda-cont", type=float, default=0.0, help="CLIP loss weight (0)")
    opt.add_argument("--lambda-rand", type=float, default=1.0, help="RaFA weight (1)")
    opt.add_argument("--lambda-kd", type=float, default=1.0, help="HyCD weight (1)")
    opt.add_argument("--alpha", type=float, default=0.5,
                     help="HyCD: weight of the identity in the targets (0.5)")
    opt.add_argument("--temperature", type=float, default=1.0, help="HyCD temperature (1)")
    opt.add_argument("--normalize", action="store_true",
                     help="normalise features before RaFA and HyCD (official: raw)")
    opt.add_argument("--cma-lambda", type=float, default=0.001,
                     help="CMA: weight of the -logsumexp term (0.001)")
    opt.add_argument("--tower-stages", type=int, default=1, metavar="K",
                     help="fine-tuned towers: last K stages refined (default 1; 0: heads only)")
    opt.add_argument("--seed", type=int, default=0,
                     help="seed of the initialisation and of the batch order (0)")
    add_debug_flag(p)


def run(args: argparse.Namespace) -> int:
    from modalign.embed.store import EmbeddingStore
    from modalign.errors import ModalignError
    from modalign.evaluate.records import make_record, write_record
    from modalign.model import MultiTowerModel
    from modalign.refine.core import (
        RefineConfig,
        as_mapping,
        class_prompt_features,
        config_dict,
        evaluate_model,
        label_classes,
        refine_model,
    )
    from modalign.train.data import PairedFeatures

    mods = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    if len(mods) != 2:
        raise ModalignError(f"--modalities {args.modalities!r}: expected two, e.g. image,text")
    config = RefineConfig(
        method=args.method, modalities=(mods[0], mods[1]), epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        lambda_cont=args.lambda_cont, lambda_rand=args.lambda_rand, lambda_kd=args.lambda_kd,
        alpha=args.alpha, temperature=args.temperature, normalize=args.normalize,
        cma_lambda=args.cma_lambda, label=args.label,
        templates=tuple(args.template or ("a photo of a {}.",)), seed=args.seed,
        split=args.split, tower_stages=args.tower_stages)
    config.validate()
    model = MultiTowerModel.from_pretrained(args.model)
    tuned = [m for m in mods if m in model.config.trainable_towers]
    if tuned and not args.data:
        raise ModalignError(f"--model: the {tuned} tower(s) are fine-tuned; pass --data (not "
                            "--embeddings) so their raw inputs are encoded")
    dataset = None
    if args.embeddings:
        store = EmbeddingStore(args.embeddings)
    else:
        store, dataset = _store_for(model, args.data)
    classnames: list[str] = []
    prompts = None
    if args.label:
        classnames = label_classes(store, mods[0], args.label)
        prompts = class_prompt_features(model, classnames, config.templates, mods[1])
    data = PairedFeatures(store, list(mods), args.split)
    measure = dict(split=args.eval_split, modalities=(mods[0], mods[1]), label=args.label,
                   classnames=classnames, dataset=dataset)
    before = evaluate_model(model, store, prompt_features=prompts, **measure)
    result = refine_model(model, data, config, prompt_features=prompts, classnames=classnames,
                          dataset=dataset, progress=True)
    if args.label and mods[1] in tuned:  # the refined text tower encodes the prompts anew
        prompts = class_prompt_features(result.model, classnames, config.templates, mods[1])
    after = evaluate_model(result.model, store, prompt_features=prompts, **measure)
    out = Path(args.out)
    summary = {"refine": config_dict(config), "from_model": str(args.model),
               "steps": result.steps, "seconds": round(result.seconds, 3)}
    result.model.save_pretrained(out, extra=summary)
    record = make_record(dataset=args.data or Path(args.embeddings).name, split=args.eval_split,
                         model=str(out), task="refine",
                         protocol={**summary, "final_loss": result.log[-1]},
                         metrics={**as_mapping(before, "before"), **as_mapping(after, "after")},
                         seed=args.seed)
    path = write_record(record, out / "refine.json")
    for key in before:
        if key.startswith(("gap", "zeroshot_acc1")) or key.endswith("recall@1"):
            print(f"  {key:<34} {before[key]:.4g} -> {after[key]:.4g}")
    print(json.dumps({"model": str(out), "record": str(path), "steps": result.steps}))
    return 0


def _store_for(model: MultiTowerModel, data: str) -> tuple[EmbeddingStore, PairedDataset]:
    """The dataset ``data`` and its embedding store for the model's towers (encoded if
    needed). Fine-tuned towers' arrays hold their base tower's features, as in ``train``: only
    their rows and groups are read."""
    from modalign.data import load_dataset
    from modalign.embed.encode import embed_dataset
    from modalign.embed.paths import default_store_dir
    from modalign.embed.store import EmbeddingStore

    dataset = load_dataset(data)
    store = EmbeddingStore(default_store_dir(dataset, model.config.towers))
    from modalign.encoders import load_encoder

    towers = {m: (load_encoder(model.config.towers[m], modality=m)
                  if m in model.config.trainable_towers else model.tower(m))
              for m in model.modalities if m in dataset.modalities}
    if towers:
        embed_dataset(dataset, towers, store.path)
    return store, dataset
