"""Command-line options shared by every command that loads a model.

Each command module (``cli``, ``server.cli``, ...) builds its parser from these, so a
flag means the same everywhere. This module imports nothing heavy.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .checkpoints.hub import DEFAULT_MODEL
from .errors import InputError


def add_model_source_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"checkpoint folder or hub id (default {DEFAULT_MODEL})"
    )


def add_placement_options(p: argparse.ArgumentParser) -> None:
    """Where the model runs and in what form."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument(
        "--adapter", default=None, metavar="DIR", help="LoRA adapter folder (PEFT format) to apply"
    )
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--int8", action="store_true", help="int8 weight-only decoder (faster decoding)")
    weights.add_argument(
        "--int4", action="store_true", help="4-bit weight-only decoder (fastest on CPU, coarser)"
    )


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")


def add_constraint_options(p: argparse.ArgumentParser) -> None:
    """At most one shape the answer must take (constrained decoding)."""
    shape = p.add_mutually_exclusive_group()
    shape.add_argument(
        "--json-schema", default=None, metavar="FILE", help="answer JSON valid under this JSON-schema file"
    )
    shape.add_argument("--regex", default=None, metavar="PATTERN", help="answer text matching this regex")
    shape.add_argument(
        "--choice", action="append", default=None, metavar="TEXT", help="answer one of these (repeatable)"
    )


def constraint_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``json_schema``/``regex``/``choices`` options the flags ask for (the schema file read)."""
    path = getattr(args, "json_schema", None)
    options = {"regex": getattr(args, "regex", None), "choices": getattr(args, "choice", None)}
    return {**options, "json_schema": read_json_schema(path) if path is not None else None}


def read_json_schema(path: str) -> dict:
    """The JSON schema in file ``path``; InputError (one line) when it cannot be used."""
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as exc:
        raise InputError(f"cannot read the JSON-schema file {path!r}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the JSON-schema file {path!r} is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        kind = type(schema).__name__
        raise InputError(f"the JSON-schema file {path!r} must hold a JSON object, not {kind}")
    return schema
