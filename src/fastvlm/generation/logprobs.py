"""The sampler's log-probabilities as the tokens a client reads: text, bytes and number.

The sampler returns ids and floats (``scores.RowLogprobs``); this spells them with the
tokenizer's bytes (``processing.token_bytes``), only for requests that asked.
"""

from __future__ import annotations

from collections.abc import Callable

from .request import TokenLogprob, TopLogprob
from .scores import RowLogprobs

Spell = Callable[[int], tuple[str, bytes]]  # token id -> (text, UTF-8 bytes)


def token_logprob(row: RowLogprobs, spell: Spell) -> TokenLogprob:
    text, raw = spell(row.token_id)
    top = [_top(i, lp, spell) for i, lp in zip(row.top_ids, row.top_logprobs, strict=True)]
    return TokenLogprob(row.token_id, text, list(raw), row.logprob, top)


def _top(token_id: int, logprob: float, spell: Spell) -> TopLogprob:
    text, raw = spell(token_id)
    return TopLogprob(token_id, text, list(raw), logprob)
