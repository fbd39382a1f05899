"""The Qwen2 tokenizer: text <-> token ids, padding of id lists into a batch, and
incremental detokenisation for streaming (``StreamDecoder``).

Usable on its own (``Qwen2Tokenizer.from_dir(path)``). It knows nothing about
images or chat templates; the processor expands image markers and renders prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer

from ..errors import InputError
from .batch import BatchInputs
from .tokenizer_files import TokenizerFiles, load_tokenizer_files

PaddingSide = Literal["left", "right"]
REPLACEMENT_CHAR = "\ufffd"
_MAX_CHAR_TOKENS = 4  # a UTF-8 character spans at most 4 bytes, so at most 4 byte-level tokens


class Qwen2Tokenizer:
    """Byte-level BPE tokenizer of Qwen2, on the ``tokenizers`` library.

    ``padding_side`` is "left" by default, which is what batched generation needs.
    """

    def __init__(self, files: TokenizerFiles, *, padding_side: PaddingSide = "left"):
        self._backend: Tokenizer = files.backend
        self._special = dict(files.special_tokens)
        self._extra_special = list(files.extra_special_tokens)
        self.model_max_length = files.model_max_length
        self.padding_side = padding_side

    @classmethod
    def from_dir(cls, path: str | Path, *, padding_side: PaddingSide = "left") -> Qwen2Tokenizer:
        """Load from a folder with tokenizer.json, or vocab.json + merges.txt."""
        return cls(load_tokenizer_files(path), padding_side=padding_side)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._backend

    # -- padding side ---------------------------------------------------------------

    @property
    def padding_side(self) -> PaddingSide:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', not {side!r}")
        self._padding_side = side

    # -- text <-> ids -----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised."""
        if not isinstance(text, str):
            raise InputError(f"text to encode must be a string, not {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], *, return_tensors: str | None = "pt", padding: bool = True):
        """Encode one text or a batch into ``{input_ids, attention_mask}`` (padded)."""
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t) for t in texts]
        input_ids, mask = self.pad(ids, return_tensors=return_tensors, padding=padding)
        return BatchInputs(input_ids=input_ids, attention_mask=mask)

    def decode(self, ids: int | Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Incomplete UTF-8 at the end shows as U+FFFD; for streaming
        use ``decode_stream``, which holds such bytes back."""
        return self._backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def decode_stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A decoder that turns ids, fed one by one, into text pieces of whole characters."""
        return StreamDecoder(self.decode, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._backend.token_to_id(tokens)
        return [self._backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Size of the base BPE vocabulary, without added tokens (as in transformers)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    # -- special tokens -----------------------------------------------------------------

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: v for k, v in self._special.items() if v is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self._extra_special]))

    @property
    def all_special_ids(self) -> list[int]:
        ids = (self._backend.token_to_id(t) for t in self.all_special_tokens)
        return [i for i in ids if i is not None]

    def _special_id(self, name: str) -> int | None:
        token = self._special.get(name)
        return None if token is None else self._backend.token_to_id(token)

    eos_token = property(lambda self: self._special.get("eos_token"))
    pad_token = property(lambda self: self._special.get("pad_token"))
    bos_token = property(lambda self: self._special.get("bos_token"))
    unk_token = property(lambda self: self._special.get("unk_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))

    # -- batching -------------------------------------------------------------------

    def pad(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        return_tensors: str | None = "pt",
        padding: bool = True,
        padding_side: PaddingSide | None = None,
    ) -> tuple[Any, Any]:
        """Pad id lists to the longest one; returns ``(input_ids, attention_mask)``.

        ``return_tensors="pt"`` gives int64 tensors of shape (B, T); ``None`` gives lists.
        """
        side = padding_side or self.padding_side
        longest = max((len(s) for s in sequences), default=0)
        if not padding:
            if return_tensors is not None and len({len(s) for s in sequences}) > 1:
                raise InputError("sequences have different lengths; pass padding=True to batch them")
            ids, masks = [list(s) for s in sequences], [[1] * len(s) for s in sequences]
        else:
            pad_id = self.pad_token_id
            if pad_id is None:
                raise InputError("this tokenizer has no pad token, so a batch cannot be padded")
            ids, masks = [], []
            for seq in sequences:
                fill = longest - len(seq)
                if side == "left":
                    ids.append([pad_id] * fill + list(seq))
                    masks.append([0] * fill + [1] * len(seq))
                else:
                    ids.append(list(seq) + [pad_id] * fill)
                    masks.append([1] * len(seq) + [0] * fill)
        if return_tensors is None:
            return ids, masks
        if return_tensors != "pt":
            raise InputError(f"return_tensors must be 'pt' or None, not {return_tensors!r}")
        return torch.tensor(ids, dtype=torch.long), torch.tensor(masks, dtype=torch.long)


def _as_id_list(ids: int | Iterable[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise InputError("decode takes one sequence; use batch_decode for a batch")
        return [int(i) for i in ids.tolist()] if ids.dim() else [int(ids.item())]
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class StreamDecoder:
    """Ids in, text pieces out, never half a character.

    Byte-level BPE tokens can end in the middle of a UTF-8 character (emoji, CJK), and
    decoding such a prefix gives U+FFFD. The decoder re-decodes a short window of recent
    ids and only emits text once it no longer ends in U+FFFD, the approach of
    text-generation-inference's ``decode_token``.

    ``decode`` is a function ``(ids, skip_special_tokens=...) -> str``, such as
    ``Qwen2Tokenizer.decode``. Feed ids with ``push``; call ``flush`` at the end to get
    text held back.
    """

    def __init__(self, decode: Callable[..., str], *, skip_special_tokens: bool = True):
        self._decode = decode
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window used to decode
        self._read_offset = 0  # ids before this have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (maybe "")."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character shows as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        window = self._ids[self._prefix_offset :]
        seen = self._decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip
        )
        text = self._decode(window, skip_special_tokens=self._skip)
        pending = len(self._ids) - self._read_offset
        # Past 4 pending tokens a trailing U+FFFD is real output, not a character still forming.
        incomplete = text.endswith(REPLACEMENT_CHAR) and pending < _MAX_CHAR_TOKENS
        if len(text) <= len(seen) or (incomplete and not final):
            return ""
        # The window's first ids give context (a leading space, a joined character);
        # only what follows the already-emitted part is new.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(seen) :]
