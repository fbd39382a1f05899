"""The tensor side of the engine: image encoding, prefill into a cache row, batched decode.

The runner owns the static KV cache (``max_batch`` rows x ``max_seq_len`` columns),
allocated once. It knows nothing about requests, text or sampling: it takes ids and
lengths and returns logits. Nothing is padded: a prompt is prefilled alone into its
own row at columns 0..T-1, and each decode step feeds every running row one token at
its own column, with a mask that hides the columns the row has not written.
"""

from __future__ import annotations

import torch


class ModelRunner:
    def __init__(self, model, max_batch: int, max_seq_len: int) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.device = model.device
        self.vocab_size = model.config.text.vocab_size  # columns of the logits
        self.cache = model.new_cache(max_batch, max_seq_len)
        self._columns = torch.arange(max_seq_len, device=self.device)  # reused for positions and masks

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) pixels -> (n, N, H) projected features on the model device."""
        return self.model.encode_images(pixels)

    @torch.inference_mode()
    def prefill(self, row: int, ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Write the keys of prompt ``ids`` (T,) into cache row ``row``; return the last logits (V,).

        ``features`` (n_images, N, H) replace the image placeholders, in order.
        """
        T = ids.shape[0]
        embeds = self.model.embed(ids.to(self.device)[None], features)  # (1, T, D)
        positions = self._columns[:T][None]  # (1, T): positions and cache columns coincide
        # mask=None: plain causal attention over the row's first T columns.
        hidden = self.model.language_model(
            embeds, positions, None, self.cache, positions, T, slice(row, row + 1)
        )  # (1, T, D)
        return self.model.logits(hidden[0, -1])  # (V,): only the last position is needed

    @torch.inference_mode()
    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """One step for rows 0..B-1: row b holds ``lengths[b]`` keys and reads ``tokens[b]``.

        Returns (B, V) logits for the next token of every row.
        """
        B = len(tokens)
        S = max(lengths) + 1
        both = torch.tensor([tokens, lengths], device=self.device)  # (2, B): one host->device copy
        tok, pos = both[0][:, None], both[1][:, None]  # (B, 1) each
        # Row b may see its own columns 0..lengths[b] (the last is the token written now);
        # columns past that hold stale keys of earlier occupants of the row.
        mask = (self._columns[:S][None, :] <= pos)[:, None, None, :]  # (B, 1, 1, S)
        # Embed directly, not via model.embed: a generated id may equal the image
        # placeholder, and there are no image features to put there.
        embeds = self.model.language_model.embed_tokens(tok)  # (B, 1, D)
        hidden = self.model.language_model(embeds, pos, mask, self.cache, pos, S, slice(0, B))  # (B, 1, D)
        return self.model.logits(hidden[:, -1])  # (B, V)

    def move_row(self, src: int, dst: int) -> None:
        self.cache.move_row(src, dst)

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Row ``dst`` continues from the first ``length`` keys of row ``src`` (shared prefill)."""
        self.cache.copy_row(src, dst, length)
