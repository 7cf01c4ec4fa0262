"""Bits per character: windows, batching, the CLI. A tiny random Llama keeps it fast."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trkit import evaluation as ev


@pytest.fixture(scope="module")
def tiny_lm():
    """A random 2-layer Llama over SmolLM2's tokenizer (49,152 ids); fast on CPU."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trkit import assets

    tok = AutoTokenizer.from_pretrained(assets.smollm2_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), tok


DOCS = ["Geliyorum eve, yarın görüşürüz.", "Öğrenciler için hazırlanmış materyaller.",
        "Türkiye'nin eğitim sisteminde gelişmeler. " * 6, "The quick brown fox jumps over the lazy dog."]


def reference_nll(model, tok, docs, max_length, stride):
    """One window at a time, no batching, no padding: the HF perplexity recipe written out."""
    prefix = ev.document_prefix_id(tok)
    total = 0.0
    for d in docs:
        seq = [prefix] + tok(d, add_special_tokens=False)["input_ids"]
        scored = 0  # targets 1..scored are done
        end = 0
        while scored < len(seq) - 1:
            end = min(len(seq) - 1, max(end, 0) + (max_length if scored == 0 else stride))
            start = max(0, end - max_length)
            x = torch.tensor([seq[start:end + 1]])
            with torch.no_grad():
                logp = torch.log_softmax(model(x[:, :-1]).logits[0].float(), -1)
            for j in range(scored + 1, end + 1):  # target index j is predicted at position j-1-start
                total -= logp[j - 1 - start, seq[j]].item()
            scored = end
    return total


def test_sliding_windows_cover_every_target_once():
    for n in [1, 5, 16, 17, 100]:
        for L, S in [(16, 8), (16, 16), (7, 3), (1, 1)]:
            wins = ev.sliding_windows(n, L, S)
            covered = []
            for start, end, m in wins:
                assert end - start <= L and m <= end - start
                covered += list(range(end - m + 1, end + 1))
                if start > 0:  # a full window: every new target sees >= L - S tokens of context
                    assert end - m + 1 - start >= L - S
            assert covered == list(range(1, n + 1))
    with pytest.raises(ValueError):
        ev.sliding_windows(10, 8, 9)


@pytest.mark.parametrize("max_length,stride", [(256, 128), (12, 5), (8, 8)])
def test_score_matches_unbatched_reference(tiny_lm, max_length, stride):
    model, tok = tiny_lm
    ref = reference_nll(model, tok, DOCS, max_length, stride)
    for batch_size in (1, 3):
        s = ev.score_documents(model, tok, DOCS, max_length=max_length, stride=stride, batch_size=batch_size,
                               progress=False)
        assert s.nll_nats == pytest.approx(ref, rel=1e-4)
    assert s.tokens == sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in DOCS)
    assert s.chars == sum(len(d) for d in DOCS)
    assert s.bytes == sum(len(d.encode()) for d in DOCS) > s.chars  # Turkish letters are 2 bytes
    assert s.bits_per_char == pytest.approx(ref / (s.chars * math.log(2)), rel=1e-4)


def test_uniform_model_gives_log2_vocab_bits_per_token(tiny_lm):
    model, tok = tiny_lm
    import copy

    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.get_output_embeddings().weight.zero_()  # tied: zero logits, uniform distribution
    s = ev.score_documents(flat, tok, DOCS, progress=False)
    assert s.bits_per_token == pytest.approx(math.log2(len(tok)), rel=1e-5)
    assert ev.bits_per_char(flat, tok, DOCS, progress=False) == pytest.approx(s.tokens * math.log2(len(tok)) / s.chars)


def test_errors(tiny_lm, tmp_path):
    model, tok = tiny_lm
    with pytest.raises(FileNotFoundError):
        ev.read_documents(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        ev.read_documents(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe abc")
    with pytest.raises(ValueError, match="UTF-8"):
        ev.read_documents(tmp_path / "bad.txt")
    small = torch.nn.Embedding(100, 32)
    import copy

    m = copy.deepcopy(model)
    m.set_input_embeddings(small)
    with pytest.raises(ValueError, match="embedding rows"):
        ev.score_documents(m, tok, ["ğüşiöç"], progress=False)


def test_cli_json(tiny_lm, tmp_path, capsys):
    from trkit.cli import main

    model, tok = tiny_lm
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("\n".join(DOCS[:2]) + "\n", encoding="utf-8")
    b.write_text("\n".join(DOCS[2:]) + "\n", encoding="utf-8")
    assert main(["bpc", "--model", str(tmp_path / "m"), "--text", str(a), str(b), "--json", "--dtype", "float32"]) == 0
    report = json.loads(capsys.readouterr().out)
    fa, fb = report["files"][str(a)], report["files"][str(b)]
    pooled = report["pooled"]
    assert pooled["chars"] == fa["chars"] + fb["chars"] and pooled["tokens"] == fa["tokens"] + fb["tokens"]
    assert pooled["bits_per_char"] == pytest.approx(
        (fa["nll_nats"] + fb["nll_nats"]) / (pooled["chars"] * math.log(2)))
    direct = ev.score_documents(model, tok, DOCS[:2], progress=False)
    assert fa["bits_per_char"] == pytest.approx(direct.bits_per_char, rel=1e-5)
    assert main(["bpc", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "nope.txt")]) == 2
