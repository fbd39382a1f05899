"""``FastVLM``: the model with transformers-style ``from_pretrained``, ``forward`` and ``generate``.

    model = FastVLM.from_pretrained("apple/FastVLM-0.5B", dtype=torch.bfloat16)
    ids = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=32)

This module sits above the layers it joins: the network (``models``), loading
(``checkpoints``) and the decoding loop (``generation``); none of those imports it.
``from_pretrained`` applies the same speed switches as ``fastvlm.load`` unless told
otherwise (``speed=SpeedOptions.off()`` keeps the plain reference modules). How
transformers' own arguments map onto ours is ``fastvlm.modeling_args``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .checkpoints.loader import load_model
from .checkpoints.writer import DEFAULT_MAX_SHARD_SIZE, save_model
from .generation.generation_config import checkpoint_generation_config
from .generation.simple import generate
from .modeling_args import forward_kwargs, plan_load
from .models.fastvlm import CausalLMOutput, FastVLMCore
from .models.optimize import SpeedOptions, optimize


class FastVLM(FastVLMCore):
    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        revision: str | None = None,
        progress: bool = True,
        speed: SpeedOptions | None = None,
        device_map: str | int | torch.device | dict | None = None,
        attn_implementation: str | dict | None = None,
        **kwargs: Any,
    ) -> FastVLM:
        """Load either checkpoint format from a folder or hub id, in eval mode.

        As transformers: ``dtype`` None or "auto" is the checkpoint's dtype (config.json's
        ``dtype``/``torch_dtype``, else its weights'), ``torch_dtype`` is its older name,
        ``device_map`` ("auto", a device, or ``{"": device}``) places the whole model, and
        ``attn_implementation`` is "eager", "sdpa" or ``{"text_config": "flash_attention_2"}``.
        ``device`` (default: CUDA, else MPS, else CPU) is ours. ``speed`` defaults to
        ``SpeedOptions()`` (fused projections, channels-last vision, float32 weights laid out
        for decoding on CPU); ``SpeedOptions.off()`` gives the plain modules.
        """
        plan = plan_load(
            src,
            dtype=dtype,
            device=device,
            device_map=device_map,
            attn_implementation=attn_implementation,
            speed=speed,
            revision=revision,
            extra=kwargs,
        )
        model = load_model(
            plan.folder, model_class=cls, dtype=plan.dtype, device=plan.device, progress=progress
        )
        return optimize(model, plan.speed)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput | tuple:
        """transformers' ``forward``: also ``labels``, ``position_ids``, ``inputs_embeds``,
        ``logits_to_keep``, ``return_dict``; cache, attention and hidden-state outputs are refused."""
        ours, return_dict = forward_kwargs(kwargs)
        out = super().forward(input_ids, pixel_values, attention_mask, **ours)
        return out if return_dict else out.to_tuple()

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        **kwargs: Any,
    ) -> None:
        """Write a transformers ``fast_vlm`` checkpoint (config.json, safetensors weights,
        generation_config.json) that ``FastVlmForConditionalGeneration.from_pretrained``
        and ``FastVLM.from_pretrained`` load, whichever format this model came from.

        Speed switches are undone in the files; int8/int4 models are refused, and so are
        transformers options we cannot honour (``safe_serialization=False``, ``push_to_hub``).
        """
        defaults = {k: v for k, v in checkpoint_generation_config(self).to_dict().items() if v is not None}
        save_model(self, save_directory, max_shard_size=max_shard_size, generation=defaults, **kwargs)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Prompt followed by new tokens, as transformers' ``generate`` returns them.

        Takes transformers' generation options (``max_new_tokens``, ``do_sample``,
        ``num_beams``, ``generation_config``, ``return_dict_in_generate``, ``inputs_embeds``,
        ...; see ``fastvlm.generation.simple.generate``); the checkpoint's
        ``generation_config.json`` gives the defaults.
        """
        return generate(self, input_ids, pixel_values, attention_mask, **kwargs)
