"""Device checks of modalign against the CPU: one line per check, a non-zero exit on a failure.

Run by ``scripts/gpu-check.sh`` (which installs the project first); ``--device cpu`` runs every
check on the CPU against itself, which is how the test suite keeps this script working. Only
random-weight models are built: nothing is downloaded.

Checks (each compared with the CPU result within the tolerance it prints):

* ``loss-tiled``: the tiled log-sum-exp (values and gradients) against the full matrix, in fp32
  and under bf16 autocast;
* ``oti/<family>``, ``ovi/<family>``: a few inversion steps of a small model of each family
  (transformers CLIP, transformers SigLIP, the OpenAI layout of the ``clip`` package, open_clip
  CLIP and SigLIP when open_clip is installed) from the same initial tokens, fp32; then the speed
  at batch 64 in the official precision (fp16 with a gradient scaler) and the peak GPU memory;
* ``train/<config>``: 3 steps of each built-in training config on a small synthetic embedding
  store (the configs' objectives and heads, fake towers), in bf16 on CUDA (fp32 on the CPU),
  against fp32 on the CPU: the final training loss;
* ``reproduce``: ``modalign reproduce cross-the-gap`` on tiny fixtures, the records on the device
  against those on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

FAILED: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def guarded(name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as e:  # a crash is a failed check, with its reason on the line
        report(name, False, f"{type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stderr)


def check_tiled_loss(device: str) -> None:
    from modalign.losses.tiled import tiled_logsumexp

    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(300, 32, generator=g), dim=-1)
    y = F.normalize(torch.randn(260, 32, generator=g), dim=-1)
    xr = x.clone().requires_grad_()  # the reference: full matrix, fp32, on the CPU
    full = torch.logsumexp(10.0 * xr @ y.T, dim=1)
    (gf,) = torch.autograd.grad(full.sum(), [xr])
    for amp in (False, True):
        xd = x.to(device).requires_grad_()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            rows, _ = tiled_logsumexp(xd, y.to(device), 10.0, cols=False, tile_size=64)
        (gt,) = torch.autograd.grad(rows.float().sum(), [xd])
        tol = 5e-2 if amp else 1e-4
        err = max((rows.float().cpu() - full).abs().max().item(),
                  (gt.float().cpu() - gf).abs().max().item())
        report(f"loss-tiled/{'bf16' if amp else 'fp32'}", err <= tol,
               f"max |tiled on device - full fp32 on cpu| {err:.2e} (values, grads) <= {tol:g}")


def tiny_models() -> dict[str, tuple[Any, Any]]:
    """``family -> (OTI forward factory, OVI forward factory)`` on small random-weight models."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from modalign.bridge.inversion import (
        OpenAITextInversion,
        OpenAIVisionInversion,
        TemplateTokens,
        clip_vision_inversion,
        text_model_inversion,
    )

    out: dict[str, tuple[Any, Any]] = {}
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, eos_token_id=99),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=64, patch_size=16),
        projection_dim=32)).eval()
    ctpl = TemplateTokens((98, 11, 12, 13, 50, 99), slot=4)
    out["hf-clip"] = (lambda m=clip: text_model_inversion(m, ctpl),
                      lambda m=clip: clip_vision_inversion(m, 2), clip)
    siglip = SiglipModel(SiglipConfig(
        text_config=dict(vocab_size=100, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=64, patch_size=16))).eval()
    stpl = TemplateTokens((11, 12, 13, 50, 14) + (1,) * 11, slot=3)
    out["hf-siglip"] = (lambda m=siglip: text_model_inversion(m, stpl),
                        lambda m=siglip: clip_vision_inversion(m, 4), siglip)
    spec = importlib.util.find_spec("clip")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "model.py"
        mspec = importlib.util.spec_from_file_location("openai_clip_model", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        oai = module.CLIP(32, 64, 2, 64, 16, 16, 100, 64, 4, 2).eval()
        ttpl = TemplateTokens((98, 11, 12, 13, 50, 99), slot=4)
        out["openai-clip"] = (lambda m=oai: OpenAITextInversion(m, ttpl),
                              lambda m=oai: OpenAIVisionInversion(m, 2), oai)
    if importlib.util.find_spec("open_clip") is not None:
        import open_clip

        # made-up ids (no tokenizer files offline): SOT a photo of <slot> EOT, padded by the
        # forward to the model's context; SigLIP pools the last position of the padded text
        for arch, ids in (("ViT-B-32", (49406, 320, 1125, 539, 333, 49407)),
                          ("ViT-B-16-SigLIP", (262, 266, 1304, 267, 333, 1))):
            try:
                model = open_clip.create_model(arch, pretrained=None).eval()
            except Exception as e:
                report(f"open_clip/{arch}", False, f"cannot build: {type(e).__name__}: {e}")
                continue
            tpl = TemplateTokens(ids, slot=4)
            out[f"open_clip/{arch}"] = (
                lambda m=model, t=tpl: OpenAITextInversion(m, t),
                lambda m=model: OpenAIVisionInversion(m, 1), model)
    return out


def check_inversion(device: str, steps: int, speed_batch: int) -> None:
    from modalign.bridge.inversion import InversionSettings, invert

    for family, (make_oti, make_ovi, model) in tiny_models().items():
        for direction, make in (("oti", make_oti), ("ovi", make_ovi)):
            name = f"{direction}/{family}"

            def run(direction=direction, make=make, name=name, model=model) -> None:
                g = torch.Generator().manual_seed(1)
                model.to("cpu").float()
                fwd = make()
                targets = F.normalize(torch.randn(4, _out_dim(fwd), generator=g), dim=-1)
                settings = InversionSettings(steps=steps, lr=0.02)
                cpu = invert(targets, fwd, settings)
                model.to(device)
                fwd = make()
                dev = invert(targets.to(device), fwd, settings)
                err = (dev.features.cpu() - cpu.features).abs().max().item()
                tol = 1e-3
                speed = ""
                if torch.device(device).type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    big = F.normalize(torch.randn(speed_batch, targets.shape[1], generator=g),
                                      dim=-1).to(device)
                    fast = InversionSettings(steps=20, precision="fp16", batch_size=speed_batch)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    invert(big, fwd, fast)
                    torch.cuda.synchronize()
                    per_item = (time.perf_counter() - t0) / 20 * (150 if direction == "oti"
                                                                  else 1000)
                    mem = torch.cuda.max_memory_allocated() / 2**20
                    speed = (f"; fp16 batch {speed_batch}: {speed_batch / per_item:.1f} items/s "
                             f"at {150 if direction == 'oti' else 1000} steps, peak {mem:.0f} MiB")
                report(name, err <= tol, f"max |device - cpu| {err:.2e} after {steps} fp32 steps "
                                         f"<= {tol:g}{speed}")

            guarded(name, run)
        model.to("cpu")


def _out_dim(fwd: Any) -> int:
    with torch.no_grad():
        p = next(iter(_params(fwd)), None)
        dtype = p.dtype if p is not None else torch.float32
        device = p.device if p is not None else "cpu"
        return int(fwd(torch.zeros(1, fwd.num_tokens, fwd.token_dim, dtype=dtype,
                                   device=device)).shape[-1])


def _params(fwd: Any):
    for attr in ("tower", "model", "base", "token_embedding"):
        obj = getattr(fwd, attr, None)
        if obj is None:
            continue
        if hasattr(obj, "parameters"):
            return obj.parameters()
        return _params(obj)
    return iter(())


def check_training(device: str, repo: Path) -> None:
    sys.path.insert(0, str(repo / "tests"))
    from modalign.train.config import TrainConfig, builtin_config_path, read_config_file
    from modalign.train.loop import train
    from train_support import synthetic_store

    cuda = torch.device(device).type == "cuda"
    names = sorted(p.stem for p in builtin_config_path("clip").parent.glob("*.toml"))
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        synthetic_store(store, audio_dim=6)
        for name in names:
            def run(name: str = name) -> None:
                losses = {}
                runs = (("cpu", "fp32"), (device, "bf16" if cuda else "fp32"))
                for k, (dev, precision) in enumerate(runs):
                    data = read_config_file(builtin_config_path(name))
                    data["data"] = {**data["data"], "embeddings": str(store), "dataset": ""}
                    data["model"] = {**data["model"], "joint_dim": 8, "towers": {
                        m: f"fake-{m}" for m in data["model"]["towers"]}}
                    data["train"] = {**data.get("train", {}), "epochs": 1, "max_steps": 3,
                                     "batch_size": 8, "progress": False, "device": dev,
                                     "precision": precision}
                    data["run"] = {"dir": str(Path(tmp) / f"{name}-{k}")}
                    with contextlib.redirect_stdout(io.StringIO()):
                        res = train(TrainConfig.from_dict(data))
                    losses["cpu" if k == 0 else "device"] = float(
                        res.summary["final_train_loss"])
                rel = abs(losses["device"] - losses["cpu"]) / max(abs(losses["cpu"]), 1e-12)
                tol = 5e-2 if cuda else 1e-6
                report(f"train/{name}", rel <= tol,
                       f"final loss {losses['device']:.4f} on {device} "
                       f"({'bf16' if cuda else 'fp32'}) vs {losses['cpu']:.4f} fp32 cpu, "
                       f"rel. diff {rel:.1e} <= {tol:g}")

            guarded(f"train/{name}", run)


def check_reproduce(device: str, repo: Path) -> None:
    sys.path.insert(0, str(repo / "tests"))
    from modalign.cli import main
    from modalign.io import read_jsonl
    from reproduce_fixtures import save_tiny_clip, write_coop, write_karpathy

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_coop(root, "dtd")
        write_karpathy(root, "coco", n_images=6)
        clip = save_tiny_clip(Path(tmp) / "tiny-clip")
        got = {}
        for dev in ("cpu", device):
            out = Path(tmp) / f"out-{dev.replace(':', '-')}"
            argv = ["reproduce", "cross-the-gap", "--model", str(clip), "--data-root",
                    str(root), "--out", str(out), "--datasets", "dtd", "coco", "--oti-steps",
                    "3", "--ovi-steps", "3", "--precision", "fp32", "--no-progress",
                    "--device", dev]
            with contextlib.redirect_stdout(io.StringIO()):
                status = main(argv)
            if status != 0:
                report("reproduce", False, f"exit status non-zero on {dev}")
                return
            got[dev] = {(r["dataset"], r["task"], r["method"]): r["metrics"]
                        for r in read_jsonl(out / "records.jsonl")}
        worst = 0.0
        for key, metrics in got["cpu"].items():
            for k, v in metrics.items():
                w = got[device].get(key, {}).get(k)
                if isinstance(v, float) and isinstance(w, float):
                    worst = max(worst, abs(v - w))
        same_keys = set(got["cpu"]) == set(got[device])
        tol = 0.02
        report("reproduce", same_keys and worst <= tol,
               f"{len(got['cpu'])} records, max |device - cpu| metric {worst:.2e} <= {tol:g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="device to check (default cuda)")
    parser.add_argument("--steps", type=int, default=10, help="inversion steps compared")
    parser.add_argument("--speed-batch", type=int, default=64, help="batch of the speed runs")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=("loss", "inversion", "training", "reproduce"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"FAIL setup: --device {args.device} but CUDA is not available", flush=True)
        return 1
    torch.use_deterministic_algorithms(False)
    repo = Path(__file__).resolve().parent.parent
    print(f"device {args.device}: torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    if "loss" not in args.skip:
        guarded("loss-tiled", lambda: check_tiled_loss(args.device))
    if "inversion" not in args.skip:
        guarded("inversion", lambda: check_inversion(args.device, args.steps, args.speed_batch))
    if "training" not in args.skip:
        guarded("training", lambda: check_training(args.device, repo))
    if "reproduce" not in args.skip:
        guarded("reproduce", lambda: check_reproduce(args.device, repo))
    print(f"{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all checks passed'}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
