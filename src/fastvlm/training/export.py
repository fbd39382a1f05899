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

from ..checkpoints.files import read_config_json
from ..checkpoints.hub import resolve_checkpoint
from ..checkpoints.keymap import apple_network_table, apple_to_hf, hf_to_ours, unfold_ffn_conv
from ..checkpoints.loader import weight_files
from ..config import APPLE_FORMAT, FastVLMConfig
from ..errors import CheckpointError

# Where a tensor goes: (weight file, key in it).
Target = tuple[Path, str]


def base_keys(base: str | Path) -> dict[str, Target]:
    """Stored tensor in our module names (ConvFFN convs unfolded, as stored) -> its place."""
    from safetensors import safe_open

    folder = resolve_checkpoint(base)
    config = FastVLMConfig.from_dict(read_config_json(folder))
    network = apple_network_table(config.vision) if config.format == APPLE_FORMAT else None
    out: dict[str, Target] = {}
    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path.name}: only safetensors bases can be written back; convert it first"
            )
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                hf = apple_to_hf(key, network) if network is not None else key
                ours = hf_to_ours(hf) if hf is not None else None
                if ours is not None:
                    out[ours] = (path, key)
    return out


def _stored(name: str, tensor: torch.Tensor, keys: dict[str, Target]) -> dict[str, torch.Tensor]:
    """Our tensor -> the stored tensors it becomes (a folded ConvFFN conv goes back as the conv
    plus an identity BatchNorm that adds its bias); a batch counter the base lacks is dropped."""
    parts = unfold_ffn_conv(name, tensor)
    return {n: t for n, t in parts.items() if n in keys or not n.endswith("num_batches_tracked")}


def check_writable(base: str | Path, names: list[str]) -> None:
    """Fail before training if a tensor to be trained has no key of its own in the base."""
    keys = base_keys(base)
    stored = {n: _stored(n, torch.zeros(0), keys) for n in names if n != "lm_head.weight"}
    missing = [n for n, parts in stored.items() if any(s not in keys for s in parts)]
    if missing:
        raise CheckpointError(
            f"the base stores {missing[0]} in training form (unfused branches), so a trained copy could "
            "not be written back in its format; reparameterize it or train without --train-vision/--full"
        )


def write_checkpoint(base: str | Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Copy ``base`` to ``out`` with ``tensors`` (our names) in place of the originals."""
    from safetensors.torch import load_file, save_file

    folder = resolve_checkpoint(base)
    keys = base_keys(folder)
    tied = "lm_head.weight" not in keys
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not (tied and name == "lm_head.weight"):
            stored.update(_stored(name, tensor.detach().cpu(), keys))
    missing = [n for n in stored if n not in keys]
    if missing:
        raise CheckpointError(f"cannot write {missing[0]}: the base has no tensor of that name")
    out.mkdir(parents=True, exist_ok=True)
    by_file: dict[Path, dict[str, torch.Tensor]] = {}
    for name, value in stored.items():
        path, key = keys[name]
        by_file.setdefault(path, {})[key] = value
    for item in folder.iterdir():
        if item.is_file() and item not in by_file:
            shutil.copy2(item, out / item.name)
    for path, changes in by_file.items():
        state = load_file(str(path))
        for key, value in changes.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise CheckpointError(f"{key}: trained shape {tuple(value.shape)} differs from the base's")
            state[key] = value.to(dtype=state[key].dtype).contiguous()
        save_file(state, str(out / path.name), metadata={"format": "pt"})
    return out


def merge_to_checkpoint(base: str | Path, adapter: str | Path, out: Path) -> Path:
    """``fastvlm merge``: base + LoRA adapter -> a full checkpoint in the base's format."""
    from ..checkpoints.adapter import merge_adapter, read_adapter
    from ..checkpoints.loader import load_model

    model = load_model(base, dtype=torch.float32, device="cpu", progress=False)
    merge_adapter(model, adapter)
    changed = read_adapter(adapter)
    names = [m + ".weight" for m in changed.lora] + list(changed.whole)
    params = dict(model.named_parameters())
    return write_checkpoint(base, out, {n: params[n] for n in names})
