"""The high-level API: ``fastvlm.load()`` gives an object that answers questions about images.

    vlm = fastvlm.load()                      # apple/FastVLM-0.5B, best device and dtype
    vlm.ask("photo.jpg", "What is shown?")    # -> str
    vlm.chat(messages, temperature=0.7)       # -> ChatResult (text, finish_reason, usage, timings, parsed)
    vlm.ask("r.jpg", "Total?", json_schema={...}).parsed  # constrained: json_schema=, regex=, choices=
    vlm.chat(messages, n=3, logprobs=True)    # -> [ChatResult] * 3, each with .logprobs
    fastvlm.api.describe_checkpoint(path)     # -> dict, from config.json and weight headers only

This layer only turns keyword options into engine requests and back; batching,
streaming and stopping live in ``fastvlm.generation``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .checkpoints.adapter import merge_adapter
from .checkpoints.files import read_config_json
from .checkpoints.hub import DEFAULT_MODEL, hub_safetensors_headers, is_hub_id, resolve_checkpoint
from .checkpoints.loader import apply_generation_config, weight_files
from .checkpoints.safetensors_io import SafetensorsReader
from .config import FastVLMConfig
from .device import resolve_device, resolve_dtype
from .errors import InputError
from .generation.constraint_spec import OutputConstraint
from .generation.engine import Engine, GenerationRequest, StreamEvent
from .generation.feature_cache import DEFAULT_MAX_BYTES as DEFAULT_FEATURE_CACHE_BYTES
from .generation.prepare import DEFAULT_MAX_IMAGES
from .generation.sampling import SamplingParams
from .modeling import FastVLM
from .models.optimize import SpeedOptions, optimize
from .processing import FastVLMProcessor
from .results import Answer, ChatResult, events_with_parsed, with_parsed

_SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
_SAMPLING_OPTIONS += ("presence_penalty", "frequency_penalty")
_REQUEST_OPTIONS = ("max_new_tokens", "stop", "stop_token_ids", "logprobs", "top_logprobs", "n")
_CONSTRAINT_OPTIONS = ("json_schema", "regex", "choices")  # at most one; see OutputConstraint
GENERATION_OPTIONS = (*_SAMPLING_OPTIONS, "logit_bias", *_REQUEST_OPTIONS, *_CONSTRAINT_OPTIONS)


def build_request(messages: list[dict], **options: Any) -> GenerationRequest:
    """A ``GenerationRequest`` from chat messages and keyword options (see GENERATION_OPTIONS)."""
    unknown = sorted(set(options) - set(GENERATION_OPTIONS))
    if unknown:
        raise InputError(f"unknown option {unknown[0]!r}; use one of: {', '.join(GENERATION_OPTIONS)}")
    sampling = {k: options[k] for k in _SAMPLING_OPTIONS if options.get(k) is not None}
    for name, value in sampling.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{name} must be a number, not {type(value).__name__}")
    if "top_k" in sampling and sampling["top_k"] != int(sampling["top_k"]):
        raise InputError(f"top_k must be an integer, got {sampling['top_k']}")
    if "top_k" in sampling:
        sampling["top_k"] = int(sampling["top_k"])
    if "seed" in sampling:
        sampling["seed"] = int(sampling["seed"])
    if options.get("logit_bias") is not None:
        sampling["logit_bias"] = options["logit_bias"]  # SamplingParams checks the mapping
    request = {k: options[k] for k in _REQUEST_OPTIONS if options.get(k) is not None}
    constraint = OutputConstraint.from_options(**{k: options.get(k) for k in _CONSTRAINT_OPTIONS})
    return GenerationRequest(
        messages=messages, sampling=SamplingParams(**sampling), constraint=constraint, **request
    )


def image_message(image: Any, prompt: str) -> list[dict]:
    """One user turn: the image(s) first, then the prompt (how FastVLM was trained)."""
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be a string, not {type(prompt).__name__}")
    images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    parts = [{"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


class VLM:
    """A loaded model, its processor and a batching engine.

    ``ask``, ``chat`` and ``batch`` take messages and keyword options; ``generate`` and
    ``stream`` take a ``GenerationRequest`` made by ``build_request`` (so a caller can
    check its options before the model is loaded, as the CLI does).
    """

    def __init__(self, model: FastVLM, processor: FastVLMProcessor, engine: Engine) -> None:
        self.model, self.processor, self.engine = model, processor, engine

    def generate(self, request: GenerationRequest) -> ChatResult | list[ChatResult]:
        """Run one request to the end: its result, or with ``n`` > 1 its n results."""
        results = [with_parsed(r, request.constraint) for r in self.engine.generate([request])]
        return results if request.n > 1 else results[0]

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """The answer's text pieces as they are decoded; ``close()`` the iterator to stop early
        (the request's cache row is freed)."""
        return self.engine.stream(request)

    def ask(self, image: Any = None, prompt: str | None = None, *, stream: bool = False, **options: Any):
        """Answer ``prompt`` about ``image`` (path, URL, PIL image, bytes, base64, a list, or None).

        Returns the answer (a ``str`` whose ``parsed`` holds the value under a
        ``json_schema``/``regex``/``choices`` constraint, see ``fastvlm.results``; with
        ``n`` > 1 a list of n answers), or with ``stream=True`` an iterator of text
        pieces (one answer only).
        """
        if prompt is None:
            raise InputError("ask(image, prompt) needs a prompt; for text only call ask(None, prompt)")
        if options.get("logprobs"):
            raise InputError("ask returns text only; call chat(...) for results with logprobs")
        request = build_request(image_message(image, prompt), **options)
        if stream:
            return self.stream(request)
        result = self.generate(request)
        return [Answer(r) for r in result] if isinstance(result, list) else Answer(result)

    def chat(
        self, messages: list[dict], *, stream: bool = False, **options: Any
    ) -> ChatResult | list[ChatResult] | Iterator[StreamEvent]:
        """Continue a conversation: its result, or with ``n`` > 1 a list of n results.

        The result has ``parsed``: the answer as a value under a constraint, else None.
        With ``stream=True``: events; each choice (``event.index``) ends with one
        finished event holding its result.
        """
        request = build_request(messages, **options)
        if stream:
            return events_with_parsed(self.engine.stream_events(request), request.constraint)
        return self.generate(request)

    def batch(self, conversations: list[Any], **options: Any) -> list[ChatResult | list[ChatResult]]:
        """Run several conversations together. Each item is a list of messages, or a dict
        ``{"messages": [...], **options}`` whose options override the shared ``options``.

        One entry per conversation: its result, or a list of n results where ``n`` > 1."""
        requests = []
        for index, item in enumerate(conversations):
            if isinstance(item, Mapping):
                if "messages" not in item:
                    raise InputError(f"batch item {index} is a dict without 'messages'")
                extra = {k: v for k, v in item.items() if k != "messages"}
                requests.append(build_request(item["messages"], **{**options, **extra}))
            else:
                requests.append(build_request(item, **options))
        results = iter(self.engine.generate(requests))
        return [
            [with_parsed(next(results), r.constraint) for _ in range(r.n)]
            if r.n > 1
            else with_parsed(next(results), r.constraint)
            for r in requests
        ]

    def __repr__(self) -> str:
        return (
            f"VLM(source={self.model.source!r}, device={self.model.device}, "
            f"dtype={self.model.dtype}, max_batch={self.engine.max_batch})"
        )


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | None = "auto",
    dtype: str | None = "auto",
    max_batch: int = 8,
    max_seq_len: int | None = None,
    feature_cache_size: int = 32,
    feature_cache_bytes: int = DEFAULT_FEATURE_CACHE_BYTES,
    max_images_per_request: int = DEFAULT_MAX_IMAGES,
    revision: str | None = None,
    progress: bool = True,
    speed: SpeedOptions | None = None,
    allow_remote_images: bool = True,
    allow_local_images: bool = True,
    allow_private_image_hosts: bool = False,
    adapter: str | os.PathLike | None = None,
) -> VLM:
    """Load a checkpoint (local folder or hub id, either format) ready to answer questions.

    ``device``/``dtype`` "auto" pick CUDA bf16, MPS fp16, or CPU (bf16 where the CPU has
    native bf16, else fp32). ``speed`` picks the fast paths (default ``SpeedOptions()``:
    fused projections and channels-last vision; ``SpeedOptions(int8=True)`` or
    ``int4=True`` quantise the decoder's weights; ``SpeedOptions.off()`` keeps the plain
    reference modules). ``max_batch``, ``max_seq_len``, ``feature_cache_size``,
    ``feature_cache_bytes`` and ``max_images_per_request`` size the engine (see
    ``Engine``). ``allow_remote_images``/``allow_local_images`` say whether image parts
    may name URLs or local files (a server that decodes images itself turns both off);
    URLs are fetched from public hosts only unless
    ``allow_private_image_hosts`` (localhost, LAN, link-local, ...). ``adapter`` is a LoRA
    adapter folder in PEFT's format (from ``fastvlm finetune`` or PEFT itself), merged into
    the weights before the fast paths are set up.
    Raises CheckpointError (one line) if it cannot be loaded.
    """
    folder = resolve_checkpoint(model, revision=revision)
    # Plain first, then the same switches from_pretrained applies: anything that changes
    # the weights (such as merging an adapter) must see the modules as the checkpoint has them.
    # The device-aware dtype ("auto" here is the best one for the device; from_pretrained's
    # "auto" is the checkpoint's, as in transformers).
    dev = resolve_device(device)
    net = FastVLM.from_pretrained(
        folder, dtype=resolve_dtype(dtype, dev), device=dev, progress=progress, speed=SpeedOptions.off()
    )
    if adapter is not None:
        merge_adapter(net, adapter)
    optimize(net, SpeedOptions() if speed is None else speed)
    processor = FastVLMProcessor.from_pretrained(
        folder,
        allow_remote_images=allow_remote_images,
        allow_local_images=allow_local_images,
        allow_private_image_hosts=allow_private_image_hosts,
    )
    engine = Engine(
        net,
        processor,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        feature_cache_size=feature_cache_size,
        feature_cache_bytes=feature_cache_bytes,
        max_images_per_request=max_images_per_request,
    )
    return VLM(net, processor, engine)


def describe_checkpoint(src: str) -> dict[str, Any]:
    """Architecture from config.json and weight statistics from safetensors headers.

    Only the JSON headers of the weight files are read, never the weights, so this is
    instant even for large checkpoints. For a hub id only the small files are downloaded
    and the weight headers are fetched with range requests.
    """
    if is_hub_id(src):
        folder = resolve_checkpoint(src, weights=False)
        weights = _weight_stats(hub_safetensors_headers(str(src)))
    else:
        folder = resolve_checkpoint(src)
        weights = _weight_stats([_local_header(path) for path in weight_files(folder)])
    config = FastVLMConfig.from_dict(read_config_json(folder))
    apply_generation_config(config, folder)
    # The processor's settings, not the tower's nominal size, decide the image size used.
    processor = FastVLMProcessor.from_pretrained(folder)
    height, width = processor.image_settings.output_size
    text_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    text_keys += ("head_dim", "intermediate_size", "vocab_size", "max_position_embeddings")
    vision_keys = ("num_features", "embed_dims", "layers")
    return {
        "source": str(folder),
        "format": config.format,
        "text": {k: getattr(config.text, k) for k in text_keys},
        "vision": {
            "image_size": [height, width],
            "num_image_tokens": processor.num_image_tokens,
            **{k: list(v) if isinstance(v := getattr(config.vision, k), tuple) else v for k in vision_keys},
        },
        "image_token_id": config.image_token_id,
        "eos_token_id": config.eos_token_id,
        "weights": weights,
    }


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_SAFETENSORS_DTYPES.update({"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I8": "int8"})


def _local_header(path: Path) -> tuple[dict | None, int]:
    """(safetensors header or None for a pickle, file size) of one weight file."""
    if path.suffix != ".safetensors":
        return None, path.stat().st_size  # a pickle cannot be inspected without loading it
    reader = SafetensorsReader(path)  # reads the header only
    return reader.entries, reader.size


def _weight_stats(files: list[tuple[dict | None, int]]) -> dict[str, Any]:
    """Parameter counts by dtype and total bytes from each weight file's (header, size)."""
    params_by_dtype: dict[str, int] = {}
    for header, _ in files:
        for entry in (header or {}).values():
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:  # integer buffers (BatchNorm counters) are not parameters
                continue
            count = 1
            for dim in entry["shape"]:
                count *= dim
            params_by_dtype[dtype] = params_by_dtype.get(dtype, 0) + count
    total_bytes = sum(size for _, size in files)
    ranked = sorted(params_by_dtype, key=params_by_dtype.get, reverse=True)
    return {
        "dtype": ", ".join(ranked) if ranked else "unknown",  # the most common first
        "parameters": sum(params_by_dtype.values()),
        "parameters_by_dtype": params_by_dtype,
        "files": len(files),
        "bytes": total_bytes,
    }
