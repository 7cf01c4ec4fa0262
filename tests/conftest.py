"""Shared fixtures. Offline assets come from trkit.assets (fetched once into TRKIT_CACHE)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir():
    from trkit import assets

    return assets.qwen3_tokenizer_dir()


@pytest.fixture(scope="session")
def qwen3_tokenizer(qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_dir():
    from trkit import assets

    return assets.smollm2_dir()


@pytest.fixture
def tiny_qwen3():
    from trkit import assets

    return assets.tiny_qwen3()


@pytest.fixture(scope="session")
def tiny_qwen3_dir():
    from trkit import assets

    return assets.tiny_qwen3_dir()
