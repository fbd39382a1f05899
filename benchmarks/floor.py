"""The compute floor for time to first token on this machine, and how close we are.

Counts the FLOPs of one request's prefill (vision tower + projector, then the decoder
over the prompt) with torch's FLOP counter, measures what one large bf16 matmul
sustains here, and divides. Then times our own TTFT pieces on the same random-weight
FastVLM-0.5B-shaped model, eager and (with --compile) with the vision tower compiled.

    python benchmarks/floor.py [--size 0.5b] [--compile]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastvlm import FastVLM, FastVLMConfig
from fastvlm.bench import SIZES
from fastvlm.config import IMAGE_PLACEHOLDER_ID, VisionConfig
from fastvlm.models.optimize import SpeedOptions, optimize


def matmul_gflops(n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vision tower")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # random weights, as in fastvlm bench
    config = FastVLMConfig(vision=VisionConfig(), text=SIZES[args.size], image_token_id=IMAGE_PLACEHOLDER_ID)
    model = optimize(FastVLM(config).to(torch.bfloat16).eval(), SpeedOptions(compile_vision=args.compile))
    px = torch.rand(1, 3, 1024, 1024).bfloat16()
    ids = torch.randint(0, 150000, (1, 24))
    ids = torch.cat([ids[:, :5], torch.full((1, 256), IMAGE_PLACEHOLDER_ID), ids[:, 5:]], dim=1)  # 280 tokens

    def prefill(features: torch.Tensor) -> torch.Tensor:
        embeds = model.embed(ids, features)
        hidden = model.language_model(embeds, torch.arange(ids.shape[1])[None])
        return model.logits(hidden[:, -1])

    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            features = model.encode_images(px)
        vision_gflop = counter.get_total_flops() / 1e9
        counter = FlopCounterMode(display=False)
        with counter:
            prefill(features)
        decoder_gflop = counter.get_total_flops() / 1e9
        for _ in range(2):  # warm-up (and compile)
            prefill(model.encode_images(px))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            prefill(model.encode_images(px))
            times.append(time.perf_counter() - start)
    ttft = sorted(times)[1]
    gflops = matmul_gflops()
    floor = (vision_gflop + decoder_gflop) / gflops
    print(f"# {args.size}, bf16, {torch.get_num_threads()} threads, vision compiled: {args.compile}")
    print(f"prefill work: vision {vision_gflop:.0f} GFLOP + decoder {decoder_gflop:.0f} GFLOP")
    print(f"bf16 4096x4096 matmul: {gflops:.0f} GFLOP/s -> floor {floor:.2f} s")
    print(f"our TTFT (median of 3): {ttft:.2f} s = {ttft / floor:.2f}x the floor")
    summary = {"vision_gflop": vision_gflop, "decoder_gflop": decoder_gflop, "matmul_gflops": gflops}
    print(json.dumps({**summary, "floor_s": floor, "ttft_s": ttft, "ratio": ttft / floor}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
