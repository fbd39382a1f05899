"""The ``fastvlm bench`` command: our model against transformers, side by side in one process.

Every side gets the same random (or given) weights, the same 1024x1024 image and the
same ~280-token prompt. Our model is measured as each entry point gives it:
``fastvlm.load(...)`` (its ``.model``), ``FastVLM.from_pretrained(...)`` (both fast by
default, so both should match) and, with ``--plain``, ``from_pretrained`` with
``SpeedOptions.off()`` (the plain reference modules). Random weights are written to a
temporary checkpoint first so that every side goes through real loading. Runs are
interleaved and the median of the repeats is reported, with the range of the per-round
ratios against the reference: vision encoder + projector time, time to first token
(TTFT), the decoder's prefill alone (the same prompt length as text), decode tokens/s
(timed on that text prompt) and batch throughput. The last line printed is one JSON object.

The reference needs the ``bench`` extra (transformers, timm, torchvision).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from ..checkpoints.files import read_config_json
from ..checkpoints.hub import resolve_checkpoint
from ..config import FastVLMConfig
from ..device import resolve_device, resolve_dtype
from .sides import (
    SIZES,
    Side,
    make_inputs,
    our_models,
    ours_side,
    ratio_range,
    reference_and_checkpoint,
    reference_side,
    without_image,
)


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
        "--plain", action="store_true", help="also measure from_pretrained(speed=SpeedOptions.off())"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the vision tower of our fast sides (compile time reported separately)",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip transformers (needs --model: random weights come from it)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush denormal floats to zero (applies to both sides)",
    )


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
        ("prefill, text only (s)", "prefill_s", False),
        ("decode (tok/s)", "decode_tok_s", True),
        ("batch throughput (img/s)", "batch_images_s", True),
    ]
    med = {s.name: s.medians() for s in sides}
    by_name = {s.name: s for s in sides}
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
                cell += f" ({(value / base) if higher_better else (base / value):.2f}x"
                ours, ref = by_name[n].samples.get(key, []), by_name[ref_name].samples[key]
                spread = ratio_range(ours, ref, higher_better) if len(ours) > 1 else None
                cell += f", {spread[0]:.2f}-{spread[1]:.2f}x)" if spread else ")"
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
    with tempfile.TemporaryDirectory(prefix="fastvlm-bench-") as scratch:
        ref, folder = reference_and_checkpoint(args, dtype, device, Path(scratch))
        config = FastVLMConfig.from_dict(read_config_json(resolve_checkpoint(folder)))
        # Before any of our models is loaded: a prompt too short for the image fails fast.
        ids, px = make_inputs(config, 1, args.prompt_tokens, dtype, device)
        models = our_models(args, folder, dtype, device)
    for model in models.values():
        model.config.eos_token_id = None  # decode exactly the requested number of tokens
    sides = ([reference_side(ref)] if ref is not None else []) + [ours_side(n, m) for n, m in models.items()]
    with torch.inference_mode():
        _measure(args, sides, config, ids, px, device)
    summary = _report(args, sides, models, dtype, device)
    fast = next(iter(models.values()))
    for bits in ("int8", "int4"):
        if bits in models:
            with torch.inference_mode():
                summary[f"{bits}_accuracy"] = quantized_accuracy(fast, models[bits], ids, px)
            print(
                f"# {bits} vs {str(dtype).removeprefix('torch.')}: " + json.dumps(summary[f"{bits}_accuracy"])
            )
    print(json.dumps(summary))
    return 0


def _measure(args, sides: list[Side], config: FastVLMConfig, ids, px, device: torch.device) -> None:
    text_ids = without_image(ids, config.image_token_id)
    for side in sides:  # warm-up: first calls pay for allocator and kernel selection
        side.run(ids, px, text_ids, 2, device)
        side.samples.clear()
    for _ in range(args.repeats):
        for side in sides:
            side.run(ids, px, text_ids, args.new_tokens, device)
    if args.batch:
        bids, bpx = make_inputs(config, args.batch, args.prompt_tokens, px.dtype, device)
        for side in sides:  # warm-up at this batch size (a compiled tower compiles per shape)
            side.generate(bids, bpx, 1)
        for _ in range(max(1, args.repeats // 2)):
            for side in sides:
                side.run_batch(bids, bpx, args.new_tokens, device)


def _report(args, sides: list[Side], models: dict, dtype: torch.dtype, device: torch.device) -> dict:
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
        "samples": {s.name: s.samples for s in sides},
    }
    compiled = {n: m.vision_tower.compiled for n, m in models.items() if m.vision_tower.compiled is not None}
    if compiled:
        summary["compile_s"] = {n: c.compile_seconds for n, c in compiled.items()}
        times = ", ".join(f"{n}: {v:.1f} s" for n, v in summary["compile_s"].items() if v is not None)
        print(f"# torch.compile of the vision tower took {times}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastvlm bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
