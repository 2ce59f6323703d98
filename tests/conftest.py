"""Fixtures shared by every test package: tiny real Llama base/fine-tune pairs on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tests.support.model_pairs import make_llama_pair  # noqa: E402


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(base_dir, finetuned_dir): a tiny fp32 Llama with untied embeddings and a perturbed copy."""
    return make_llama_pair(tmp_path_factory.mktemp("llama_pair"), seed=0)


@pytest.fixture(scope="session")
def llama_pair_fp16_tied(tmp_path_factory) -> tuple[Path, Path]:
    """(base_dir, finetuned_dir): a tiny fp16 Llama with tied embeddings, fine-tune changes the embedding."""
    return make_llama_pair(tmp_path_factory.mktemp("llama_pair_tied"), seed=1, dtype="float16", tied=True)
