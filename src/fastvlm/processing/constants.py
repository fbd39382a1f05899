"""Fixed facts about FastVLM inputs that both checkpoint layouts share.

The image placeholder id is the model's: ``fastvlm.config.IMAGE_PLACEHOLDER_ID``.
"""

from __future__ import annotations

# The text marker a prompt uses for one image before it is expanded to
# ``num_image_tokens`` placeholder ids.
IMAGE_TOKEN = "<image>"

# FastViTHD downsamples by 2**6: a 1024x1024 image gives a 16x16 grid of features.
APPLE_VISION_STRIDE = 64

# Apple's ``conv_qwen_2`` prompt starts with this system turn unless the conversation
# brings its own.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Images larger than this are refused before decoding (Pillow's own limit is ~89 Mpx).
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

# Remote images: how long to wait and how much to read before giving up.
DEFAULT_FETCH_TIMEOUT_S = 10.0
MAX_IMAGE_BYTES = 64 * 1024 * 1024

# Longer sides are refused too, whatever the pixel count: a 1 x 40,000,000 image costs
# Pillow about 30 bytes a row (over 1 GB) to decode and convert, for one pixel of width.
# 65535 is also the largest side JPEG can store.
DEFAULT_MAX_IMAGE_SIDE = 65_535
