"""The sides of ``fastvlm bench``: the reference and our model through each entry point,
each with a way to encode an image and a way to generate, and the inputs they share."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import IMAGE_PLACEHOLDER_ID, FastVLMConfig, TextConfig
from ..errors import FastVLMError, InputError
from ..modeling import FastVLM
from ..models.optimize import SpeedOptions, optimize

SIZES = {  # Qwen2 decoders of the published FastVLM checkpoints
    "0.5b": TextConfig(152000, 896, 4864, 24, 14, 2, tie_word_embeddings=True),
    "1.5b": TextConfig(152000, 1536, 8960, 28, 12, 2, tie_word_embeddings=True),
    "7b": TextConfig(152128, 3584, 18944, 28, 28, 4, tie_word_embeddings=False),
}


# ---- building the sides -----------------------------------------------------------


def reference_from_config(text: TextConfig, dtype: torch.dtype):
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration

    config = FastVlmConfig(
        vision_config={
            "model_type": "timm_wrapper",
            "architecture": "fastvit_mci3",
            "hidden_size": 3072,
            "do_pooling": False,
            "model_args": {"inference_mode": True},
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "vocab_size": text.vocab_size,
            "rope_theta": text.rope_theta,
            "tie_word_embeddings": text.tie_word_embeddings,
        },
        image_token_index=IMAGE_PLACEHOLDER_ID,
        image_seq_length=256,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in the target dtype
    try:
        return FastVlmForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)


def _require_reference() -> None:
    try:
        import timm  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise FastVLMError(
            f"fastvlm bench measures against transformers + timm ({exc}); pip install 'fastvlm[bench]', "
            "or pass --model CHECKPOINT --no-reference"
        ) from None


def reference_and_checkpoint(args, dtype: torch.dtype, device: torch.device, scratch: Path):
    """(reference model or None, checkpoint folder). Random weights are saved to ``scratch``."""
    if args.model:
        if args.no_reference:
            return None, args.model
        _require_reference()
        from transformers import FastVlmForConditionalGeneration

        ref = FastVlmForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()
        return ref, args.model
    if args.no_reference:
        raise InputError("random weights are made by transformers: drop --no-reference or pass --model")
    _require_reference()
    ref = reference_from_config(SIZES[args.size], dtype)
    ref.save_pretrained(scratch)  # what from_pretrained and load then read, like any checkpoint
    return ref.to(device), scratch


def our_models(args, folder, dtype, device) -> dict[str, FastVLM]:
    """Our model through each entry point, named as the table shows them."""
    from ..api import load

    kwargs = {"dtype": dtype, "device": device, "progress": False}
    models = {}
    if _has_processor_files(Path(folder)):
        models["fastvlm.load"] = load(folder, **kwargs, max_batch=1, feature_cache_size=0).model
    models["from_pretrained"] = FastVLM.from_pretrained(folder, **kwargs)
    if args.plain:
        models["plain"] = FastVLM.from_pretrained(folder, **kwargs, speed=SpeedOptions.off())
    for bits in ("int8", "int4"):
        if getattr(args, bits):
            models[bits] = FastVLM.from_pretrained(folder, **kwargs, speed=SpeedOptions(**{bits: True}))
    if args.compile:
        for name, model in models.items():
            if name != "plain":
                optimize(model, dataclasses.replace(SpeedOptions.off(), compile_vision=True))
    return models


def _has_processor_files(folder: Path) -> bool:
    """Whether ``fastvlm.load`` can build a processor here (a random-weight checkpoint has no
    tokenizer); a hub id is assumed complete."""
    return not folder.is_dir() or any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json"))


# ---- measuring --------------------------------------------------------------------------


def make_inputs(
    config: FastVLMConfig, batch: int, prompt_tokens: int, dtype: torch.dtype, device: torch.device
):
    """Random prompts of ``prompt_tokens`` ids, the image's placeholders after the 5th, and
    random images at the tower's input size."""
    images, size = config.num_image_tokens, config.vision.image_size
    if prompt_tokens < images + 5:
        raise InputError(f"--prompt-tokens must be at least {images + 5} (the image takes {images})")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(config.text.vocab_size, 150000), (batch, prompt_tokens - images), generator=g)
    ids[ids == config.image_token_id] = 0
    ids = torch.cat([ids[:, :5], torch.full((batch, images), config.image_token_id), ids[:, 5:]], dim=1)
    px = torch.rand(batch, 3, size, size, generator=g).to(dtype)
    return ids.to(device), px.to(device)


def without_image(ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``ids`` with its image placeholders replaced by an ordinary token (each row's first)."""
    return torch.where(ids == image_token_id, ids[:, :1], ids)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


class Side:
    """One implementation under test: how to encode an image and how to generate."""

    def __init__(self, name: str, features: Callable, generate: Callable) -> None:
        self.name, self.features, self.generate = name, features, generate
        self.samples: dict[str, list[float]] = {}

    def run(self, ids, px, text_ids, new_tokens: int, device: torch.device) -> None:
        vision = _timed(lambda: self.features(px), device)
        ttft = _timed(lambda: self.generate(ids, px, 1), device)
        # Decoding is timed on a text prompt of the same length (``text_ids``): the same
        # cache length and work per token, without two image encodings whose jitter
        # (tens of ms) would land in the difference.
        first = _timed(lambda: self.generate(text_ids, None, 1), device)
        total = _timed(lambda: self.generate(text_ids, None, new_tokens + 1), device)
        # A busy machine can make the second run no slower than the first; such a sample
        # says nothing about decoding, so it is recorded as missing rather than as nonsense.
        decode = new_tokens / (total - first) if total > first else math.nan
        for key, value in (
            ("vision_s", vision),
            ("ttft_s", ttft),
            ("prefill_s", first),  # the same prompt length without the image: the decoder's prefill
            ("decode_tok_s", decode),
        ):
            self.samples.setdefault(key, []).append(value)

    def run_batch(self, ids, px, new_tokens: int, device: torch.device) -> None:
        elapsed = _timed(lambda: self.generate(ids, px, new_tokens), device)
        self.samples.setdefault("batch_images_s", []).append(ids.shape[0] / elapsed)

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(f) for k, v in self.samples.items() if (f := _finite(v))}


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def ratio_range(ours: list[float], ref: list[float], higher_better: bool) -> tuple[float, float] | None:
    """Min and max of the per-repeat speed-up over the reference, each pair from the same
    round of the interleaved runs, so drift of the machine's speed cancels within a pair."""
    pairs = [(a, b) for a, b in zip(ours, ref, strict=False) if math.isfinite(a) and math.isfinite(b)]
    ratios = [(a / b) if higher_better else (b / a) for a, b in pairs if a > 0 and b > 0]
    return (min(ratios), max(ratios)) if ratios else None


def ours_side(name: str, model: FastVLM) -> Side:
    def generate(ids, px, n):
        mask = torch.ones_like(ids)
        return model.generate(
            input_ids=ids,
            pixel_values=px,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,  # exactly n tokens, as the reference side decodes
            do_sample=False,
        )

    return Side(name, model.encode_images, generate)


def reference_side(ref) -> Side:
    ref.generation_config.eos_token_id = None  # decode exactly the requested number of tokens
    ref.generation_config.pad_token_id = 0

    def generate(ids, px, n):
        image = {} if px is None else {"pixel_values": px}  # it cannot take pixel_values=None
        return ref.generate(
            input_ids=ids,
            **image,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )

    return Side("transformers", lambda px: ref.model.get_image_features(px), generate)
