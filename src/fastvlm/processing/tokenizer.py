"""The Qwen2 tokenizer: text <-> token ids, padding of id lists into a batch, and
incremental detokenisation for streaming (``StreamDecoder``).

Usable on its own (``Qwen2Tokenizer.from_dir(path)``). It knows nothing about
images or chat templates; the processor expands image markers and renders prompts.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tokenizers import Tokenizer

from ..errors import InputError
from .batch import BatchInputs
from .tokenizer_files import TokenizerFiles, load_tokenizer_files

PaddingSide = Literal["left", "right"]
REPLACEMENT_CHAR = "\ufffd"
_MAX_CHAR_TOKENS = 4  # a UTF-8 character spans at most 4 bytes, so at most 4 byte-level tokens
Padding = bool | Literal["longest", "max_length", "do_not_pad"]
Truncation = bool | Literal["longest_first", "only_first", "do_not_truncate"]


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
        self.truncation_side: PaddingSide = "right"
        self.clean_up_tokenization_spaces = False  # what Qwen2's tokenizer_config.json says
        # transformers' name for "clean up even though this BPE tokenizer keeps real spaces".
        self.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = False

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

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        return_tensors: str | None = "pt",
        padding: Padding = True,
        truncation: Truncation = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ):
        """Encode one text or a batch into ``{input_ids, attention_mask}`` (padded)."""
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        ids = self.truncate(ids, truncation, max_length)
        input_ids, mask = self.pad(ids, return_tensors=return_tensors, padding=padding, max_length=max_length)
        return BatchInputs(input_ids=input_ids, attention_mask=mask)

    def decode(
        self,
        ids: int | Iterable[int] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of ``ids``. Incomplete UTF-8 at the end shows as U+FFFD; for streaming
        use ``decode_stream``, which holds such bytes back."""
        text = self._backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        clean = self.clean_up_tokenization_spaces if clean is None else clean
        if not clean:
            return text
        if not self.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output:
            # As transformers 5: the clean-up is for WordPiece and would eat real spaces here.
            _warn_once(
                "ignoring clean_up_tokenization_spaces=True: Qwen2's BPE keeps the spaces it decodes; set "
                "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True to force it"
            )
            return text
        return clean_up_tokenization(text)

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        if hasattr(sequences, "tolist"):  # a tensor or an array
            sequences = sequences.tolist()
        clean = clean_up_tokenization_spaces
        return [self.decode(seq, skip_special_tokens, clean) for seq in sequences]

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

    def truncate(
        self, sequences: Sequence[Sequence[int]], truncation: Truncation, max_length: int | None
    ) -> list[list[int]]:
        """Cut each sequence to ``max_length`` ids (``model_max_length`` if None) on
        ``truncation_side``; ``truncation=False`` leaves them whole."""
        if truncation in (False, "do_not_truncate", None):
            return [list(s) for s in sequences]
        if truncation not in (True, "longest_first", "only_first"):
            raise InputError(
                f"truncation must be True, False, 'longest_first' or 'only_first', not {truncation!r}"
            )
        limit = max_length if max_length is not None else self.model_max_length
        if limit is None:
            return [list(s) for s in sequences]
        if self.truncation_side == "left":
            return [list(s)[max(len(s) - limit, 0) :] for s in sequences]
        return [list(s)[:limit] for s in sequences]

    def pad(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        return_tensors: str | None = "pt",
        padding: Padding = True,
        padding_side: PaddingSide | None = None,
        max_length: int | None = None,
    ) -> tuple[Any, Any]:
        """Pad id lists into ``(input_ids, attention_mask)``: to the longest one
        (``True``/"longest"), to ``max_length`` ("max_length"), or not at all.

        ``return_tensors="pt"`` gives int64 tensors of shape (B, T), "np" int64 arrays,
        ``None`` lists.
        """
        side = padding_side or self.padding_side
        limit = max_length if max_length is not None else self.model_max_length
        target = _pad_target(sequences, padding, limit)
        if target is None:
            if return_tensors is not None and len({len(s) for s in sequences}) > 1:
                raise InputError("sequences have different lengths; pass padding=True to batch them")
            ids, masks = [list(s) for s in sequences], [[1] * len(s) for s in sequences]
        else:
            pad_id = self.pad_token_id
            if pad_id is None:
                raise InputError("this tokenizer has no pad token, so a batch cannot be padded")
            ids, masks = [], []
            for seq in sequences:
                fill = max(target - len(seq), 0)
                if side == "left":
                    ids.append([pad_id] * fill + list(seq))
                    masks.append([0] * fill + [1] * len(seq))
                else:
                    ids.append(list(seq) + [pad_id] * fill)
                    masks.append([1] * len(seq) + [0] * fill)
        return as_tensors(ids, return_tensors), as_tensors(masks, return_tensors)


def _pad_target(sequences: Sequence[Sequence[int]], padding: Padding, max_length: int | None) -> int | None:
    """The padded length, or None for no padding."""
    if padding in (False, "do_not_pad", None):
        return None
    if padding in (True, "longest"):
        return max((len(s) for s in sequences), default=0)
    if padding == "max_length":
        if max_length is None:
            raise InputError("padding='max_length' needs max_length")
        return max_length
    raise InputError(f"padding must be True, False, 'longest' or 'max_length', not {padding!r}")


def as_tensors(rows: list[list[int]], return_tensors: str | None) -> Any:
    """Lists of ids -> int64 "pt" tensor, "np" array, or the lists themselves (None)."""
    if return_tensors is None:
        return rows
    if return_tensors == "pt":
        return torch.tensor(rows, dtype=torch.long)
    if return_tensors == "np":
        return np.array(rows, dtype=np.int64)
    raise InputError(f"return_tensors must be 'pt', 'np' or None, not {return_tensors!r}")


# transformers' ``clean_up_tokenization``: drop the space BPE leaves before punctuation
# and English contractions.
_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]  # fmt: skip


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def clean_up_tokenization(text: str) -> str:
    for before, after in _CLEANUPS:
        text = text.replace(before, after)
    return text


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
