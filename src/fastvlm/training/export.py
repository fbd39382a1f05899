"""Write a trained or merged model as a full checkpoint in its base's own format.

The base folder is copied and, in its safetensors files, every tensor that training
changed is replaced under its original key and dtype. Key names, shards, config and
tokenizer files stay the base's, so whatever loaded the base (fastvlm, transformers for
``fast_vlm``, Apple's code for ``llava_qwen2``) loads the result.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..checkpoints.formats import APPLE_FORMAT, read_config_json
from ..checkpoints.hub import resolve_checkpoint
from ..checkpoints.keymap import apple_network_table, apple_to_hf, hf_to_ours
from ..checkpoints.loader import weight_files
from ..config import FastVLMConfig
from ..errors import CheckpointError


def base_keys(base: str | Path) -> dict[str, tuple[Path, str]]:
    """Our parameter name -> (weight file, key in it) for every tensor of the base."""
    folder = resolve_checkpoint(base)
    config = FastVLMConfig.from_dict(read_config_json(folder))
    network = apple_network_table(config.vision) if config.format == APPLE_FORMAT else None
    out = {}
    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path.name}: only safetensors bases can be written back; convert it first"
            )
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                hf = apple_to_hf(key, network) if network is not None else key
                ours = hf_to_ours(hf) if hf is not None else None
                if ours is not None:
                    out[ours] = (path, key)
    return out


def check_writable(base: str | Path, names: list[str]) -> None:
    """Fail before training if a tensor to be trained has no key of its own in the base."""
    keys = base_keys(base)
    missing = [n for n in names if n not in keys and n != "lm_head.weight"]
    if missing:
        raise CheckpointError(
            f"the base stores {missing[0]} in another form (a training-form vision tower?), so a trained "
            "copy could not be written back in its format; train without --train-vision/--full"
        )


def write_checkpoint(base: str | Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Copy ``base`` to ``out`` with ``tensors`` (our names) in place of the originals."""
    from safetensors.torch import load_file, save_file

    folder = resolve_checkpoint(base)
    keys = base_keys(folder)
    tied = "lm_head.weight" not in keys
    todo = {n: t for n, t in tensors.items() if not (tied and n == "lm_head.weight")}
    missing = [n for n in todo if n not in keys]
    if missing:
        raise CheckpointError(f"cannot write {missing[0]}: the base has no tensor of that name")
    out.mkdir(parents=True, exist_ok=True)
    by_file: dict[Path, dict[str, torch.Tensor]] = {}
    for name, tensor in todo.items():
        path, key = keys[name]
        by_file.setdefault(path, {})[key] = tensor
    for item in folder.iterdir():
        if item.is_file() and item not in by_file:
            shutil.copy2(item, out / item.name)
    for path, changes in by_file.items():
        state = load_file(str(path))
        for key, tensor in changes.items():
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise CheckpointError(f"{key}: trained shape {tuple(tensor.shape)} differs from the base's")
            state[key] = tensor.detach().to(device="cpu", dtype=state[key].dtype).contiguous()
        save_file(state, str(out / path.name), metadata={"format": "pt"})
    return out


def merge_to_checkpoint(base: str | Path, adapter: str | Path, out: Path) -> Path:
    """``fastvlm merge``: base + LoRA adapter -> a full checkpoint in the base's format."""
    from ..checkpoints.loader import load_model
    from .adapter import merge_adapter, read_adapter

    model = load_model(base, dtype=torch.float32, device="cpu", progress=False)
    merge_adapter(model, adapter)
    changed = read_adapter(adapter)
    names = [m + ".weight" for m in changed.lora] + list(changed.whole)
    params = dict(model.named_parameters())
    return write_checkpoint(base, out, {n: params[n] for n in names})
