"""Build a Qwen2 ``tokenizers.Tokenizer`` from either file set a checkpoint may hold.

* new: ``tokenizer.json`` (+ ``tokenizer_config.json``);
* old: ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``, sometimes with
  ``added_tokens.json`` and ``special_tokens_map.json``.

The rules follow transformers 5's ``Qwen2Tokenizer``: the same normaliser,
pre-tokeniser and decoder, and the same precedence between the added-token files,
so both file sets give the ids transformers gives. This module knows nothing about
chat templates or images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..checkpoints.files import read_optional_json
from ..errors import CheckpointError

# Qwen2's pre-tokenisation pattern (tiktoken cl100k style, digits split one by one).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# What Qwen2Tokenizer assumes when tokenizer_config.json does not say.
_QWEN2_DEFAULTS: dict[str, str | None] = {
    "bos_token": None,
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_ADDED_TOKEN_FIELDS = ("single_word", "lstrip", "rstrip", "normalized", "special")


@dataclass
class TokenizerFiles:
    """Everything a folder says about its tokenizer, resolved."""

    backend: Tokenizer
    special_tokens: dict[str, str | None]  # bos/eos/unk/pad -> token text (or None)
    extra_special_tokens: list[str] = field(default_factory=list)
    model_max_length: int | None = None


def load_tokenizer_files(folder: str | Path) -> TokenizerFiles:
    """Read and build the tokenizer of ``folder``; raises CheckpointError if unusable."""
    folder = Path(folder)
    config = read_optional_json(folder, "tokenizer_config.json") or {}
    backend = _load_backend(folder, config)
    special_map = read_optional_json(folder, "special_tokens_map.json") or {}
    has_decoder = "added_tokens_decoder" in config
    # transformers reads special_tokens_map.json and added_tokens.json only when
    # tokenizer_config.json has no added_tokens_decoder (the legacy file set).
    specials = _named_special_tokens(config, {} if has_decoder else special_map)
    extras = _extra_special_tokens(config, {} if has_decoder else special_map)
    if has_decoder:
        declared = _tokens_from_decoder(config["added_tokens_decoder"])
    else:
        legacy = read_optional_json(folder, "added_tokens.json") or {}
        special_texts = {t for t in specials.values() if t} | set(extras)
        declared = _tokens_from_legacy_file(legacy, special_texts)
    _add_declared_tokens(backend, declared, folder)
    missing = [t for t in [*specials.values(), *extras] if t and backend.token_to_id(t) is None]
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
    )
    # Lengths are checked by the processor; a truncation or padding baked into
    # tokenizer.json would silently cut prompts.
    backend.no_truncation()
    backend.no_padding()
    max_len = config.get("model_max_length")
    return TokenizerFiles(
        backend=backend,
        special_tokens=specials,
        extra_special_tokens=extras,
        # Unset limits are stored as a huge float (VERY_LARGE_INTEGER); treat them as unknown.
        model_max_length=int(max_len) if isinstance(max_len, int) and max_len < 10**9 else None,
    )


def build_qwen2_backend(vocab: dict[str, int], merges: list[tuple[str, str]], add_prefix_space: bool = False):
    """The tokenizer transformers' Qwen2Tokenizer builds from a vocab and merges."""
    model = BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    backend = Tokenizer(model)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _load_backend(folder: Path, config: dict[str, Any]) -> Tokenizer:
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            return Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise CheckpointError(
                f"cannot load {tokenizer_json} ({exc}); re-download the checkpoint"
            ) from exc
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise CheckpointError(
            f"{folder} has neither tokenizer.json nor vocab.json + merges.txt; "
            "re-download the checkpoint with its tokenizer files"
        )
    try:
        vocab_map, merge_list = BPE.read_file(str(vocab), str(merges))
    except Exception as exc:
        raise CheckpointError(f"cannot read {vocab} / {merges} ({exc}); re-download the checkpoint") from exc
    return build_qwen2_backend(vocab_map, merge_list, bool(config.get("add_prefix_space") or False))


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _named_special_tokens(config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, str | None]:
    out = {}
    for key in NAMED_SPECIAL_TOKENS:
        if key in special_map:
            out[key] = _token_text(special_map[key])
        elif key in config:
            out[key] = _token_text(config[key])
        else:
            out[key] = _QWEN2_DEFAULTS[key]
    return out


def _extra_special_tokens(config: dict[str, Any], special_map: dict[str, Any]) -> list[str]:
    tokens: list[str] = []
    for source in (config, special_map):
        for key in ("extra_special_tokens", "additional_special_tokens"):
            value = source.get(key) or []
            items = value.keys() if isinstance(value, dict) else value
            tokens += [t for t in map(_token_text, items) if t]
    return list(dict.fromkeys(tokens))


def _tokens_from_decoder(decoder: dict[str, Any]) -> list[tuple[int, AddedToken]]:
    out = []
    for index, entry in decoder.items():
        entry = entry if isinstance(entry, dict) else {"content": str(entry)}
        flags = {k: bool(entry[k]) for k in _ADDED_TOKEN_FIELDS if k in entry}
        out.append((int(index), AddedToken(entry["content"], **flags)))
    return out


def _tokens_from_legacy_file(legacy: dict[str, int], specials: set[str]) -> list[tuple[int, AddedToken]]:
    out = []
    for text, index in legacy.items():
        special = text in specials
        out.append((int(index), AddedToken(text, special=special, normalized=not special)))
    return out


def _add_declared_tokens(backend: Tokenizer, declared: list[tuple[int, AddedToken]], folder: Path) -> None:
    # tokenizers appends new tokens after the last id, so adding them in id order
    # reproduces the declared ids as long as they are contiguous (they are for Qwen2).
    for index, token in sorted(declared, key=lambda item: item[0]):
        if backend.token_to_id(token.content) == index:
            continue
        backend.add_tokens([token])
        got = backend.token_to_id(token.content)
        if got != index:
            raise CheckpointError(
                f"{folder}: added token {token.content!r} is declared with id {index} but lands on id {got}; "
                "the tokenizer files disagree, re-download the checkpoint"
            )
