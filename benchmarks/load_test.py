"""Load test for the OpenAI-compatible server: throughput and time to first token under
concurrent streaming clients.

By default it starts ``fastvlm serve``'s app in a child process around a random-weight
model with FastVLM-0.5B's shapes (full FastViTHD tower at 1024 px, Qwen2 896x24) in
bfloat16, then runs each concurrency level in turn: ``max(--requests, concurrency)``
streamed chat requests, each with its own image (so the feature cache never helps,
unless ``--same-image``) and ``ignore_eos`` so every request decodes exactly
``--max-tokens`` tokens. ``--url`` measures a server that is already running instead.

TTFT is measured by the client: request sent -> first content chunk. It prints a table
and ends with one JSON line.

    python benchmarks/load_test.py                       # 1, 4, 16 clients; a few minutes on 2 cores
    python benchmarks/load_test.py --concurrency 1,4 --max-tokens 16 --no-image
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --model apple/FastVLM-0.5B
    python benchmarks/load_test.py --scenario stall --tiny       # stream stalls as 8 images arrive
    python benchmarks/load_test.py --scenario queue-memory --tiny --images-per-request 8

``--scenario stall`` and ``--scenario queue-memory`` are described in ``load_scenarios.py``.
``--tiny`` serves the tiny random test checkpoint (real tokenizer, 1024 px images) instead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from sse_client import has_content, percentile, stream_events

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "fastvlm-0.5b-random"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=4, help="requests per level (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens each request decodes")
    p.add_argument("--no-image", action="store_true", help="text-only prompts")
    p.add_argument("--same-image", action="store_true", help="one image for all (feature-cache hits)")
    p.add_argument("--max-batch", type=int, default=16, help="server --max-batch (own server only)")
    p.add_argument("--dtype", default="bfloat16", help="own server only")
    p.add_argument("--device", default="cpu", help="own server only")
    p.add_argument("--url", help="measure this running server instead of starting one")
    p.add_argument("--model", default=SERVED_NAME, help="model name to send (with --url)")
    p.add_argument("--api-key", default=None, help="with --url, if the server needs one")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    p.add_argument("--scenario", choices=["levels", "stall", "queue-memory"], default="levels")
    p.add_argument("--tiny", action="store_true", help="serve the tiny test checkpoint (own server only)")
    p.add_argument("--arrivals", type=int, default=8, help="stall / queue-memory: requests that arrive")
    p.add_argument("--stream-tokens", type=int, default=3000, help="stall: tokens of the text stream")
    p.add_argument("--slots", type=int, default=2, help="queue-memory: batch rows, all kept busy")
    p.add_argument("--images-per-request", type=int, default=8, help="queue-memory: 1x1 PNGs per request")
    p.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


# ---- the server under test (child process) ---------------------------------------------


def random_model(dtype: str, device: str):
    """FastVLM-0.5B's shapes with random weights: N(0, 0.02) matrices, unit norms, tied head."""
    import torch

    from fastvlm import FastVLM, FastVLMConfig, TextConfig
    from fastvlm.device import resolve_dtype

    text = TextConfig(152000, 896, 4864, 24, 14, 2, tie_word_embeddings=True)
    config = FastVLMConfig(text=text, eos_token_id=[151645, 151643])
    with torch.device("meta"):
        model = FastVLM(config)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name or name.endswith("gamma"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.lm_head.weight = model.language_model.embed_tokens.weight
    return model.to(resolve_dtype(dtype, torch.device(device))).eval()


def processor_1024(folder: Path):
    """The Hugging Face processor files of the tiny test checkpoints, at 1024 px (256 image tokens)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import builders
    from fastvlm.processing import FastVLMProcessor

    builders.save_hf_processor(folder, image_size=1024)
    config = {
        "model_type": "fast_vlm",
        "image_token_index": 151646,
        "text_config": {"max_position_embeddings": 32768},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return FastVLMProcessor.from_pretrained(folder, allow_remote_images=False, allow_local_images=False)


def tiny_model_1024(folder: Path):
    """The tests' tiny random checkpoint with 1024 px images: the tower and decoder cost ~ms."""
    sys.path.insert(0, str(ROOT / "tests"))
    import builders
    from fastvlm import FastVLM
    from fastvlm.processing import FastVLMProcessor

    builders.tiny_checkpoint(folder)
    builders.save_hf_processor(folder, image_size=1024)
    model = FastVLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    processor = FastVLMProcessor.from_pretrained(folder, allow_remote_images=False, allow_local_images=False)
    return model, processor


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from fastvlm.generation.engine import Engine
    from fastvlm.server.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            model, processor = tiny_model_1024(Path(tmp))
        else:
            model, processor = random_model(args.dtype, args.device), processor_1024(Path(tmp))
    engine = Engine(model, processor, max_batch=args.max_batch)
    app = create_app(engine, served_model_name=SERVED_NAME, max_queue=1024)
    uvicorn.run(app, host="127.0.0.1", port=args.serve_port, log_level="warning")


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, __file__, "--serve-port", str(port), "--max-batch", str(args.max_batch)]
    command += ["--dtype", args.dtype, "--device", args.device] + (["--tiny"] if args.tiny else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not come up within 600 s")


# ---- clients -------------------------------------------------------------------------------


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    completion_tokens: int


def image_uri(index: int) -> str:
    """A distinct 1024x768 JPEG per index: a colour gradient (distinct pixels -> no cache hit)."""
    from PIL import Image

    base = Image.linear_gradient("L").resize((1024, 768))
    tint = ((index * 67) % 256, (index * 131 + 40) % 256, (index * 29 + 90) % 256)
    image = Image.merge("RGB", [base.point(lambda v, t=t: (v + t) % 256) for t in tint])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(args: argparse.Namespace, index: int) -> dict:
    question = f"Describe picture number {index} in detail."
    if args.no_image:
        content: str | list = question
    else:
        uri = image_uri(0 if args.same_image else index)
        content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]
    return {
        "model": args.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    start = time.perf_counter()
    first, tokens = None, 0
    async for data in stream_events(client, url, body):
        if data.get("usage"):
            tokens = data["usage"]["completion_tokens"]
        if first is None and has_content(data):
            first = time.perf_counter()
    end = time.perf_counter()
    return Sample((first or end) - start, end - start, tokens)


async def run_level(args: argparse.Namespace, url: str, concurrency: int, offset: int) -> dict:
    n = max(args.requests, concurrency)
    bodies = [request_body(args, offset + i) for i in range(n)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    samples: list[Sample] = []
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits, headers=headers) as client:

        async def worker() -> None:
            while bodies:
                samples.append(await one_request(client, url, bodies.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts = sorted(s.ttft_s for s in samples)
    tokens = sum(s.completion_tokens for s in samples)
    return {
        "concurrency": concurrency,
        "requests": n,
        "wall_s": round(wall, 2),
        "requests_per_s": round(n / wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p90_s": round(percentile(ttfts, 90), 3),
        "ttft_p99_s": round(percentile(ttfts, 99), 3),
        "latency_mean_s": round(statistics.fmean(s.total_s for s in samples), 3),
        "completion_tokens": tokens,
    }


def peak_batch(url: str, api_key: str | None) -> float | None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for line in httpx.get(f"{url}/metrics", headers=headers, timeout=10).text.splitlines():
        if line.startswith("fastvlm_peak_batch_size "):
            return float(line.split()[-1])
    return None


COLUMNS = [("clients", 7), ("requests", 8), ("wall s", 8), ("req/s", 7), ("tok/s", 8), ("TTFT p50", 9)]
HEADER = " ".join(f"{name:>{width}}" for name, width in [*COLUMNS, ("p90", 7), ("p99", 7)])


def row_line(r: dict) -> str:
    return (
        f"{r['concurrency']:>7} {r['requests']:>8} {r['wall_s']:>8.1f} {r['requests_per_s']:>7.2f} "
        f"{r['tokens_per_s']:>8.1f} {r['ttft_p50_s']:>9.2f} {r['ttft_p90_s']:>7.2f} {r['ttft_p99_s']:>7.2f}"
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve_port:
        serve(args)
        return 0
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        print(f"starting a server: random FastVLM-0.5B shapes, {args.dtype} on {args.device} ...", flush=True)
        proc, url = start_server(args)
    if args.scenario != "levels":
        return run_scenario(args, url, proc)
    try:
        # One warm-up request so the first level does not pay for lazy initialisation.
        asyncio.run(
            run_level(argparse.Namespace(**{**vars(args), "requests": 1, "max_tokens": 2}), url, 1, 10_000)
        )
        rows = []
        print(HEADER, flush=True)
        for i, concurrency in enumerate(args.levels):
            rows.append(asyncio.run(run_level(args, url, concurrency, offset=1000 * i)))
            print(row_line(rows[-1]), flush=True)
        peak = peak_batch(url, args.api_key)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    summary = {
        "benchmark": "server_load",
        "model": "random FastVLM-0.5B shapes" if not args.url else args.model,
        "dtype": args.dtype if not args.url else None,
        "device": args.device if not args.url else None,
        "image": None if args.no_image else ("same" if args.same_image else "distinct 1024x768 JPEG"),
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch if not args.url else None,
        "peak_batch": peak,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "levels": rows,
    }
    print(json.dumps(summary))
    return 0


def run_scenario(args: argparse.Namespace, url: str, proc: subprocess.Popen | None) -> int:
    import load_scenarios

    try:
        if args.scenario == "stall":
            asyncio.run(
                run_level(argparse.Namespace(**{**vars(args), "requests": 1, "max_tokens": 2}), url, 1, 0)
            )
            row = asyncio.run(load_scenarios.stall(args, url, image_uri))
        else:
            if proc is None:
                raise SystemExit("--scenario queue-memory reads the server's memory: it needs its own server")
            row = asyncio.run(load_scenarios.queue_memory(args, url, proc.pid))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    row.update(
        model="tiny test checkpoint" if args.tiny else "random FastVLM-0.5B shapes", cores=os.cpu_count()
    )
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
