"""Shared test setup. The reference tower must use explicit attention, like the original."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TIMM_FUSED_ATTN", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config) -> None:
    # The tiny checkpoints carry the real Qwen2 tokenizer and the tests read real photos:
    # without them, say so in one line instead of failing collection with a TypeError.
    import builders

    if builders.shared_assets() is None:
        pytest.exit(
            "tests need the shared assets (tokenizer, chat template, photos): put shared/assets beside "
            "the checkout or set FASTVLM_SHARED_ASSETS=/path/to/shared/assets",
            returncode=2,
        )


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory) -> Path:
    """One complete tiny checkpoint (transformers layout, real tokenizer) per test session."""
    import builders

    folder, _ = builders.tiny_checkpoint(tmp_path_factory.mktemp("tiny_fast_vlm"))
    return folder
