"""``fastvlm bench``: our model against transformers, side by side in one process.

Both sides get the same random (or given) weights, the same 1024x1024 image and the
same ~280-token prompt. Runs are interleaved A/B and the median of the repeats is
reported: vision encoder + projector time, time to first token (TTFT), decode
tokens/s (timed on a text prompt of the same length) and batch throughput. The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from .config import FastVLMConfig, TextConfig, VisionConfig
from .device import resolve_device, resolve_dtype
from .errors import InputError
from .models.optimize import SpeedOptions, optimize

SIZES = {  # Qwen2 decoders of the published FastVLM checkpoints
    "0.5b": TextConfig(152000, 896, 4864, 24, 14, 2, tie_word_embeddings=True),
    "1.5b": TextConfig(152000, 1536, 8960, 28, 12, 2, tie_word_embeddings=True),
    "7b": TextConfig(152128, 3584, 18944, 28, 28, 4, tie_word_embeddings=False),
}
IMAGE_TOKEN_ID = 151646


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b", help="random-weight model shape")
    parser.add_argument("--model", help="benchmark this checkpoint instead of random weights")
    parser.add_argument("--dtype", default="bf16", help="bf16, fp32 or fp16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=280, help="prompt length, image tokens included")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run")
    parser.add_argument("--batch", type=int, default=0, help="also measure throughput at this batch size")
    parser.add_argument("--int8", action="store_true", help="also measure int8 weight-only decoding")
    parser.add_argument("--int4", action="store_true", help="also measure 4-bit weight-only decoding")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile our vision tower (compile time reported separately)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip transformers")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush denormal floats to zero (applies to both sides)",
    )


# ---- building the two sides -----------------------------------------------------------


def _reference_from_config(text: TextConfig, dtype: torch.dtype):
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
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=256,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in the target dtype
    try:
        return FastVlmForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)


def build_models(args, dtype: torch.dtype, device: torch.device):
    """(ours, reference or None). Random weights are made once and shared."""
    from .checkpoints.loader import model_from_state_dict
    from .models.fastvlm import FastVLM

    want_ref = not args.no_reference and _has_transformers()
    if args.model:
        ours = FastVLM.from_pretrained(args.model, dtype=dtype, device=device)
        ref = None
        if want_ref and ours.config.format == "fast_vlm":
            from transformers import FastVlmForConditionalGeneration

            ref = FastVlmForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()
        return ours, ref
    text = SIZES[args.size]
    if want_ref:
        ref = _reference_from_config(text, dtype).to(device)
        config = FastVLMConfig(vision=VisionConfig(), text=text, image_token_id=IMAGE_TOKEN_ID)
        return model_from_state_dict(config, ref.state_dict(), dtype=dtype, device=device), ref
    with torch.device(device):
        ours = FastVLM(FastVLMConfig(vision=VisionConfig(), text=text, image_token_id=IMAGE_TOKEN_ID))
    return ours.to(dtype).eval(), None


def _has_transformers() -> bool:
    try:
        import timm  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ---- measuring --------------------------------------------------------------------------


def _inputs(config: FastVLMConfig, batch: int, prompt_tokens: int, dtype: torch.dtype, device: torch.device):
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


def _without_image(ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
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
        for key, value in (
            ("vision_s", vision),
            ("ttft_s", ttft),
            ("decode_tok_s", new_tokens / (total - first)),
        ):
            self.samples.setdefault(key, []).append(value)

    def run_batch(self, ids, px, new_tokens: int, device: torch.device) -> None:
        elapsed = _timed(lambda: self.generate(ids, px, new_tokens), device)
        self.samples.setdefault("batch_images_s", []).append(ids.shape[0] / elapsed)

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}


def _ours_side(name: str, model) -> Side:
    def generate(ids, px, n):
        mask = torch.ones_like(ids)
        return model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=n)

    return Side(name, model.get_image_features, generate)


def _reference_side(ref) -> Side:
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


# ---- reporting ---------------------------------------------------------------------------


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def _table(sides: list[Side], ref_name: str = "transformers") -> str:
    rows = [
        ("vision + projector (s)", "vision_s", False),
        ("TTFT (s)", "ttft_s", False),
        ("decode (tok/s)", "decode_tok_s", True),
        ("batch throughput (img/s)", "batch_images_s", True),
    ]
    med = {s.name: s.medians() for s in sides}
    names = [s.name for s in sides]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, key, higher_better in rows:
        if not any(key in m for m in med.values()):
            continue
        cells = []
        for n in names:
            value = med[n].get(key)
            cell = "-" if value is None else f"{value:.3g}"
            base = med.get(ref_name, {}).get(key)
            if value is not None and base and n != ref_name:
                cell += f" ({(value / base) if higher_better else (base / value):.2f}x)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quantized_accuracy(base, quant, ids, px, new_tokens: int = 64) -> dict[str, float]:
    """Accuracy cost of quantised weights against ``base``: prompt logits and greedy agreement."""
    a = base(ids, pixel_values=px).logits.float()
    b = quant(ids, pixel_values=px).logits.float()
    gen_a = base.generate(input_ids=ids, pixel_values=px, max_new_tokens=new_tokens)[0, ids.shape[1] :]
    gen_b = quant.generate(input_ids=ids, pixel_values=px, max_new_tokens=new_tokens)[0, ids.shape[1] :]
    same = (gen_a == gen_b).long()
    return {
        "logits_max_rel_diff": float((a - b).abs().max() / a.abs().max()),
        "top1_agreement_prompt": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "greedy_tokens_equal": int(same.sum()),
        "greedy_common_prefix": int(same.cumprod(0).sum()),
        "greedy_tokens": new_tokens,
    }


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    # Random weights drive activations into denormal range, where x86 arithmetic is
    # many times slower; real checkpoints rarely do. Same setting for both sides.
    torch.set_flush_denormal(not args.keep_denormals)
    torch.manual_seed(0)
    ours, ref = build_models(args, dtype, device)
    ours.config.eos_token_id = None
    # Before any copying or optimising: a prompt too short for the image fails fast.
    ids, px = _inputs(ours.config, 1, args.prompt_tokens, dtype, device)
    text_ids = _without_image(ids, ours.config.image_token_id)
    sides = []
    if ref is not None:
        sides.append(_reference_side(ref))
    quantized = [bits for bits in ("int8", "int4") if getattr(args, bits)]
    # Each quantised side starts from the loaded model: float32's default optimisation
    # re-lays out the very weights they replace.
    variants = {
        f"fastvlm {bits}": optimize(copy.deepcopy(ours), SpeedOptions(**{bits: True})) for bits in quantized
    }
    fast = optimize(ours, SpeedOptions())
    models = {"fastvlm": fast, **variants}
    for name, model in models.items():
        if args.compile:
            optimize(model, dataclasses.replace(SpeedOptions.off(), compile_vision=True))
        sides.append(_ours_side(name, model))
    with torch.inference_mode():
        for side in sides:  # warm-up: first calls pay for allocator and kernel selection
            side.run(ids, px, text_ids, 2, device)
            side.samples.clear()
        for _ in range(args.repeats):
            for side in sides:
                side.run(ids, px, text_ids, args.new_tokens, device)
        if args.batch:
            bids, bpx = _inputs(ours.config, args.batch, args.prompt_tokens, dtype, device)
            for side in sides:  # warm-up at this batch size (a compiled tower compiles per shape)
                side.generate(bids, bpx, 1)
            for _ in range(max(1, args.repeats // 2)):
                for side in sides:
                    side.run_batch(bids, bpx, args.new_tokens, device)
    print(
        f"# fastvlm bench: {args.model or args.size}, {dtype}, {hardware(device)}, torch {torch.__version__}"
    )
    print(
        f"# prompt {args.prompt_tokens} tokens (256 image), {args.new_tokens} new tokens, "
        f"median of {args.repeats}, batch {args.batch or '-'}"
    )
    print(_table(sides))
    summary = {
        "model": args.model or args.size,
        "dtype": str(dtype).removeprefix("torch."),
        "hardware": hardware(device),
        "torch": torch.__version__,
        "results": {s.name: s.medians() for s in sides},
    }
    if args.compile:
        summary["compile_s"] = {n: m.vision_forward.compile_seconds for n, m in models.items()}
        print(
            "# torch.compile of the vision tower took "
            + ", ".join(f"{n}: {v:.1f} s" for n, v in summary["compile_s"].items() if v is not None)
        )
    for bits in quantized:
        with torch.inference_mode():
            summary[f"{bits}_accuracy"] = quantized_accuracy(fast, models[f"fastvlm {bits}"], ids, px)
        name = str(dtype).removeprefix("torch.")
        print(f"# {bits} vs {name}: " + json.dumps(summary[f"{bits}_accuracy"]))
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastvlm bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
