"""A bounded LRU cache of projected image features, keyed by the image's pixels.

Asking several questions about one image is the common case for a VLM, and the
vision encoder is the expensive part of a prefill. The key is a hash of the
preprocessed uint8 pixels, not of the source: the same picture sent as a path, a
data URI or a PIL image gives one entry.

Entries are compact copies. The encoder returns a whole batch in one tensor, and a
per-image slice of it is a view that keeps the entire batch alive: the cache bounds
what its entries really hold, in bytes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch

DEFAULT_MAX_BYTES = 256 * 2**20


def image_key(pixels: torch.Tensor) -> str:
    """Content hash of one preprocessed image (3, S, S), including its shape and dtype."""
    flat = pixels.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(flat.shape)}|{flat.dtype}".encode())
    # Viewed as bytes, bf16 and fp16 tensors hash without a numpy conversion (numpy has no bf16).
    h.update(memoryview(flat.view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()


class FeatureCache:
    """``key -> (N, H) features`` on the model's device, at most ``max_entries`` and
    ``max_bytes``; either limit 0 turns it off."""

    def __init__(self, max_entries: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(
                f"feature cache limits must be >= 0, got {max_entries} entries, {max_bytes} bytes"
            )
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.nbytes = 0  # what the entries hold
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        feats = self._entries.get(key)
        if feats is not None:
            self._entries.move_to_end(key)
        return feats

    def put(self, key: str, feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        if not self.enabled or size > self.max_bytes:
            return
        if key in self._entries:
            self.nbytes -= _nbytes(self._entries.pop(key))
        self._entries[key] = feats.detach().clone(memory_format=torch.contiguous_format)  # own storage
        self.nbytes += size
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self.nbytes -= _nbytes(self._entries.popitem(last=False)[1])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def gather_features(
    images: list[list[tuple[str, torch.Tensor]]],
    cache: FeatureCache,
    encode: Callable[[torch.Tensor], torch.Tensor],
    max_batch: int,
) -> tuple[list[torch.Tensor | None], dict[str, int]]:
    """Features for several requests' images: cache hits reused, misses encoded together.

    ``images[r]`` lists request r's images as (key, pixels (3, S, S)); an empty key means
    "do not cache". ``encode`` maps (n, 3, S, S) -> (n, N, H) and is called with at most
    ``max_batch`` images. Returns (n_images, N, H) per request (None without images) and
    counters: encoder_calls, images_encoded, feature_cache_hits.
    """
    counts = {"encoder_calls": 0, "images_encoded": 0, "feature_cache_hits": 0}
    feats: dict[tuple[int, int], torch.Tensor] = {}
    first: dict[str, tuple[int, int]] = {}  # key -> the image that is encoded for it now
    duplicates: list[tuple[int, int, str]] = []
    todo: list[tuple[int, int]] = []
    for r, request_images in enumerate(images):
        for j, (key, _) in enumerate(request_images):
            hit = cache.get(key) if key else None
            if hit is not None:
                feats[(r, j)] = hit
            elif key in first:  # the same image twice in this batch: encode it once
                duplicates.append((r, j, key))
            else:
                todo.append((r, j))
                if key:
                    first[key] = (r, j)
                continue
            counts["feature_cache_hits"] += 1
    for start in range(0, len(todo), max_batch):
        chunk = todo[start : start + max_batch]
        encoded = encode(torch.stack([images[r][j][1] for r, j in chunk]))  # (n, N, H)
        counts["encoder_calls"] += 1
        counts["images_encoded"] += len(chunk)
        for (r, j), f in zip(chunk, encoded, strict=True):
            feats[(r, j)] = f
            if images[r][j][0]:
                cache.put(images[r][j][0], f)
    for r, j, key in duplicates:
        feats[(r, j)] = feats[first[key]]
    out = [
        torch.stack([feats[(r, j)] for j in range(len(ims))]) if ims else None for r, ims in enumerate(images)
    ]
    return out, counts
