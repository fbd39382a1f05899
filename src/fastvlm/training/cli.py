"""``fastvlm finetune``: the command-line face of ``recipe.finetune``.

The flag names are the interface; each maps to one ``FinetuneConfig`` field. Under
``torchrun`` every process runs this same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkpoints.adapter import LORA_TARGETS, LoraSettings
from ..cli_options import add_model_source_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_source_option(p)
    p.add_argument("--data", required=True, type=Path, help="LLaVA-style JSON/JSONL or chat JSONL")
    p.add_argument(
        "--image-folder", type=Path, default=None, help="image root (default: the data file's folder)"
    )
    p.add_argument(
        "--output", required=True, type=Path, help="folder for the adapter, checkpoints and metrics"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="full", action="store_false", help="train LoRA adapters (default)")
    mode.add_argument("--full", dest="full", action="store_true", help="train every weight")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument(
        "--lora-targets", default=",".join(LORA_TARGETS), help="comma-separated decoder projections"
    )
    p.set_defaults(full=False)
    proj = p.add_mutually_exclusive_group()
    proj.add_argument("--train-projector", dest="train_projector", action="store_true", default=True)
    proj.add_argument("--freeze-projector", dest="train_projector", action="store_false")
    p.add_argument("--train-vision", action="store_true", help="also train the vision tower")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=1)
    length.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument(
        "--max-length", type=int, default=2048, help="longest row in tokens (image tokens included)"
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--dtype", default="auto", help="compute dtype: float32, bfloat16 (autocast) or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-data", type=Path, default=None)
    p.add_argument("--eval-every", type=int, default=0, help="steps between eval losses (0: only at the end)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT's last checkpoint")
    p.add_argument("--merge", action="store_true", help="also write base + adapter as OUTPUT/merged")
    p.add_argument("--skip-bad-rows", action="store_true", help="leave out bad rows instead of stopping")


def config_from_args(args: argparse.Namespace):
    from .recipe import FinetuneConfig

    lora = LoraSettings(
        r=args.lora_rank,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
    )
    return FinetuneConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        image_folder=args.image_folder,
        full=args.full,
        lora=lora,
        train_projector=args.train_projector,
        train_vision=args.train_vision,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        eval_data=args.eval_data,
        eval_every=args.eval_every,
        save_every=args.save_every,
        resume=args.resume,
        merge=args.merge,
        skip_bad_rows=args.skip_bad_rows,
        progress=sys.stderr.isatty(),
    )


def run(args: argparse.Namespace) -> int:
    from .recipe import finetune

    summary = finetune(config_from_args(args))
    if "output" in summary:  # rank 0 only
        losses = summary["losses"]
        line = {"steps": summary["steps"], "output": summary["output"]}
        if losses:
            line.update(first_loss=losses[0], last_loss=losses[-1])
        if "eval_loss" in summary:
            line["eval_loss"] = summary["eval_loss"]
        print(json.dumps(line))
    return 0
