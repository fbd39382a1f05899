"""Constrained decoding on llguidance: compile a constraint once, match one sequence per row.

``GrammarCompiler.compile`` turns an ``OutputConstraint`` into a ``CompiledGrammar``:
checked (a JSON-schema keyword or regex feature that cannot be enforced is an
``InputError`` naming it), and kept in a bounded LRU per tokenizer, so the same schema
costs nothing the second time. Each sequence gets its own ``Matcher`` (a cheap copy of
the compiled one); every step ``allowed_masks`` fills a (V,) bool mask for the
constrained rows of a batch, the sampler sets the rest to -inf, and the matcher
advances with the token sampled.

JSON is compact: no whitespace between tokens at all, so a model cannot spend its budget
on spaces and newlines. The grammar ends the answer: once it cannot be extended, the
matcher allows only the end-of-sequence ids (``Matcher.terminated``).

Why llguidance (measured on the real Qwen2 tokenizer, see the README): a standalone
wheel with no dependencies, ~1 ms to compile a schema, a mask in 0.1-0.5 ms per token,
and it refuses the keywords it does not implement instead of dropping them.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from .constraint_spec import OutputConstraint
from .schema_keywords import check_schema

DEFAULT_CACHE_SIZE = 64  # compiled grammars kept per tokenizer
_INSTALL = "constrained decoding needs llguidance: pip install llguidance"


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise InputError(_INSTALL) from None
    return llguidance


@dataclass(frozen=True)
class TokenSpace:
    """The logits' width, the grammar's width (in 32-token words) and the end ids."""

    vocab_size: int  # V: width of the model's logits
    mask_words: int  # the grammar's mask covers 32 * mask_words >= max(V, tokenizer size) ids
    eos_ids: frozenset[int]


class CompiledGrammar:
    """One checked constraint for one tokenizer; ``matcher()`` starts a sequence on it."""

    def __init__(self, prototype, space: TokenSpace) -> None:
        self._prototype = prototype  # never advanced: each matcher is a copy
        self.space = space

    def matcher(self) -> Matcher:
        return Matcher(self._prototype.deep_copy(), self.space)


class Matcher:
    """Where one sequence stands in its grammar."""

    def __init__(self, ll_matcher, space: TokenSpace) -> None:
        self.ll, self.space = ll_matcher, space

    def accept(self, token: int) -> None:
        """Advance by ``token``; a token outside the last mask is a bug, so it raises."""
        if not self.ll.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.ll.get_error()}")

    @property
    def terminated(self) -> bool:
        """Nothing but the end-of-sequence ids may follow: the answer is complete."""
        return self.ll.is_stopped()


def allowed_masks(matchers: Sequence[Matcher | None]) -> list[torch.Tensor | None] | None:
    """A (V,) bool mask (True = allowed) per constrained row, None for free rows.

    Returns None when no row is constrained, so an unconstrained batch pays nothing.
    """
    rows = [b for b, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    space = matchers[rows[0]].space
    vocab, words = space.vocab_size, space.mask_words
    bits = np.zeros((len(rows), words), dtype=np.int32)  # (n, W): bit j of word w is token 32w+j
    for i, b in enumerate(rows):
        target = bits[i]
        matchers[b].ll.unsafe_compute_mask_ptr(target.ctypes.data, target.nbytes)
    # Little-endian words: the bytes' bits, least significant first, are the tokens in order.
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab]  # (n, V) 0/1
    masks = torch.from_numpy(allowed.view(np.bool_))
    out: list[torch.Tensor | None] = [None] * len(matchers)
    for i, b in enumerate(rows):
        out[b] = masks[i]
    return out


class GrammarCompiler:
    """Compiles constraints for one tokenizer and one logits width, with an LRU of results.

    Thread-safe: ``Engine.prepare`` compiles on whatever thread prepares requests.
    """

    def __init__(
        self, tokenizer, vocab_size: int, eos_ids: Sequence[int], cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        """``tokenizer`` has ``backend_tokenizer`` (a ``tokenizers.Tokenizer``); ``vocab_size``
        is the width of the model's logits; ``eos_ids`` end an answer once the grammar is done."""
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self._cache: OrderedDict[OutputConstraint, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer = None  # built on the first constraint: ~1 s for a 150k vocabulary

    def compile(self, constraint: OutputConstraint) -> CompiledGrammar:
        with self._lock:
            hit = self._cache.get(constraint)
            if hit is not None:
                self._cache.move_to_end(constraint)
                return hit
        compiled = self._compile(constraint)  # outside the lock: other threads may compile too
        with self._lock:
            self._cache[constraint] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, constraint: OutputConstraint) -> CompiledGrammar:
        llg = _llguidance()
        grammar = _grammar_text(llg, constraint)
        tokenizer = self._ll()
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise InputError(f"cannot enforce this {_what(constraint)}: {_first_line(messages)}")
        prototype = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if prototype.is_error():
            raise InputError(
                f"cannot enforce this {_what(constraint)}: {_first_line([prototype.get_error()])}"
            )
        space = TokenSpace(self.vocab_size, -(-tokenizer.vocab_size // 32), self.eos_ids)
        return CompiledGrammar(prototype, space)

    def _ll(self):
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = _ll_tokenizer(self._tokenizer, self.vocab_size, self.eos_ids)
            return self._ll_tokenizer


# JSON as ``json.dumps`` writes it: ", " and ": " between tokens and no other whitespace,
# which reads naturally to a model and leaves it no whitespace to run away in.
_JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
}


def _grammar_text(llg, constraint: OutputConstraint) -> str:
    """The llguidance grammar of ``constraint`` (not yet checked against a tokenizer)."""
    if constraint.kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if constraint.kind == "json_schema":
        check_schema(constraint.schema)  # done when it was made; again, as this is what enforces it
        return llg.LLMatcher.grammar_from_json_schema(constraint.schema, overrides=_JSON_OPTIONS)
    if constraint.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(constraint.pattern)
    # JSON string literals are Lark string literals too (same quotes and escapes).
    alternatives = " | ".join(json.dumps(choice) for choice in constraint.choices)
    return llg.LLMatcher.grammar_from_lark(f"start: {alternatives}")


@functools.lru_cache(maxsize=4)
def _ll_tokenizer_cached(tokenizer_json: str, n_vocab: int, eos_ids: tuple[int, ...]):
    return _llguidance().LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=list(eos_ids))


def _ll_tokenizer(tokenizer, vocab_size: int, eos_ids: frozenset[int]):
    """llguidance's view of ``tokenizer``, shared by engines on the same vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError("constrained decoding needs a tokenizer backed by the tokenizers library")
    n_vocab = max(vocab_size, backend.get_vocab_size(with_added_tokens=True))
    return _ll_tokenizer_cached(backend.to_str(), n_vocab, tuple(sorted(eos_ids)))


def _what(constraint: OutputConstraint) -> str:
    return {"json_object": "JSON constraint", "json_schema": "JSON schema"}.get(
        constraint.kind, constraint.kind
    )


def _first_line(messages: list[str]) -> str:
    """llguidance's message without its multi-line source excerpt."""
    lines = " ".join(messages).strip().splitlines() or ["unknown error"]
    lines[0] = re.sub(r"^at \d+\(\d+\): ", "", lines[0])  # a position in the generated grammar
    detail = next(
        (line.removeprefix("error:").strip() for line in lines[1:] if line.startswith("error:")), ""
    )
    return f"{lines[0].rstrip(':')}: {detail}" if detail else lines[0]
