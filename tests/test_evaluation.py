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


def test_logits_are_built_a_chunk_at_a_time(tiny_lm):
    """Line documents are first windows that score every token: the head must still see few rows.

    A 151,936-row head (Qwen3's) over 8 documents of ~50 tokens in one batch: the old code built
    batch x max(n_scored) = 8 x ~50 rows of logits at once; chunks hold LOGIT_CHUNK_ELEMENTS values.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = tiny_lm
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=151_936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    docs = [f"{i}. {DOCS[0]} {DOCS[1]} {DOCS[3]}" for i in range(8)]
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(out.numel() // out.shape[-1]))
    try:
        score = ev.score_documents(model, tok, docs, max_length=128, stride=64, batch_size=8, progress=False)
    finally:
        handle.remove()
    per_chunk = ev.LOGIT_CHUNK_ELEMENTS // cfg.vocab_size
    assert per_chunk == 220
    assert score.tokens > 300  # one batch scores more positions than a chunk holds
    assert max(rows) <= per_chunk, rows
    assert sum(rows) - 8 == score.tokens  # each scored position once, plus one row per window in the forward
    assert score.nll_nats == pytest.approx(reference_nll(model, tok, docs, 128, 64), rel=1e-5)


def test_frozen_model_head_sees_contiguous_rows(tiny_lm):
    """The head's input in the model's own forward is contiguous even when no weight needs grad.

    A strided (batch, 1, hidden) view with frozen weights (a merged adapter, PEFT's base) sends torch's
    matmul to bmm against the head weight expanded once per window: on the demo's 69k-row SmolLM2
    extension that copy made scoring ~4x slower for trained models than for the same model at init.
    """
    model, tok = tiny_lm
    model.requires_grad_(False)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(a[0].is_contiguous()))
    try:
        ev.score_documents(model, tok, DOCS, max_length=12, stride=5, batch_size=4, progress=False)
    finally:
        handle.remove()
        model.requires_grad_(True)
    assert seen and all(seen), seen


@pytest.mark.parametrize("max_length,stride", [(12, 5), (256, 128)])
def test_chunk_boundaries_do_not_change_the_score(tiny_lm, monkeypatch, max_length, stride):
    model, tok = tiny_lm
    monkeypatch.setattr(ev, "LOGIT_CHUNK_ELEMENTS", 5 * len(tok))  # 5 positions per chunk
    ref = reference_nll(model, tok, DOCS, max_length, stride)
    s = ev.score_documents(model, tok, DOCS, max_length=max_length, stride=stride, batch_size=3, progress=False)
    assert s.nll_nats == pytest.approx(ref, rel=1e-5)


def test_peft_head_and_4bit_body_score_as_their_own_forward(tiny_lm, tmp_path):
    """The head module is called directly: PEFT's wrappers on it (trainable token rows) must still apply."""
    import copy

    from peft import LoraConfig, get_peft_model

    model, tok = tiny_lm
    ids = sorted({t for d in DOCS for t in tok(d, add_special_tokens=False)["input_ids"]})[:40]
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices={"embed_tokens": ids})
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 0.5)
    s = ev.score_documents(peft_model, tok, DOCS, max_length=12, stride=5, batch_size=3, progress=False)
    assert s.nll_nats == pytest.approx(reference_nll(peft_model, tok, DOCS, 12, 5), rel=1e-5)
    with peft_model.disable_adapter():
        plain = ev.score_documents(peft_model, tok, DOCS, max_length=12, stride=5, batch_size=3, progress=False)
    assert abs(plain.nll_nats - s.nll_nats) > 1e-2 * s.nll_nats  # the adapter (and its head rows) matter

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model.save_pretrained(tmp_path / "m")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    q4 = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=quant, device_map="cpu", dtype=torch.float32)
    import bitsandbytes as bnb

    for m in q4.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # the CPU repacking trap (shared/OFFLINE.md)
    s4 = ev.score_documents(q4, tok, DOCS, max_length=12, stride=5, batch_size=3, progress=False)
    assert s4.nll_nats == pytest.approx(reference_nll(q4, tok, DOCS, 12, 5), rel=1e-5)


def test_logits_changed_after_the_head_are_refused(tiny_lm):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    _, tok = tiny_lm
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.05)
    with pytest.raises(ValueError, match="changes its logits after the output embedding"):
        ev.score_documents(Gemma2ForCausalLM(cfg).eval(), tok, DOCS[:2], progress=False)


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


def test_read_documents_splits_on_newline_only_and_strips_a_bom(tmp_path):
    """bpc split documents on \\x0b \\x0c \\x1c \\x85 \\u2028 (str.splitlines) and kept a UTF-8 BOM, while
    corpus and vocab split on \\n only (issue 10 item 11)."""
    p = tmp_path / "t.txt"
    p.write_bytes("\ufeffbir\x0biki\x0cüç\x1cdört\x85beş\u2028altı\r\nyedi\n".encode("utf-8"))
    assert ev.read_documents(p) == ["bir\x0biki\x0cüç\x1cdört\x85beş\u2028altı", "yedi"]


def test_read_documents_bounds_a_huge_line_and_says_so(tmp_path):
    """A 2 MB single line (issue 10 item 10) is scored as consecutive pieces, with a note."""
    from trkit.corpus import MAX_DOCUMENT_CHARS

    p = tmp_path / "one-line.txt"
    line = ("Türkiye'nin eğitim sisteminde gelişmeler var. " * 45_000).strip()
    p.write_text(line + "\n", encoding="utf-8")
    notes: list[str] = []
    docs = ev.read_documents(p, notes=notes)
    assert len(line) > 2 * MAX_DOCUMENT_CHARS and len(docs) == 3 and "".join(docs) == line
    assert all(len(d) <= MAX_DOCUMENT_CHARS for d in docs)
    assert len(notes) == 1 and "3 consecutive pieces" in notes[0]


def test_cli_reports_language_totals_and_refuses_a_bad_batch_size(tiny_lm, tmp_path, capsys):
    from trkit.cli import main

    model, tok = tiny_lm
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    tr = tmp_path / "tr.txt"
    tr.write_text("\n".join(DOCS[:3]) + "\n", encoding="utf-8")
    en = tmp_path / "en.txt"
    en.write_text(DOCS[3] + "\nReturn the value of the named attribute of the object.\n", encoding="utf-8")
    assert main(["bpc", "--model", str(tmp_path / "m"), "--text", str(tr), str(en), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.strip().split("\n")}
    assert "Turkish" in rows["tr.txt"] and "English" in rows["en.txt"]
    assert out.count("(all)") == 2 and "pooled" not in out
    with pytest.raises(SystemExit):
        main(["bpc", "--model", str(tmp_path / "m"), "--text", str(tr), "--batch-size", "-1"])
    assert "argument --batch-size: must be an integer >= 1" in capsys.readouterr().err
