"""Cost of JSON-schema constrained decoding: per-token decode time against unconstrained, same run.

Random weights of the chosen shape (default: FastVLM-0.5B), the real Qwen2 tokenizer,
a text prompt (the image only changes the prefill). Each case runs through the
``Engine`` with a batch of --batch rows, all constrained or all free, alternating
--repeats times; a random-weight model fills every string to its ``maxLength``, so a
constrained answer is long. Time per token comes from the engine's own timings (first
token and prefill left out). A first constrained run finds n, the fewest tokens a row
took to complete; then both sides decode exactly n tokens per row (free rows with stop
ids off), so the batch stays full. Each figure is the fastest of its repeats.
Also measured: the one-time costs (llguidance's view of the tokenizer, once per
process; compiling a schema; its first mask) and a cached compile.

    python benchmarks/structured.py [--size 0.5b|tiny] [--dtype bf16] [--batch 1] [--repeats 3]

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

RECEIPT = {
    "type": "object",
    "properties": {
        "merchant": {"type": "string", "maxLength": 24},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "currency": {"enum": ["USD", "EUR", "GBP", "JPY"]},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "price": {"type": "number", "minimum": 0},
                },
                "required": ["name", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "total": {"type": "number", "minimum": 0},
        "paid": {"type": "boolean"},
    },
    "required": ["merchant", "date", "currency", "items", "total", "paid"],
    "additionalProperties": False,
}


def build(size: str, dtype: torch.dtype, device: torch.device, folder: Path):
    """(model, processor): random weights of ``size``; the processor (real tokenizer) comes
    from a tiny checkpoint written to ``folder``, which is also the "tiny" model."""
    import builders
    from fastvlm import FastVLM, FastVLMProcessor
    from fastvlm.models.optimize import SpeedOptions, optimize

    builders.tiny_checkpoint(folder)
    processor = FastVLMProcessor.from_pretrained(folder)
    if size == "tiny":
        return FastVLM.from_pretrained(folder, dtype=dtype, device=device, progress=False), processor
    from fastvlm.bench.sides import SIZES, reference_from_config
    from fastvlm.checkpoints.loader import model_from_state_dict
    from fastvlm.config import FastVLMConfig, VisionConfig

    ref = reference_from_config(SIZES[size], dtype)
    config = FastVLMConfig(vision=VisionConfig(), text=SIZES[size], image_token_id=builders.IMAGE_TOKEN_ID)
    model = model_from_state_dict(config, ref.state_dict(), dtype=dtype, device=device)
    del ref
    optimize(model, SpeedOptions())  # the fast paths fastvlm.load() sets up
    return model, processor


def requests(batch: int, new_tokens: int, constraint):
    from fastvlm.generation.engine import GenerationRequest, SamplingParams

    prompt = [{"role": "user", "content": "Read the receipt and give its fields as JSON."}]
    return [
        GenerationRequest(
            prompt,
            max_new_tokens=new_tokens,
            sampling=SamplingParams(temperature=1.0, seed=row),
            stop_token_ids=[] if constraint is None else None,  # free rows run their whole budget
            constraint=constraint,
        )
        for row in range(batch)
    ]


def ms_per_token(results) -> float:
    """Mean over rows of the engine's decode time per token after the first."""
    rates = [r.timings.decode_tokens_per_s for r in results]
    return sum(1e3 / r for r in rates) / len(rates)


def one_time_costs(engine, constraint) -> dict[str, float]:
    """Seconds: the tokenizer view, a compile, the first mask, and a cached compile."""
    from fastvlm.generation.constraints import GrammarCompiler, allowed_masks

    tokenizer, stop_ids = engine.processor.tokenizer, engine.default_stop_token_ids
    fresh = GrammarCompiler(tokenizer, engine.grammars.vocab_size, stop_ids)
    start = time.perf_counter()
    fresh.compile(type(constraint).json_schema({"type": "boolean"}))  # builds llguidance's tokenizer view
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = fresh.compile(constraint)
    compile_s = time.perf_counter() - start
    matcher = compiled.matcher()
    start = time.perf_counter()
    allowed_masks([matcher])
    first_mask_s = time.perf_counter() - start
    start = time.perf_counter()
    fresh.compile(constraint)
    cached_s = time.perf_counter() - start
    return {
        "tokenizer_s": tokenizer_s,
        "compile_s": compile_s,
        "first_mask_s": first_mask_s,
        "cached_s": cached_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.5b", help="0.5b, 1.5b, 7b or tiny")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--new-tokens", type=int, default=160, help="budget of a constrained answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastvlm.generation.constraint_spec import OutputConstraint
    from fastvlm.generation.engine import Engine

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as scratch:
        model, processor = build(args.size, dtype, torch.device(args.device), Path(scratch))
    engine = Engine(model, processor, max_batch=args.batch, max_seq_len=512)
    constraint = OutputConstraint.json_schema(RECEIPT)
    once = one_time_costs(engine, constraint)
    engine.generate(requests(args.batch, 4, None))  # warm-up
    pilot = engine.generate(requests(args.batch, args.new_tokens, constraint))
    tokens = [r.usage.completion_tokens for r in pilot]
    valid = sum(r.finish_reason == "stop" for r in pilot)
    # Every timed run decodes exactly n tokens per row (the seeds repeat the pilot, so no
    # constrained row completes sooner): the batch stays full and both sides do equal work.
    n = min(tokens)
    timings: dict[str, list[float]] = {"json_schema": [], "free": []}
    for _ in range(args.repeats):
        timings["json_schema"].append(ms_per_token(engine.generate(requests(args.batch, n, constraint))))
        timings["free"].append(ms_per_token(engine.generate(requests(args.batch, n, None))))
    free, guided = min(timings["free"]), min(timings["json_schema"])
    overhead = guided / free - 1
    print(f"{args.size} {args.dtype} on {args.device}, batch {args.batch}, threads {torch.get_num_threads()}")
    print(f"{'case':<14} {'ms/token':>9}")
    print(f"{'free':<14} {free:>9.2f}")
    print(f"{'json_schema':<14} {guided:>9.2f}   overhead {overhead:+.1%}")
    spread = f"{min(tokens)}-{max(tokens)}"
    print(f"constrained answers: {valid}/{len(tokens)} complete in {spread} tokens; timed {n} per row")
    print(
        f"one-time: tokenizer view {once['tokenizer_s'] * 1e3:.0f} ms (once per process), compile "
        f"{once['compile_s'] * 1e3:.1f} ms, first mask {once['first_mask_s'] * 1e3:.1f} ms, "
        f"cached compile {once['cached_s'] * 1e6:.0f} us"
    )
    record = {
        "benchmark": "structured",
        "size": args.size,
        "dtype": args.dtype,
        "device": args.device,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "free_ms_per_token": round(free, 3),
        "json_schema_ms_per_token": round(guided, 3),
        "overhead": round(overhead, 4),
        "complete": f"{valid}/{len(tokens)}",
        **{k: round(v, 5) for k, v in once.items()},
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
