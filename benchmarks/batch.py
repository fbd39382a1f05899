"""``fastvlm batch`` against a plain loop of ``vlm.ask``, and Ray mode against local mode.

Writes a random-weight checkpoint of the chosen shape (default FastVLM-0.5B: FastViTHD at
1024 px, Qwen2-0.5B decoder; the real tokenizer from the shared test assets), makes
``--images`` distinct photos-sized images, then times on the same images:

* loop:  ``for image: vlm.ask(image, prompt, max_new_tokens=N)``
* local: ``fastvlm.run_batch(folder, out, ...)`` (thread-pool decoding + continuous batching)
* ray:   the same with ``ray="local"`` and 1 and 2 replicas (``--workers``)

Each line gives images/s over the whole run after the model is loaded (for Ray: from
``ray.init``, so it includes starting Ray and loading each replica) and the steady rate
after the first row. ``--rss`` also measures peak resident memory of local mode for 20
and for 1,000 images in fresh processes (tiny model: memory growth is the pipeline's).

    python benchmarks/batch.py                       # 0.5B shape, bf16, 32 images, 32 tokens
    python benchmarks/batch.py --size tiny --images 8 --new-tokens 8 --rss   # smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # checkpoint builders

PROMPT = "Describe the image."


def write_checkpoint(folder: Path, size: str, dtype: str) -> Path:
    import builders

    if size == "tiny":
        return builders.tiny_checkpoint(folder)[0]
    from fastvlm.bench.sides import SIZES, reference_from_config

    reference_from_config(SIZES[size], getattr(torch, dtype)).save_pretrained(folder)
    builders.save_hf_processor(folder, image_size=1024)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    return folder


def make_images(folder: Path, count: int, size: tuple[int, int] = (800, 600)) -> Path:
    """Distinct noisy JPEGs (so no image feature is reused and decoding costs what a photo does)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"img{i:05d}.jpg", quality=90)
    return folder


def time_loop(model: Path, images: Path, args) -> dict:
    import fastvlm

    vlm = fastvlm.load(model, device=args.device, dtype=args.dtype, progress=False)
    paths = sorted(images.iterdir())
    start = time.perf_counter()
    first = None
    for path in paths:
        vlm.ask(str(path), PROMPT, max_new_tokens=args.new_tokens)
        first = first or time.perf_counter() - start
    return _rates("loop of vlm.ask", len(paths), time.perf_counter() - start, first)


def flush_denormals() -> None:
    # Random weights produce denormal floats that make x86 arithmetic many times slower;
    # real checkpoints rarely do. Same setting as ``fastvlm bench``, in every process.
    torch.set_flush_denormal(True)


def start_ray() -> None:
    import ray

    setup = {"worker_process_setup_hook": flush_denormals}  # the model replicas too
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=setup)


def time_batch(model: Path, images: Path, out: Path, args, **extra) -> dict:
    import fastvlm

    s = fastvlm.run_batch(
        [str(images)], out, model=str(model), device=args.device, dtype=args.dtype, prompt=PROMPT,
        max_new_tokens=args.new_tokens, max_batch=args.max_batch, progress=False, **extra,
    )  # fmt: skip
    assert s.failed == 0, s
    name = f"ray, {extra['workers']} replica(s)" if extra.get("ray") else "fastvlm batch (local)"
    return _rates(name, s.done, s.seconds, s.first_row_seconds)


def time_ray(model: Path, images: Path, out: Path, args, workers: int) -> dict:
    import ray

    start = time.perf_counter()
    start_ray()
    try:
        row = time_batch(model, images, out, args, ray="local", workers=workers)
    finally:
        ray.shutdown()
    # run_batch's clock started after ray.init here; count Ray's start-up as the CLI would.
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["images_per_s"] = row["images"] / row["seconds"]
    return row


def _rates(name: str, n: int, seconds: float, first: float) -> dict:
    steady = (n - 1) / (seconds - first) if n > 1 and seconds > first else float("nan")
    return {"mode": name, "images": n, "seconds": round(seconds, 2), "images_per_s": n / seconds,
            "steady_images_per_s": steady}  # fmt: skip


RSS_CHILD = """
import sys, torch, fastvlm
torch.set_flush_denormal(True)
fastvlm.run_batch([sys.argv[2]], sys.argv[3], model=sys.argv[1], device="cpu", dtype="float32",
                  max_new_tokens=4, progress=False)
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) // 1024)
"""


def peak_rss_mib(model: Path, images: Path, out: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-c", RSS_CHILD, str(model), str(images), str(out)]
    return int(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.split()[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "0.5b", "1.5b", "7b"], default="0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--modes", default="loop,local,ray1,ray2", help="any of loop,local,ray1,ray2")
    parser.add_argument("--rss", action="store_true", help="peak RSS, 20 vs 1,000 images (tiny model)")
    return parser.parse_args()


def run_modes(model: Path, images: Path, tmp: Path, args) -> list[dict]:
    modes = args.modes.split(",")
    runs = {
        "loop": lambda: time_loop(model, images, args),
        "local": lambda: time_batch(model, images, tmp / "local.parquet", args),
        "ray1": lambda: time_ray(model, images, tmp / "ray1.parquet", args, workers=1),
        "ray2": lambda: time_ray(model, images, tmp / "ray2.parquet", args, workers=2),
    }
    rows = []
    for name in (m for m in runs if m in modes):
        rows.append(runs[name]())
        print(f"# measured: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)  # partial results
    return rows


def print_table(rows: list[dict], args) -> None:
    from fastvlm.bench.cli import hardware

    shape = f"{args.size}, {args.dtype}, {args.images} images, {args.new_tokens} new tokens"
    print(f"# fastvlm batch: {shape}, max_batch {args.max_batch}, {hardware(torch.device(args.device))}")
    print(f"{'mode':<24} {'images/s':>9} {'steady':>9} {'seconds':>8}")
    for r in rows:
        rates = f"{r['images_per_s']:>9.2f} {r['steady_images_per_s']:>9.2f}"
        print(f"{r['mode']:<24} {rates} {r['seconds']:>8.1f}")


def main() -> int:
    args = parse_args()
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    flush_denormals()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_checkpoint(tmp / "model", args.size, args.dtype)
        rows = run_modes(model, make_images(tmp / "images", args.images), tmp, args)
        print_table(rows, args)
        summary = {r["mode"]: round(r["images_per_s"], 3) for r in rows}
        if args.rss:
            tiny = write_checkpoint(tmp / "tiny", "tiny", "float32")
            small = peak_rss_mib(tiny, make_images(tmp / "rss20", 20), tmp / "rss20.parquet")
            large = peak_rss_mib(tiny, make_images(tmp / "rss1000", 1000), tmp / "rss1000.parquet")
            print(f"peak RSS, local mode (tiny model): 20 images {small} MiB, 1000 images {large} MiB")
            summary.update(rss_20_mib=small, rss_1000_mib=large)
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
