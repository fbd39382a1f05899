"""Shared test setup. The reference tower must use explicit attention, like the original."""

import os

os.environ.setdefault("TIMM_FUSED_ATTN", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
