"""``fastvlm merge BASE ADAPTER OUT``: a LoRA adapter folded into a full checkpoint.

The result is in the base's own format (transformers or Apple), so whatever loaded
the base loads it, with the logits of base + adapter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base checkpoint folder or hub id")
    p.add_argument("adapter", type=Path, help="LoRA adapter folder (adapter_config.json + weights)")
    p.add_argument("out", type=Path, help="folder to write the merged checkpoint to")


def run(args: argparse.Namespace) -> int:
    from .export import merge_to_checkpoint

    if args.out.exists() and any(args.out.iterdir()):
        raise InputError(f"{args.out} is not empty; pass a new folder for the merged checkpoint")
    out = merge_to_checkpoint(args.base, args.adapter, args.out)
    print(f"merged checkpoint written to {out}", file=sys.stderr)
    return 0
