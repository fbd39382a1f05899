"""Typed model configuration, built from either checkpoint format's config.json.

The dataclasses here describe architecture only, and this module sits at the bottom
of the package: it reads no files and imports nothing of ours but the errors. Which
keys a checkpoint uses is the business of ``fastvlm.checkpoints``; how text and images
are turned into tensors is the business of ``fastvlm.processing``.

The checkpoint format is decided here, from config.json alone, because the format
decides how the rest of that file is read. Two published layouts exist:

* ``fast_vlm``: Hugging Face transformers' ``FastVlmForConditionalGeneration``
  (vision tower = timm ``fastvit_mci3``), image placeholder ``<image>`` in the vocabulary.
* ``llava_qwen2``: Apple's original ml-fastvlm code, image marked by -200 in ``input_ids``.

The format decides key names, the prompt format and image preprocessing, so it is
decided once here and never guessed from tensor shapes or file names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .config_rules import check_sliding_window, check_vision_args, check_width, dtype_name, rope_parameters
from .errors import CheckpointError

Format = Literal["fast_vlm", "llava_qwen2"]
HF_FORMAT: Format = "fast_vlm"
APPLE_FORMAT: Format = "llava_qwen2"

# The id that marks an image position in ``input_ids``. The transformers checkpoints
# have ``<image>`` at this id; Apple's checkpoints mark images with -200, which cannot
# be embedded, so we use the same (otherwise unused) row of their 151936-row table. The
# model never embeds these positions: it overwrites them with image features.
IMAGE_PLACEHOLDER_ID = 151646


def detect_format(config: dict[str, Any]) -> Format:
    """The checkpoint layout a config.json describes; CheckpointError if it is not FastVLM."""
    model_type = config.get("model_type")
    if model_type == HF_FORMAT:
        return HF_FORMAT
    if model_type == APPLE_FORMAT or (model_type == "qwen2" and "mm_vision_tower" in config):
        return APPLE_FORMAT
    raise CheckpointError(
        f"config.json has model_type {model_type!r}, not a FastVLM checkpoint; expected "
        f"'{HF_FORMAT}' (transformers) or '{APPLE_FORMAT}' (Apple ml-fastvlm)"
    )


def _from_dict(cls, data: dict[str, Any]):
    """Build a dataclass from a dict, ignoring keys it does not know."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class VisionConfig:
    """FastViTHD (timm ``fastvit_mci3``) architecture; defaults are the published tower."""

    layers: tuple[int, ...] = (2, 12, 24, 4, 2)
    embed_dims: tuple[int, ...] = (96, 192, 384, 768, 1536)
    mlp_ratios: tuple[float, ...] = (4, 4, 4, 4, 4)
    token_mixers: tuple[str, ...] = ("repmixer", "repmixer", "repmixer", "attention", "attention")
    # Kernel size of the RepCPE positional conv before each stage, or None for no RepCPE.
    pos_embs: tuple[int | None, ...] = (None, None, None, 7, 7)
    downsamples: tuple[bool, ...] = (False, True, True, True, True)
    se_downsamples: tuple[bool, ...] = (False, False, False, False, False)
    repmixer_kernel_size: int = 3
    down_patch_size: int = 7
    down_stride: int = 2
    lkc_use_act: bool = True
    layer_scale: bool = True
    cls_ratio: float = 2.0
    in_chans: int = 3
    head_dim: int = 32
    norm_eps: float = 1e-5
    image_size: int = 1024

    def __post_init__(self) -> None:
        n = len(self.layers)
        self.layers = tuple(int(x) for x in self.layers)
        self.embed_dims = tuple(int(x) for x in self.embed_dims)
        for name in ("mlp_ratios", "token_mixers", "pos_embs", "downsamples", "se_downsamples"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                value = (value,) * n
            if len(value) != n:
                raise CheckpointError(f"vision config: {name} has {len(value)} entries, layers has {n}")
            setattr(self, name, tuple(value))
        bad = set(self.token_mixers) - {"repmixer", "attention"}
        if bad:
            raise CheckpointError(f"vision config: unknown token mixer(s) {sorted(bad)}")

    @property
    def num_features(self) -> int:
        return int(self.embed_dims[-1] * self.cls_ratio)

    def stage_downsamples(self) -> list[bool]:
        """Whether each stage opens with a patch embed (timm also adds one on a width change)."""
        prev = self.embed_dims[0]
        out = []
        for dim, flag in zip(self.embed_dims, self.downsamples, strict=True):
            out.append(bool(flag) or prev != dim)
            prev = dim
        return out

    @property
    def reduction(self) -> int:
        """Total stride: the stem halves twice, each patch embed halves once."""
        return 4 * self.down_stride ** sum(self.stage_downsamples())

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.reduction) ** 2

    # -- transformers' TimmWrapperConfig attribute names ---------------------------------------
    model_type = "timm_wrapper"
    architecture = "fastvit_mci3"

    @property
    def hidden_size(self) -> int:
        return self.num_features

    @property
    def model_args(self) -> dict[str, Any]:
        """This tower in timm's ``fastvit_mci3`` argument names (RepCPE as its kernel size)."""
        return {
            "layers": list(self.layers),
            "embed_dims": list(self.embed_dims),
            "mlp_ratios": list(self.mlp_ratios),
            "token_mixers": list(self.token_mixers),
            "pos_embs": list(self.pos_embs),
            "downsamples": list(self.downsamples),
            "se_downsamples": list(self.se_downsamples),
            "repmixer_kernel_size": self.repmixer_kernel_size,
            "down_patch_size": self.down_patch_size,
            "down_stride": self.down_stride,
            "lkc_use_act": self.lkc_use_act,
            "cls_ratio": self.cls_ratio,
            "in_chans": self.in_chans,
            "inference_mode": True,
        }

    @classmethod
    def from_timm_args(cls, model_args: dict[str, Any] | None, image_size: int = 1024) -> VisionConfig:
        args = dict(model_args or {})
        pos = args.pop("pos_embs", None)
        if pos is not None:
            # JSON cannot carry timm's partial(RepConditionalPosEnc); any truthy entry means
            # the published 7x7 RepCPE, an int gives its kernel size.
            args["pos_embs"] = tuple(
                None if p is None or p is False else (p if isinstance(p, int) and p > 1 else 7) for p in pos
            )
        if "layer_scale_init_value" in args:
            args["layer_scale"] = args.pop("layer_scale_init_value") is not None
        if "in_chans" not in args and "in_channels" in args:
            args["in_chans"] = args.pop("in_channels")
        return _from_dict(cls, {**args, "image_size": image_size})


@dataclass
class TextConfig:
    """Qwen2 decoder architecture, with transformers' ``Qwen2Config`` attribute names.

    ``model.config.text_config`` is this object, so code written for transformers reads
    ``hidden_size``, ``num_attention_heads``, ``vocab_size``, ``rope_parameters``... here.
    """

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int | None = 2  # None means num_attention_heads, as in transformers
    hidden_act: str = "silu"  # a name of models.activations.ACTIVATIONS, checked when the model is built
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # Standardised as transformers does: {"rope_type": ..., "rope_theta": ..., type-specific keys}.
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0 means hidden_size // num_attention_heads
    attention_dropout: float = 0.0  # applied in training mode only, as in transformers
    # Read so that a sliding window is refused unless it cannot bite (see ``config_rules``).
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    model_type: str = "qwen2"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"text config: {self.num_attention_heads} attention heads is not a multiple of "
                f"{self.num_key_value_heads} key/value heads"
            )
        self.rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta, **self.rope_parameters}
        self.rope_theta = self.rope_parameters["rope_theta"]

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> TextConfig:
        data = dict(data)
        data["rope_parameters"] = rope_parameters(data)
        data["rope_theta"] = data["rope_parameters"]["rope_theta"]
        check_sliding_window(data)
        data.pop("model_type", None)  # "llava_qwen2" on Apple's flat configs; the decoder is Qwen2
        if data.get("head_dim") is None:
            data.pop("head_dim", None)
        return _from_dict(cls, data)


@dataclass
class FastVLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    format: Format = HF_FORMAT
    image_token_id: int = IMAGE_PLACEHOLDER_ID
    projector_bias: bool = True
    projector_hidden_act: str = "gelu"
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str | None = None  # the weights' dtype as config.json states it (``dtype``/``torch_dtype``)
    # Image tokens per image as config.json states it (transformers' processor reads it);
    # 0: the tower's count at its nominal image size.
    image_seq_length: int = 0

    def __post_init__(self) -> None:
        self.image_seq_length = int(self.image_seq_length or self.vision.num_image_tokens)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_image_tokens

    # -- transformers' FastVlmConfig attribute names, as views of the fields above ------------
    @property
    def text_config(self) -> TextConfig:
        return self.text

    @property
    def vision_config(self) -> VisionConfig:
        return self.vision

    @property
    def image_token_index(self) -> int:
        return self.image_token_id

    @property
    def multimodal_projector_bias(self) -> bool:
        return self.projector_bias

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    vision_feature_select_strategy = "full"  # the only values FastVLM has
    vision_feature_layer = -1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FastVLMConfig:
        fmt = detect_format(data)
        return _from_hf(data) if fmt == HF_FORMAT else _from_apple(data)


def _from_hf(data: dict[str, Any]) -> FastVLMConfig:
    vision = data.get("vision_config") or {}
    arch = vision.get("architecture", "fastvit_mci3")
    if arch != "fastvit_mci3":
        raise CheckpointError(f"vision tower {arch!r} is not supported; FastVLM uses fastvit_mci3")
    if (
        data.get("vision_feature_select_strategy", "full") != "full"
        or data.get("vision_feature_layer", -1) != -1
    ):
        raise CheckpointError("only vision_feature_select_strategy 'full' and vision_feature_layer -1 exist")
    text_data = dict(data.get("text_config") or {})
    text = TextConfig.from_hf(text_data)
    # transformers forwards a tie flag set on either level to the whole model.
    text.tie_word_embeddings = bool(data.get("tie_word_embeddings") or text_data.get("tie_word_embeddings"))
    check_vision_args(vision.get("model_args") or {})
    image_size = _image_size_from(vision.get("pretrained_cfg", {}).get("input_size"), default=1024)
    tower = VisionConfig.from_timm_args(vision.get("model_args"), image_size)
    check_width(vision.get("hidden_size"), tower.num_features, "vision_config.hidden_size")
    return FastVLMConfig(
        vision=tower,
        text=text,
        format=HF_FORMAT,
        image_token_id=int(data.get("image_token_index", data.get("image_token_id", IMAGE_PLACEHOLDER_ID))),
        projector_bias=bool(data.get("multimodal_projector_bias", True)),
        projector_hidden_act=data.get("projector_hidden_act", "gelu"),
        eos_token_id=text_data.get("eos_token_id", data.get("eos_token_id")),
        dtype=dtype_name(data, text_data),
        image_seq_length=int(data.get("image_seq_length") or 0),
    )


def _from_apple(data: dict[str, Any]) -> FastVLMConfig:
    tower = data.get("mm_vision_tower", "mobileclip_l_1024")
    match = re.fullmatch(r"mobileclip_l_(\d+)", str(tower).rsplit("/", 1)[-1])
    if not match:
        raise CheckpointError(f"vision tower {tower!r} is not supported; FastVLM uses mobileclip_l_<size>")
    if data.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"projector {data['mm_projector_type']!r} is not supported (mlp2x_gelu only)")
    text = TextConfig.from_hf(data)
    text.tie_word_embeddings = bool(data.get("tie_word_embeddings", False))
    # Apple's towers are fixed by name; "vision_model_args" (our extension, timm's
    # argument names) describes a shrunk tower such as the ones tests build.
    check_vision_args(data.get("vision_model_args") or {})
    tower = VisionConfig.from_timm_args(data.get("vision_model_args"), int(match.group(1)))
    check_width(data.get("mm_hidden_size"), tower.num_features, "mm_hidden_size")
    return FastVLMConfig(
        vision=tower,
        text=text,
        format=APPLE_FORMAT,
        image_token_id=IMAGE_PLACEHOLDER_ID,
        eos_token_id=data.get("eos_token_id"),
        dtype=dtype_name(data, {}),
    )


def _image_size_from(input_size: Any, default: int) -> int:
    if isinstance(input_size, (list, tuple)) and len(input_size) == 3:
        return int(input_size[-1])
    return default
