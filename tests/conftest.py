"""Shared test setup. The reference tower must use explicit attention, like the original."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TIMM_FUSED_ATTN", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory) -> Path:
    """One complete tiny checkpoint (transformers layout, real tokenizer) per test session."""
    import builders

    folder, _ = builders.tiny_checkpoint(tmp_path_factory.mktemp("tiny_fast_vlm"))
    return folder
