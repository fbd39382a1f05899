"""Load a checkpoint of either format into a model of the class the caller names.

The model is built on the meta device and each tensor is read, converted and placed
on the target device one at a time, so a second full copy of the weights never
exists in memory. The model comes back plain, as the checkpoint describes it, in eval
mode; speed switches are the caller's (``models.optimize``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from ..config import APPLE_FORMAT, FastVLMConfig
from ..device import resolve_device, resolve_dtype
from ..errors import CheckpointError
from ..models.fastvlm import FastVLMCore
from .files import read_config_json, read_optional_json
from .fusion import LazyState, fuse_vision_state
from .hub import resolve_checkpoint
from .keymap import apple_network_table, apple_to_hf, hf_to_ours
from .safetensors_io import SafetensorsReader

Model = TypeVar("Model", bound=FastVLMCore)


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred, shards in index order."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(
                    f"{index} is not a valid shard index; re-download the checkpoint"
                ) from exc
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{folder} is missing shard(s) {missing}; re-download the checkpoint")
            return files
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"{folder} has no model.safetensors (or pytorch_model.bin); nothing to load")


def _open_lazy(files: list[Path]) -> LazyState:
    state: LazyState = {}
    for path in files:
        if path.suffix == ".safetensors":
            reader = SafetensorsReader(path)
            for key in reader.keys():
                state[key] = partial(reader.read, key)
            continue
        try:
            # Never unpickle arbitrary objects: tensors only.
            tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # corrupt, truncated, or not a plain state dict
            raise CheckpointError(f"cannot read weights from {path} ({exc}); re-download it") from exc
        for key, value in tensors.items():
            state[key] = partial(lambda v: v, value)
    return state


def _rename(state: LazyState, config: FastVLMConfig) -> LazyState:
    network = apple_network_table(config.vision) if config.format == APPLE_FORMAT else None
    out: LazyState = {}
    for key, lazy in state.items():
        hf_key = apple_to_hf(key, network) if network is not None else key
        if hf_key is None:
            continue
        ours = hf_to_ours(hf_key)
        out[ours if ours is not None else "<unknown>." + key] = lazy
    return out


def _check_keys(state: LazyState, expected: dict[str, torch.Tensor]) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k.removeprefix("<unknown>.") for k in state if k not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"checkpoint is missing weight {missing[0]!r}{more}; is it a complete FastVLM checkpoint?"
        )
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"checkpoint has unexpected weight {unexpected[0]!r}{more}; it does not match its config.json"
        )


def _set(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def load_state(model, state: LazyState, dtype: torch.dtype, device: torch.device, progress: bool) -> None:
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.text.tie_word_embeddings
    if not tied and "lm_head.weight" not in state:
        # transformers would start such a model with a random head; an answer from it is noise.
        raise CheckpointError(
            "checkpoint has no 'lm_head.weight' but config.json says tie_word_embeddings is false; "
            "re-download the weights, or set tie_word_embeddings to true if the head is the embedding"
        )
    if tied:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    _check_keys(state, expected)
    for name, target in _progress(expected.items(), progress, len(expected)):
        tensor = state.pop(name)()  # pop: drop each source (and fused float32 copy) once placed
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"weight {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(target.shape)}; "
                "the checkpoint and its config.json disagree"
            )
        _set(model, name, tensor.to(device=device, dtype=dtype))
    if tied:
        model.lm_head.weight = model.language_model.embed_tokens.weight


def _progress(items, enabled: bool, total: int) -> Iterator:
    return iter(
        tqdm(items, total=total, desc="Loading weights", unit="tensor", disable=not enabled, leave=False)
    )


def apply_generation_config(config: FastVLMConfig, folder: Path) -> None:
    """Stop and pad ids from generation_config.json override config.json's, as in transformers."""
    gen = read_optional_json(folder, "generation_config.json")
    if gen is None:
        return
    if gen.get("eos_token_id") is not None:
        config.eos_token_id = gen["eos_token_id"]
    if gen.get("pad_token_id") is not None:
        config.pad_token_id = gen["pad_token_id"]


def _build(
    model_class: type[Model],
    config: FastVLMConfig,
    source: LazyState,
    dtype,
    device,
    progress: bool,
    folder: Path | None = None,
) -> Model:
    """A ``model_class`` from lazily read source tensors (either format's key names), in eval mode."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with torch.device("meta"):
        model = model_class(config, source=None if folder is None else str(folder))
    load_state(model, fuse_vision_state(_rename(source, config)), dt, dev, progress)
    return model.eval()


def model_from_state_dict(
    config: FastVLMConfig,
    state_dict: dict,
    *,
    model_class: type[Model] = FastVLMCore,
    dtype=None,
    device=None,
) -> Model:
    """Build a model from an in-memory state dict in either format's key names."""
    lazy = {k: partial(lambda v: v, v) for k, v in state_dict.items()}
    return _build(model_class, config, lazy, dtype, device, False)


def load_model(
    src: str | os.PathLike,
    *,
    model_class: type[Model] = FastVLMCore,
    dtype=None,
    device=None,
    revision: str | None = None,
    progress: bool = True,
) -> Model:
    """Resolve ``src`` (folder or hub id), read its config and weights into a ``model_class``."""
    folder = resolve_checkpoint(src, revision=revision)
    config = FastVLMConfig.from_dict(read_config_json(folder))
    apply_generation_config(config, folder)
    return _build(model_class, config, _open_lazy(weight_files(folder)), dtype, device, progress, folder)


def stored_dtype(folder: Path, config: FastVLMConfig) -> torch.dtype:
    """The checkpoint's own dtype, as transformers' ``dtype="auto"`` finds it: config.json's
    ``dtype``/``torch_dtype``, else the first floating-point weight's."""
    if config.dtype is not None:
        dtype = getattr(torch, str(config.dtype).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"config.json: dtype {config.dtype!r} is not a torch dtype")
        return dtype
    first = weight_files(folder)[0]
    if first.suffix == ".safetensors":
        floats = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        for entry in SafetensorsReader(first).entries.values():  # the header only, no weights read
            if entry["dtype"] in floats:
                return floats[entry["dtype"]]
    else:
        for tensor in torch.load(first, map_location="meta", weights_only=True).values():
            if tensor.is_floating_point():
                return tensor.dtype
    raise CheckpointError(f"{first} holds no floating-point weights; it is not a FastVLM checkpoint")
