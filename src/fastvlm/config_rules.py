"""Which config.json values we honour and which we refuse, for the fields that need a rule.

Every field ``fastvlm.config`` reads is either honoured (the model computes what
transformers computes for it) or refused here with one ``CheckpointError`` line: a
value that loads but is silently ignored would give other logits with no warning.
Fields that cannot change the output in inference (dropout rates, initialisation,
pooling heads that FastVLM never runs) are accepted and listed as inert.
"""

from __future__ import annotations

from typing import Any

from .errors import CheckpointError

# transformers' default when a config gives no rope_theta at all.
DEFAULT_ROPE_THETA = 10_000.0
ROPE_TYPES = ("default", "linear", "yarn")  # all static: the KV cache stays valid as a sequence grows


def rope_parameters(data: dict[str, Any]) -> dict[str, Any]:
    """The text config's RoPE settings, standardised as transformers does, or CheckpointError."""
    # transformers lets a legacy rope_scaling override rope_parameters.
    raw = data.get("rope_scaling") or data.get("rope_parameters") or {}
    if not isinstance(raw, dict) or any(isinstance(v, dict) for v in raw.values()):
        raise CheckpointError(f"text config: rope_parameters {raw!r} is not one flat dict of RoPE settings")
    params = {k: v for k, v in raw.items() if k != "type"}
    kind = raw.get("rope_type", raw.get("type", "default"))
    params["rope_type"] = kind
    params.setdefault("rope_theta", data.get("rope_theta", DEFAULT_ROPE_THETA))
    partial = params.pop("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"text config: partial_rotary_factor {partial} is not supported (Qwen2: 1.0)")
    if kind not in ROPE_TYPES:
        raise CheckpointError(
            f"text config: rope type {kind!r} is not supported; default, linear and yarn are "
            "(dynamic NTK scaling changes frequencies as a sequence grows; a KV cache cannot follow)"
        )
    if kind != "default":
        factor = params.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1:
            raise CheckpointError(f"text config: rope type {kind!r} needs a factor >= 1, got {factor!r}")
    if kind == "yarn":
        params.setdefault("original_max_position_embeddings", data.get("max_position_embeddings", 32768))
    return params


def check_sliding_window(data: dict[str, Any]) -> None:
    """Refuse a sliding window that can bite; accept one that covers every position.

    Qwen2 slides the window over layers ``max_window_layers`` and up when
    ``use_sliding_window`` is set (or where ``layer_types`` says so). A window at least
    ``max_position_embeddings`` long never hides a key, so it changes nothing.
    """
    n = int(data.get("num_hidden_layers", 24))
    window = data.get("sliding_window", 4096) if data.get("use_sliding_window") else None
    first = int(data.get("max_window_layers", 28))
    types = data.get("layer_types") or [
        "sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)
    ]
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise CheckpointError(f"text config: layer type(s) {unknown} are not supported")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding:
        return
    if window is None:
        raise CheckpointError(
            "text config: layer_types has sliding_attention layers but use_sliding_window is false "
            "(transformers refuses this too)"
        )
    max_positions = int(data.get("max_position_embeddings", 32768))
    if window < max_positions:
        raise CheckpointError(
            f"text config: sliding-window attention (window {window} on layers {sliding[0]}..{sliding[-1]}) "
            f"is not supported; only a window >= max_position_embeddings ({max_positions}) is"
        )


# timm FastViT arguments: the ones fastvlm.config reads, and the ones that cannot change
# the features FastVLM uses (training-only rates, the classifier head, its pooling).
VISION_ARGS_READ = {
    "layers",
    "embed_dims",
    "mlp_ratios",
    "token_mixers",
    "pos_embs",
    "downsamples",
    "se_downsamples",
    "repmixer_kernel_size",
    "down_patch_size",
    "down_stride",
    "lkc_use_act",
    "layer_scale_init_value",
    "cls_ratio",
    "in_chans",
    "in_channels",
}
VISION_ARGS_INERT = {
    "inference_mode",  # fused or training-form weights: the loader fuses either
    "stem_use_scale_branch",  # a training-form branch, fused away like the others
    "num_classes",
    "global_pool",
    "drop_rate",
    "proj_drop_rate",
    "drop_path_rate",
}


def check_vision_args(args: dict[str, Any]) -> None:
    unknown = sorted(set(args) - VISION_ARGS_READ - VISION_ARGS_INERT - {"fork_feat"})
    if unknown:
        raise CheckpointError(f"vision config: model_args {unknown} are not supported")
    if args.get("fork_feat"):
        raise CheckpointError("vision config: fork_feat is not supported (FastVLM uses the final map only)")


def check_width(stated: Any, num_features: int, name: str) -> None:
    """The projector's input width must be the tower's output width; say so before loading."""
    if stated is not None and int(stated) != num_features:
        raise CheckpointError(
            f"config.json: {name} is {stated} but the vision tower it describes gives {num_features} "
            "features (embed_dims[-1] * cls_ratio)"
        )


def dtype_name(data: dict[str, Any], text_data: dict[str, Any]) -> str | None:
    for source in (data, text_data):
        for key in ("dtype", "torch_dtype"):
            if isinstance(source.get(key), str):
                return source[key]
    return None
