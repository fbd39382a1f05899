"""Resumable training state: trainable weights, optimiser moments and the step reached.

Data order and dropout noise are functions of (seed, step, rank) (see ``loop.py``), so
the step number is the whole data position and no RNG state needs saving: a resumed
run takes the same later steps as one that never stopped. A checkpoint is written to a
temporary folder and swapped in with renames, so a crash mid-save loses nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

DIRNAME = "checkpoint"


def checkpoint_dir(output: Path) -> Path:
    return output / DIRNAME


def save_state(
    output: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, meta: dict
) -> None:
    from safetensors.torch import save_file

    final, tmp, old = output / DIRNAME, output / (DIRNAME + ".tmp"), output / (DIRNAME + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**meta, "step": step}, indent=2), encoding="utf-8")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_state(output: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> int:
    """Restore weights and optimiser from ``output``'s checkpoint; returns the step to continue at."""
    from safetensors.torch import load_file

    folder = output / DIRNAME
    if not (folder / "state.json").is_file():
        raise InputError(f"--resume: {output} has no checkpoint to continue from; drop --resume to start")
    saved = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    changed = [k for k, v in meta.items() if saved.get(k) != v]
    if changed:
        raise InputError(
            f"--resume: the checkpoint was made with {changed[0]}={saved.get(changed[0])!r}, now "
            f"{meta[changed[0]]!r}; resume with the same settings"
        )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors = load_file(str(folder / "trainable.safetensors"))
    if set(tensors) != set(params):
        raise InputError("--resume: the checkpoint trains other parameters than these settings do")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    return int(saved["step"])
