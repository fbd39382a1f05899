"""``fastvlm batch``: the command-line face of ``run_batch``.

Progress goes to stderr, and the last line on stderr is the summary. Exit status 0 when
the job ran (however many rows failed: the summary counts them), 2 with one line for a
mistake in the command.
"""

from __future__ import annotations

import argparse
import sys

from ..cli_options import (
    add_constraint_options,
    add_model_source_option,
    add_placement_options,
    add_sampling_options,
    constraint_options,
)
from .job import run_batch
from .options import DEFAULT_PROMPT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folder, glob, .jsonl, .csv or .parquet")
    p.add_argument("--output", required=True, metavar="OUT", help="OUT.parquet (parts folder) or OUT.jsonl")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"for rows without one ({DEFAULT_PROMPT!r})")
    add_model_source_option(p)
    p.add_argument("--image-column", default="image", metavar="NAME", help="table column of images")
    p.add_argument("--prompt-column", default=None, metavar="NAME", help="table column of prompts (prompt)")
    p.add_argument("--id-column", default=None, metavar="NAME", help="table column of ids (the row number)")
    add_sampling_options(p)
    add_constraint_options(p)
    add_placement_options(p)
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoded together")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run on Ray Data: alone starts Ray here; 'auto' or an address joins a cluster",
    )
    p.add_argument("--workers", type=int, default=1, metavar="N", help="model replicas in Ray mode")
    p.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs named in a table"
    )
    p.add_argument("--max-image-pixels", type=int, default=None, help="refuse larger images (a row error)")
    p.add_argument("--commit-every", type=int, default=32, metavar="N", help="rows per part file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    summary = run_batch(
        args.inputs,
        args.output,
        prompt=args.prompt,
        model=args.model,
        image_column=args.image_column,
        prompt_column=args.prompt_column,
        id_column=args.id_column,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        **constraint_options(args),
        device=args.device,
        dtype=args.dtype,
        int8=args.int8,
        int4=args.int4,
        adapter=args.adapter,
        max_batch=args.max_batch,
        ray=args.ray,
        workers=args.workers,
        allow_remote_images=args.allow_remote_images,
        max_image_pixels=args.max_image_pixels,
        progress=not args.no_progress,
        commit_every=args.commit_every,
    )
    print(summary.line(), file=sys.stderr)
    return 0
