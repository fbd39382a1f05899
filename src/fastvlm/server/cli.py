"""``fastvlm serve``: load a checkpoint with ``fastvlm.load`` and run the app under uvicorn.

``fastvlm.cli`` calls ``add_arguments`` and ``run``; ``python -m fastvlm.server.cli``
works on its own too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..cli_options import add_model_source_option, add_placement_options

log = logging.getLogger("fastvlm.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source_option(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("FASTVLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $FASTVLM_API_KEY)",
    )
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    parser.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting beyond the batch; then 429"
    )
    parser.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="let image_url be http(s); only public hosts are fetched unless --allow-private-image-hosts",
    )
    parser.add_argument(
        "--allow-private-image-hosts",
        action="store_true",
        help="with --allow-remote-images, also fetch from loopback, private and link-local addresses",
    )
    add_placement_options(parser)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the vision tower (slow first request per batch size)",
    )
    parser.add_argument("--served-model-name", default=None, help="the name clients pass as 'model'")
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="cache length per request (prompt + new)"
    )
    parser.add_argument(
        "--default-max-tokens", type=int, default=512, help="when a request sets no max_tokens"
    )
    parser.add_argument("--feature-cache-size", type=int, default=32, help="image features kept for reuse")
    parser.add_argument(
        "--feature-cache-mb", type=int, default=256, help="memory the kept image features may use (MiB)"
    )
    parser.add_argument("--max-images-per-request", type=int, default=8, help="more images get a 400")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted. Bad options or checkpoints raise FastVLMError (one line)."""
    from .serving import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    check_arguments(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("binding to %s without --api-key: anyone who can reach it can use the model", args.host)
    if args.allow_private_image_hosts and not args.allow_remote_images:
        log.warning("--allow-private-image-hosts does nothing without --allow-remote-images")
    app = build_app(args)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    from ..errors import InputError

    checks = [
        (0 <= args.port <= 65535, f"--port must be 0-65535, got {args.port}"),
        (args.max_batch >= 1, f"--max-batch must be >= 1, got {args.max_batch}"),
        (args.feature_cache_mb >= 0, f"--feature-cache-mb must be >= 0, got {args.feature_cache_mb}"),
        (
            args.max_images_per_request >= 0,
            f"--max-images-per-request must be >= 0, got {args.max_images_per_request}",
        ),
        (args.max_queue >= 0, f"--max-queue must be >= 0, got {args.max_queue}"),
        (args.default_max_tokens >= 1, f"--default-max-tokens must be >= 1, got {args.default_max_tokens}"),
        (
            args.max_seq_len is None or args.max_seq_len >= 2,
            f"--max-seq-len must be >= 2, got {args.max_seq_len}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)


def build_app(args: argparse.Namespace):
    from ..api import SpeedOptions, load
    from .app import create_app

    log.info("loading %s", args.model)
    vlm = load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        feature_cache_size=args.feature_cache_size,
        feature_cache_bytes=args.feature_cache_mb << 20,
        max_images_per_request=args.max_images_per_request,
        adapter=args.adapter,
        speed=SpeedOptions(int8=args.int8, int4=args.int4, compile_vision=args.compile),
        # The server checks and decodes image URLs itself; the processor reads nothing else.
        allow_remote_images=False,
        allow_local_images=False,
    )
    return create_app(
        vlm.engine,
        served_model_name=args.served_model_name or served_name(args.model),
        api_key=args.api_key,
        allow_remote_images=args.allow_remote_images,
        allow_private_image_hosts=args.allow_private_image_hosts,
        max_queue=args.max_queue,
        default_max_tokens=args.default_max_tokens,
        max_images=args.max_images_per_request,
    )


def served_name(src: str) -> str:
    """A hub id stays as given; a local folder is known by its name."""
    path = Path(src).expanduser()
    return path.resolve().name if path.exists() else src


def main(argv: list[str] | None = None) -> int:
    from ..errors import FastVLMError

    parser = argparse.ArgumentParser(prog="fastvlm serve", description="OpenAI-compatible FastVLM server")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except FastVLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
