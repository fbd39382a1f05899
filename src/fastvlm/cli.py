"""The ``fastvlm`` command: run, chat, info, and the serve/bench commands of other modules.

Every error a user can cause ends the command with exit status 2 and one line on
stderr that says what was wrong and what to do; ``--debug`` shows the traceback
instead. Answers go to stdout, everything else (progress, prompts) to stderr.
The model is loaded only after the arguments and a local image have been checked,
so mistakes are reported at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import asdict
from typing import Any

from .checkpoints.hub import DEFAULT_MODEL
from .cli_options import (
    add_constraint_options,
    add_model_source_option,
    add_placement_options,
    add_sampling_options,
    constraint_options,
)

# Commands implemented elsewhere: name -> (module, help). Each module has
# add_arguments(parser) and run(args) -> int, and is imported only when chosen.
_DELEGATED = {
    "serve": ("fastvlm.server.cli", "serve an OpenAI-compatible HTTP API"),
    "bench": ("fastvlm.bench", "measure speed"),
    "batch": ("fastvlm.batch.cli", "answer a prompt about every image of a folder or table"),
    "finetune": ("fastvlm.training.cli", "fine-tune on your own images (LoRA or full)"),
    "merge": ("fastvlm.training.merge", "merge a LoRA adapter into its base checkpoint"),
}
# The extra that installs what a command needs: by the missing module when the import
# error names one, else by command.
_EXTRA_BY_MODULE = {
    **dict.fromkeys(("fastapi", "uvicorn", "httpx", "starlette", "anyio"), "server"),
    **dict.fromkeys(("transformers", "timm", "torchvision"), "bench"),
    "ray": "ray",
    **dict.fromkeys(("peft", "safetensors"), "train"),
}
_EXTRA_BY_COMMAND = {"serve": "server", "bench": "bench", "finetune": "train", "merge": "train"}
_NO_IMAGE = ("none", "")


class UsageError(Exception):
    """Bad command line; the message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage over several lines
        raise UsageError(f"{message}; see '{self.prog} --help'")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    add_model_source_option(p)
    add_placement_options(p)
    add_sampling_options(p)


def _add_debug(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not overwrite a --debug given before it.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="fastvlm", description="FastVLM vision-language models in plain PyTorch")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="answer one prompt about an image, streaming to stdout")
    run.add_argument("image", help="image path, URL, data URI, '-' for stdin, or 'none' for text only")
    run.add_argument("prompt")
    _add_model_options(run)
    add_constraint_options(run)
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")

    chat = sub.add_parser("chat", help="interactive multi-turn chat (/image PATH, /reset, /exit)")
    chat.add_argument("image", nargs="?", default=None, help="image to talk about (optional)")
    _add_model_options(chat)
    chat.add_argument("--system", default=None, help="system prompt")

    info = sub.add_parser("info", help="describe a checkpoint without loading its weights")
    info.add_argument("src", help="checkpoint folder or hub id")
    info.add_argument("--json", action="store_true")

    for p in (run, chat, info):
        _add_debug(p)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in _DELEGATED.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:  # only the chosen one pays for its imports
            _delegate(name, module).add_arguments(p)
            _add_debug(p)
    return parser


def _delegate(name: str, module: str):
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # missing, or present but broken: the other commands still work
        raise UsageError(
            f"'fastvlm {name}' is unavailable ({type(exc).__name__}: {exc}){_install_hint(name, exc)}"
        ) from None
    if not (callable(getattr(mod, "add_arguments", None)) and callable(getattr(mod, "run", None))):
        raise UsageError(f"'fastvlm {name}' is unavailable: {module} lacks add_arguments/run")
    return mod


def _install_hint(command: str, exc: Exception) -> str:
    """'; install fastvlm[EXTRA]' naming the extra that provides the missing module."""
    if not isinstance(exc, ImportError) or not exc.name:
        return ""  # the module is there but broken: no extra would fix it
    top = exc.name.split(".")[0]
    if top == "fastvlm":
        return "; reinstall fastvlm"  # one of our own modules is missing
    extra = _EXTRA_BY_MODULE.get(top, _EXTRA_BY_COMMAND.get(command))
    return f"; install fastvlm[{extra}]" if extra else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args, extra = build_parser(argv).parse_known_args(argv)
        if extra:
            raise UsageError(
                f"unrecognized arguments: {' '.join(extra)}; see 'fastvlm {args.command} --help'"
            )
        debug = bool(getattr(args, "debug", False))
        if args.command in _DELEGATED:
            return int(_delegate(args.command, _DELEGATED[args.command][0]).run(args) or 0)
        return {"run": cmd_run, "chat": cmd_chat, "info": cmd_info}[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if debug:
            raise
        return _report(exc, argv)


def _report(exc: Exception, argv: list[str]) -> int:
    from .errors import CheckpointError, FastVLMError

    if isinstance(exc, UsageError):
        message, status = str(exc), 2
    elif isinstance(exc, FastVLMError):
        message, status = str(exc), 2
        default_model = not any(a.startswith("--model") for a in argv)
        if isinstance(exc, CheckpointError) and default_model and argv[:1] in (["run"], ["chat"]):
            message += f"; to use a local copy of {DEFAULT_MODEL}, pass --model /path/to/local/checkpoint"
    else:
        message, status = f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return status


# ---- run / chat --------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }


def _load(args: argparse.Namespace):
    from .api import SpeedOptions, load

    # Progress bars only on a terminal: a redirected stderr should hold errors, not bars.
    return load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_batch=1,
        progress=sys.stderr.isatty(),
        speed=SpeedOptions(int8=args.int8, int4=args.int4),
        adapter=args.adapter,
    )


def _image_source(arg: str | None) -> Any:
    """Check a local image before the (slow) model load; return what the processor takes."""
    if arg is None or arg.lower() in _NO_IMAGE:
        return None
    if arg == "-":
        return sys.stdin.buffer.read()
    from .processing.images import HF_RGB_RULES, ImageLoadOptions, load_rgb_image

    if not arg.lower().startswith(("http://", "https://", "data:")):
        load_rgb_image(arg, ImageLoadOptions(), HF_RGB_RULES, "image")
    return arg


def cmd_run(args: argparse.Namespace) -> int:
    from .api import build_request, image_message

    image = _image_source(args.image)
    options = {**_options(args), **constraint_options(args)}
    request = build_request(image_message(image, args.prompt), **options)
    vlm = _load(args)
    if args.json:
        result = vlm.generate(request)
        out = {k: v for k, v in asdict(result).items() if k != "token_ids"}
        print(json.dumps(out, ensure_ascii=False))
        return 0
    for piece in vlm.stream(request):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .api import build_request
    from .errors import FastVLMError

    if args.image == "-":
        raise UsageError("chat reads its turns from stdin, so the image cannot come from '-'; pass a path")
    image = _image_source(args.image)
    build_request([{"role": "user", "content": "check"}], **_options(args))  # bad options fail early
    vlm = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
        print("fastvlm chat: /image PATH (or none), /reset, /exit; Ctrl-C stops an answer", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    pending_image = image  # attached to the next user turn
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        text = line.strip()
        if not line or text in ("/exit", "/quit"):  # EOF or asked to
            return 0
        if text == "/reset":
            history, pending_image = [], image
        elif text.startswith("/image"):
            path = text[len("/image") :].strip()
            try:
                if path == "-":
                    raise UsageError("/image needs a path, not '-'")
                image = pending_image = _image_source(path)
            except (FastVLMError, UsageError) as exc:
                print(f"error: {exc}", file=sys.stderr)
        elif text.startswith("/"):
            print(
                f"error: unknown command {text.split()[0]}; use /image PATH, /reset or /exit", file=sys.stderr
            )
        elif text:
            parts = [{"type": "image", "image": pending_image}] if pending_image is not None else []
            turn = {"role": "user", "content": [*parts, {"type": "text", "text": text}]}
            answer = _answer(vlm, build_request([*system, *history, turn], **_options(args)))
            if answer is not None:
                history += [turn, {"role": "assistant", "content": answer}]
                pending_image = None


def _answer(vlm, request) -> str | None:
    """Stream one answer to stdout; None if it failed or was interrupted (the turn is dropped)."""
    from .errors import ContextLengthError, FastVLMError

    pieces: list[str] = []
    try:
        stream = vlm.stream(request)
        try:
            for piece in stream:
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:
            stream.close()  # an interrupted answer frees its cache row
    except FastVLMError as exc:
        hint = "; type /reset to start over" if isinstance(exc, ContextLengthError) else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return None
    except KeyboardInterrupt:
        print(file=sys.stdout, flush=True)
        return None
    print(file=sys.stdout, flush=True)
    return "".join(pieces)


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401  (input history and editing for interactive use)
    except ImportError:
        pass


# ---- info --------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from .api import describe_checkpoint

    info = describe_checkpoint(args.src)
    if args.json:
        print(json.dumps(info))
        return 0
    for section, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in value.items())
        print(f"{section:<15} {value}")
    return 0
