"""Tokenizer report: counts, new-token use, and that round-trip / coarsening failures are detected."""

from __future__ import annotations

import json

import pytest

from trkit import tokstats, vocab

TEXTS = {
    "tr": ["Geliyorum eve, yarın görüşürüz.", "Öğrenciler için hazırlanmış materyaller.",
           "Türkiye'nin eğitim sisteminde gelişmeler."] * 3,
    "en": ["The quick brown fox jumps over the lazy dog.", "Return the value of the named attribute."],
}


@pytest.fixture(scope="module")
def small_ext(tmp_path_factory, qwen3_tokenizer_dir):
    out = tmp_path_factory.mktemp("ts") / "ext"
    vocab.extend_tokenizer(qwen3_tokenizer_dir, {"tr": TEXTS["tr"]}, 15, out, progress=False)
    return out


def test_base_against_itself(qwen3_tokenizer_dir):
    rep = tokstats.compare(qwen3_tokenizer_dir, qwen3_tokenizer_dir, TEXTS)
    assert rep["n_new_tokens"] == 0
    for st in rep["sources"].values():
        assert st["tokens"] == st["base_tokens"] and st["pct_fewer"] == 0.0
        assert st["roundtrip_failures"] == 0 and st["coarsening_violations"] == 0
        assert st["new_tokens_used_share"] is None


def test_extension_report(qwen3_tokenizer_dir, small_ext):
    rep = tokstats.compare(qwen3_tokenizer_dir, small_ext, TEXTS, morphology=True)
    tr, en = rep["sources"]["tr"], rep["sources"]["en"]
    assert rep["n_new_tokens"] == 15 and rep["base_vocab_size"] == 151_669
    assert tr["words"] == 3 * (4 + 4 + 4)
    assert tr["tokens"] < tr["base_tokens"] and tr["pct_fewer"] > 20
    assert tr["fertility"] == pytest.approx(tr["tokens"] / tr["words"])
    assert tr["chars_per_token"] == pytest.approx(tr["chars"] / tr["tokens"])
    assert tr["new_tokens_used"] + tr["new_tokens_never_used"] == 15
    assert en["pct_fewer"] == 0.0 and en["new_tokens_used"] == 0
    assert tr["roundtrip_failures"] == 0 and tr["coarsening_violations"] == 0
    assert 0.0 <= tr["morph_boundary_share"] <= 1.0 and tr["word_internal_boundaries"] > 0
    assert rep["all"]["tokens"] == tr["tokens"] + en["tokens"]
    assert rep["all"]["new_tokens_used"] == tr["new_tokens_used"]
    table = tokstats.format_table(rep)
    assert "Turkish (all)" in table and "English (all)" in table and "ALL" not in table


def test_add_tokens_breakage_is_detected(tmp_path, qwen3_tokenizer):
    """The ``add_tokens`` route (what common scripts do) breaks round trips on Turkish letters."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer.name_or_path)
    tok.add_tokens(["Öğrenciler", "eğitim", "görüşürüz", "hazırlanmış"])
    rep = tokstats.compare(qwen3_tokenizer, tok, {"tr": TEXTS["tr"]})
    st = rep["sources"]["tr"]
    assert st["roundtrip_failures"] > 0 or st["coarsening_violations"] > 0


def test_coarsening_violation_detected(qwen3_tokenizer_dir, smollm2_dir):
    # a different tokenizer is not a coarsening of Qwen3's
    rep = tokstats.compare(qwen3_tokenizer_dir, smollm2_dir, {"tr": TEXTS["tr"]})
    assert rep["sources"]["tr"]["coarsening_violations"] > 0


def test_word_token_counts(qwen3_tokenizer_dir, small_ext):
    docs = ["Geliyorum eve, yarın görüşürüz."]
    base = tokstats.word_token_counts(qwen3_tokenizer_dir, docs)
    ext = tokstats.word_token_counts(small_ext, docs)
    assert len(base) == len(ext) == 4
    assert sum(ext) <= sum(base) and all(n >= 1 for n in ext)


def test_read_documents(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("bir\n\n  \niki\n", encoding="utf-8")
    assert tokstats.read_documents(p) == ["bir", "iki"]
    assert tokstats.read_documents(["a", "", "b"]) == ["a", "b"]


def test_cli_json(tmp_path, small_ext, capsys):
    from trkit.cli import main

    f = tmp_path / "tr.txt"
    f.write_text("\n".join(TEXTS["tr"]), encoding="utf-8")
    assert main(["tokstats", "--base", "qwen3", "--tokenizer", str(small_ext), "--text", str(f), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["sources"]["tr"]["pct_fewer"] > 20
    assert main(["tokstats", "--tokenizer", str(small_ext), "--text", str(tmp_path / "nope.txt")]) == 2


def test_language_totals_and_an_aligned_table(qwen3_tokenizer_dir, small_ext):
    """ALL pooled English with Turkish and the columns did not line up (issue 15 item 5)."""
    rep = tokstats.compare(qwen3_tokenizer_dir, small_ext, TEXTS)
    assert rep["languages"] == {"tr": "Turkish", "en": "English"}
    assert all(isinstance(v, (int, float)) or v is None for st in rep["sources"].values() for v in st.values())
    tr, en = rep["totals"]["Turkish"], rep["totals"]["English"]
    assert tr["tokens"] == rep["sources"]["tr"]["tokens"] and en["tokens"] == rep["sources"]["en"]["tokens"]
    assert tr["pct_fewer"] == pytest.approx(rep["sources"]["tr"]["pct_fewer"]) and en["pct_fewer"] == 0.0
    assert list(rep["totals"]) == ["Turkish", "English"]
    forced = tokstats.compare(qwen3_tokenizer_dir, small_ext, TEXTS, languages={"tr": "Turkish", "en": "Turkish"})
    assert list(forced["totals"]) == ["Turkish"] and forced["totals"]["Turkish"]["tokens"] == forced["all"]["tokens"]
    lines = tokstats.format_table(rep).split("\n")
    assert len({len(line) for line in lines}) == 1  # every row padded to the same columns
    rule = next(line for line in lines if set(line) <= {"-", " "})  # the dashes under each column
    ends = [i for i, ch in enumerate(rule) if ch == "-" and (i + 1 == len(rule) or rule[i + 1] == " ")]
    assert len(ends) == 2 + len(tokstats.TABLE_COLUMNS)
    for line in [lines[0], *(line for line in lines[1:] if line != rule)]:
        assert all(line[i] != " " for i in ends[2:]), line  # numbers end where their header ends


def test_invalid_bytes_are_refused_with_the_file_named(tmp_path):
    """Invalid UTF-8 was replaced silently by U+FFFD (issue 10 item 11)."""
    p = tmp_path / "t.txt"
    p.write_bytes(b"bir\n\xff\xfe iki\n")
    with pytest.raises(ValueError, match=r"t.txt line 2 is not valid UTF-8"):
        tokstats.read_documents(p)


def test_check_extension(qwen3_tokenizer_dir, small_ext, smollm2_dir):
    ext, base = tokstats.check_extension("qwen3", small_ext)
    assert ext.vocab_size - ext.base_vocab_size == 15 and base.get_vocab_size() == 151_669
    with pytest.raises(ValueError, match="is not the base of the extension"):
        tokstats.check_extension(smollm2_dir, small_ext)
    with pytest.raises(ValueError, match="not `trkit vocab`"):  # the asset directory has a manifest of its own
        tokstats.check_extension("qwen3", qwen3_tokenizer_dir)
