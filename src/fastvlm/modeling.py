"""``FastVLM``: the model with transformers-style ``from_pretrained`` and ``generate``.

    model = FastVLM.from_pretrained("apple/FastVLM-0.5B", dtype=torch.bfloat16)
    ids = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=32)

This module sits above the layers it joins: the network (``models``), loading
(``checkpoints``) and the decoding loop (``generation``); none of those imports it.
``from_pretrained`` applies the same speed switches as ``fastvlm.load`` unless told
otherwise (``speed=SpeedOptions.off()`` keeps the plain reference modules).
"""

from __future__ import annotations

import os

import torch

from .checkpoints.loader import load_model
from .checkpoints.writer import DEFAULT_MAX_SHARD_SIZE, save_model
from .generation.generation_config import checkpoint_generation_config
from .generation.simple import generate
from .models.fastvlm import FastVLMCore
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
    ) -> FastVLM:
        """Load either checkpoint format from a folder or hub id, in eval mode.

        ``speed`` defaults to ``SpeedOptions()`` (fused projections, channels-last vision,
        float32 weights laid out for decoding on CPU); ``SpeedOptions.off()`` gives the
        plain modules, exactly as the checkpoint describes them.
        """
        model = load_model(
            src, model_class=cls, dtype=dtype, device=device, revision=revision, progress=progress
        )
        return optimize(model, SpeedOptions() if speed is None else speed)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    ) -> None:
        """Write a transformers ``fast_vlm`` checkpoint (config.json, safetensors weights,
        generation_config.json) that ``FastVlmForConditionalGeneration.from_pretrained``
        and ``FastVLM.from_pretrained`` load, whichever format this model came from.

        Speed switches are undone in the files; int8/int4 models are refused.
        """
        defaults = {k: v for k, v in checkpoint_generation_config(self).to_dict().items() if v is not None}
        save_model(self, save_directory, max_shard_size=max_shard_size, generation=defaults)

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
