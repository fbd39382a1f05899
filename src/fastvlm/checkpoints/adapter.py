"""LoRA adapters in PEFT's file format, named as transformers' FastVlmForConditionalGeneration.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<transformers module>.lora_A.weight`` / ``.lora_B.weight``, plus whole
tensors of the fully trained modules (PEFT's ``modules_to_save``). Whatever the base's
format (transformers or Apple), the names are the transformers ones, so one adapter
works with ``PeftModel.from_pretrained`` and with ``fastvlm.load(..., adapter=)``.

Applying an adapter here is plain tensor math, ``W += scale * B @ A``, and needs no
``peft``: merged weights keep every inference fast path. Training (``fastvlm.training``) is what
uses ``peft``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .keymap import hf_to_ours, ours_to_hf, unfold_ffn_conv
from .safetensors_io import SafetensorsReader

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Our top-level modules -> the transformers module PEFT wraps in ``modules_to_save``.
SAVED_MODULES = {"projector": "multi_modal_projector", "vision_tower": "vision_tower"}


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS
    modules_to_save: tuple[str, ...] = ("projector",)  # our module names
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


def peft_config(settings: LoraSettings, base: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT 0.21 writes for the same LoRA, fields it reads first."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "auto_mapping": {
            "base_model_class": "FastVlmForConditionalGeneration",
            "parent_library": "transformers.models.fast_vlm.modeling_fast_vlm",
        },
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": list(settings.targets),
        "modules_to_save": [SAVED_MODULES[m] for m in settings.modules_to_save] or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": settings.use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }


def save_adapter(folder: Path, tensors: dict[str, torch.Tensor], settings: LoraSettings, base: str | None):
    """Write ``tensors`` (our names: ``...q_proj.lora_A.weight`` and whole module tensors)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    plain = {}
    for name, tensor in tensors.items():
        plain.update(unfold_ffn_conv(name, tensor.detach().cpu()))
    named = {PEFT_PREFIX + ours_to_hf(k): v.contiguous() for k, v in plain.items()}
    save_file(named, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    text = json.dumps(peft_config(settings, base), indent=2)
    (folder / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")


def _fold_vision(whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole vision-tower tensors in timm's form -> ours, by the loader's own fusion rules."""
    from functools import partial

    from .fusion import fuse_vision_state

    vision = {k: partial(lambda v: v, v) for k, v in whole.items() if k.startswith("vision_tower.")}
    if not vision:
        return whole
    rest = {k: v for k, v in whole.items() if not k.startswith("vision_tower.")}
    fused = fuse_vision_state(vision)
    return {**rest, **{k: make() for k, make in fused.items() if not k.endswith("num_batches_tracked")}}


@dataclass
class Adapter:
    config: dict[str, Any]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)
    whole: dict[str, torch.Tensor] = field(default_factory=dict)  # our parameter name -> tensor

    def scale(self, rank: int) -> float:
        alpha = float(self.config.get("lora_alpha", rank))
        return alpha / (rank**0.5 if self.config.get("use_rslora") else rank)


def read_adapter(folder: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter folder into our module names; refuse what we cannot merge exactly."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{folder} is not a LoRA adapter: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder} holds a {config.get('peft_type')} adapter; only LoRA is supported")
    for flag in ("use_dora", "fan_in_fan_out", "alpha_pattern"):
        if config.get(flag):
            raise CheckpointError(f"{folder}: adapters with {flag} are not supported; retrain without it")
    adapter, halves = Adapter(config), {}
    reader = SafetensorsReader(weights_path)  # no safetensors package needed to apply an adapter
    for key in reader.keys():
        tensor = reader.read(key)
        ours = hf_to_ours(key.removeprefix(PEFT_PREFIX))
        if ours is None:
            raise CheckpointError(f"{folder}: adapter weight {key!r} names no FastVLM module")
        module, _, rest = ours.rpartition(".lora_")
        if not module:
            adapter.whole[ours] = tensor
        elif rest in ("A.weight", "B.weight"):
            halves.setdefault(module, {})[rest[0]] = tensor
        else:
            raise CheckpointError(f"{folder}: adapter weight {key!r} is not a plain LoRA weight")
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{folder}: {module} has lora_{''.join(pair)} but not its partner")
        adapter.lora[module] = (pair["A"], pair["B"])
    adapter.whole = _fold_vision(adapter.whole)
    return adapter


@torch.no_grad()
def merge_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Merge the adapter at ``folder`` into ``model``'s plain weights in place.

    Call it on the model as loaded, before ``models.optimize`` fuses projections.
    """
    adapter = read_adapter(folder)
    for module_name, (A, B) in adapter.lora.items():
        linear = _linear(model, module_name, folder)
        rank = A.shape[0]
        if A.shape[1] != linear.in_features or B.shape != (linear.out_features, rank):
            raise CheckpointError(f"{folder}: the LoRA shapes of {module_name} do not match the model")
        delta = (B.double() @ A.double()) * adapter.scale(rank)  # (out, r) @ (r, in)
        linear.weight.copy_((linear.weight.double() + delta.to(linear.weight.device)).to(linear.weight.dtype))
    params = dict(model.named_parameters())
    for name, tensor in adapter.whole.items():
        if name not in params or params[name].shape != tensor.shape:
            raise CheckpointError(f"{folder}: saved weight {name} does not fit this model")
        params[name].copy_(tensor.to(params[name].dtype))
    return model


def _linear(model: nn.Module, name: str, folder: Path) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise CheckpointError(
            f"{folder}: LoRA target {name} is not a linear layer of this model; "
            "apply adapters to the plain model, before speed options"
        )
    return module
