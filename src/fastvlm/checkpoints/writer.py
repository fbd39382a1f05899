"""Write a model as a transformers ``fast_vlm`` checkpoint, whatever it was loaded from.

The folder gets ``config.json`` (``model_type: fast_vlm``), the weights under
transformers' key names in safetensors (one ``model.safetensors``, or shards with
``model.safetensors.index.json`` past ``max_shard_size``) and, when given,
``generation_config.json``. transformers' ``FastVlmForConditionalGeneration`` and our
loader both read it. An Apple (``llava_qwen2``) model is written in the transformers
layout too: the weights are the same, only their names differ.

Our modules hold some weights in other forms than the checkpoint: ConvFFN convs with
their BatchNorm folded in, and after ``models.optimize`` fused q|k|v and gate|up
projections and transposed float32 linears. Each is turned back here into the tensors
transformers expects. Quantised weights are refused: written back they would be a
lossy copy that looks like the original.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..config import FastVLMConfig, VisionConfig
from ..errors import CheckpointError, FastVLMError, InputError
from ..models.quantize import QuantizedLinear
from .keymap import ours_to_hf, unfold_ffn_conv

# transformers 5's default: one file up to this size, shards beyond.
DEFAULT_MAX_SHARD_SIZE = "50GB"
_FUSED_QKV = re.compile(r"^(.*)\.qkv_proj\.linear\.(weight|bias)$")
_FUSED_GATE_UP = re.compile(r"^(.*)\.gate_up_proj\.linear\.(weight|bias)$")
# Vision settings timm's fastvit_mci3 takes as keyword arguments (our names are timm's).
_TIMM_ARGS = (
    "token_mixers",
    "downsamples",
    "se_downsamples",
    "repmixer_kernel_size",
    "down_patch_size",
    "down_stride",
    "lkc_use_act",
    "cls_ratio",
    "in_chans",
)


# transformers' save_pretrained options and the value we can honour (anything else is refused).
_SAVE_OPTIONS = {
    "safe_serialization": (True, "weights are written as safetensors only"),
    "push_to_hub": (False, "upload the folder with huggingface_hub's upload_folder"),
    "is_main_process": (True, "call save_pretrained on the main process only"),
}


def check_save_options(options: dict[str, Any]) -> None:
    """One line for a transformers ``save_pretrained`` option we do not honour."""
    for name, value in options.items():
        if name not in _SAVE_OPTIONS:
            raise InputError(f"save_pretrained does not take {name!r}")
        honoured, hint = _SAVE_OPTIONS[name]
        if value != honoured:
            raise InputError(f"save_pretrained does not support {name}={value!r}: {hint}")


def save_model(
    model: torch.nn.Module,
    folder: str | Path,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    generation: dict[str, Any] | None = None,
    **options: Any,
) -> Path:
    """Write ``model`` (a ``FastVLMCore``) to ``folder`` in the transformers layout.
    ``options``: transformers' other save_pretrained arguments, checked by ``check_save_options``."""
    from huggingface_hub import save_torch_state_dict

    check_save_options(options)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass a folder to save the checkpoint in")
    state = hf_state_dict(model)  # checks everything before anything is written
    config = hf_config(model.config, model.dtype)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("model*.safetensors*"):  # a previous save's shards would mix in
        stale.unlink()
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})
    _write_json(folder / "config.json", config)
    if generation:
        _write_json(folder / "generation_config.json", generation)
    return folder


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' key names, as separate CPU tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in plain_state_dict(model).items():
        for stored, value in unfold_ffn_conv(name, tensor).items():
            out[ours_to_hf(stored)] = value
    if model.config.text.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # transformers ties it to the embedding on load
    return out


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our module names of the plain model (as the loader builds it), whatever ``optimize`` did."""
    quantized = next((n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)), None)
    if quantized is not None:
        raise FastVLMError(
            f"cannot save: {quantized} holds int8/int4 weights, which would be written back as a lossy "
            "copy of the original; save a model loaded without int8/int4"
        )
    text = model.config.text
    qkv = [n * text.head_dim for n in (text.num_attention_heads, text.num_key_value_heads)]
    qkv_sizes = [qkv[0], qkv[1], qkv[1]]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if name.endswith(".weight_t"):  # TransposedLinear keeps (in, out)
            name, tensor = name[: -len("_t")], tensor.t()
        if match := _FUSED_QKV.match(name):
            parts = zip(("q_proj", "k_proj", "v_proj"), tensor.split(qkv_sizes), strict=True)
        elif match := _FUSED_GATE_UP.match(name):
            parts = zip(("gate_proj", "up_proj"), tensor.chunk(2), strict=True)
        else:
            out[name] = _own_copy(tensor)
            continue
        for part, value in parts:
            out[f"{match.group(1)}.{part}.{match.group(2)}"] = _own_copy(value)
    return out


def _own_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with storage of its own: slices and transposed views of one
    buffer would otherwise look like shared (tied) weights to the safetensors writer."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def hf_config(config: FastVLMConfig, dtype: torch.dtype) -> dict[str, Any]:
    """transformers' ``FastVlmConfig`` as JSON, from our typed config."""
    tied = bool(config.text.tie_word_embeddings)
    return {
        "architectures": ["FastVlmForConditionalGeneration"],
        "model_type": "fast_vlm",
        "dtype": str(dtype).removeprefix("torch."),
        "image_token_index": int(config.image_token_id),
        "image_seq_length": int(config.num_image_tokens),
        "multimodal_projector_bias": bool(config.projector_bias),
        "projector_hidden_act": getattr(config, "projector_hidden_act", "gelu"),
        "tie_word_embeddings": tied,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "text_config": _text_config(config),
        "vision_config": {
            "model_type": "timm_wrapper",
            "architecture": "fastvit_mci3",
            "do_pooling": False,
            "hidden_size": config.vision.num_features,
            "model_args": timm_model_args(config.vision),
        },
    }


def _text_config(config: FastVLMConfig) -> dict[str, Any]:
    # Our field names are Qwen2Config's; transformers 5 keeps rope_theta in rope_parameters.
    text = asdict(config.text)
    theta = text.pop("rope_theta")
    rope = text.pop("rope_parameters", None) or {"rope_type": "default", "rope_theta": theta}
    return {
        **text,
        "model_type": "qwen2",
        "rope_parameters": rope,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


def timm_model_args(vision: VisionConfig) -> dict[str, Any]:
    """Arguments for timm's ``fastvit_mci3``: the sizes, and every other setting that differs
    from its defaults. The weights are always the fused (``inference_mode``) ones."""
    default = VisionConfig()
    # JSON cannot carry timm's RepCPE factory: the default layout is left out, "none" is all nulls.
    no_pos_embs = all(k is None for k in vision.pos_embs)
    for name in ("pos_embs", "head_dim", "norm_eps"):
        if name == "pos_embs" and no_pos_embs:
            continue
        if getattr(vision, name) != getattr(default, name):
            raise CheckpointError(
                f"the vision tower's {name} ({getattr(vision, name)}) is not fastvit_mci3's and cannot be "
                "written in a transformers config"
            )
    args: dict[str, Any] = {
        "layers": list(vision.layers),
        "embed_dims": list(vision.embed_dims),
        "mlp_ratios": list(vision.mlp_ratios),
        "inference_mode": True,
    }
    for name in _TIMM_ARGS:
        value = getattr(vision, name)
        if value != getattr(default, name):
            args[name] = list(value) if isinstance(value, tuple) else value
    if no_pos_embs:
        args["pos_embs"] = [None] * len(vision.layers)
    if not vision.layer_scale:
        args["layer_scale_init_value"] = None
    return args


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
