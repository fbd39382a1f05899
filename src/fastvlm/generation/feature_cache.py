"""A bounded LRU cache of projected image features, keyed by the image's pixels.

Asking several questions about one image is the common case for a VLM, and the
vision encoder is the expensive part of a prefill. The key is a hash of the
preprocessed pixel tensor, not of the source: the same picture sent as a path, a
data URI or a PIL image gives one entry, and two sources that preprocess
differently (another checkpoint's settings) never collide.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch


def image_key(pixels: torch.Tensor) -> str:
    """Content hash of one preprocessed image (3, S, S), including its shape and dtype."""
    flat = pixels.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(flat.shape)}|{flat.dtype}".encode())
    # Viewed as bytes, bf16 and fp16 tensors hash without a numpy conversion (numpy has no bf16).
    h.update(memoryview(flat.view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()


class FeatureCache:
    """``key -> (N, H) features`` on the model's device; ``capacity`` 0 disables it."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"feature cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

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
        if self.capacity == 0:
            return
        self._entries[key] = feats
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


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
