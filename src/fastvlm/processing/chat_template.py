"""Render chat templates in a Jinja sandbox, with the globals transformers provides.

Templates come from checkpoint files, i.e. from strangers: they run in
``ImmutableSandboxedEnvironment`` and only ever see plain data (``messages`` parses
user input into dicts, lists and strings first). This module knows nothing about
tokens or images beyond the ``<image>`` text marker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import CheckpointError, InputError
from .constants import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN

# Apple's llava ``conv_qwen_2`` prompt format as a template. For the common case (one
# user turn, images then text) it gives exactly what the Hugging Face FastVLM template
# gives. It differs where conv_qwen_2 does: a turn without images has no leading "\n"
# (the HF template puts "\n" before every text part), and text parts join with "\n".
APPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length %}"
    "{% if n_images > 0 %}{{ '" + IMAGE_TOKEN + "' * n_images + '\\n' }}{% endif %}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') }}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str] | None = None,
) -> str:
    """Render one conversation (already parsed into plain data) to a prompt string.

    Raises CheckpointError if the template is broken, InputError if it rejects the
    conversation (``raise_exception`` in the template).
    """
    return _render(source, messages, add_generation_prompt, special_tokens, track=False)


def render_with_generation_spans(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The prompt and the (start, end) character spans of its ``{% generation %}`` blocks."""
    marked = _render(source, messages, add_generation_prompt, special_tokens, track=True)
    return _strip_generation_marks(marked)


def _render(source, messages, add_generation_prompt, special_tokens, *, track: bool) -> str:
    template = compile_chat_template(source)
    variables = dict(special_tokens or {})
    try:
        return template.render(
            **variables,
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{_TRACK: track},
        )
    except jinja2.exceptions.SecurityError as exc:
        raise CheckpointError(
            f"the chat template tried an unsafe operation ({exc}); use a trusted template"
        ) from exc
    except jinja2.exceptions.TemplateError as exc:
        raise InputError(f"the chat template rejected the conversation: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"the chat template could not render the conversation ({exc})") from exc


def _strip_generation_marks(marked: str) -> tuple[str, list[tuple[int, int]]]:
    pieces, spans, at, start = [], [], 0, None
    length = 0  # of the unmarked text so far
    for index, char in enumerate(marked):
        if char not in (_GEN_START, _GEN_END):
            continue
        if (char == _GEN_START) != (start is None):
            raise InputError("the conversation text contains characters U+E000/U+E001; remove them")
        pieces.append(marked[at:index])
        length += index - at
        at = index + 1
        if char == _GEN_START:
            start = length
        else:
            spans.append((start, length))
            start = None
    if start is not None:
        raise InputError("the conversation text contains characters U+E000/U+E001; remove them")
    pieces.append(marked[at:])
    return "".join(pieces), spans


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile ``source`` once; the environment matches transformers' (trim/lstrip
    blocks, loop controls, ``raise_exception``, ``tojson``, ``strftime_now``)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise CheckpointError(
            f"the checkpoint's chat template has a syntax error ({exc}); fix or replace it"
        ) from exc


# Private-use characters around each {% generation %} block when its spans are asked for.
_GEN_START, _GEN_END = "\ue000", "\ue001"
_TRACK = "__fastvlm_generation_spans__"


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (used by transformers to mask assistant
    tokens in training) renders its body unchanged, marked when spans are tracked."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_mark", [jinja2.nodes.ContextReference()])
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _mark(self, context, caller) -> str:
        text = caller()
        return f"{_GEN_START}{text}{_GEN_END}" if context.get(_TRACK) else text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
):
    # Jinja's own tojson escapes HTML characters, which chat prompts must not do.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
