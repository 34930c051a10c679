"""Crash-safe training checkpoints: weights in safetensors, the rest as plain tensors and dicts.

A checkpoint is a folder ``ckpt-<step>`` under ``<run>/checkpoints`` holding

- ``weights.safetensors``: every module's ``state_dict`` under ``<module name>.`` prefixes;
- ``trainer.pt``: optimizer and scheduler state dicts, RNG states and the loop's counters, written
  with ``torch.save`` and read back with ``torch.load(weights_only=True)`` (nothing is unpickled).

The folder is filled under a temporary name and renamed into place; ``latest.json`` (written
atomically afterwards) names the newest complete checkpoint, so a kill at any instant leaves either
the previous or the new checkpoint readable. Older checkpoints beyond ``keep`` are deleted.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from modalign.embed.arrays import disk_full
from modalign.errors import ModalignError
from modalign.io import (
    NewerFormatError,
    check_format_version,
    read_json,
    read_safetensors,
    read_torch,
    write_json_atomic,
)

LATEST = "latest.json"
FORMAT_VERSION = 1
"""The checkpoint layout's version, in ``latest.json`` and ``trainer.pt`` (absent: written before
versions were recorded, the same layout)."""
WEIGHTS = "weights.safetensors"
TRAINER = "trainer.pt"


@dataclass
class Checkpoint:
    """A checkpoint read back: weights per module, trainer state, and where it lives."""

    path: Path
    step: int
    weights: dict[str, dict[str, torch.Tensor]]
    trainer: dict[str, Any]


def rng_state() -> dict[str, Any]:
    """The torch RNG states of this process (CPU, and every CUDA device when present)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def open_run(run_dir: Path, settings: Mapping[str, Any], settings_name: str,
             resumable: frozenset[str], section: str, resume: bool) -> tuple[Path, bool]:
    """The checkpoint folder of a run and whether it resumes: ``resume`` with a latest
    checkpoint there resumes (refused if a setting outside ``resumable`` differs from the one
    recorded in ``run_dir / settings_name``); no ``resume`` with checkpoints there is refused.
    """
    root = run_dir / "checkpoints"
    resumed = resume and (root / LATEST).is_file()
    if resumed:
        path = run_dir / settings_name
        old = read_json(path) if path.is_file() else {}
        changed = {k: (old[k], v) for k, v in settings.items()
                   if k not in resumable and k in old and old[k] != v}
        if changed:
            diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ModalignError(f"--resume: {run_dir} was started with other [{section}] "
                                f"settings ({diff}); a resume may only change "
                                f"{', '.join(sorted(resumable))}")
    elif (root / LATEST).exists():
        raise ModalignError(f"run folder {run_dir} already holds checkpoints; pass --resume to "
                            "continue it or choose another run.dir")
    return root, resumed


def save_checkpoint(root: str | os.PathLike[str], step: int, modules: Mapping[str, nn.Module],
                    trainer: Mapping[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``ckpt-<step>`` under ``root`` and point ``latest.json`` at it.

    Args:
        root: the checkpoints folder.
        step: optimizer steps done.
        modules: name -> module whose ``state_dict`` is saved (``"model"``, ``"objective"``).
        trainer: optimizer/scheduler state dicts, RNG states and counters (tensors, numbers,
            strings, lists, dicts).
        keep: how many of the newest checkpoints to keep (at least 1).

    Examples:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = save_checkpoint(d, 3, {"model": nn.Linear(2, 2)}, {"step": 3})
        >>> load_checkpoint(d).step
        3
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        flat: dict[str, torch.Tensor] = {}
        stored: set[int] = set()
        for mod_name, module in modules.items():
            if "." in mod_name:
                raise ValueError(f"module name {mod_name!r} must not contain '.'")
            for k, v in module.state_dict().items():
                t = v.detach().cpu().contiguous()
                if t.data_ptr() in stored:  # one parameter held by two modules (the scale)
                    t = t.clone()
                stored.add(t.data_ptr())
                flat[f"{mod_name}.{k}"] = t
        try:
            save_file(flat, str(tmp / WEIGHTS))
            torch.save({**dict(trainer), "step": int(step), "modules": sorted(modules),
                        "format_version": FORMAT_VERSION}, tmp / TRAINER)
            for f in (tmp / WEIGHTS, tmp / TRAINER):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        except Exception as e:
            needed = sum(t.numel() * t.element_size() for t in flat.values())
            if "code: 28" in str(e) or "StorageFull" in str(e) or "No space left" in str(e):
                e = OSError(errno.ENOSPC, str(e))
            err = disk_full(e, root / name, needed)
            if err is None:
                raise
            raise err from None
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(root / LATEST, {"format_version": FORMAT_VERSION, "checkpoint": name,
                                      "step": int(step)})
    existing = sorted(p for p in root.glob("ckpt-*") if p.is_dir() and not p.name.startswith("."))
    for old in existing[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The folder ``latest.json`` points at, or ``None`` when there is no checkpoint yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    meta = read_json(pointer)
    check_format_version(meta, FORMAT_VERSION, str(pointer))
    path = Path(root) / meta["checkpoint"]
    if not (path / WEIGHTS).is_file() or not (path / TRAINER).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def load_checkpoint(root_or_path: str | os.PathLike[str],
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read the latest checkpoint under a checkpoints folder (or one ``ckpt-*`` folder).

    When the latest one cannot be read (a truncated copy, a damaged file), the previous kept
    checkpoint is used instead, saying so on stderr; when none can be read, a
    :class:`~modalign.errors.ModalignError` lists each one with its reason.
    """
    p = Path(root_or_path)
    if (p / WEIGHTS).is_file():
        return _read_checkpoint(p, map_location)
    pointer = p / LATEST
    if not pointer.is_file():
        raise ModalignError(f"no checkpoint under {p}: expected {LATEST} or a ckpt-* folder")
    meta = read_json(pointer)
    check_format_version(meta, FORMAT_VERSION, str(pointer))
    latest = meta.get("checkpoint", "")
    folders = sorted((d for d in p.glob("ckpt-*") if d.is_dir() and d.name <= latest),
                     reverse=True)
    problems = []
    for folder in folders:
        try:
            ckpt = _read_checkpoint(folder, map_location)
        except NewerFormatError:
            raise
        except (ModalignError, FileNotFoundError, KeyError) as e:
            problems.append(f"{folder.name}: {e}")
            continue
        if problems:
            print(f"checkpoint {problems[0]}; resuming from the previous checkpoint "
                  f"{folder.name} (step {ckpt.step}) instead", file=sys.stderr, flush=True)
        return ckpt
    raise ModalignError(f"no readable checkpoint under {p}: " + ("; ".join(problems) or
                                                                  f"{latest} is missing"))


def _read_checkpoint(path: Path, map_location: str | torch.device) -> Checkpoint:
    for f in (WEIGHTS, TRAINER):
        if not (path / f).is_file():
            raise ModalignError(f"{path / f} is missing")
    flat = read_safetensors(path / WEIGHTS, device=str(map_location))
    trainer = read_torch(path / TRAINER, map_location=map_location)
    check_format_version(trainer, FORMAT_VERSION, str(path / TRAINER))
    weights: dict[str, dict[str, torch.Tensor]] = {m: {} for m in trainer["modules"]}
    for k, v in flat.items():
        mod, _, rest = k.partition(".")
        weights.setdefault(mod, {})[rest] = v
    return Checkpoint(path, int(trainer["step"]), weights, trainer)
