"""Score processors with transformers' semantics, as callables ``(input_ids, scores) -> scores``.

``input_ids`` is (B, S): the prompt ids plus everything generated so far; ``scores`` is
(B, V) float32. Each processor returns new scores and never edits its input. The list
built by ``build_processors`` has the order transformers uses, so greedy, sampling and
beam search see the same numbers as there; user-supplied processors (ours or
transformers' own ``LogitsProcessor`` objects, anything with that call signature) run
after the built-in constraints and before the sampling warpers, also as there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .generation_config import GenerationConfig

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")


class RepetitionPenalty:
    """CTRL penalty on every id already in the row; left padding is not "seen"."""

    def __init__(self, penalty: float, pad_lengths: torch.Tensor | None = None) -> None:
        self.penalty, self.pad_lengths = penalty, pad_lengths  # pad_lengths (B,) or None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.shape[-1]
        if self.pad_lengths is not None:
            pads = self.pad_lengths  # (B,), while beams and returned copies make B * n adjacent rows
            pads = pads.repeat_interleave(input_ids.shape[0] // pads.shape[0])
            cols = torch.arange(input_ids.shape[1], device=input_ids.device)
            input_ids = input_ids.masked_fill(cols[None] < pads[:, None], V)
        ids = input_ids.clamp(max=V)
        padded = torch.nn.functional.pad(scores, (0, 1))  # (B, V + 1): column V absorbs ignored ids
        picked = padded.gather(1, ids)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return padded.scatter(1, ids, picked)[:, :V]


class NoRepeatNGram:
    """Ban any token that would repeat an n-gram already present in the row."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, S = input_ids.shape
        if S + 1 < self.n:
            return scores
        V = scores.shape[-1]
        prefix = input_ids[:, S + 1 - self.n :]  # (B, n-1): the n-gram the next token would end
        windows = input_ids.unfold(1, self.n, 1)  # (B, W, n): every n-gram so far
        hits = (windows[..., :-1] == prefix[:, None]).all(-1)  # (B, W)
        banned = torch.zeros(B, V + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(hits, windows[..., -1].clamp(max=V), V), True)
        return scores.masked_fill(banned[:, :V], NEG_INF)


class NoBadWords:
    """Ban the last token of each bad sequence when the row ends with the rest of it.

    A bad "word" that is exactly one eos id is dropped, as in transformers: banning the
    stop token would make generation run to the length limit.
    """

    def __init__(self, bad_words_ids: Sequence[Sequence[int]], eos_ids: Sequence[int]) -> None:
        self.words = [list(w) for w in bad_words_ids if not (len(w) == 1 and w[0] in eos_ids)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.shape[-1]
        if any(t >= V for w in self.words for t in w):
            raise ValueError(f"bad_words_ids has token ids outside the vocabulary of {V} ids")
        banned = torch.zeros_like(scores, dtype=torch.bool)  # (B, V)
        for word in self.words:
            *prefix, last = word
            if not prefix:
                banned[:, last] = True
            elif len(prefix) <= input_ids.shape[1]:
                tail = input_ids[:, -len(prefix) :]
                banned[:, last] |= (tail == torch.tensor(prefix, device=tail.device)).all(-1)
        return scores.masked_fill(banned, NEG_INF)


class MinLength:
    """No stop token while the row is shorter than ``min_length`` ids (prompt included)."""

    def __init__(self, min_length: int, eos_ids: Sequence[int]) -> None:
        self.min_length, self.eos_ids = min_length, list(eos_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] >= self.min_length:
            return scores
        out = scores.clone()
        out[:, self.eos_ids] = NEG_INF
        return out


class InfNanRemove:
    """NaN -> 0 and +/-inf -> the dtype's largest/smallest finite value (``remove_invalid_values``)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        finfo = torch.finfo(scores.dtype)
        out = torch.where(scores.isnan(), 0.0, scores)
        out = torch.where(scores == float("inf"), finfo.max, out)
        return torch.where(scores == NEG_INF, finfo.min, out)


class Temperature:
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    def __init__(self, top_k: int, keep: int = 1) -> None:
        self.top_k = max(top_k, keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1:]  # (B, 1)
        return scores.masked_fill(scores < kth, NEG_INF)


class TopP:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (ascending-sort
    form, as transformers writes it: ties at the boundary resolve the same way)."""

    def __init__(self, top_p: float, keep: int = 1) -> None:
        self.top_p, self.keep = top_p, keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= (1 - self.top_p)
        drop[..., -self.keep :] = False
        return scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)


class MinP:
    def __init__(self, min_p: float, keep: int = 1) -> None:
        self.min_p, self.keep = min_p, keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(-1)
        drop = probs < self.min_p * probs.amax(-1, keepdim=True)
        order = torch.argsort(scores, dim=-1, descending=True)
        keep_top = torch.zeros_like(drop)
        keep_top.scatter_(1, order[:, : self.keep], True)
        return scores.masked_fill(drop & ~keep_top, NEG_INF)


class ProcessorList(list):
    """Applies its processors in order (``LogitsProcessorList`` behaviour)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


def build_processors(
    cfg: GenerationConfig,
    eos_ids: Sequence[int],
    pad_lengths: torch.Tensor | None,
    custom: Sequence[LogitsProcessor] = (),
) -> ProcessorList:
    """The processors ``cfg`` asks for, in transformers' order. ``cfg.min_length`` is the
    resolved minimum (``min_new_tokens`` already added to the prompt length)."""
    out = ProcessorList()
    if cfg.repetition_penalty != 1.0:
        out.append(RepetitionPenalty(float(cfg.repetition_penalty), pad_lengths))
    if cfg.no_repeat_ngram_size:
        out.append(NoRepeatNGram(cfg.no_repeat_ngram_size))
    if cfg.bad_words_ids is not None:
        out.append(NoBadWords(cfg.bad_words_ids, eos_ids))
    if cfg.min_length and eos_ids:
        out.append(MinLength(cfg.min_length, eos_ids))
    if cfg.remove_invalid_values:
        out.append(InfNanRemove())
    out.extend(custom)
    if cfg.do_sample:
        # Beam sampling keeps one more candidate than there are stop ids, as transformers does.
        keep = max(len(eos_ids), 1) + 1 if cfg.num_beams > 1 else 1
        if cfg.temperature != 1.0:
            out.append(Temperature(cfg.temperature))
        if cfg.top_k:
            out.append(TopK(cfg.top_k, keep))
        if cfg.top_p < 1.0:
            out.append(TopP(cfg.top_p, keep))
        if cfg.min_p is not None:
            out.append(MinP(cfg.min_p, keep))
    return out
