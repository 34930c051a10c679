"""Text-tower tuning on the emoji data: frozen MiniLM + heads, the last blocks unfrozen, LoRA.

Every case trains image (cached EfficientNet-Lite0 features) <-> text (``text:name``) with the
CLIP loss for the same epochs and batch, in a fresh process, and reports: trainable parameters
(heads included), peak resident memory (``peak_mb``), training samples/s, test image->name R@1
(Noto images, the texts encoded through the tuned tower) and the centroid gap
``||mean(image) - mean(text)||`` of the unit test embeddings.

    python benchmarks/lora.py --store runs/emb --data emoji --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CASES = {
    "frozen": {},
    "unfreeze2": {"train": {"unfreeze": {"text": 2}}},
    "lora8": {"lora": {"towers": ["text"], "rank": 8, "alpha": 16.0}},
}


def run_case(case: str, store: str, data: str, epochs: int, batch: int, threads: int) -> dict:
    import torch

    from modalign.model import MultiTowerModel
    from modalign.train.config import TrainConfig
    from modalign.train.loop import Trainer

    torch.set_num_threads(threads)
    cfg: dict = {"data": {"embeddings": store, "dataset": data, "keys": ["image:noto",
                                                                          "text:name"]},
                 "model": {"towers": {"image": "effnet-lite0", "text": "minilm"}},
                 "objectives": [{"loss": "clip", "modalities": ["image:noto", "text:name"]}],
                 "optim": {"lr": 1e-3, "tower_lr": 1e-4, "warmup_steps": 2},
                 "train": {"epochs": epochs, "batch_size": batch, "progress": False,
                           "device": "cpu"},
                 "validate": {"metric": "image:noto-to-text:name_recall@1"},
                 "run": {"dir": tempfile.mkdtemp(prefix=f"lora-{case}-")}}
    for section, values in CASES[case].items():
        cfg.setdefault(section, {}).update(values)
    trainer = Trainer(TrainConfig.from_dict(cfg))
    trainable = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    result = trainer.run()
    model = MultiTowerModel.from_pretrained(result.model_dir)
    images = trainer.store.load("image", view="noto", split="test")
    texts = trainer.store.load("text", view="name", split="test")
    with torch.no_grad():
        zi = model.project("image", torch.from_numpy(images.vectors.copy()))
    zt = model.encode("text", [it["value"] for it in texts.items])
    gi, gt = images.group_ids(), texts.group_ids()
    top = (zi @ zt.T).argmax(1).numpy()
    r1 = float((gt[top] == gi).mean())
    gap = float((zi.mean(0) - zt.mean(0)).norm())
    return {"case": case, "trainable_params": trainable,
            "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "samples_per_s": result.summary.get("samples_per_s"), "test_r1": round(r1, 4),
            "gap": round(gap, 4), "epochs": epochs, "batch": batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="emoji store with image and text arrays")
    p.add_argument("--data", default="emoji", help="the dataset the store was embedded from")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--case", choices=sorted(CASES), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.store, args.data, args.epochs, args.batch,
                                  args.threads)))
        return
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--store", args.store, "--data", args.data,
                              "--epochs",
                              str(args.epochs), "--batch", str(args.batch), "--threads",
                              str(args.threads), "--case", case],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
