"""Peak resident memory for "load a checkpoint, answer one request": ours vs transformers.

Writes a random-weight FastVLM-0.5B-shaped checkpoint (transformers layout, bf16) to a
temporary folder, then measures each side in a fresh subprocess (peak resident set,
VmHWM), so the two never share an allocator. Prints a table and ends with one JSON line.

    python benchmarks/memory.py [--size 0.5b] [--dtype bfloat16] [--quantize int8|int4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import sys, time, torch
side, folder, dtype, quantize = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4]
torch.set_flush_denormal(True)
ids = torch.randint(0, 150000, (1, 24))
ids = torch.cat([ids[:, :5], torch.full((1, 256), 151646), ids[:, 5:]], dim=1)
px = torch.rand(1, 3, 1024, 1024).to(dtype)
start = time.perf_counter()
with torch.inference_mode():
    if side == "transformers":
        from transformers import FastVlmForConditionalGeneration
        model = FastVlmForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
        loaded = time.perf_counter()
        model.generate(input_ids=ids, pixel_values=px, max_new_tokens=8, do_sample=False)
    else:
        from fastvlm import FastVLM, SpeedOptions
        options = SpeedOptions(int8=quantize == "int8", int4=quantize == "int4")
        model = FastVLM.from_pretrained(folder, dtype=dtype, device="cpu", progress=False, speed=options)
        loaded = time.perf_counter()
        model.generate(input_ids=ids, pixel_values=px, max_new_tokens=8)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork/exec.
with open("/proc/self/status") as f:
    peak_mib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
print(f"{peak_mib:.0f} {loaded - start:.2f}")
"""


def write_checkpoint(folder: Path, size: str, dtype: str) -> None:
    import torch

    from fastvlm.bench.sides import SIZES, reference_from_config

    ref = reference_from_config(SIZES[size], getattr(torch, dtype))
    ref.save_pretrained(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default="none", help="our side only")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, args.size, args.dtype)
        weights_mib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
        for side in ("transformers", "fastvlm"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, side, str(folder), args.dtype, args.quantize],
                capture_output=True,
                text=True,
                check=True,
            )
            peak, load_s = out.stdout.split()[-2:]
            results[side] = {"peak_rss_mib": float(peak), "load_s": float(load_s)}
    print(
        "# load + one request (1024x1024 image, 280-token prompt, 8 new tokens), "
        f"{args.size}, {args.dtype}, fastvlm weights: {args.quantize}"
    )
    print("| | peak RSS (MiB) | load (s) |\n|---|---|---|")
    for side, r in results.items():
        print(f"| {side} | {r['peak_rss_mib']:.0f} | {r['load_s']:.2f} |")
    print(
        json.dumps(
            {
                "size": args.size,
                "dtype": args.dtype,
                "quantize": args.quantize,
                "weights_mib": weights_mib,
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
