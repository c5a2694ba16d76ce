"""Shared fixtures: tiny random-weight models (Llama-style and Qwen2) saved to folders, and the byte tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread (small matmuls; no OpenMP barriers, which are costly on a busy machine).
torch.set_num_threads(1)

import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama-style model + tokenizer (GQA, tied embeddings); load it by path like a user would."""
    from tunesmith.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    from tunesmith.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(params=["llama", "qwen2"])
def tiny_arch(request):
    return request.param


@pytest.fixture
def tiny_model_and_tokenizer():
    from tunesmith.models.tiny import build_tiny_model

    return build_tiny_model("llama")


@pytest.fixture
def tiny_tokenizer():
    from tunesmith.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def reference_available() -> bool:
    from tunesmith.models.reference import is_available

    return is_available()


requires_reference = pytest.mark.skipif(not reference_available(), reason="reference model not installed (make reference)")
