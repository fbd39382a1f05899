"""Cost of beam search and num_return_sequences: ours vs transformers, same weights, same run.

Random weights of the chosen shape (default: FastVLM-0.5B's Qwen2 decoder); a text
prompt, since the image only changes the prefill and this measures decoding. Time per
new token = (time for N new tokens - time for 1) / (N - 1), so prefill is left out;
each time is the fastest of --repeats runs.
Stop ids are off on both sides, so every run decodes exactly N tokens. Both sides must
return the same sequences; the script says so in the table. Prints a table and ends
with one JSON line.

    python benchmarks/beam.py [--size 0.5b|tiny] [--dtype bf16] [--new-tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CASES = [  # name, generate options
    ("greedy", {"num_beams": 1}),
    ("beams=4", {"num_beams": 4}),
    ("beams=4, return 4", {"num_beams": 4, "num_return_sequences": 4}),
    ("sample, return 4", {"do_sample": True, "num_return_sequences": 4}),
]


def build(size: str, dtype: torch.dtype, device: torch.device):
    from fastvlm.bench.sides import SIZES, reference_from_config
    from fastvlm.checkpoints.loader import model_from_state_dict
    from fastvlm.config import FastVLMConfig

    if size == "tiny":
        import builders

        ref = builders.build_reference(vocab=builders.REAL_VOCAB, seed=0).to(dtype)
        folder = Path(__import__("tempfile").mkdtemp())
        builders.save_reference(ref, folder)
        from fastvlm import FastVLM

        ours = FastVLM.from_pretrained(folder, dtype=dtype, device=device, progress=False)
        return ours, ref.to(device)
    from fastvlm.config import VisionConfig

    ref = reference_from_config(SIZES[size], dtype).to(device)
    config = FastVLMConfig(vision=VisionConfig(), text=SIZES[size], image_token_id=151646)
    from fastvlm import FastVLM, SpeedOptions
    from fastvlm.models.optimize import optimize

    ours = model_from_state_dict(config, ref.state_dict(), model_class=FastVLM, dtype=dtype, device=device)
    return optimize(ours, SpeedOptions()), ref  # the fast model FastVLM.from_pretrained gives


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def per_token(generate, options: dict, n: int, repeats: int, device) -> tuple[float, torch.Tensor]:
    """Seconds per new token after the first, and the N-token output (seeded). The fastest
    of ``repeats`` runs of each length: on a shared machine the minimum is the least noisy."""
    firsts, totals, out = [], [], None
    for _ in range(repeats):
        torch.manual_seed(0)
        firsts.append(timed(lambda: generate(max_new_tokens=1, **options), device)[0])
        torch.manual_seed(0)
        total, out = timed(lambda: generate(max_new_tokens=n, **options), device)
        totals.append(total)
    return max(min(totals) - min(firsts), 0.0) / (n - 1), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.5b", help="0.5b, 1.5b, 7b or tiny")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    ours, ref = build(args.size, dtype, device)
    ref.generation_config.eos_token_id = None  # decode exactly the requested number of tokens
    ref.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 150000, (1, args.prompt_tokens), generator=g).to(device)
    sides = {
        "fastvlm": lambda **kw: ours.generate(input_ids=ids, eos_token_id=[], pad_token_id=0, **kw),
        "transformers": lambda **kw: ref.generate(input_ids=ids, **kw),
    }
    rows, record = [], {}
    for name, options in CASES:
        result = {
            side: per_token(fn, options, args.new_tokens, args.repeats, device) for side, fn in sides.items()
        }
        (ours_s, ours_out), (ref_s, ref_out) = result["fastvlm"], result["transformers"]
        same = ours_out.tolist() == ref_out.tolist()
        rows.append((name, ours_s * 1e3, ref_s * 1e3, ref_s / max(ours_s, 1e-9), same))
        record[name] = {
            "fastvlm_ms": round(ours_s * 1e3, 2),
            "transformers_ms": round(ref_s * 1e3, 2),
            "same": same,
        }
    print(f"{args.size} {args.dtype} on {args.device}, prompt {args.prompt_tokens}, {args.new_tokens} new")
    header = ("case", "fastvlm ms/token", "transformers ms/token", "speed-up", "same tokens")
    print(f"{header[0]:<20} {header[1]:>17} {header[2]:>22} {header[3]:>9} {header[4]:>12}")
    for name, a, b, ratio, same in rows:
        print(f"{name:<20} {a:>17.1f} {b:>22.1f} {ratio:>8.2f}x {str(same):>12}")
    meta = {"size": args.size, "dtype": args.dtype, "device": args.device, "new_tokens": args.new_tokens}
    print(json.dumps({"benchmark": "beam", **meta, "cases": record}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
