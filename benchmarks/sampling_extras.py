"""Cost of logprobs, and what n choices save: the engine on random weights of a small shape.

1. Decode tokens/s (prefill excluded: ``Timings.decode_tokens_per_s``) of greedy rows
   without logprobs and with ``logprobs=True, top_logprobs=5``, at batch 1 and batch 4,
   and the sampler alone (``sample_rows`` on (B, 152000) logits, median of 50 calls):
   the part logprobs add to, measured apart from the model's noise on a busy machine.
2. One request with n=4 against 4 separate requests for the same image and prompt
   (all admitted in one step): seconds spent in image encoding and prefill, and wall
   time until all four answers are done.

The model: the real 152000-token vocabulary and a tiny vision tower (128 px) with a
decoder of --hidden/--layers (default 512 x 8), so the vocabulary-sized work that
logprobs add is not hidden by a large decoder. Stop ids are off, so every run decodes
exactly --new-tokens. Each figure is the best of --repeats runs. Prints a table and
ends with one JSON line.

    python benchmarks/sampling_extras.py [--hidden 512] [--layers 8] [--new-tokens 64] [--repeats 3]
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


def build_engine(args, max_batch: int):
    import builders
    from fastvlm import FastVLM
    from fastvlm.generation.engine import Engine
    from fastvlm.processing import FastVLMProcessor

    heads = max(args.hidden // 64, 2)
    shape = {
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 3,
        "num_hidden_layers": args.layers,
    }
    builders.TINY_TEXT = {**builders.TINY_TEXT, **shape, "num_attention_heads": heads}
    folder = Path(tempfile.mkdtemp())
    ref = builders.build_reference(vocab=builders.REAL_VOCAB, seed=0)
    builders.save_reference(ref, folder)
    builders.save_hf_processor(folder)
    model = FastVLM.from_pretrained(folder, dtype=args.dtype, device=args.device, progress=False)
    processor = FastVLMProcessor.from_pretrained(folder)
    return Engine(
        model, processor, max_batch=max_batch, max_seq_len=1024, prefill_per_step=4, feature_cache_size=0
    )


def messages(prompt_words: int) -> list[dict]:
    import builders

    image = str(builders.shared_assets() / "images" / "waterview.jpg")
    text = " ".join(["Describe every object in the picture in detail."] * (prompt_words // 8))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def decode_rate(engine, args, rows: int, logprobs: bool) -> float:
    """Best decode tokens/s of one row over --repeats runs of ``rows`` rows."""
    from fastvlm.generation.engine import GenerationRequest

    extra = {"logprobs": True, "top_logprobs": 5} if logprobs else {}
    best = 0.0
    for _ in range(args.repeats):
        requests = [
            GenerationRequest(messages(args.prompt_words), args.new_tokens, stop_token_ids=[], **extra)
            for _ in range(rows)
        ]
        results = engine.generate(requests)
        best = max(best, min(r.timings.decode_tokens_per_s for r in results))
    return best


def sampler_ms(rows: int, logprobs: bool, device: str, calls: int = 50) -> float:
    """Median milliseconds of one ``sample_rows`` call on (rows, 152000) greedy logits."""
    from fastvlm.generation.sampling import SamplingParams, sample_rows

    logits = torch.randn(rows, 152000, generator=torch.Generator().manual_seed(0)).to(device)
    args = ([SamplingParams()] * rows, [None] * rows, [None] * rows)
    top = [5] * rows if logprobs else None
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        sample_rows(logits, *args, top_logprobs=top)
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2] * 1e3


def choices_cost(engine, args, n: int) -> tuple[float, float, int]:
    """(encode + prefill seconds, wall seconds, prefills) for n answers: one request with n
    choices when ``n`` is given as such, else ``-n`` separate requests."""
    from fastvlm.generation.engine import GenerationRequest
    from fastvlm.generation.sampling import SamplingParams

    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            spent[0] += time.perf_counter() - start
            return out

        return wrapper

    runner = engine.runner
    prefill, encode = runner.prefill, runner.encode_images
    runner.prefill, runner.encode_images = timed(prefill), timed(encode)
    best = (float("inf"), float("inf"), 0)
    try:
        for _ in range(args.repeats):
            spent[0], before = 0.0, engine.stats["prefills"]
            params = SamplingParams(temperature=1.0, seed=0)
            common = (messages(args.prompt_words), args.new_tokens, params)
            if n > 0:
                requests = [GenerationRequest(*common, stop_token_ids=[], n=n)]
            else:
                requests = [GenerationRequest(*common, stop_token_ids=[]) for _ in range(-n)]
            start = time.perf_counter()
            engine.generate(requests)
            wall = time.perf_counter() - start
            best = min(best, (spent[0], wall, engine.stats["prefills"] - before))
    finally:
        runner.prefill, runner.encode_images = prefill, encode
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-words", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    engine = build_engine(args, max_batch=4)
    record: dict = {}
    print(f"decoder {args.hidden} x {args.layers}, vocab 152000, {args.dtype} on {args.device}")
    head = ("rows", "logprobs off tok/s", "top_logprobs=5 tok/s", "sampler off ms", "sampler top5 ms")
    print(f"{head[0]:<6} {head[1]:>19} {head[2]:>21} {head[3]:>15} {head[4]:>16}")
    for rows in (1, 4):
        off, on = decode_rate(engine, args, rows, False), decode_rate(engine, args, rows, True)
        ms_off, ms_on = sampler_ms(rows, False, args.device), sampler_ms(rows, True, args.device)
        print(f"{rows:<6} {off:>19.1f} {on:>21.1f} {ms_off:>15.2f} {ms_on:>16.2f}")
        record[f"batch{rows}"] = {"off_tok_s": round(off, 1), "top5_tok_s": round(on, 1)}
        record[f"batch{rows}"] |= {"sampler_off_ms": round(ms_off, 3), "sampler_top5_ms": round(ms_on, 3)}
    print(f"\n{'4 answers':<22} {'encode+prefill s':>17} {'wall s':>8} {'prefills':>9}")
    for name, n in (("n=4, one request", 4), ("4 separate requests", -4)):
        spent, wall, prefills = choices_cost(engine, args, n)
        print(f"{name:<22} {spent:>17.3f} {wall:>8.3f} {prefills:>9}")
        record[name] = {"prefill_s": round(spent, 4), "wall_s": round(wall, 3), "prefills": prefills}
    meta = {"hidden": args.hidden, "layers": args.layers, "dtype": args.dtype, "device": args.device}
    meta |= {"prompt_words": args.prompt_words, "new_tokens": args.new_tokens}
    print(json.dumps({"benchmark": "sampling_extras", **meta, "cases": record}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
