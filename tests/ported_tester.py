"""transformers' ``FastVlmVisionText2TextModelTester`` (tests/models/fast_vlm/
test_modeling_fast_vlm.py) as plain data: its tiny config and its inputs.

The reference model is built from that config with transformers, saved, and loaded
by us, so both sides hold the same random weights; the ported tests compare them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import builders

# The tester's config, as written there (its "gelu" decoder activation included).
TEXT_CONFIG = {
    "model_type": "qwen2",
    "is_training": True,
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 37,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
    "pad_token_id": 1,
}
VISION_CONFIG = {
    "image_size": 16,
    "patch_size": 8,
    "num_channels": 3,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "architecture": "fastvit_mci3",
    "do_pooling": True,
    "global_pool": "avg",
    "model_args": {
        "inference_mode": True,
        "layers": (2, 2),
        "embed_dims": (8, 16),
        "mlp_ratios": (4, 4),
        "se_downsamples": (False, False),
        "downsamples": (False, True),
        "pos_embs": (None, None),
        "token_mixers": ("repmixer", "repmixer"),
        "lkc_use_act": True,
        "stem_use_scale_branch": False,
    },
}
IMAGE_TOKEN_ID = 0
PAD_TOKEN_ID = 1
BATCH_SIZE = 3
NUM_IMAGE_TOKENS = (VISION_CONFIG["image_size"] // VISION_CONFIG["patch_size"]) ** 2
SEQ_LENGTH = 7 + NUM_IMAGE_TOKENS
MAX_NEW_TOKENS = 3  # GenerationTesterMixin.max_new_tokens


@dataclass
class Pair:
    ours: torch.nn.Module
    ref: torch.nn.Module
    folder: Path


def reference_config():
    from transformers import FastVlmConfig

    return FastVlmConfig(
        text_config=TEXT_CONFIG,
        vision_config=VISION_CONFIG,
        ignore_index=-100,
        image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )


def build_pair(folder: Path, seed: int = 0) -> Pair:
    """The tester's model with random weights (BatchNorm statistics and layer scales away
    from identity), saved by transformers and loaded by us in float32."""
    from transformers import FastVlmForConditionalGeneration

    from fastvlm import FastVLM

    torch.manual_seed(seed)
    ref = FastVlmForConditionalGeneration(reference_config()).eval()
    builders._randomize_(ref, seed)
    ref.save_pretrained(folder)
    ours = FastVLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False)
    return Pair(ours, ref, folder)


def inputs_for_common(seed: int = 0) -> dict[str, torch.Tensor]:
    """``prepare_config_and_inputs_for_common``: image tokens first, then text ids; the mask
    is 0 wherever a text id happens to be the pad id (holes, not left padding)."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.rand(BATCH_SIZE, 3, 16, 16, generator=g)
    input_ids = torch.randint(0, TEXT_CONFIG["vocab_size"] - 1, (BATCH_SIZE, SEQ_LENGTH), generator=g) + 1
    input_ids[input_ids == IMAGE_TOKEN_ID] = PAD_TOKEN_ID
    input_ids[:, :NUM_IMAGE_TOKENS] = IMAGE_TOKEN_ID
    return {
        "pixel_values": pixel_values,
        "input_ids": input_ids,
        "attention_mask": input_ids.ne(PAD_TOKEN_ID),
    }


def inputs_for_generate(batch_size: int = 2) -> dict[str, torch.Tensor]:
    """``GenerationTesterMixin.prepare_config_and_inputs_for_generate``: the first rows."""
    return {k: v[:batch_size] for k, v in inputs_for_common().items()}


def logits_processor_kwargs(do_sample: bool = False) -> dict:
    """``GenerationTesterMixin._get_logits_processor_kwargs`` with the VLM band-aid that
    bans the image token (0 < vocab_size)."""
    kwargs = {
        "bad_words_ids": [[1, 0], [IMAGE_TOKEN_ID]],
        "repetition_penalty": 1.2,
        "remove_invalid_values": True,
    }
    if do_sample:
        kwargs.update({"top_k": 10, "top_p": 0.7, "temperature": 0.7})
    return kwargs


def beam_kwargs(num_return_sequences: int = 1) -> dict:
    """``GenerationTesterMixin._get_beam_kwargs``."""
    return {
        "early_stopping": False,
        "length_penalty": 2.0,
        "num_beams": 2,
        "num_return_sequences": num_return_sequences,
    }
