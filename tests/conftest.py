"""Shared fixtures. Offline assets come from trkit.assets (fetched once into TRKIT_CACHE)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see trkit/__init__.py
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


@pytest.fixture(scope="session")
def qwen_ext(tmp_path_factory):
    """A 64-token extension of the real Qwen3 tokenizer, learned on a few hundred Turkish lines."""
    from trkit import assets
    from trkit.vocab import extend_tokenizer

    docs = assets.corpus_files()["web"].read_text(encoding="utf-8").splitlines()[:300]
    out = tmp_path_factory.mktemp("ext") / "qwen3-tr64"
    extend_tokenizer("qwen3", docs, n_new_tokens=64, out_dir=out, progress=False)
    from trkit import embeddings

    return embeddings.load_extension(out)


@pytest.fixture(scope="session")
def tied_dir(tmp_path_factory, tiny_qwen3_dir):
    """A tiny Qwen3 with tied embeddings (like Qwen3-0.6B..4B and SmolLM2), saved with the Qwen3 tokenizer."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from trkit.assets import tiny_qwen3_config

    cfg = tiny_qwen3_config()
    import torch

    cfg.tie_word_embeddings = True
    torch.manual_seed(1)
    model = Qwen3ForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tied") / "tiny-tied"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_qwen3_dir).save_pretrained(out)
    return out
